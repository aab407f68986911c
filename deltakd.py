"""
Delta Knowledge Distillation (Cao, Kang, Xing, Jiang 2025, arXiv 2509.14526): the loss and a plain
DDP training loop, one code path from one CPU process to torchrun on 8 GPUs.

    python deltakd.py --method=delta --student=DIR --teacher_ft=DIR --teacher_raw=DIR --train_data=FILE
    torchrun --nproc_per_node=8 deltakd.py --method=delta ...
    python deltakd.py --dry_run=true ...                 # the per-GPU memory plan, from config.json alone
    python assets/demo/demo.py                           # the demo: the whole method on bundled data, CPU

The student learns the shift the teacher acquired in finetuning rather than its absolute output:
    pi*(y|x) = (1/Z) pi_t^ft(y|x) (pi_s^raw(y|x) / pi_t^raw(y|x))^alpha,   each pi = softmax(z / tau)
             = softmax((z_ft + alpha (z_s^raw - z_t^raw)) / tau)           (the normalisers cancel)
    L = lam * L_SFT + (1 - lam) * KL(pi* || pi_theta),   averaged over supervised (assistant) tokens.
alpha = 0 is forward-KL distillation from the finetuned teacher; lam = 1 is SFT.

Sections: config and METHODS, the loss, set-up/models/data, stored targets, evaluation, checkpoints,
training (the KD step, the MiniLLM step, the loop), dry run, main.
"""

import contextlib
import dataclasses
import errno
import functools
import glob
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import sys
import threading
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError
from tokenizers import Tokenizer

import data
import qwen
import rouge

# -----------------------------------------------------------------------------
# all hyperparameters, overridden by --key=value; parse_args writes each method's settings in (resolve)


@dataclasses.dataclass
class Config:
    # models (HF-format directories); which ones a run reads is decided in model_dirs
    student: str = ""           # raw student: the initialisation, and pi_s^raw for delta
    teacher_ft: str = ""        # finetuned teacher pi_t^ft (e.g. Qwen2.5-7B-Instruct)
    teacher_raw: str = ""       # raw teacher pi_t^raw (e.g. Qwen2.5-7B)
    student_raw: str = ""       # pi_s^raw if it is not the initialisation (default: --student)
    tokenizer: str = ""         # tokenizer.json; default: the one in --student
    # data
    train_data: str = ""        # .jsonl / .json / .parquet (formats: see data.py)
    max_rows: int = 0           # use only the first max_rows rows of train_data (0: all)
    eval_data: str = ""         # held-out file; empty: hold out eval_size rows of train_data
    eval_size: int = 64         # rows of train_data held out for evaluation when there is no eval_data
    max_len: int = 1024         # tokens per example, longer ones are truncated
    system_prompt: str = data.SYSTEM_PROMPT_BASE  # the system turn of every chat (Qwen2.5 base's default)
    skip_bad_rows: bool = False  # skip (and count) malformed rows instead of stopping
    cache_dir: str = ""         # token caches, shared by runs on the same data; default out_dir/cache (or targets_dir/)
    # method (METHODS fixes some of these per method; a setting the run does not read becomes None)
    method: str = "delta"       # sft | fkl | rkl | delta | seqkd | minillm (see METHODS)
    divergence: str = "fkl"     # delta: fkl = KL(pi* || pi_theta) (the paper), rkl = KL(pi_theta || pi*)
    lam: float = 0.5            # weight of the SFT term
    alpha: float = 1.0          # strength of the finetuning shift; 0: the raw models are not loaded
    temperature: float = 1.0    # tau of every distribution of the KD term (no tau^2 factor)
    seqkd_max_new_tokens: int = 256  # SeqKD: the longest teacher answer
    # on-policy distillation: answers sampled from the student, scored by the frozen models live
    on_policy: float = 0.0      # share of micro-batches answered by the student's own samples (GKD's lmbda); 0: none
    on_policy_temperature: float = 1.0  # the student's sampling temperature, top_p 1 (0: greedy)
    on_policy_max_new_tokens: int = 256  # longest sampled answer (and at most max_len in all)
    # MiniLLM (--method=minillm; LMOps' defaults): every micro-batch sampled, a PPO step on each rollout batch
    ppo_epochs: int = 4         # optimizer updates on each rollout batch (the step's micro-batches, all ranks)
    ppo_clip: float = 0.2       # the ratio w q_theta / q_old is clipped to [1 - clip, 1 + clip]
    teacher_mix: float = 0.2    # each token is drawn from (1 - mix) q_theta + mix p_teacher
    reward_gamma: float = 0.95  # discount of the reward-to-go
    reward_scaling: float = 0.5  # r_t = clip((log p - log q_theta) / scaling, +-reward_clip)
    reward_clip: float = 100.0  # the bound of a reward r_t
    # MiniLLM's language-modelling term (LMOps' --lm-data-dir): a pretraining micro-batch beside each rollout
    # micro-batch at every update, its loss lm_coef * [(1 - kd_ratio) cross-entropy + kd_ratio KL(pi_t^ft || student)]
    pretrain_data: str = ""     # plain text or chat rows, as --train_data; empty: no such term (LMOps' *_no_pt scripts)
    lm_coef: float = 1.0        # weight of the language-modelling term
    kd_ratio: float = 0.5       # LMOps' scripts' value
    # stored targets ("decoupled teachers"): the frozen models run once, training loads none of them
    targets_dir: str = ""       # empty: frozen models run live at every step
    topk: int = 64              # target probabilities kept per supervised token (+ the mass of the rest)
    targets_dtype: str = "float16"  # storage of the top-k log-probabilities: float16 | float32
    targets_shard: int = 256    # examples per shard file (the unit an interrupted pass resumes from)
    targets_only: bool = False  # compute the stored targets and stop (e.g. on other GPUs, before training)
    # optimisation
    batch_size: int = 4         # sequences per micro-batch per rank
    grad_accum: int = 1         # micro-batches per rank per optimizer step
    epochs: int = 1             # passes over train_data (where max_steps is 0)
    max_steps: int = 0          # 0: epochs * steps per epoch
    lr: float = 1e-5            # AdamW peak learning rate (a method may set its own default)
    min_lr_ratio: float = 0.1   # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 0       # linear warmup from 0, then cosine decay
    weight_decay: float = 0.0   # AdamW, on matrices only
    beta1: float = 0.9          # AdamW
    beta2: float = 0.95         # AdamW
    grad_clip: float = 1.0      # 0 disables
    zero: bool = False          # shard AdamW state across ranks (ZeroRedundancyOptimizer)
    grad_checkpointing: bool = False  # recompute each layer in backward: less memory, ~1/3 more compute
    compile: bool = False       # torch.compile the student, frozen models and loss chunk (lengths padded to x64)
    loss_impl: str = "chunked"  # chunked (memory-flat) | dense (full logits, for checking)
    chunk_size: int = 512       # supervised tokens per loss chunk: 3 (chunk, vocab) fp32 buffers for a KD term
    teacher_dtype: str = "bfloat16"  # frozen models; the student trains in fp32
    autocast: str = "auto"      # bf16 | none; auto: bf16 on CUDA, none on CPU
    # evaluation: ROUGE of generated answers on held-out prompts, and teacher-forced NLL / KL / top-1
    eval_every: int = 0         # 0: only at the end
    eval_max_new_tokens: int = 256  # 0: the teacher-forced figures only, nothing generated
    eval_temperature: float = 0.0  # 0: greedy; > 0: sampled at this temperature, top_p 1 (MiniLLM / DistiLLM)
    eval_seeds: int = 1         # sampled answers per prompt (seeds seed, seed+1, ...); ROUGE is their mean
    eval_batch_size: int = 16   # prompts generated together
    # run
    out_dir: str = "out"        # checkpoints, metrics.jsonl, evaluations (one run per out_dir)
    save_every: int = 0         # 0: only at the end
    keep_last: int = 2          # checkpoints kept (older ones are pruned)
    resume: bool = False        # continue from the newest intact checkpoint in out_dir (the same run: RUN_KEYS)
    resume_allow: str = ""      # comma-separated RUN_KEYS a resumed run may change (e.g. a model that moved)
    seed: int = 1337            # data order, sampling, initial RNG state
    device: str = "auto"        # auto: cuda (rank LOCAL_RANK) if there is one, else cpu
    peak_tflops: float = 0.0    # per device, for MFU in the log; 0: 989 on H100/H200, 312 on A100 (bf16 dense), else none
    quiet: bool = False         # no per-step lines (metrics.jsonl is still written)
    dry_run: bool = False       # print the per-GPU memory plan and FLOPs per step from config.json alone, then exit
    eval_only: bool = False     # score --student on --eval_data (with --teacher_ft: the teacher-forced KL) and stop


@dataclasses.dataclass(frozen=True)
class Method:
    forced: dict = dataclasses.field(default_factory=dict)  # the settings it fixes; divergence None: no KD term
    shift: bool = False             # the target adds the finetuning shift alpha (z_s^raw - z_t^raw): Delta-KD
    generator: str | None = None    # seqkd: the model whose greedy answers replace the training answers
    policy_gradient: bool = False   # MiniLLM: the KD term (reverse KL) plus a PPO policy gradient on the samples
    lr: float | None = None         # the method's own default --lr (where --lr is not given)


# the one table of methods: everything else reads it, through the settings resolve writes into the config
METHODS = {
    "sft": Method(forced={"divergence": None, "lam": 1.0}),
    "fkl": Method(forced={"divergence": "fkl"}),
    "rkl": Method(forced={"divergence": "rkl"}),
    "delta": Method(shift=True),  # --divergence: fkl (the paper's) or rkl
    "seqkd": Method(forced={"divergence": None, "lam": 1.0}, generator="teacher_ft"),
    # LMOps' MiniLLM (docs/minillm.md), its language-modelling term with --pretrain_data; its samples have no
    # labels (lam 0), and its weights, rewards and KL are at temperature 1
    "minillm": Method(forced={"divergence": "rkl", "lam": 0.0, "on_policy": 1.0, "temperature": 1.0,
                              "on_policy_temperature": 1.0}, policy_gradient=True, lr=5e-6),
}
MINILLM_KEYS = ("ppo_epochs", "ppo_clip", "teacher_mix", "reward_gamma", "reward_scaling", "reward_clip",
                "pretrain_data", "lm_coef", "kd_ratio")


def resolve(cfg, given):
    """Writes into cfg the settings the method makes, so that the printed config and run.json say what the run
    does: METHODS' forced values, then None (or off) for each setting the run does not read. A flag in given that
    says otherwise is refused in one line, naming it and why."""
    name, method = f"--method={cfg.method}", METHODS[cfg.method]

    def fix(settings, why):
        for key, value in settings.items():
            if key in given and getattr(cfg, key) != value:
                raise SystemExit(f"--{key}={getattr(cfg, key)} has no effect: {why(value)}")
            setattr(cfg, key, value)

    fix(method.forced, lambda v: f"{name} does not read it" if v is None else f"{name} fixes it at {v}")
    rules = [(lambda: not method.shift, {"alpha": None}, f"{name} has no finetuning shift (delta's)"),
             (lambda: cfg.divergence is None, {"temperature": None, "on_policy": 0.0, "targets_dir": ""},
              f"{name} has no teacher distribution"),
             (lambda: cfg.on_policy, {"targets_dir": ""}, "the samples change at every step, so no stored target "
              "can score them; drop --targets_dir (the frozen models then run live)"),
             (lambda: cfg.on_policy == 1, {"lam": 0.0}, "at --on_policy=1 every answer is the student's own "
              "sample, which has no labels"),
             (lambda: not cfg.on_policy, {"on_policy_temperature": None, "on_policy_max_new_tokens": None},
              "it goes with --on_policy > 0"),
             (lambda: not method.policy_gradient, dict.fromkeys(MINILLM_KEYS), "it goes with --method=minillm"),
             (lambda: not cfg.pretrain_data, {"lm_coef": None, "kd_ratio": None}, "it goes with --pretrain_data"),
             (lambda: not method.generator, {"seqkd_max_new_tokens": None}, "it goes with --method=seqkd"),
             (lambda: not cfg.targets_dir, {"topk": None, "targets_dtype": None, "targets_shard": None,
                                            "targets_only": False}, "it goes with --targets_dir"),
             (lambda: cfg.eval_data, {"eval_size": None}, "--eval_data is the held-out set"),
             (lambda: int(os.environ.get("WORLD_SIZE", 1)) == 1, {"zero": False}, "it shards the optimizer state "
              "across torchrun's processes; one process has nothing to shard (--dry_run: set WORLD_SIZE=N)"),
             (lambda: not cfg.eval_temperature, {"eval_seeds": None}, "it goes with --eval_temperature > 0 "
              "(greedy answers are scored once)")]
    for applies, settings, why in rules:  # in order: each condition sees what the rules before it wrote
        if applies():
            fix(settings, lambda v: why)
    if method.lr is not None and "lr" not in given:
        cfg.lr = method.lr
    return cfg


# the values each numeric flag accepts, refused in parse_args before any work (a float must also be finite)
FLAG_RANGES = [
    (("batch_size", "grad_accum", "epochs", "topk", "targets_shard", "chunk_size", "eval_batch_size", "eval_seeds",
      "seqkd_max_new_tokens", "on_policy_max_new_tokens", "ppo_epochs"), lambda v: v >= 1, ">= 1"),
    (("max_rows", "eval_size", "max_steps", "warmup_steps", "weight_decay", "grad_clip", "alpha", "eval_every",
      "eval_max_new_tokens", "save_every", "keep_last", "peak_tflops", "lm_coef"),
     lambda v: v >= 0, ">= 0"),
    (("lr", "ppo_clip", "reward_scaling", "reward_clip"), lambda v: v > 0, "> 0"),
    # logits of ~30 / 1e-3 stay inside even float16's range (65504); far below, z / tau overflows
    (("temperature",), lambda v: v >= 1e-3, ">= 0.001"),
    (("eval_temperature", "on_policy_temperature"), lambda v: v == 0 or v >= 1e-3, "0 (greedy) or >= 0.001"),
    (("seed",), lambda v: 0 <= v < 2**32, "in [0, 2**32)"),  # numpy's bound
    (("lam", "min_lr_ratio", "on_policy", "reward_gamma", "kd_ratio"), lambda v: 0 <= v <= 1, "in [0, 1]"),
    (("beta1", "beta2", "teacher_mix"), lambda v: 0 <= v < 1, "in [0, 1)"),
    (("max_len",), lambda v: v >= 2, ">= 2 (a prompt token and a supervised one)"),
]
CHOICES = {"method": tuple(METHODS), "divergence": ("fkl", "rkl"), "loss_impl": ("chunked", "dense"),
           "targets_dtype": ("float16", "float32"), "autocast": ("auto", "bf16", "none"),
           "teacher_dtype": ("bfloat16", "float16", "float32")}


BOOLS = {"true": True, "1": True, "false": False, "0": False}


def parse_flags(argv):
    """(cfg, the keys given) from --key=value flags, each type-, range- and choice-checked; nothing resolved."""
    cfg, given, types = Config(), set(), {f.name: f.type for f in dataclasses.fields(Config)}
    for arg in argv:
        if arg in ("--help", "-h"):
            print(usage())
            raise SystemExit(0)
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"arguments are --key=value, got {arg!r}")
        key, val = arg[2:].split("=", 1)
        if key not in types:
            raise SystemExit(f"unknown config key {key!r}; known keys: {', '.join(types)}")
        try:
            setattr(cfg, key, BOOLS[val.lower()] if types[key] is bool else types[key](val))
        except (KeyError, ValueError):
            raise SystemExit(f"--{key}={val}: expected {types[key].__name__}") from None
        given.add(key)
    for keys, ok, text in FLAG_RANGES:
        for key in keys:
            v = getattr(cfg, key)
            if not (ok(v) and math.isfinite(v)):
                raise SystemExit(f"--{key}={v}: must be {text} and finite")
    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise SystemExit(f"--{key}={getattr(cfg, key)}: expected one of {', '.join(choices)}")
    unknown = set(filter(None, cfg.resume_allow.split(","))) - set(RUN_KEYS) - set(RUN_FACTS)
    if unknown:
        raise SystemExit(f"--resume_allow={cfg.resume_allow}: {', '.join(sorted(unknown))} not among "
                         f"{', '.join(RUN_KEYS + RUN_FACTS)}")
    return cfg, given


def usage():
    """--help: every flag, its default and its meaning, grouped as Config groups them (Config's own lines)."""
    lines = ["python deltakd.py --key=value ...  (DDP: torchrun --nproc_per_node=N deltakd.py ...); the README has "
             "the commands"]
    for line in inspect.getsource(Config).splitlines()[2:]:  # after the decorator and the class line
        flag = re.match(r"    (\w+): [^=]+= .*?(?:  # (.*))?$", line)
        lines.append(f"  --{flag[1]}={getattr(Config, flag[1])}".ljust(35) + f" {flag[2] or ''}" if flag else
                     "\n" * lines[-1].startswith(("  --", "python")) + line.strip().removeprefix("# "))
    return "\n".join(lines)


# what --eval_only of a deltakd checkpoint takes from its run.json unless given (what the held-out examples, the
# answers and the teacher-forced figures depend on), so that it scores as that run's final evaluation did
EVAL_DEFAULTS = ("eval_data", "max_len", "system_prompt", "teacher_ft", "teacher_dtype", "autocast", "seed",
                 "eval_batch_size", "eval_max_new_tokens", "eval_temperature", "eval_seeds")


def checkpoint_defaults(cfg, given):
    path = os.path.join(cfg.student, "run.json")
    if not (cfg.eval_only and cfg.student and os.path.isfile(path)):
        return cfg
    try:
        with open(path) as f:
            theirs = json.load(f)
        settings = {**theirs["config"], **theirs["identity"]}  # the identity's paths are absolute
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{path}: not the run.json of a deltakd checkpoint ({data.first_line(e)})") from None
    taken = {k: settings[k] for k in EVAL_DEFAULTS if k not in given and settings.get(k) is not None}
    for key, value in taken.items():
        setattr(cfg, key, value)
    if taken and not cfg.quiet and launch_rank() == 0:
        print(f"--eval_only: from {path}, as the run that wrote it evaluated (a flag given overrides): "
              + " ".join(f"--{k}={v}" for k, v in taken.items()))
    return cfg


def parse_args(argv):
    # the run's config: the flags, an evaluated checkpoint's settings, then each method's settings written in
    cfg, given = parse_flags(argv)
    return resolve(checkpoint_defaults(cfg, given), given)

# -----------------------------------------------------------------------------
# the loss. Each formula once: the target's logits, each divergence, the SFT term; the dense
# reference, the chunked path and the stored-target path all call these.


def target_weights(divergence, alpha):
    """{role: weight} of the frozen models whose logits sum to the target's (before / tau): none without a KD term,
    z_ft alone for fkl/rkl, z_ft + alpha (z_s^raw - z_t^raw) for Delta-KD. A model of weight 0 is neither loaded
    nor run (at alpha = 0, a 7B and a 1.5B model at the paper's scale). A new linear shift operator goes here (a
    non-linear one replaces target_logits and chunk_target)."""
    if divergence is None:
        return {}
    if alpha:
        return {"teacher_ft": 1.0, "student_raw": alpha, "teacher_raw": -alpha}
    return {"teacher_ft": 1.0}


@dataclasses.dataclass(frozen=True)
class LossSpec:
    vocab: int                  # the tokenizer's real tokens: logits are sliced to these before any arithmetic
    lam: float = 0.5
    alpha: float | None = 1.0   # None: no finetuning shift (target_weights)
    temperature: float | None = 1.0
    divergence: str | None = "fkl"  # None: no KD term
    chunk_size: int = 512
    impl: str = "chunked"
    compile: bool = False       # chunk_loss through torch.compile (one graph per spec, any chunk length)
    ppo_clip: float = 0.2       # MiniLLM's PPO ratio clip (long_term_term)

    @property
    def weights(self):
        return target_weights(self.divergence, self.alpha)


def loss_spec(cfg, vocab):
    return LossSpec(vocab=vocab, lam=cfg.lam, alpha=cfg.alpha, temperature=cfg.temperature, divergence=cfg.divergence,
                    chunk_size=cfg.chunk_size, impl=cfg.loss_impl, compile=cfg.compile, ppo_clip=cfg.ppo_clip)


def target_logits(z, weights):
    """The target's logits (before / tau) from the frozen models' full logits by role, in float32."""
    return sum(w * z[role].float() for role, w in weights.items())


def forward_kl(logp, logq):
    """KL(p || q) per row from log-probabilities over the same support (vocabulary, or K+1 buckets)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def reverse_kl(logp, logq):
    """KL(q || p) per row, as forward_kl."""
    return (logq.exp() * (logq - logp)).sum(-1)


DIVERGENCES = {"fkl": forward_kl, "rkl": reverse_kl}  # a new divergence: a function here (autograd does its gradient)

# MiniLLM (Gu et al., ICLR 2024, as microsoft/LMOps computes it; docs/minillm.md) minimises KL(q_theta || p) on the
# student's teacher-mixed samples: the exact reverse KL at every sampled prefix, plus PPO's clipped policy gradient
# on the discounted, length-normalised reward-to-go, weighted for the teacher-mixed sampling.


def minillm_rewards(logp_y, logq_y, cfg):
    """r_t = clip((log p(y_t) - log q(y_t)) / reward_scaling, +-reward_clip) of each sampled token, q the student
    that sampled the rollout (its own distribution, not the mixture)."""
    return ((logp_y - logq_y) / cfg.reward_scaling).clamp(-cfg.reward_clip, cfg.reward_clip)


def reward_to_go(rewards, mask, gamma):
    """R_t = sum_{k >= t} gamma^(k - t) r_k / n_t along each sequence, n_t its supervised tokens at >= t: LMOps'
    return, r_t included, normalised by the remaining length (a one-token answer: R = r). rewards (N,) in the
    order of mask (B, T-1)'s True entries (shift_labels'), in float64."""
    r = torch.zeros(mask.shape, dtype=torch.float64, device=rewards.device)
    r[mask] = rewards.double()
    acc, out = torch.zeros_like(r[:, 0]), torch.zeros_like(r)
    for t in reversed(range(r.shape[1])):  # positions after a sequence's end hold r = 0: it does not leak back
        acc = r[:, t] + gamma * acc
        out[:, t] = acc
    return (out / mask.flip(1).cumsum(1).flip(1).clamp(min=1))[mask]


def importance_weights(logq_y, logp_y, mix):
    """w_t = q(y_t) / ((1 - mix) q(y_t) + mix p(y_t)): the sampled token under the student over under the mixture
    it was drawn from; per token, as LMOps (not a product over the prefix), so at most 1 / (1 - mix)."""
    if not mix:
        return torch.ones_like(logq_y)
    return torch.exp(logq_y - torch.logaddexp(logq_y + math.log1p(-mix), logp_y + math.log(mix)))


class PPORows(NamedTuple):
    """MiniLLM's per-token inputs to the long-term term, one row per sampled token (minillm_rollouts)."""
    logq_old: torch.Tensor      # (N,) log q_old(y_t): the student that sampled the rollout
    advantage: torch.Tensor     # (N,) A_t, the whitened reward-to-go
    weight: torch.Tensor        # (N,) w_t, the importance weight of the teacher-mixed sampling

    def __getitem__(self, s):  # rows, not fields, as StoredTarget
        return PPORows(self.logq_old[s], self.advantage[s], self.weight[s])


def long_term_term(logq_y, ppo, clip):
    """PPO's clipped surrogate sum_t max(-A_t rho_t, -A_t clip(rho_t, 1 - c, 1 + c)), rho_t = w_t q_theta(y_t) /
    q_old(y_t), from PPORows. Returns the sum and its derivative in log q_theta(y_t): -A_t rho_t where the
    unclipped side is the larger, else 0 (the clipped side is flat)."""
    ratio = ppo.weight * (logq_y - ppo.logq_old).exp()
    unclipped, clipped = -ppo.advantage * ratio, -ppo.advantage * ratio.clamp(1 - clip, 1 + clip)
    return torch.maximum(unclipped, clipped).sum(), torch.where(unclipped >= clipped, unclipped, 0.0)


def supervised_mask(labels):
    """The one next-token shift: position t predicts labels[t + 1]; (B, T-1), True where the loss looks."""
    return labels[:, 1:] != data.IGNORE_INDEX


def shift_labels(labels):
    """(mask of supervised positions (B, T-1), their label ids (N,)), as supervised_mask."""
    mask = supervised_mask(labels)
    return mask, labels[:, 1:][mask]


def negative_log_likelihood(logq, label_ids):
    """Sum over rows of -log q[y]: the SFT term, from log-probabilities at tau = 1."""
    return -logq.gather(-1, label_ids[:, None]).sum()


def sft_loss(student_logits, labels):
    """Sum of -log softmax(z)[y] over supervised positions, and their count."""
    mask, label_ids = shift_labels(labels)
    return negative_log_likelihood(F.log_softmax(student_logits[:, :-1][mask].float(), dim=-1), label_ids), mask.sum()


def kd_loss(student_logits, target_logprobs, labels, divergence="fkl", temperature=1.0):
    """Sum over supervised positions of DIVERGENCES[divergence](p, q), p = exp(target_logprobs),
    q = softmax(student_logits / tau); logits (B, T, V) aligned with labels (B, T). Returns
    (sum, count): the caller divides once by the global count. No tau^2 factor."""
    mask = supervised_mask(labels)
    logq = F.log_softmax(student_logits[:, :-1][mask].float() / temperature, dim=-1)
    return DIVERGENCES[divergence](target_logprobs[:, :-1][mask].float(), logq).sum(), mask.sum()


class StoredTarget(NamedTuple):
    """A target kept as its K most probable ids, their log-probabilities and the log of the rest's mass
    (one row per supervised position). The divergence is then taken over K+1 buckets {id_1..id_K,
    everything else}: by the log-sum inequality a lower bound of the exact one, equal to it when the
    rest is empty (K = vocabulary)."""
    ids: torch.Tensor       # (N, K) int64
    logp: torch.Tensor      # (N, K) float32
    log_rest: torch.Tensor  # (N,) float32, >= LOG_FLOOR

    def __getitem__(self, s):  # rows, not fields: target[a:b] is the target of positions a..b-1
        return StoredTarget(self.ids[s], self.logp[s], self.log_rest[s])


LOG_FLOOR = -1e4  # log of an empty bucket: finite, so 0 * (log p - log q) stays 0


def log_rest(logp, ids, in_place=False):
    """Per row, the log of the mass outside ids: a stored target's last bucket. A logsumexp over the other
    ids, not log(1 - their sum): that difference is rounding noise when the rest is nearly empty.
    in_place overwrites logp instead of allocating an (n, V) copy (not for autograd)."""
    if not in_place:
        return logp.scatter(1, ids, float("-inf")).logsumexp(-1).clamp(min=LOG_FLOOR)
    x = logp.scatter_(1, ids, float("-inf"))
    m = x.amax(-1, keepdim=True).clamp(min=LOG_FLOOR)  # a row of -inf (every id stored) has no rest
    return x.sub_(m).exp_().sum(-1).log_().add_(m[:, 0]).clamp_(min=LOG_FLOOR)


def topk_target(target_logits_tau, k):
    """The StoredTarget of logits already divided by tau: what the target pass writes."""
    logp = F.log_softmax(target_logits_tau.float(), dim=-1)
    top, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return StoredTarget(ids, top, log_rest(logp, ids))


def chunk_loss(z, label_ids, target, spec, scratch=None, ppo=None):
    """One chunk of rows: z (n, V) fp32 student logits, label_ids (n,); target None (SFT), the (n, V) fp32 target
    logits (before / tau) or a StoredTarget; ppo: MiniLLM's PPORows. Returns the loss, its SFT and KD sums and
    dloss/dz, in z's memory. z, the target's logits and scratch are overwritten in place (on a CPU a fresh
    tensor of a few hundred MB is page-faulted in again at every chunk). The SFT term is at tau = 1."""
    if ppo is not None:
        return minillm_chunk(z, label_ids, target, spec, scratch, ppo)
    lam = spec.lam
    if target is None:
        sft = negative_log_likelihood(torch.log_softmax(z, -1, out=z), label_ids)
        kd, dz = torch.zeros_like(sft), z.exp_().mul_(lam)  # z held log q, now lam * q
    else:
        logq, sft, q1 = student_logprobs(z, label_ids, spec)
        # where q1 is q itself (tau = 1), the SFT gradient's lam * q joins the KD gradient's q coefficient
        kd, dz = kd_chunk(logq, target, spec, lam if q1 is None else 0.0, scratch)
        if q1 is not None:
            dz.add_(q1, alpha=lam)
    if lam:
        dz[torch.arange(len(label_ids), device=z.device), label_ids] -= lam
    return lam * sft + (1 - lam) * kd, sft, kd, dz


def minillm_chunk(z, label_ids, target, spec, scratch, ppo):
    """A chunk of MiniLLM's loss, the single-step term sum_t KL(q_theta || p) (tau = 1) plus the long-term
    term, and dloss/dz in closed form: q (log q - log p - KL) for the first, g (onehot(y) - q) for the second
    (g its derivative in log q(y)). Returns (loss, 0, the KL sum, dz) as chunk_loss, dz in the target's buffer."""
    logq = torch.log_softmax(z, -1, out=z)
    q = torch.exp(logq, out=scratch)
    pg, g = long_term_term(logq.gather(1, label_ids[:, None])[:, 0], ppo, spec.ppo_clip)
    dz = torch.log_softmax(target, -1, out=target).neg_().add_(logq).mul_(q)  # q (log q - log p)
    kl = dz.sum(-1)
    dz.addcmul_(q, (-kl - g)[:, None])
    dz[torch.arange(len(label_ids), device=z.device), label_ids] += g
    return kl.sum() + pg, torch.zeros_like(pg), kl.sum(), dz


def student_logprobs(z, label_ids, spec):
    """log softmax(z / tau), written over z; the SFT sum (at tau = 1); and softmax(z) for the SFT gradient
    where it is not q itself (tau != 1 and lam > 0), else None."""
    tau, q1 = spec.temperature, None
    if tau != 1.0:  # the SFT term is at tau = 1: its own log-softmax
        logq1 = F.log_softmax(z, dim=-1)
        sft = negative_log_likelihood(logq1, label_ids)
        q1 = logq1.exp_() if spec.lam else None
        z.div_(tau)
    logq = torch.log_softmax(z, -1, out=z)
    if tau == 1.0:
        sft = negative_log_likelihood(logq, label_ids)
    return logq, sft, q1


def kd_chunk(logq, target, spec, lam_q, scratch):
    """The KD sum of a chunk and dloss/dz = (1 - lam) / tau * dKD/d(z / tau) + lam_q * q: forward KL in
    closed form, (q - p~) / tau with p~ the target spread over the vocabulary; any other divergence by
    autograd on this chunk alone, so memory stays flat. log p is written over the target's logits."""
    stored = isinstance(target, StoredTarget)
    if stored:
        logp = torch.cat([target.logp, target.log_rest[:, None]], 1)
    else:
        logp = torch.log_softmax(target.div_(spec.temperature) if spec.temperature != 1.0 else target, -1, out=target)
    if DIVERGENCES[spec.divergence] is not forward_kl:
        return autograd_kd(logq, logp, target, spec, lam_q)
    if stored:
        return stored_forward_kl(logq, logp, target, spec, lam_q, scratch)
    kd_scale = (1 - spec.lam) / spec.temperature
    p = torch.exp(logp, out=scratch)
    kd = logp.sub_(logq).mul_(p).sum()  # sum_j p_j (log p_j - log q_j), in the target's buffer
    return kd, logq.exp_().mul_(kd_scale + lam_q).sub_(p, alpha=kd_scale)  # in z's buffer


def stored_forward_kl(logq, logp, target, spec, lam_q, scratch):
    # over the K+1 buckets p~ is p_k on the stored ids and q_j p_rest / q_rest on the others
    kd_scale = (1 - spec.lam) / spec.temperature
    logq_k = logq.gather(1, target.ids)
    q = torch.exp(logq, out=scratch)
    rest = log_rest(logq, target.ids, in_place=True)  # logq is spent: its buffer (z's) takes dz below
    kd = forward_kl(logp, torch.cat([logq_k, rest[:, None]], 1)).sum()
    r = (target.log_rest - rest).exp()  # p_rest / q_rest
    dz = torch.mul(q, (kd_scale * (1 - r) + lam_q)[:, None], out=logq)  # every id as if in the rest ...
    dz.scatter_add_(1, target.ids, kd_scale * (r[:, None] * logq_k.exp() - target.logp.exp()))  # ... then c (q_k - p_k)
    return kd, dz


def autograd_kd(logq, logp, target, spec, lam_q):
    with torch.enable_grad():  # logq is z / tau up to a per-row constant, so it stands in for it here
        zz = logq.detach().clone().requires_grad_()
        lq = F.log_softmax(zz, dim=-1)
        if isinstance(target, StoredTarget):  # the student over the stored target's K+1 buckets
            lq = torch.cat([lq.gather(1, target.ids), log_rest(lq, target.ids)[:, None]], 1)
        kd = DIVERGENCES[spec.divergence](logp, lq).sum()
        (dkd,) = torch.autograd.grad(kd, zz)
    return kd.detach(), dkd.mul_((1 - spec.lam) / spec.temperature).add_(logq.exp_(), alpha=lam_q)


def plain_fp32(x):
    # float32 matmuls with no autocast write straight into the loss's buffers (mm out=, addmm_); under
    # autocast they stay out-of-place bf16 ops, rounded as the dense reference rounds them
    return x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)


def logits(h, weight, out=None):
    # h @ weight.T in float32, into out when given
    if plain_fp32(h):
        return torch.mm(h, weight.T, out=out)
    z = h @ weight.T
    return z.float() if out is None else out.copy_(z)


def chunk_target(hidden, start, end, spec, out=None):
    """Target logits (before / tau) of rows start:end from the frozen models' final hidden states and heads
    {role: (hidden (N, C_t), head (V_t, C_t))}, summed with spec.weights into one fp32 buffer (addmm
    in fp32: no (n, V) temporary)."""
    for i, (role, w) in enumerate(spec.weights.items()):
        h, head = hidden[role]
        if i == 0:
            out = logits(h[start:end], head[:spec.vocab], out)
            if w != 1.0:
                out.mul_(w)
        elif plain_fp32(h):
            out.addmm_(h[start:end], head[:spec.vocab].T, alpha=w)
        else:
            out.add_(logits(h[start:end], head[:spec.vocab]), alpha=w)
    return out


@functools.cache
def compiled_chunk_loss():
    return torch.compile(chunk_loss, dynamic=True)


class ChunkedDistillLoss(torch.autograd.Function):
    """lam * SFT + (1 - lam) * KD summed over N supervised positions, from final hidden states, holding
    one chunk of (chunk, vocab) logits at a time. chunk_loss gives dloss/dz while the chunk is live;
    it is projected onto the hidden states and the lm_head right away, so backward only scales the
    stored gradients, and no logits are ever recomputed or stored. The (chunk, vocab) buffers are
    allocated once per call and reused by every chunk."""

    @staticmethod
    def forward(ctx, h, weight, label_ids, target, spec, ppo):
        V, chunk, N = spec.vocab, spec.chunk_size, h.shape[0]
        need_grad = h.requires_grad or weight.requires_grad  # grad mode itself is off in here
        W = weight[:V]  # the real tokens only: Qwen's padded rows never enter a softmax
        # fp32 gradient buffers; padded vocab rows stay zero
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_grad else None
        grad_W = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_grad else None
        totals = torch.zeros(3, dtype=torch.float64, device=h.device)  # loss, sft, kd
        live = isinstance(target, dict)  # the frozen models' rows {role: (hidden (N, C_t), head (V_t, C_t))}
        buffers = torch.empty((1 + (target is not None) + live, min(chunk, N), V), device=h.device)
        loss_of_chunk = compiled_chunk_loss() if spec.compile else chunk_loss
        for s in range(0, N, chunk):
            hc = h[s:s + chunk]
            n = len(hc)
            z = logits(hc, W.to(hc.dtype), buffers[0, :n])  # (n, V) student logits
            if live:
                t = chunk_target(target, s, s + chunk, spec, buffers[2, :n])  # the target's logits
            else:
                t = None if target is None else target[s:s + chunk]
            loss, sft, kd, dz = loss_of_chunk(z, label_ids[s:s + chunk], t, spec,
                                              buffers[1, :n] if t is not None else None,
                                              None if ppo is None else ppo[s:s + chunk])
            totals += torch.stack([loss, sft, kd]).double()
            if need_grad:
                if plain_fp32(hc):
                    torch.mm(dz, W, out=grad_h[s:s + chunk])
                    grad_W[:V].addmm_(dz.T, hc)
                else:  # bf16 matmuls (autocast's), accumulated in fp32 across chunks
                    dz = dz.to(hc.dtype)
                    grad_h[s:s + chunk] = dz @ W.to(hc.dtype)
                    grad_W[:V] += dz.T @ hc
            del dz, z, t
        ctx.save_for_backward(grad_h, grad_W)
        ctx.dtypes = (h.dtype, weight.dtype)
        ctx.mark_non_differentiable(totals)
        return totals[0].float(), totals[1].float(), totals[2].float()

    @staticmethod
    def backward(ctx, g, _g_sft, _g_kd):
        # scaled in place: this graph is backpropagated once (no retain_graph), so no copy is needed
        grad_h, grad_W = ctx.saved_tensors
        return grad_h.mul_(g).to(ctx.dtypes[0]), grad_W.mul_(g).to(ctx.dtypes[1]), None, None, None, None


def distill_loss(h, weight, labels, target, spec, ppo=None):
    """(loss_sum, sft_sum, kd_sum, count) over a batch's supervised positions, from the student's final hidden
    states h (B, T, C) and lm_head weight; target: None (SFT), the frozen models' {role: (hidden, head)}
    (frozen_hidden_states) or a StoredTarget (a row per supervised position); ppo: MiniLLM's PPORows. spec.impl
    "dense" takes full (B, T, V) logits through the pure functions above: the reference "chunked" equals."""
    V, lam = spec.vocab, spec.lam
    target = target or None  # {}: no frozen model (SFT)
    mask, label_ids = shift_labels(labels)
    if spec.impl == "chunked" or isinstance(target, StoredTarget):
        rows = {r: (t[:, :-1][mask], w) for r, (t, w) in target.items()} if isinstance(target, dict) else target
        return (*ChunkedDistillLoss.apply(h[:, :-1][mask], weight, label_ids, rows, spec, ppo), mask.sum())
    z = (h @ weight[:V].T).float()  # (B, T, V)
    sft, n = sft_loss(z, labels)
    if target is None:
        return lam * sft, sft.detach(), torch.zeros_like(sft), n
    t = target_logits({r: (th @ tw[:V].T).float() for r, (th, tw) in target.items()}, spec.weights)
    if ppo is not None:  # MiniLLM, at tau = 1
        logq = F.log_softmax(z[:, :-1][mask], dim=-1)
        kd = reverse_kl(F.log_softmax(t[:, :-1][mask], dim=-1), logq).sum()
        pg, _ = long_term_term(logq.gather(1, label_ids[:, None])[:, 0], ppo, spec.ppo_clip)
        return kd + pg, torch.zeros_like(kd), kd.detach(), n
    kd, _ = kd_loss(z, F.log_softmax(t / spec.temperature, dim=-1), labels, spec.divergence, spec.temperature)
    return lam * sft + (1 - lam) * kd, sft.detach(), kd.detach(), n

# -----------------------------------------------------------------------------
# distributed set-up, models, data


@dataclasses.dataclass(frozen=True)
class Run:
    """A run's fixed parts, passed whole where a function would otherwise take a long parameter list."""
    cfg: Config
    rank: int
    world: int
    device: torch.device
    tokenizer: Tokenizer
    tokenizer_path: str
    spec: LossSpec
    configs: dict = dataclasses.field(default_factory=dict)  # {role: QwenConfig} of every model it reads
    identity: dict | None = None    # what makes it this run (run_identity), taken once at the start
    resume_from: str | None = None  # the checkpoint this run continues (resume_point)

    @property
    def master(self):
        return self.rank == 0

    @property
    def pad_id(self):
        return self.tokenizer.token_to_id("<|endoftext|>")

    @property
    def stop_ids(self):
        # where generation stops: the end of a chat turn, or of a text (where a raw model may end)
        return [self.tokenizer.token_to_id("<|im_end|>"), self.pad_id]

    @property
    def length_multiple(self):
        # a compiled model gets training lengths padded to a multiple of 64, so it sees few shapes
        return 64 if self.cfg.compile else 1


def start(cfg):
    """Distributed set-up, every input checked before a weight is read, the seeds; the config printed once."""
    # a Config that did not come through resolve is refused where it says one thing and would do another
    resolve(dataclasses.replace(cfg), {f.name for f in dataclasses.fields(cfg)})
    rank, world, device = setup_distributed(cfg.device)
    tokenizer, tokenizer_path, configs = check_inputs(cfg)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    run = Run(cfg, rank, world, device, tokenizer, tokenizer_path, loss_spec(cfg, tokenizer.get_vocab_size()), configs)
    if not (cfg.eval_only or cfg.targets_only):
        run = dataclasses.replace(run, identity=run_identity(run))  # once: the data as this run reads it
        run = dataclasses.replace(run, resume_from=resume_point(run))
    if run.master and not cfg.quiet:
        print("config:", json.dumps(dataclasses.asdict(cfg)))
        if METHODS[cfg.method].shift and cfg.alpha == 0:
            print("--alpha=0: the target is the finetuned teacher's alone; the raw models are not loaded")
    return run


def launch_rank():
    # the rank torchrun gave this process (0 when run alone), known before the process group is up
    return int(os.environ.get("RANK", 0))


def setup_distributed(device="auto"):
    """(rank, world_size, device); torchrun's env vars switch DDP on (gloo on CPU, NCCL on GPU)."""
    if "RANK" in os.environ and not dist.is_initialized():
        cuda = torch.cuda.is_available() and device in ("auto", "cuda")
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if device == "auto":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    return rank, world, torch.device(device)


def all_reduce(x):
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def model_dirs(cfg):
    """role -> directory of every model a run reads, in Config's order: the one place that decides it. The student;
    the frozen models of the target (target_weights); seqkd's generator; a given --teacher_ft, for every
    evaluation's teacher-forced figures. --eval_only reads the student and that teacher alone."""
    method = METHODS[cfg.method]
    roles = {"student"} | ({"teacher_ft"} if cfg.teacher_ft else set())
    if not cfg.eval_only:
        roles |= set(target_weights(cfg.divergence, cfg.alpha)) | ({method.generator} if method.generator else set())
    return {f.name: (cfg.student_raw or cfg.student) if f.name == "student_raw" else getattr(cfg, f.name)
            for f in dataclasses.fields(Config) if f.name in roles}


def frozen_dirs(cfg):
    # role -> directory of the frozen models the loss reads
    weights = target_weights(cfg.divergence, cfg.alpha)
    return {role: path for role, path in model_dirs(cfg).items() if role in weights}


def check_inputs(cfg):
    """Everything that can be checked before loading weights or tokenizing: paths, the models' files,
    tokenizer agreement, vocab sizes. Returns the tokenizer, its path and {role: QwenConfig}."""
    dirs = model_dirs(cfg)
    for role, path in dirs.items():
        if not path:
            raise SystemExit(f"--method={cfg.method} needs --{role}")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise SystemExit(f"--{role}={path}: no config.json there (not an HF model directory)")
    if cfg.eval_only and not cfg.eval_data:
        raise SystemExit("--eval_only needs --eval_data (the held-out file to score --student on)")
    for key in ("train_data", "eval_data", "pretrain_data"):
        path = getattr(cfg, key)
        if (path or (key == "train_data" and not cfg.eval_only)) and not os.path.isfile(path):
            raise SystemExit(f"--{key}={path}: no such file")
        if path:
            data.check_data_file(path)
    tok_path = cfg.tokenizer or os.path.join(cfg.student, "tokenizer.json")
    tokenizer, configs = data.load_tokenizer(tok_path, dirs), {}
    for role, path in dirs.items():
        n = qwen.QwenConfig.from_json(os.path.join(path, "config.json")).vocab_size
        if n < tokenizer.get_vocab_size():
            raise SystemExit(f"--{role}={path}: vocab_size {n} is smaller than the tokenizer's "
                             f"{tokenizer.get_vocab_size()} tokens")
        configs[role], _ = qwen.check_model_dir(path)  # the headers against config.json and the file sizes
        if cfg.max_len > configs[role].max_position_embeddings:
            raise SystemExit(f"--max_len={cfg.max_len} is beyond --{role}={path}'s max_position_embeddings "
                             f"{configs[role].max_position_embeddings} (its config.json): the positions it was "
                             "trained on")
    return tokenizer, tok_path, configs


def load_frozen_model(run, path):
    # a model that is only run forward (teacher, raw model, generator): teacher_dtype, no gradients
    dtype = getattr(torch, run.cfg.teacher_dtype)
    return qwen.Qwen.from_pretrained(path, dtype=dtype, device=run.device).eval().requires_grad_(False)


def load_frozen(run):
    # {role: model} of the frozen models the loss reads
    return {role: load_frozen_model(run, path) for role, path in frozen_dirs(run.cfg).items()}


def token_cache(run, path):
    # the TokenCache of a data file: built once by rank 0, memory-mapped by every rank (data.open_cache)
    cfg = run.cfg
    key = data.cache_key(path, run.tokenizer_path, cfg.max_len, cfg.system_prompt, cfg.max_rows, cfg.skip_bad_rows)
    return data.open_cache(path, run.tokenizer, key, cfg.cache_dir or os.path.join(work_dir(cfg), "cache"), run.rank,
                           print if run.master and not cfg.quiet else None)


def load_data(run):
    """(cache, training example indices, held-out data.EvalExamples): --eval_data, read first (a bad row there
    stops the run before the training data is tokenized), or rows held out of the cache (data.held_out_split)."""
    cfg = run.cfg
    examples = functools.partial(data.eval_examples, tokenizer=run.tokenizer, max_len=cfg.max_len,
                                 system_prompt=cfg.system_prompt)
    evalset = examples(data.read_rows(cfg.eval_data), source=cfg.eval_data) if cfg.eval_data else []
    cache = token_cache(run, cfg.train_data)
    train_idx = np.arange(len(cache))
    if not cfg.eval_data and cfg.eval_size > 0:
        train_idx, held = data.held_out_split(cache, cfg.train_data, cfg.eval_size, cfg.seed)
        evalset = examples(held, source=cfg.train_data)
    if METHODS[cfg.method].generator:  # SeqKD trains on its own file
        cache = token_cache(run, seqkd_data(run, cache, train_idx))
        train_idx = np.arange(len(cache))
    if len(train_idx) == 0:
        raise SystemExit(f"{cfg.train_data}: no training example left after holding out {cfg.eval_size} rows")
    return cache, train_idx, evalset


def seqkd_data(run, cache, train_idx):
    """SeqKD (Kim & Rush 2016): the path of a data file whose answers are the finetuned teacher's greedy answers to
    each training example's first user turn, written once into out_dir (a resumed run does not regenerate)."""
    cfg = run.cfg
    path = os.path.join(cfg.out_dir, "seqkd_data.jsonl")
    generator = model_dirs(cfg)[METHODS[cfg.method].generator]
    if not os.path.isfile(path):
        prompts = [data.prompt_ids(*cache.example(i)) for i in train_idx]
        answers = generate_all(run, load_frozen_model(run, generator), prompts, cfg.seqkd_max_new_tokens)
        if run.master:  # an empty teacher answer cannot be supervised: its row is left out
            data.write_answered(path, cfg.train_data, cfg.max_rows, cache.rows[train_idx].tolist(), answers)
        data.wait_until(lambda: os.path.isfile(path), f"rank 0 to write {path}", run.rank)
    if os.path.getsize(path) == 0:
        raise SystemExit(f"seqkd: the finetuned teacher {generator} gave an empty answer to every training "
                         f"prompt ({path}); nothing to train on")
    return path

# -----------------------------------------------------------------------------
# stored targets ("decoupled teachers", as the paper served its teachers apart from training): the frozen models
# run once over the token cache, each supervised position's top-K target goes to disk (data.TargetStore), and
# training loads no frozen model. fkl and rkl share one store (the same target); delta has its own per alpha.


def targets_key(run, cache):
    cfg, vocab = run.cfg, run.spec.vocab
    return {"format": data.STORE_FORMAT, "tokens": cache.meta["key"], "vocab": vocab, "topk": min(cfg.topk, vocab),
            "models": {role: qwen.model_identity(path) for role, path in frozen_dirs(cfg).items()},
            "alpha": cfg.alpha if len(run.spec.weights) > 1 else None,  # no shift: one store for fkl, rkl, alpha 0
            "temperature": cfg.temperature, "teacher_dtype": cfg.teacher_dtype,
            "autocast": autocast_dtype(run.device, cfg.autocast) is not None, "targets_dtype": cfg.targets_dtype,
            "shard": cfg.targets_shard}


def compute_targets(run, cache, store):
    """The target pass: each rank takes every world-th unfinished shard, runs the frozen models over it
    and writes it; then all ranks wait (on the file system, not a collective) for every shard.
    A killed pass resumes from the finished shards."""
    cfg, spec = run.cfg, run.spec
    todo = store.todo(run.rank, run.world)
    if dist.is_initialized():
        dist.barrier()  # every damaged shard is gone before any rank trusts the ones it sees (seconds, not hours)
    frozen, t0, rows = load_frozen(run) if todo else {}, time.time(), 0
    for n, s in enumerate(todo):
        examples = sorted(range(s * store.shard, min((s + 1) * store.shard, len(cache))),
                          key=lambda i: -int(cache.lengths[i]))  # similar lengths together: less padding
        pieces = {}  # example -> its (ids, logp, rest), a row per supervised position
        for b in range(0, len(examples), cfg.batch_size):
            idx = examples[b:b + cfg.batch_size]
            input_ids, labels, _ = (x.to(run.device) for x in data.collate([cache.example(i) for i in idx], run.pad_id))
            mask = supervised_mask(labels)
            states = frozen_hidden_states(frozen, input_ids, cfg.autocast)
            hidden = {r: (h[:, :-1][mask], w) for r, (h, w) in states.items()}
            with torch.no_grad():
                parts = [topk_target(chunk_target(hidden, c, c + cfg.chunk_size, spec) / spec.temperature, store.k)
                         for c in range(0, int(mask.sum()), cfg.chunk_size)]
            pieces.update(zip(idx, zip(*(torch.cat(x).split(mask.sum(1).tolist()) for x in zip(*parts)))))
        target = StoredTarget(*(torch.cat(x).cpu() for x in zip(*(pieces[i] for i in sorted(pieces)))))
        store.write(s, {"ids": target.ids.numpy(), "logp": target.logp.numpy(), "rest": target.log_rest.numpy()})
        rows += store.rows(s)
        if run.master and not cfg.quiet:
            print(f"targets: shard {s + 1}/{store.n_shards} | {rows / (time.time() - t0):.0f} supervised tokens/s on "
                  f"rank 0 | eta {(time.time() - t0) / (n + 1) * (len(todo) - n - 1):.0f}s", flush=True)
    del frozen
    data.wait_until(lambda: all(store.complete(s) for s in range(store.n_shards)),
                    f"all target shards in {store.dir}", run.rank)

# -----------------------------------------------------------------------------
# evaluation: ROUGE of generated answers, teacher-forced NLL / KL / top-1, the answers' sanity


def generate_all(run, model, prompts, max_new_tokens, temperature=0.0, seed=0):
    """Answers (decoded text) for all prompts, each rank generating a share; returned on every rank. Greedy
    at temperature 0, else sampled (top_p 1) with batch b of this rank seeded by (seed, b): the same
    answers for the same seed, batch size and world size."""
    tok, batch = run.tokenizer, run.cfg.eval_batch_size
    mine = sorted(range(run.rank, len(prompts), run.world), key=lambda i: len(prompts[i]))  # less padding
    out, was_training = {}, model.training
    model.eval()
    for s in range(0, len(mine), batch):
        idx = mine[s:s + batch]
        with autocast(model.lm_head.weight.device):
            gen = model.generate([prompts[i] for i in idx], max_new_tokens, run.stop_ids,
                                 qwen.Sampling(temperature=temperature, seed=seed * 1_000_003 + s),
                                 vocab_limit=tok.get_vocab_size())
        for i, ids in zip(idx, gen):
            out[i] = tok.decode(ids, skip_special_tokens=True)
    model.train(was_training)
    if dist.is_initialized():
        parts = [None] * run.world
        dist.all_gather_object(parts, out)
        out = {k: v for p in parts for k, v in p.items()}
    return [out[i] for i in range(len(prompts))]


@torch.no_grad()
def forced_scores(run, model, teacher, examples):
    """Per answer token of the held-out references: the student's NLL and entropy and, with the finetuned teacher,
    KL(pi_t^ft || student) at tau = 1 and top-1 agreement. Smooth and cheap, where ROUGE of generations is noisy."""
    cfg, dev, vocab = run.cfg, model.lm_head.weight.device, run.spec.vocab
    sums = {k: torch.zeros((), dtype=torch.float64, device=dev) for k in ("nll", "entropy", "kl", "agree", "tokens")}
    was_training = model.training
    model.eval()
    mine = [(e.input_ids, e.labels) for e in examples[run.rank::run.world]]
    for s in range(0, len(mine), cfg.eval_batch_size):
        input_ids, labels, attention_mask = (x.to(dev) for x in data.collate(mine[s:s + cfg.eval_batch_size], run.pad_id))
        mask, label_ids = shift_labels(labels)
        with autocast(dev, cfg.autocast):
            hs = {m: m(input_ids, attention_mask, return_hidden=True)[:, :-1][mask] for m in (model, teacher) if m}
        for c in range(0, len(label_ids), cfg.chunk_size):
            z = {m: logits(h[c:c + cfg.chunk_size], m.lm_head.weight[:vocab]) for m, h in hs.items()}
            logq = F.log_softmax(z[model], dim=-1)
            sums["nll"] += negative_log_likelihood(logq, label_ids[c:c + cfg.chunk_size])
            sums["entropy"] -= (logq.exp() * logq).sum()
            if teacher:
                sums["kl"] += forward_kl(F.log_softmax(z[teacher], dim=-1), logq).sum()
                sums["agree"] += (z[model].argmax(-1) == z[teacher].argmax(-1)).sum()
        sums["tokens"] += len(label_ids)
    model.train(was_training)
    total = dict(zip(sums, all_reduce(torch.stack(list(sums.values()))).tolist()))
    n = max(total["tokens"], 1)
    return {"nll": total["nll"] / n, "entropy": total["entropy"] / n,
            **({"kl_teacher": total["kl"] / n, "top1_teacher": total["agree"] / n} if teacher else {})}


def evaluate(run, model, teacher, examples, tag):
    """ROUGE F1 of greedy answers and, at --eval_temperature > 0, sampled_* of sampled ones (the mean over
    --eval_seeds answers per prompt: MiniLLM's protocol); rouge.answer_sanity; forced_scores. Answers to
    eval-{tag}*.jsonl."""
    cfg, prompts, refs = run.cfg, [e.prompt for e in examples], [e.reference for e in examples]
    protocols = [("", 0.0, 1)] + ([("sampled_", cfg.eval_temperature, cfg.eval_seeds)] if cfg.eval_temperature else [])
    protocols = protocols if cfg.eval_max_new_tokens else []
    scores = {}
    for prefix, temperature, n_seeds in protocols:
        preds = [generate_all(run, model, prompts, cfg.eval_max_new_tokens, temperature, cfg.seed + k)
                 for k in range(n_seeds)]
        per_seed = [rouge_f1(refs, p) for p in preds]
        scores.update({prefix + t: statistics.mean(s[t] for s in per_seed) for t in per_seed[0]})
        if not prefix:
            scores.update(rouge.answer_sanity(preds[0]))
        if run.master:
            with open(os.path.join(cfg.out_dir, f"eval-{tag}{'-' + prefix[:-1] if prefix else ''}.jsonl"), "w") as f:
                for k, p in enumerate(preds):
                    for a, r in zip(p, refs):
                        seed = {"seed": cfg.seed + k, "temperature": temperature} if prefix else {}
                        f.write(json.dumps({**seed, "prediction": a, "reference": r}) + "\n")
    return {**scores, **forced_scores(run, model, teacher, examples)}


def rouge_f1(refs, preds):
    # ROUGE-1/2/L/Lsum F1, stemmed, mean over examples: what every table here reports
    return {t: s.fmeasure for t, s in rouge.corpus_score(refs, preds, use_stemmer=True).items()}


class Evaluation:
    """Scores a model on the run's held-out examples (evaluate) and logs them, with the finetuned teacher the loss
    runs live, else the one read from disk at the first evaluation and kept."""

    def __init__(self, run, examples, frozen, log):
        self.run, self.examples, self.log = run, examples, log
        self.teacher_dir = model_dirs(run.cfg).get("teacher_ft")
        self.teacher = uncompiled(frozen.get("teacher_ft"))

    def __call__(self, model, step, tag):
        if self.teacher is None and self.teacher_dir:
            self.teacher = load_frozen_model(self.run, self.teacher_dir)
        scores = evaluate(self.run, model, self.teacher, self.examples, tag)
        self.log.eval(step, scores)
        return scores


def autocast_dtype(device, mode="auto"):
    # --autocast: bf16 on CUDA by default; on CPU only when asked (so the tests cover that path)
    on = mode == "bf16" or (mode == "auto" and torch.device(device).type == "cuda")
    return torch.bfloat16 if on else None


def autocast(device, mode="auto"):
    dtype = autocast_dtype(device, mode)
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()

# -----------------------------------------------------------------------------
# checkpoints


# what a resumed run shares with the run it continues, as resolve made them (None: not read): a change is refused,
# naming each key, unless --resume_allow names them. Model paths count (a moved model: allow the keys named), as do
# the bytes of the training data and of the models' weights (RUN_FACTS)
RUN_KEYS = ("student", "student_raw", "teacher_ft", "teacher_raw", "tokenizer", "train_data", "max_rows", "eval_data",
            "eval_size", "max_len", "system_prompt", "skip_bad_rows", "method", "divergence", "lam", "alpha",
            "temperature", "topk", "targets_dtype", "teacher_dtype", "autocast", "batch_size", "seed", "on_policy",
            "on_policy_temperature", "on_policy_max_new_tokens", "seqkd_max_new_tokens") + MINILLM_KEYS
RUN_FACTS = ("micro_batches_per_step", "train_data_content", "pretrain_data_content", "models_content")  # the rest
PATH_KEYS = ("student", "student_raw", "teacher_ft", "teacher_raw", "tokenizer", "train_data", "eval_data",
             "pretrain_data")
# the schedule may change on resume (e.g. a finished run continued to a larger max_steps); the run says so
SCHEDULE_KEYS = ("epochs", "max_steps", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2",
                 "grad_clip")


def run_identity(run):
    """RUN_KEYS' values (the directories of the models it reads, absolute: a path relative or absolute is the same),
    the step's geometry (micro-batches of all ranks) and the bytes of the data it trains on and of the models'
    weights (data.file_identity without its mtime: a copy is the same file, a model replaced in place another)."""
    cfg, dirs = run.cfg, model_dirs(run.cfg)
    paths = {**dirs, "tokenizer": run.tokenizer_path,
             **{k: getattr(cfg, k) for k in ("train_data", "eval_data", "pretrain_data")}}
    values = {k: (os.path.abspath(paths[k]) if paths.get(k) else None) if k in PATH_KEYS else getattr(cfg, k)
              for k in RUN_KEYS}
    content = lambda path: {f: v for f, v in data.file_identity(path).items() if f != "mtime_ns"}  # noqa: E731
    models = {role: {os.path.basename(f): content(f) for f in sorted(glob.glob(os.path.join(d, "*.safetensors")))}
              for role, d in dirs.items()}
    data_content = {f"{k}_content": content(getattr(cfg, k)) if getattr(cfg, k) else None
                    for k in ("train_data", "pretrain_data")}
    return {**values, "micro_batches_per_step": run.world * cfg.grad_accum, "models_content": models, **data_content}


def resume_point(run):
    """The checkpoint a run continues from (None: step 0), chosen before any long work. Without --resume an out_dir
    holding checkpoints is refused; with it, the newest intact one, which must be of this run (check_same_run).
    Damaged ones are named and set aside as damaged-* (nothing names or prunes them; kept for a post-mortem)."""
    cfg, found = run.cfg, checkpoints(run.cfg.out_dir)
    unsealed = sorted(set(glob.glob(os.path.join(cfg.out_dir, "ckpt-*"))) - set(found))
    if unsealed:
        raise SystemExit(f"{unsealed[0]} has no {data.SEAL}: an older deltakd wrote it, so it cannot be checked to be "
                         "this run; continue it with that version, or move it away")
    if not cfg.resume:
        if found:
            raise SystemExit(f"--out_dir={cfg.out_dir} holds checkpoints of an earlier run (newest "
                             f"{os.path.basename(found[-1])}): pass --resume=true to continue it, or another --out_dir")
        return None
    damaged, ckpt = [], None
    for candidate in reversed(found):  # each check reads the checkpoint's files once
        why = checkpoint_damage(candidate)
        if why is None:
            ckpt = candidate
            break
        damaged.append(candidate)
        if run.master:
            print(f"resume: {candidate} is damaged ({why}); trying the checkpoint before it", flush=True)
    if damaged:
        if dist.is_initialized():
            dist.barrier()  # every rank has made its choice before rank 0 renames
        for d in damaged if run.master else []:
            aside = os.path.join(os.path.dirname(d), f"damaged-{os.path.basename(d)}-{int(time.time())}")
            os.rename(d, aside)
            print(f"resume: {d} set aside as {aside}", flush=True)
        if ckpt is None:
            raise SystemExit(f"--resume=true: no checkpoint in {cfg.out_dir} is intact (each set aside as damaged-*)")
        if run.master:
            print(f"resume: continuing from {ckpt}", flush=True)
    if ckpt:
        with open(os.path.join(ckpt, "run.json")) as f:
            check_same_run(run, json.load(f), ckpt)
    elif run.master:  # a job script that always passes --resume=true, at its first launch (or a mistyped out_dir)
        print(f"resume: no checkpoint in --out_dir={cfg.out_dir}; starting at step 0", flush=True)
    return ckpt


def check_same_run(run, theirs, ckpt):
    # refuses a changed run (RUN_KEYS), naming each change; tells a changed schedule
    cfg, allowed = run.cfg, set(filter(None, run.cfg.resume_allow.split(",")))
    changed = [c for c in data.differing(theirs["identity"], run.identity) if c[0].split(".")[0] not in allowed]
    if changed:
        keys = ",".join(sorted({k.split(".")[0] for k, _, _ in changed}))
        values = ", ".join(f"{k} ({a!r} -> {b!r})" for k, a, b in changed)
        accum, rest = divmod(theirs["identity"]["micro_batches_per_step"], run.world)
        fix = (f"--grad_accum={accum} keeps its global batch on {run.world} process(es)" if
               keys == "micro_batches_per_step" and accum and not rest else f"pass --resume_allow={keys} to continue it anyway")
        raise SystemExit(f"--resume=true: this run differs from the one in {ckpt} in {values}; a resumed "
                         f"run must be the same run: {fix}, or use another --out_dir")
    schedule = [f"{k} {theirs['config'][k]} -> {getattr(cfg, k)}" for k in SCHEDULE_KEYS
                if theirs["config"].get(k) != getattr(cfg, k)]
    if schedule and run.master:
        print(f"resume: the schedule changed ({', '.join(schedule)}); the steps from {theirs['step']} on follow "
              "the new one", flush=True)


def checkpoint_damage(ckpt):
    """Why a checkpoint cannot be resumed from (None if it can): a file whose size or CRC-32 differs from its seal
    (data.seal), a run.json without its fields, a model or trainer state that does not open."""
    try:
        why = data.seal_damage(ckpt)
        if why:
            return why
        with open(os.path.join(ckpt, "run.json")) as f:
            if not {"step", "identity", "config"} <= set(json.load(f)):
                return "run.json lacks a field"
        qwen.check_model_dir(ckpt)
        torch.load(os.path.join(ckpt, "trainer_state.pt"), map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # noqa: BLE001 -- whatever a damaged file raises, the verdict is the same
        return data.first_line(e)
    return None


def save_checkpoint(run, step, student):
    """out_dir/ckpt-{step}: a Hugging Face model directory (with tokenizer and chat template) + trainer_state.pt
    (optimizer, step, RNG states) + run.json (identity, config), sealed and written atomically: a kill leaves the
    previous one intact. A failed write (a full disk) stops the run naming the intact one."""
    cfg, ckpt = run.cfg, checkpoint_dir(run.cfg.out_dir, step)
    if cfg.zero:
        student.optimizer.consolidate_state_dict(to=0)  # every rank must join; rank 0 receives the full state
    if not run.master:
        return
    try:
        with qwen.atomic_dir(ckpt) as tmp:
            student.model.write_pretrained(tmp)
            data.write_tokenizer_files(tmp, run.tokenizer_path, cfg.system_prompt)
            torch.save({"step": step, "optimizer": student.optimizer.state_dict(), "config": dataclasses.asdict(cfg),
                        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                                "numpy": np.random.get_state(),
                                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
                       os.path.join(tmp, "trainer_state.pt"))
            with open(os.path.join(tmp, "run.json"), "w") as f:
                json.dump({"step": step, "identity": run.identity, "config": dataclasses.asdict(cfg)}, f, indent=1)
            data.seal(tmp)  # read back from the page cache: ~4 s at 1.5B (docs/recipe.md)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save's and safetensors' failed writes
        free = shutil.disk_usage(cfg.out_dir).free
        need = 3 * sum(p.numel() * p.element_size() for p in student.model.parameters())  # weights + AdamW m, v
        full = getattr(e, "errno", None) == errno.ENOSPC or free < need  # the C++ and Rust writers hide errno
        why = f"no space left on the disk holding {cfg.out_dir} ({free / 1e9:.2f} GB free, a checkpoint takes " \
              f"about {need / 1e9:.2f} GB)" if full else data.first_line(e)
        raise SystemExit(f"could not write {ckpt}: {why}; {intact_checkpoint(cfg.out_dir)}") from None
    for old in checkpoints(cfg.out_dir)[:-cfg.keep_last] if cfg.keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def intact_checkpoint(out_dir):
    # what a stopped run leaves to resume from, for its last message
    found = checkpoints(out_dir)  # damaged ones were set aside when the run started
    if not found:
        return "no checkpoint has been written yet"
    return f"the newest checkpoint, {found[-1]}, is intact (continue with --resume=true)"


def load_checkpoint(run, student):
    """The step of run.resume_from, with the weights, optimizer and RNG states restored."""
    ckpt = run.resume_from
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), map_location=run.device, weights_only=False)
    student.model.load_state_dict(qwen.Qwen.from_pretrained(ckpt, dtype=torch.float32, device=run.device).state_dict())
    student.optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"].cpu())
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    if run.master and not run.cfg.quiet:
        print(f"resumed from {ckpt} at step {state['step']}")
    return state["step"]


def checkpoint_dir(out_dir, step):
    return os.path.join(out_dir, f"ckpt-{step:07d}")


def checkpoints(out_dir):
    # the complete checkpoints, oldest first: a directory gets its final name once it is written and sealed
    return sorted(d for d in glob.glob(os.path.join(out_dir, "ckpt-*")) if os.path.isfile(os.path.join(d, data.SEAL)))


# -----------------------------------------------------------------------------
# training: the student, each micro-batch's target, the KD step and the MiniLLM step (sharing the gradient
# accumulation and the optimizer step), the log, the loop


class Student(NamedTuple):
    model: qwen.Qwen            # the module itself: weights, lm_head, checkpoints
    ddp: torch.nn.Module        # what a step calls: the model under DDP (and torch.compile) when they are on
    optimizer: torch.optim.Optimizer


def build_student(run):
    cfg = run.cfg
    model = qwen.Qwen.from_pretrained(cfg.student, dtype=torch.float32, device=run.device)
    model.gradient_checkpointing = cfg.grad_checkpointing
    ddp = torch.nn.parallel.DistributedDataParallel(model) if dist.is_initialized() else model
    if cfg.compile:  # lengths are padded to a multiple of 64 (micro_batches): few shapes, each compiled once
        ddp = torch.compile(ddp)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # biases and norms: no weight decay
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    adam = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=run.device.type == "cuda")
    if cfg.zero:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        return Student(model, ddp, ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **adam))
    return Student(model, ddp, torch.optim.AdamW(groups, **adam))


class TargetSource(NamedTuple):
    """Where each micro-batch's target comes from: the frozen models run live ({role: model}), or the store the
    target pass wrote (training then loads no frozen model); neither for SFT."""
    frozen: dict
    store: "data.TargetStore | None"

    def of(self, batch, autocast_mode):
        # a micro-batch's target (its tensors on the device), as distill_loss takes it
        if self.store:  # the StoredTarget rows of the micro-batch's examples, in its order
            rows = {k: torch.from_numpy(v).to(batch.input_ids.device) for k, v in self.store.get(batch.examples).items()}
            return StoredTarget(rows["ids"].long(), rows["logp"].float(), rows["rest"])
        return frozen_hidden_states(self.frozen, batch.input_ids, autocast_mode) if self.frozen else None


def target_source(run, cache):
    """The run's TargetSource: the target pass stores the targets once (training then loads no frozen model), or
    the frozen models are loaded to run live at every step."""
    cfg = run.cfg
    if cfg.targets_dir:
        store = data.TargetStore(cfg.targets_dir, cache, targets_key(run, cache))
        compute_targets(run, cache, store)
        return TargetSource({}, store)
    frozen = load_frozen(run)
    return TargetSource({r: torch.compile(m) for r, m in frozen.items()} if cfg.compile else frozen, None)


def uncompiled(model):
    # the module itself of a torch.compile'd model (for generate, its weights), else the model
    return getattr(model, "_orig_mod", model)


def frozen_hidden_states(frozen, input_ids, autocast_mode="auto"):
    """{role: (final hidden states (B, T, C_t), lm_head weight)} of the frozen models, no grad."""
    with torch.no_grad(), autocast(input_ids.device, autocast_mode):
        return {r: (m(input_ids, return_hidden=True), m.lm_head.weight) for r, m in frozen.items()}


class MicroBatch(NamedTuple):
    input_ids: torch.Tensor     # (B, T) right-padded: under causal attention padding never reaches a real position
    labels: torch.Tensor        # (B, T), -100 where nothing is learned
    examples: np.ndarray        # the cache's example indices (a stored target's rows)
    lengths: np.ndarray         # their real lengths (model FLOPs)
    sampled: bool = False       # the answers are the student's own samples (--on_policy): no SFT term

    def to(self, device):
        return self._replace(input_ids=self.input_ids.to(device), labels=self.labels.to(device))


def micro_batches(run, cache, examples):
    # collated on CPU
    return [MicroBatch(*data.collate([cache.example(i) for i in ex], run.pad_id, run.length_multiple)[:2],
                       ex, cache.lengths[ex]) for ex in examples]


def on_policy_draw(seed, step, position):
    """(u, sampling seed) of the micro-batch at this position among all ranks' micro-batches of the step
    (rank + j * world for a rank's j-th); it is sampled if u < --on_policy. A function of the seed, step and
    position alone: every rank, any world size with the same global batch and a resumed run draw the same."""
    rng = np.random.default_rng([seed, step, position])
    return rng.random(), int(rng.integers(2**62))


def answer_prompts(batch):
    """What the student answers for each example of a micro-batch: the conversation up to its first supervised
    token (data.prompt_ids); a plain-text row (every token supervised) has none, so its first token."""
    return [data.prompt_ids(ids, labels) or ids[:1].tolist()
            for ids, labels in zip(batch.input_ids.numpy(), batch.labels.numpy())]


def sample_answers(run, model, micro, step, teacher_mix=None):
    """The step's micro-batches with those drawn (on_policy_draw) answered by the student itself: one sample per
    prompt (answer_prompts) at --on_policy_temperature, up to <|im_end|> (supervised, as in the data) or the
    length limit, with MiniLLM's teacher mixed in (teacher_mix = (model, mix)). Each sample has at least one token
    (the prompt leaves room for it), so a sampled micro-batch always has supervised tokens. Returns them and the
    step's sampling figures, all ranks."""
    cfg, out, was_training = run.cfg, [], model.training
    count = {"batches": 0, "tokens": 0, "samples": 0, "seconds": 0.0}
    model.eval()
    for j, batch in enumerate(micro):
        u, seed = on_policy_draw(cfg.seed, step, run.rank + j * run.world)
        if u >= cfg.on_policy:
            out.append(batch)
            continue
        t0 = time.time()
        prompts = answer_prompts(batch)
        sampling = qwen.Sampling(temperature=cfg.on_policy_temperature, seed=seed)
        with autocast(run.device, cfg.autocast):
            answers = model.generate(prompts, min(cfg.on_policy_max_new_tokens, cfg.max_len - min(map(len, prompts))),
                                     run.stop_ids, sampling, run.spec.vocab, teacher_mix)
        answers = [a[:cfg.max_len - len(p)] for p, a in zip(prompts, answers)]  # at most max_len in all
        examples = [(p + a, [data.IGNORE_INDEX] * len(p) + a) for p, a in zip(prompts, answers)]
        input_ids, labels, _ = data.collate(examples, run.pad_id, run.length_multiple)
        out.append(MicroBatch(input_ids, labels, batch.examples, np.array([len(e) for e, _ in examples]), True))
        count["batches"] += 1
        count["tokens"] += sum(map(len, answers))
        count["samples"] += len(answers)
        count["seconds"] += time.time() - t0
    model.train(was_training)
    total = dict(zip(count, all_reduce(torch.tensor(list(count.values()), dtype=torch.float64,
                                                    device=run.device)).tolist()))
    return out, {"sampled": total["batches"] / (len(micro) * run.world),
                 "sampled_length": total["tokens"] / max(total["samples"], 1),
                 "sampled_tokens_per_s": total["tokens"] / max(total["seconds"], 1e-9)}


class Rollout(NamedTuple):
    """A sampled micro-batch as MiniLLM's PPO passes read it, scored once before them (minillm_rollouts)."""
    teacher_states: dict        # the teacher's {role: (final hidden states, head)} over the samples: every pass's target
    ppo: PPORows                # per sampled token: log q_old(y_t), the whitened reward-to-go A_t, w_t


def token_logprobs(h, head, label_ids, spec):
    # log softmax(h @ head.T)[y] of each row at tau = 1 over the real vocabulary, a chunk of rows at a time, with
    # the head in h's dtype as the chunked loss casts it (so the first PPO pass's ratio is 1, without --compile)
    c, head = spec.chunk_size, head[:spec.vocab].to(h.dtype)
    return torch.cat([F.log_softmax(logits(h[s:s + c], head), dim=-1).gather(1, label_ids[s:s + c, None])[:, 0]
                      for s in range(0, len(h), c)])


@torch.no_grad()
def minillm_rollouts(run, student, source, micro):
    """The step's samples scored for MiniLLM by the student that drew them and the teacher: each token's log
    q_old(y_t), importance weight and reward; the reward-to-go whitened over the whole rollout batch, all ranks
    (LMOps whitens each minibatch, padding included; here padding is left out). Returns the Rollouts and the
    mean reward."""
    cfg, spec, scored = run.cfg, run.spec, []
    for batch in micro:
        mask, label_ids = shift_labels(batch.labels)
        teacher_states = source.of(batch, cfg.autocast)
        with autocast(run.device, cfg.autocast):
            h = student.model(batch.input_ids, return_hidden=True)
        logq_y = token_logprobs(h[:, :-1][mask], student.model.lm_head.weight, label_ids, spec)
        teacher_h, teacher_head = teacher_states["teacher_ft"]
        logp_y = token_logprobs(teacher_h[:, :-1][mask], teacher_head, label_ids, spec)
        rewards = minillm_rewards(logp_y, logq_y, cfg)
        returns = reward_to_go(rewards, mask, cfg.reward_gamma)  # float64; the advantage once whitened
        scored.append((teacher_states, PPORows(logq_y, returns, importance_weights(logq_y, logp_y, cfg.teacher_mix)),
                       rewards.sum()))
    returns = torch.cat([ppo.advantage for _, ppo, _ in scored])
    n, total, squares, reward = all_reduce(torch.stack([torch.ones_like(returns).sum(), returns.sum(),
                                                        returns.square().sum(), sum(r for _, _, r in scored).double()]))
    mean = total / n
    scale = torch.rsqrt(squares / n - mean**2 + 1e-8)  # the population variance, as LMOps' whiten
    return [Rollout(states, ppo._replace(advantage=((ppo.advantage - mean) * scale).float()))
            for states, ppo, _ in scored], (reward / n).item()


def lr_at(step, cfg, total):
    # linear warmup, then cosine decay from lr to lr * min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def supervised_tokens(run, micro):
    # the step's supervised tokens, all micro-batches and ranks: what the loss is divided by, once
    return all_reduce(torch.tensor(sum(int(supervised_mask(b.labels).sum()) for b in micro),
                                   dtype=torch.float64, device=run.device)).item()


def accumulate_gradients(run, student, micro, targets, n_tokens, ppo=None):
    """Forward and backward over this rank's micro-batches (on the device) and their targets (distill_loss's;
    ppo: MiniLLM's PPORows of each), the gradients accumulated and scaled to those of the mean over the step's
    n_tokens supervised tokens, all ranks (DDP all-reduces on the last micro-batch only). Returns the sums
    (loss, sft, kd) per supervised token, all ranks; sft counts the data's tokens only."""
    sums = torch.zeros(3, dtype=torch.float64, device=run.device)
    for i, (batch, target) in enumerate(zip(micro, targets)):
        sync = i == len(micro) - 1 or not dist.is_initialized()
        with contextlib.nullcontext() if sync else student.ddp.no_sync():
            with autocast(run.device, run.cfg.autocast):
                h = student.ddp(batch.input_ids, return_hidden=True)
            spec = dataclasses.replace(run.spec, lam=0.0) if batch.sampled else run.spec  # samples have no labels
            loss, sft, kd, _ = distill_loss(h, student.model.lm_head.weight, batch.labels, target, spec,
                                            ppo[i] if ppo else None)
            # DDP averages gradients over ranks; * world turns that into the global token mean
            (loss * (run.world / n_tokens)).backward()
        sums += torch.stack([loss.detach(), sft * (not batch.sampled), kd]).double()
    return all_reduce(sums) / n_tokens


def optimizer_step(run, student, step, sums):
    # clip and step, unless the loss (sums per supervised token, all ranks) or the gradient is not finite; returns
    # the grad norm
    cfg = run.cfg
    if not torch.isfinite(sums).all():
        raise SystemExit(f"non-finite loss at step {step + 1} ({sums.tolist()}); stopping without saving: "
                         f"{intact_checkpoint(cfg.out_dir)}")
    gnorm = torch.nn.utils.clip_grad_norm_(student.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    if not torch.isfinite(gnorm):
        raise SystemExit(f"non-finite gradient norm at step {step + 1}; stopping without saving: "
                         f"{intact_checkpoint(cfg.out_dir)}")
    student.optimizer.step()
    student.optimizer.zero_grad(set_to_none=True)
    return gnorm


def kd_step(run, student, source, micro, step):
    """One optimizer step of SFT or a KD method (Delta-KD's) over this rank's micro-batches; returns its record.
    With --on_policy the drawn micro-batches are first answered by the student (sample_answers); on those the
    loss is the KD term alone at full weight (lam = 0: the student's own tokens are no labels), every supervised
    token of the step weighing the same, so at --on_policy=1 it is GKD's loss on the student's samples."""
    micro, sampling = sample_answers(run, student.model, micro, step) if run.cfg.on_policy else (micro, {})
    n_tokens = supervised_tokens(run, micro)
    micro = [batch.to(run.device) for batch in micro]
    targets = (source.of(batch, run.cfg.autocast) for batch in micro)  # live frozen models: one micro-batch at a time
    sums = accumulate_gradients(run, student, micro, targets, n_tokens)
    grad_norm = optimizer_step(run, student, step, sums)
    return {**step_record(run, micro, sums, n_tokens, grad_norm), **sampling}


def pretraining_data(run):
    # MiniLLM's Pretraining (None without --pretrain_data): tokenized once, as the training data; ordered from the seed
    cfg = run.cfg
    if not cfg.pretrain_data:
        return None
    cache = token_cache(run, cfg.pretrain_data)
    try:
        return Pretraining(cache, data.Batches(cache.lengths, cfg.batch_size, cfg.seed, run.world * cfg.grad_accum))
    except data.DataError as e:
        raise data.DataError(f"--pretrain_data={cfg.pretrain_data}: {e}") from None


class Pretraining(NamedTuple):
    """MiniLLM's pretraining data (--pretrain_data): its token cache and its order, one Batches step per PPO pass,
    so that a pass reads a micro-batch beside each rollout micro-batch and a resumed run reads what it would have."""
    cache: data.TokenCache
    batches: data.Batches

    def of_pass(self, run, step, k):
        # this rank's pretraining micro-batches of PPO pass k of the step, on the device
        ex = self.batches.at(step * run.cfg.ppo_epochs + k, run.rank, run.world)
        return [batch.to(run.device) for batch in micro_batches(run, self.cache, ex)]


def pretraining_gradients(run, student, source, micro):
    """MiniLLM's language-modelling term on this rank's pretraining micro-batches, as LMOps computes it: lm_coef *
    [(1 - kd_ratio) cross-entropy + kd_ratio KL(pi_t^ft || student)] at tau = 1, each micro-batch's mean over its
    own tokens, averaged over the micro-batches of all ranks (LMOps' loss is a per-micro-batch mean that DeepSpeed
    averages; its KD part is the cross-entropy to the teacher, larger by the teacher's entropy, of the same
    gradient). Accumulates its gradients (DDP syncs them with the rollouts' last backward); returns that mean."""
    cfg = run.cfg
    spec = dataclasses.replace(run.spec, lam=1 - cfg.kd_ratio, divergence="fkl", alpha=None, temperature=1.0)
    total = torch.zeros((), dtype=torch.float64, device=run.device)
    for batch in micro:
        with student.ddp.no_sync() if dist.is_initialized() else contextlib.nullcontext():
            with autocast(run.device, cfg.autocast):
                h = student.ddp(batch.input_ids, return_hidden=True)
            loss, _, _, n = distill_loss(h, student.model.lm_head.weight, batch.labels, source.of(batch, cfg.autocast),
                                         spec)
            (loss * (cfg.lm_coef / (n * len(micro)))).backward()
        total += loss.detach().double() / n
    return all_reduce(total).item() / (len(micro) * run.world)


def minillm_step(run, student, source, micro, step, pretraining=None):
    """MiniLLM's step, one rollout batch: every micro-batch answered by the student with its teacher mixed into
    the sampling, the samples scored once (minillm_rollouts), then --ppo_epochs optimizer updates on them at the
    step's lr, each with the language-modelling term on a fresh pretraining micro-batch per rollout micro-batch
    (pretraining: a Pretraining). Its record holds the passes' mean sums and pt_loss, the last pass's grad norm
    and the rollout's mean reward."""
    teacher = uncompiled(source.frozen["teacher_ft"])
    micro, sampling = sample_answers(run, student.model, micro, step, (teacher, run.cfg.teacher_mix))
    n_tokens = supervised_tokens(run, micro)
    micro = [batch.to(run.device) for batch in micro]
    rollouts, reward = minillm_rollouts(run, student, source, micro)
    sums, pt_loss, pt_lengths, epochs = torch.zeros(3, dtype=torch.float64, device=run.device), 0.0, [], run.cfg.ppo_epochs
    for k in range(epochs):
        if pretraining:
            pt_micro = pretraining.of_pass(run, step, k)
            pt_loss += pretraining_gradients(run, student, source, pt_micro) / epochs
            pt_lengths += [T for b in pt_micro for T in b.lengths.tolist()]
        pass_sums = accumulate_gradients(run, student, micro, [r.teacher_states for r in rollouts], n_tokens,
                                         [r.ppo for r in rollouts])
        grad_norm = optimizer_step(run, student, step, pass_sums)
        sums += pass_sums / epochs
    rec = {**step_record(run, micro, sums, n_tokens, grad_norm, pt_lengths), **sampling, "reward": reward}
    return {**rec, "pt_loss": pt_loss} if pretraining else rec


def step_record(run, micro, sums, n_tokens, grad_norm, pretraining_lengths=()):
    # the step's loss terms per supervised token and grad norm, with the input tokens and model FLOPs of all ranks
    flops = sum(sequence_flops(run.cfg, run.configs, T, b.sampled) for b in micro for T in b.lengths.tolist())
    flops += sum(sequence_flops(run.cfg, run.configs, T, False, pretraining=True) for T in pretraining_lengths)
    tokens, flops = all_reduce(torch.tensor([sum(b.input_ids.numel() for b in micro), flops],
                                            dtype=torch.float64, device=run.device)).tolist()
    loss, sft, kd = sums.tolist()
    return {"loss": loss, "sft": sft, "kd": kd, "grad_norm": grad_norm.item(), "tokens": tokens, "flops": flops,
            "supervised_tokens": n_tokens}


def sequence_flops(cfg, configs, T, sampled, pretraining=False):
    """Model FLOPs a step spends on one sequence of T tokens: the one formula of the log's MFU and the dry run
    (configs {role: QwenConfig}). The student trains on it (once per PPO pass) and runs forward over it where it
    sampled it (sampled: 0/1, or the --on_policy share); each live frozen model runs forward. MiniLLM runs both once
    more: its teacher decodes beside the sampling, and the student scores its rollout. A sequence of MiniLLM's
    pretraining data (pretraining) is trained on once, its teacher running forward over it."""
    student = configs["student"]
    if pretraining:
        return T * (qwen.flops_per_token(student, T, train=True) + qwen.flops_per_token(configs["teacher_ft"], T, train=False))
    minillm = METHODS[cfg.method].policy_gradient
    live = () if cfg.targets_dir else target_weights(cfg.divergence, cfg.alpha)
    return T * ((cfg.ppo_epochs if minillm else 1) * qwen.flops_per_token(student, T, train=True)
                + sampled * (1 + minillm) * qwen.flops_per_token(student, T, train=False)
                + (1 + minillm) * sum(qwen.flops_per_token(configs[r], T, train=False) for r in live))


def peak_flops(cfg, device):
    # bf16 dense peak per device, from the device name unless --peak_tflops says otherwise
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((p * 1e12 for k, p in (("H100", 989), ("H200", 989), ("A100", 312)) if k in name), None)


class Log:
    """The step and evaluation records (rank 0): to out_dir/metrics.jsonl, and a line each unless --quiet."""

    def __init__(self, run):
        self.run, self.path = run, os.path.join(run.cfg.out_dir, "metrics.jsonl")
        self.t_start, self.peak = time.time(), peak_flops(run.cfg, run.device)

    def continue_from(self, step):
        """A training run keeps only the records of the steps it continues from: none for a fresh start, the
        first `step` ones on resume (the steps after the checkpoint are trained, and logged, again)."""
        if not self.run.master or not os.path.isfile(self.path):
            return
        with open(self.path) as f:  # a line cut by a kill belongs to no saved step
            kept = [line for line, n in ((line, parsed_step(line)) for line in f) if n is not None and n <= step]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)

    def step(self, step, total, rec, seconds):
        if not self.run.master:
            return
        flops, world = rec["flops"], self.run.world
        rec = {"step": step, **{k: v for k, v in rec.items() if k not in ("tokens", "flops")},
               "tokens_per_s": rec["tokens"] / seconds, "tflops_per_device": flops / seconds / world / 1e12,
               "mfu": flops / seconds / world / self.peak if self.peak else None}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if not self.run.cfg.quiet:
            eta = (time.time() - self.t_start) / step * (total - step)
            mfu = f"mfu {rec['mfu']:.1%}" if self.peak else f"{rec['tflops_per_device']:.2f} TFLOP/s/device"
            extra = ""  # --on_policy: the share of sampled micro-batches, and the samples when there are any
            if rec.get("sampled"):
                extra = f" (mean {rec['sampled_length']:.0f} tokens, {rec['sampled_tokens_per_s']:.0f} tok/s)"
            extra = f"sampled {rec['sampled']:.0%}{extra} | " if "sampled" in rec else ""
            extra += f"reward {rec['reward']:.3f} | " if "reward" in rec else ""  # MiniLLM's mean r_t
            extra += f"pt_loss {rec['pt_loss']:.3f} | " if "pt_loss" in rec else ""  # and its language-modelling term
            print(f"step {step}/{total} | loss {rec['loss']:.4f} (sft {rec['sft']:.4f} kd {rec['kd']:.4f}) | lr "
                  f"{rec['lr']:.2e} | gnorm {rec['grad_norm']:.3f} | {extra}{rec['tokens_per_s']:.0f} tok/s | {mfu} | "
                  f"eta {eta:.0f}s")

    def eval(self, step, scores):
        if not self.run.master:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "eval": scores}) + "\n")
        if not self.run.cfg.quiet:
            print(f"eval step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in scores.items()))


def parsed_step(line):
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


class Preempted(Exception):
    """A signal during the final evaluation, when the last checkpoint is written: the run stops at once."""


class Preemption:
    """While the training loop runs, SIGTERM / SIGUSR1 (what SLURM and most clusters send before a kill) and a
    first Ctrl-C (SIGINT) only set a flag: the loop finishes the optimizer step, all ranks agree, a checkpoint
    is written and the run exits 0, so --resume=true continues bit-exactly. A second Ctrl-C stops at once.
    During the final evaluation (finished: the last checkpoint is written) a signal stops the run at once."""
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __enter__(self):
        self.requested, self.previous, self.finished = None, {}, False
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            self.previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.finished:
            raise Preempted(signal.Signals(signum).name)
        if signum == signal.SIGINT:
            if self.requested == "SIGINT":
                raise KeyboardInterrupt
            if launch_rank() == 0:  # a terminal's Ctrl-C reaches every rank
                # os.write, not print: the signal may have landed inside a print, which is not reentrant
                os.write(1, b"\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again stops at once)\n")
        self.requested = signal.Signals(signum).name

    def agreed(self, device):
        # one rank's signal stops every rank at the same step
        return all_reduce(torch.tensor(float(self.requested is not None), device=device)).item() > 0


def eval_only(run):
    """--eval_only: a given model (a base model, a teacher), scored as every trained one is, and no training."""
    cfg = run.cfg
    if os.path.exists(os.path.join(cfg.out_dir, "metrics.jsonl")):  # a run's record, or an earlier evaluation's
        raise SystemExit(f"--eval_only: --out_dir={cfg.out_dir} holds a run's metrics.jsonl and evaluation, which this "
                         "one would overwrite; pass another --out_dir")
    model = qwen.Qwen.from_pretrained(cfg.student, dtype=torch.float32, device=run.device)
    examples = data.eval_examples(data.read_rows(cfg.eval_data), run.tokenizer, cfg.max_len, cfg.system_prompt)
    scores = Evaluation(run, examples, {}, Log(run))(model, 0, "final")
    return scores if run.master else {}


def work_dir(cfg):
    # where a run writes (its lock, its default token cache): the target pass alone, only into its store
    return cfg.targets_dir if cfg.targets_only else cfg.out_dir


def train(cfg):
    """One run of the configured method; returns the final evaluation scores (rank 0) or {}."""
    with data.out_dir_lock(work_dir(cfg)):
        run = start(cfg)  # every input checked; the checkpoint to resume from chosen
        if cfg.eval_only:
            return eval_only(run)
        cache, train_idx, evalset = load_data(run)  # tokenized once into a memory-mapped cache
        source = target_source(run, cache)  # the frozen models live, or the store of the target pass
        if cfg.targets_only:
            return {}
        student = build_student(run)
        batches = data.Batches(cache.lengths[train_idx], cfg.batch_size, cfg.seed, run.world * cfg.grad_accum)
        total = cfg.max_steps or cfg.epochs * batches.steps_per_epoch
        if run.master and not cfg.quiet:
            print(f"padding: {data.padding_fraction(batches.batches, batches.lengths):.1%} of batch tokens")
        step = load_checkpoint(run, student) if run.resume_from else 0
        log = Log(run)
        log.continue_from(step)
        evaluation = Evaluation(run, evalset, source.frozen, log)
        one_step = kd_step
        if METHODS[cfg.method].policy_gradient:
            one_step = functools.partial(minillm_step, pretraining=pretraining_data(run))
        student.model.train()
        with Preemption() as preemption:
            while step < total:
                t0, lr = time.time(), lr_at(step, cfg, total)
                for group in student.optimizer.param_groups:
                    group["lr"] = lr
                micro = micro_batches(run, cache, [train_idx[b] for b in batches.at(step, run.rank, run.world)])
                rec = one_step(run, student, source, micro, step)
                step += 1
                log.step(step, total, {**rec, "lr": lr}, time.time() - t0)
                if preemption.agreed(run.device):
                    save_checkpoint(run, step, student)
                    if run.master:
                        print(f"{preemption.requested or 'a signal on another rank'}: saved step {step} to "
                              f"{cfg.out_dir}; exiting (continue with --resume=true)", flush=True)
                    return {}
                if cfg.eval_every and step % cfg.eval_every == 0 and step < total and evalset:
                    evaluation(student.model, step, f"step{step}")
                if (cfg.save_every and step % cfg.save_every == 0) or step == total:
                    save_checkpoint(run, step, student)
            preemption.finished = True
            scores = evaluation(student.model, step, "final") if evalset else {}
        return scores if run.master else {}

# -----------------------------------------------------------------------------
# dry run: the per-GPU memory plan and the FLOPs of a step, from the configs alone


# (chunk, vocab) fp32 tensors live at once in the chunked loss: SFT alone, the student's logits (which become
# dz); forward KL (and MiniLLM, also in closed form), those plus the target's logits and its probabilities; a
# divergence differentiated by autograd, those plus its graph's copies of logq and of the elementwise terms (a
# CPU step peaks inside the loss; test_deltakd's dry-run test holds the plan to 20% of a measured step)
LOSS_BUFFERS = {"sft": 1, "fkl": 3, "autograd": 9}


def activation_dtype_bytes(cfg):
    # the plan is for the run's GPUs: the autocast rule (autocast_dtype) on CUDA, unless the run is on the CPU
    return 2 if autocast_dtype("cpu" if cfg.device == "cpu" else "cuda", cfg.autocast) else 4


def memory_plan(cfg, configs, world):
    """[(item, bytes per GPU)] of a run: configs {role: QwenConfig} with the student under "student"."""
    with torch.device("meta"):
        params = {role: qwen.num_parameters(qwen.Qwen(config)) for role, config in configs.items()}
    s, n, act = configs["student"], params.pop("student"), activation_dtype_bytes(cfg)
    dtype_bytes = getattr(torch, cfg.teacher_dtype).itemsize
    rows = [(f"student weights fp32 ({n:,} params)", 4 * n), ("student gradients fp32", 4 * n),
            (f"AdamW m + v fp32{f' (ZeRO over {world} ranks)' if cfg.zero else ''}", 8 * n // (world if cfg.zero else 1))]
    rows += [(f"{role} {cfg.teacher_dtype} ({m:,} params)", dtype_bytes * m) for role, m in params.items()]
    closed_form = cfg.divergence == "fkl" or METHODS[cfg.method].policy_gradient
    buffers = LOSS_BUFFERS["sft" if cfg.divergence is None else "fkl" if closed_form else "autograd"]
    buffers += act == 2  # under bf16 autocast, half-size bf16 logits and dz on their way into and out of them
    rows.append((f"loss: {buffers} ({cfg.chunk_size} x vocab) fp32 buffers + fp32 lm_head gradient",
                 4 * (buffers * cfg.chunk_size * s.vocab_size + s.vocab_size * s.hidden_size)))
    tokens = cfg.batch_size * cfg.max_len
    rows.append((f"activations {cfg.batch_size} x {cfg.max_len}, {'bf16' if act == 2 else 'fp32'}, "
                 f"checkpointing={'on' if cfg.grad_checkpointing else 'off'}",
                 qwen.activation_bytes(s, tokens, act, cfg.grad_checkpointing)))
    if cfg.on_policy:  # the longest prompt + the longest sample; held while the student samples, before the step's
        # forward (counted as if at the peak: a bound), while the frozen models stay loaded. The cache is in the
        # autocast dtype, else the weights' (Qwen.empty_kv_cache)
        L = cfg.max_len + min(cfg.on_policy_max_new_tokens, cfg.max_len)
        rows.append((f"on-policy sampling: the student's KV cache, {cfg.batch_size} x {L} at most, "
                     f"{'bf16' if act == 2 else 'fp32'}", qwen.kv_cache_bytes(s, cfg.batch_size * L, act)))
        if METHODS[cfg.method].policy_gradient:  # its teacher samples beside it; its states serve every PPO pass
            t = configs["teacher_ft"]
            rows.append(("MiniLLM: the teacher's KV cache while sampling",
                         qwen.kv_cache_bytes(t, cfg.batch_size * L, 2 if act == 2 else dtype_bytes)))
            rows.append((f"MiniLLM: the teacher's hidden states of {cfg.grad_accum} rollout micro-batch(es), "
                         f"{cfg.teacher_dtype}",
                         cfg.grad_accum * cfg.batch_size * cfg.max_len * t.hidden_size * dtype_bytes))
    return rows


def dry_run(cfg):
    """--dry_run=true: every model of the run built on the meta device from its config.json (no weight
    is read), the per-GPU memory plan and the model FLOPs of one optimizer step (sequence_flops); returns
    the plan."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    dirs = {"student": cfg.student, **({} if cfg.targets_dir else frozen_dirs(cfg))}
    configs = {r: qwen.QwenConfig.from_json(os.path.join(p, "config.json")) for r, p in dirs.items()}
    rows = memory_plan(cfg, configs, world)
    T, s = cfg.max_len, configs["student"]
    flops = world * cfg.grad_accum * cfg.batch_size * sequence_flops(cfg, configs, T, cfg.on_policy)
    if cfg.pretrain_data:  # MiniLLM's pretraining micro-batch beside each rollout micro-batch, at every PPO pass
        flops += world * cfg.grad_accum * cfg.batch_size * cfg.ppo_epochs * sequence_flops(cfg, configs, T, 0, True)
    other = qwen.activation_bytes(s, cfg.batch_size * T, activation_dtype_bytes(cfg), not cfg.grad_checkpointing)
    print(f"memory plan per GPU (world size {world}, --method={cfg.method}"
          f"{', stored targets' if cfg.targets_dir else ''}):")
    for item, b in rows:
        print(f"  {item:<78} {b / 1e9:7.2f} GB")
    print(f"  {'total':<78} {sum(b for _, b in rows) / 1e9:7.2f} GB")
    print(f"  (activations with checkpointing {'off' if cfg.grad_checkpointing else 'on'} instead: {other / 1e9:.2f} GB)")
    minillm = " (MiniLLM, per rollout batch of --ppo_epochs updates)" if METHODS[cfg.method].policy_gradient else ""
    print(f"model FLOPs per optimizer step{minillm} (all ranks, every sequence {T} tokens): {flops:.3e}")
    return rows

# -----------------------------------------------------------------------------


def main(argv):
    cfg = parse_args(argv)
    if not cfg.student:
        raise SystemExit("--student=DIR is the model to train (or, with --eval_only, to score); the demo, which "
                         "needs no flag: python assets/demo/demo.py")
    try:
        if cfg.dry_run:
            dry_run(cfg)
        else:
            train(cfg)
    except (OSError, data.DataError, qwen.CheckpointError) as e:  # bad files, rows, checkpoints: one line
        sys.exit(f"error: {e}")
    except Preempted as e:  # the run is finished and saved; its final evaluation is what --resume=true reruns
        if launch_rank() == 0:
            print(f"{e}: stopped the final evaluation; training is finished and saved in "
                  f"{checkpoints(cfg.out_dir)[-1]} (--resume=true runs the evaluation)", flush=True)
    except KeyboardInterrupt:  # outside the training loop (Preemption), or a second Ctrl-C inside it
        print(f"\ninterrupted (Ctrl-C); {intact_checkpoint(cfg.out_dir)}", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
            leave(sys.exc_info()[1])


def leave(exc):
    """Ends a torchrun process that finished, or stopped with its one line (exc: a SystemExit or None), without the
    interpreter's shutdown: a thread of the process group (gloo's workers) may still be releasing a collective's
    tensors, and a thread that takes the GIL while the interpreter finalizes aborts the process ("terminate called
    without an active exception", SIGABRT), so torchrun reports a finished run as failed. Every file is closed by
    then. Any other exception keeps its traceback."""
    if exc is not None and not isinstance(exc, SystemExit):
        return
    code = exc.code if exc else 0
    if isinstance(code, str):
        print(code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if isinstance(code, str) else code or 0)


if __name__ == "__main__":
    main(sys.argv[1:])
