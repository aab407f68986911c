"""
Delta Knowledge Distillation (Cao, Kang, Xing, Jiang 2025, arXiv 2509.14526): the loss and a plain
DDP training loop, one code path from one CPU process to torchrun on 8 GPUs.

    python deltakd.py                                   # the embedded demo: everything, bundled data, CPU
    python deltakd.py --method=delta --student=DIR --teacher_ft=DIR --teacher_raw=DIR --train_data=FILE
    torchrun --nproc_per_node=8 deltakd.py --method=delta ...

The student learns the shift the teacher acquired in finetuning rather than its absolute output:
    pi*(y|x) = (1/Z) pi_t^ft(y|x) (pi_s^raw(y|x) / pi_t^raw(y|x))^alpha,   each pi = softmax(z / tau)
             = softmax((z_ft + alpha (z_s^raw - z_t^raw)) / tau)           (the normalisers cancel)
    L = lam * L_SFT + (1 - lam) * KL(pi* || pi_theta),   averaged over supervised (assistant) tokens.
alpha = 0 is forward-KL distillation from the finetuned teacher; lam = 1 is SFT.
"""

import collections
import contextlib
import dataclasses
import functools
import glob
import hashlib
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
import tempfile
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tokenizers import Tokenizer

import data
import qwen
import rouge

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# all hyperparameters, overridden by --key=value


@dataclasses.dataclass
class Config:
    # models (HF-format directories); which ones a method loads is in METHODS below
    student: str = ""           # raw student: the initialisation, and pi_s^raw for delta. Empty: run the demo
    teacher_ft: str = ""        # finetuned teacher pi_t^ft (e.g. Qwen2.5-7B-Instruct)
    teacher_raw: str = ""       # raw teacher pi_t^raw (e.g. Qwen2.5-7B)
    student_raw: str = ""       # pi_s^raw if it is not the initialisation (default: --student)
    tokenizer: str = ""         # tokenizer.json; default: the one in --student
    # data
    train_data: str = ""        # .jsonl / .json / .parquet (formats: see data.py)
    max_rows: int = 0           # use only the first max_rows rows of train_data (0: all)
    eval_data: str = ""         # held-out file; empty: hold out eval_size rows of train_data
    eval_size: int = 64
    max_len: int = 1024         # tokens per example, longer ones are truncated
    system_prompt: str = data.SYSTEM_PROMPT_BASE
    skip_bad_rows: bool = False  # skip (and count) malformed rows instead of stopping
    cache_dir: str = ""         # token caches (tokenized once, shared by runs on the same data); default out_dir/cache
    # method
    method: str = "delta"       # sft | fkl | rkl | delta | seqkd (see METHODS)
    divergence: str = "fkl"     # delta only: fkl = KL(pi* || pi_theta) (the paper), rkl = KL(pi_theta || pi*)
    lam: float = 0.5            # weight of the SFT term (forced to 1 for sft and seqkd)
    alpha: float = 1.0          # strength of the finetuning shift; 0: the raw models are not loaded
    temperature: float = 1.0
    # stored targets ("decoupled teachers"): the frozen models run once, training loads none of them
    targets_dir: str = ""       # empty: frozen models run live at every step
    topk: int = 64              # target probabilities kept per supervised token (+ the mass of the rest)
    targets_dtype: str = "float16"  # storage of the top-k log-probabilities: float16 | float32
    targets_shard: int = 256    # examples per shard file (the unit an interrupted pass resumes from)
    targets_only: bool = False  # compute the stored targets and stop (e.g. on other GPUs, before training)
    # optimisation
    batch_size: int = 4         # sequences per micro-batch per rank
    grad_accum: int = 1         # micro-batches per rank per optimizer step
    epochs: int = 1
    max_steps: int = 0          # 0: epochs * steps per epoch
    lr: float = 1e-5
    min_lr_ratio: float = 0.1   # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0      # 0 disables
    zero: bool = False          # shard AdamW state across ranks (ZeroRedundancyOptimizer)
    grad_checkpointing: bool = False
    compile: bool = False       # torch.compile the student, the frozen models (lengths padded to a multiple of 64) and the loss chunk
    loss_impl: str = "chunked"  # chunked (memory-flat) | dense (full logits, for checking)
    chunk_size: int = 512       # supervised tokens per loss chunk: 3 (chunk, vocab) fp32 buffers for a KD term
    teacher_dtype: str = "bfloat16"  # frozen models; the student trains in fp32
    autocast: str = "auto"      # bf16 | none; auto: bf16 on CUDA, none on CPU
    # evaluation: ROUGE of generated answers on held-out prompts, and teacher-forced NLL / KL / top-1
    eval_every: int = 0         # 0: only at the end
    eval_max_new_tokens: int = 256
    eval_temperature: float = 0.0  # 0: greedy; > 0: sampled at this temperature, top_p 1 (MiniLLM / DistiLLM)
    eval_seeds: int = 1         # sampled answers per prompt (seeds seed, seed+1, ...); ROUGE is their mean
    eval_batch_size: int = 16
    seqkd_max_new_tokens: int = 256
    # run
    out_dir: str = "out"
    save_every: int = 0         # 0: only at the end
    keep_last: int = 2
    resume: bool = False
    seed: int = 1337
    device: str = "auto"
    peak_tflops: float = 0.0    # per device, for MFU in the log; 0: 989 on H100/H200, 312 on A100 (bf16 dense), else none
    quiet: bool = False         # no per-step lines (metrics.jsonl is still written)
    dry_run: bool = False       # print the per-GPU memory plan and FLOPs per step from config.json alone, then exit
    eval_only: bool = False     # score --student on --eval_data (with --teacher_ft: the teacher-forced KL) and stop
    full_comparison: bool = False  # the demo only: 3 seeds, Delta-KD at alpha 0, 0.5, 1 and with stored top-k
    demo_raw_models: str = ""   # the demo only: its raw models and tokenizer (default the bundled assets/demo)


@dataclasses.dataclass(frozen=True)
class Method:
    frozen: tuple = ()          # frozen models the loss reads, by role
    divergence: str = ""        # fixed divergence; "flag": --divergence; "": no KD term
    lam: float | None = None    # forced lambda; None: --lam
    generator: str = ""         # seqkd: the model whose greedy answers replace the training answers


# the one table of methods: everything else reads it
METHODS = {
    "sft": Method(lam=1.0),
    "fkl": Method(frozen=("teacher_ft",), divergence="fkl"),
    "rkl": Method(frozen=("teacher_ft",), divergence="rkl"),
    "delta": Method(frozen=("teacher_ft", "teacher_raw", "student_raw"), divergence="flag"),
    "seqkd": Method(lam=1.0, generator="teacher_ft"),
}


def parse_args(argv, cfg=None):
    cfg = cfg or Config()
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    given = set()
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"arguments are --key=value, got {arg!r}")
        key, val = arg[2:].split("=", 1)
        if key not in types:
            raise SystemExit(f"unknown config key {key!r}; known keys: {', '.join(types)}")
        typ = types[key]
        try:
            if typ is bool:
                if val.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                v = val.lower() in ("true", "1")
            else:
                v = typ(val)
        except ValueError:
            raise SystemExit(f"--{key}={val}: expected {typ.__name__}") from None
        setattr(cfg, key, v)
        given.add(key)
    if cfg.method not in METHODS:
        raise SystemExit(f"--method={cfg.method}: expected one of {', '.join(METHODS)}")
    method = METHODS[cfg.method]
    if "divergence" in given and method.divergence != "flag":
        raise SystemExit(f"--divergence has no effect with --method={cfg.method} (only delta takes it)")
    if cfg.divergence not in DIVERGENCES or cfg.loss_impl not in ("chunked", "dense"):
        raise SystemExit(f"--divergence is one of {', '.join(DIVERGENCES)}; --loss_impl is chunked or dense")
    if not 0.0 <= cfg.lam <= 1.0 or cfg.temperature <= 0:
        raise SystemExit("--lam must be in [0, 1] and --temperature > 0")
    if cfg.targets_dir and not method.frozen:
        raise SystemExit(f"--targets_dir has no effect with --method={cfg.method} (no teacher distribution)")
    if cfg.targets_dtype not in ("float32", "float16") or cfg.autocast not in ("auto", "bf16", "none"):
        raise SystemExit("--targets_dtype is float32 or float16; --autocast is auto, bf16 or none")
    if cfg.eval_seeds < 1 or cfg.eval_temperature < 0 or ("eval_seeds" in given and cfg.eval_temperature == 0):
        raise SystemExit("--eval_seeds >= 1 goes with --eval_temperature > 0 (the sampled protocol; greedy "
                         "answers are always scored too)")
    return cfg

# -----------------------------------------------------------------------------
# the loss. Each formula once: the target's logits, each divergence, the SFT term; the dense
# reference, the chunked path and the stored-target path all call these.


@dataclasses.dataclass(frozen=True)
class LossSpec:
    vocab: int                  # the tokenizer's real tokens: logits are sliced to these before any arithmetic
    lam: float = 0.5
    alpha: float = 1.0
    temperature: float = 1.0
    divergence: str = "fkl"
    chunk_size: int = 512
    impl: str = "chunked"
    compile: bool = False       # chunk_loss through torch.compile (one graph per spec, any chunk length)


def target_weights(roles, alpha):
    """The target's logits (before / tau) are a weighted sum of the frozen models' logits by role: z_ft
    alone for fkl/rkl, and for Delta-KD z_ft + alpha (z_s^raw - z_t^raw), whose softmax at tau is
    pi_t^ft (pi_s^raw / pi_t^raw)^alpha / Z with every pi = softmax(z / tau). A new linear shift
    operator goes here (a non-linear one replaces target_logits and chunk_target)."""
    if "teacher_raw" not in roles:
        return {"teacher_ft": 1.0}
    return {"teacher_ft": 1.0, "student_raw": alpha, "teacher_raw": -alpha}


def target_logits(z, alpha):
    """The target's logits from the frozen models' full logits by role, in float32."""
    return sum(w * z[r].float() for r, w in target_weights(z, alpha).items())


def forward_kl(logp, logq):
    """KL(p || q) per row from log-probabilities over the same support (vocabulary, or K+1 buckets)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def reverse_kl(logp, logq):
    """KL(q || p) per row, as forward_kl."""
    return (logq.exp() * (logq - logp)).sum(-1)


DIVERGENCES = {"fkl": forward_kl, "rkl": reverse_kl}  # a new divergence: a function here (autograd does its gradient)


def delta_kd_target(ft_teacher_logits, raw_teacher_logits, raw_student_logits, alpha, temperature):
    """float32 log pi* from the three models' logits (already sliced to the real tokens)."""
    z = {"teacher_ft": ft_teacher_logits, "teacher_raw": raw_teacher_logits, "student_raw": raw_student_logits}
    return F.log_softmax(target_logits(z, alpha) / temperature, dim=-1)


def shift_labels(labels):
    """The one next-token shift: position t's logits predict labels[t + 1]. Returns the (B, T-1) mask
    of supervised positions and their target ids (N,)."""
    mask = labels[:, 1:] != data.IGNORE_INDEX
    return mask, labels[:, 1:][mask]


def kd_loss(student_logits, target_logprobs, labels, divergence="fkl", temperature=1.0):
    """Sum over supervised positions of DIVERGENCES[divergence](p, q), p = exp(target_logprobs),
    q = softmax(student_logits / tau); logits (B, T, V) aligned with labels (B, T). Returns
    (sum, count): the caller divides once by the global count. No tau^2 factor."""
    mask, _ = shift_labels(labels)
    logq = F.log_softmax(student_logits[:, :-1][mask].float() / temperature, dim=-1)
    return DIVERGENCES[divergence](target_logprobs[:, :-1][mask].float(), logq).sum(), mask.sum()


def negative_log_likelihood(logq, targets):
    """Sum over rows of -log q[y]: the SFT term, from log-probabilities at tau = 1."""
    return -logq.gather(-1, targets[:, None]).sum()


def sft_loss(student_logits, labels):
    """Sum of -log softmax(z)[y] over supervised positions, and their count."""
    mask, targets = shift_labels(labels)
    return negative_log_likelihood(F.log_softmax(student_logits[:, :-1][mask].float(), dim=-1), targets), mask.sum()


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


def topk_target(target_logits_tau, k):
    """The StoredTarget of logits already divided by tau: what the target pass writes."""
    logp = F.log_softmax(target_logits_tau.float(), dim=-1)
    top, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    rest = logp.scatter(1, ids, float("-inf")).logsumexp(-1).clamp(min=LOG_FLOOR)
    return StoredTarget(ids, top, rest)


def bucket_logq(logq, target):
    # the student's log-probabilities over the stored target's K+1 buckets. The rest is a logsumexp over
    # the other ids, not 1 - sum(q_k): that difference is rounding noise when the rest is nearly empty
    rest = logq.scatter(1, target.ids, float("-inf")).logsumexp(-1).clamp(min=LOG_FLOOR)
    return torch.cat([logq.gather(1, target.ids), rest[:, None]], 1)


def logsumexp_(x):
    # torch.logsumexp over the last dim without its (n, V) temporary: x is overwritten
    m = x.amax(-1, keepdim=True).clamp(min=LOG_FLOOR)  # a row of -inf (every id stored) has no rest
    return x.sub_(m).exp_().sum(-1).log_().add_(m[:, 0])


def chunk_loss(z, targets, target, spec, scratch=None):
    """One chunk: z (n, V) fp32 student logits, targets (n,) ids; target None (SFT), (n, V) fp32 target
    logits (before / tau), or a StoredTarget. Returns the loss, its SFT and KD sums and dloss/dz (n, V).
    z, the target's logits and scratch (n, V) are workspace and are overwritten; dz comes back in z's
    memory. On CPU a fresh tensor of this size is page-faulted in again, which was most of this
    function's time before (a chunk is a few hundred MB).
    Gradients: SFT softmax(z) - onehot(y); forward KL in closed form, (q - p~) / tau with p~ the target
    spread over the vocabulary (for a stored target: p_k on its ids, q_j p_rest / q_rest on the
    others); any other divergence by autograd on this chunk alone, so memory stays flat."""
    lam, tau = spec.lam, spec.temperature
    c = (1 - lam) / tau
    rows = torch.arange(len(targets), device=z.device)
    if target is None:
        sft = negative_log_likelihood(torch.log_softmax(z, -1, out=z), targets)
        dz = z.exp_().mul_(lam)
        dz[rows, targets] -= lam
        return lam * sft, sft, torch.zeros_like(sft), dz
    q1 = None  # softmax(z) at tau = 1 for the SFT gradient, where it is not q itself
    if tau != 1.0:  # the SFT term is at tau = 1: its own log-softmax
        logq1 = F.log_softmax(z, dim=-1)
        sft = negative_log_likelihood(logq1, targets)
        q1 = logq1.exp_() if lam else None
        z.div_(tau)
    logq = torch.log_softmax(z, -1, out=z)
    if tau == 1.0:
        sft = negative_log_likelihood(logq, targets)
    lam_q = lam if q1 is None else 0.0  # the SFT gradient's lam * q1, folded into q's coefficient when q1 is q
    divergence = DIVERGENCES[spec.divergence]
    stored = isinstance(target, StoredTarget)
    if stored:
        logp = torch.cat([target.logp, target.log_rest[:, None]], 1)
    else:
        logp = torch.log_softmax(target.div_(tau) if tau != 1.0 else target, -1, out=target)
    if divergence is forward_kl and stored:
        logq_k = logq.gather(1, target.ids)
        q = torch.exp(logq, out=scratch)
        rest = logsumexp_(logq.scatter_(1, target.ids, float("-inf"))).clamp_(min=LOG_FLOOR)  # logq is spent
        kd = forward_kl(logp, torch.cat([logq_k, rest[:, None]], 1)).sum()
        r = (target.log_rest - rest).exp()  # p_rest / q_rest
        dz = torch.mul(q, (c * (1 - r) + lam_q)[:, None], out=z)  # every id as if in the rest: c q_j (1 - r) ...
        dz.scatter_add_(1, target.ids, c * (r[:, None] * logq_k.exp() - target.logp.exp()))  # ... then c (q_k - p_k)
    elif divergence is forward_kl:
        p = torch.exp(logp, out=scratch)
        kd = logp.sub_(logq).mul_(p).sum()  # sum_j p_j (log p_j - log q_j), in the target's buffer
        dz = logq.exp_().mul_(c + lam_q).sub_(p, alpha=c)
    else:
        with torch.enable_grad():  # logq is z / tau up to a per-row constant, so it stands in for it here
            zz = logq.detach().clone().requires_grad_()
            lq = F.log_softmax(zz, dim=-1)
            kd = divergence(logp, bucket_logq(lq, target) if stored else lq).sum()
            (dkd,) = torch.autograd.grad(kd, zz)
        kd = kd.detach()
        dz = dkd.mul_(c).add_(logq.exp_(), alpha=lam_q)
    if q1 is not None:
        dz.add_(q1, alpha=lam)
    if lam:
        dz[rows, targets] -= lam
    return lam * sft + (1 - lam) * kd, sft, kd, dz


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


def chunk_target(live, s, e, spec, out=None):
    """Target logits (before / tau) of rows s:e from the frozen models' hidden states and heads, by role,
    summed into one fp32 buffer with target_weights' coefficients (addmm in fp32: no (n, V) temporary)."""
    for i, (role, w) in enumerate(target_weights(live, spec.alpha).items()):
        h, head = live[role]
        if i == 0:
            out = logits(h[s:e], head[:spec.vocab], out)
            if w != 1.0:
                out.mul_(w)
        elif plain_fp32(h):
            out.addmm_(h[s:e], head[:spec.vocab].T, alpha=w)
        else:
            out.add_(logits(h[s:e], head[:spec.vocab]), alpha=w)
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
    def forward(ctx, h, weight, targets, target, spec):
        V, chunk, N = spec.vocab, spec.chunk_size, h.shape[0]
        need_grad = h.requires_grad or weight.requires_grad  # grad mode itself is off in here
        W = weight[:V]  # the real tokens only: Qwen's padded rows never enter a softmax
        # fp32 gradient buffers; padded vocab rows stay zero
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_grad else None
        grad_W = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_grad else None
        totals = torch.zeros(3, dtype=torch.float64, device=h.device)  # loss, sft, kd
        live = isinstance(target, dict)  # live frozen models: {role: (hidden (N, C_t), head (V_t, C_t))}
        buffers = torch.empty((1 + (target is not None) + live, min(chunk, N), V), device=h.device)
        loss_of_chunk = compiled_chunk_loss() if spec.compile else chunk_loss
        for s in range(0, N, chunk):
            hc = h[s:s + chunk]
            n = len(hc)
            z = logits(hc, W.to(hc.dtype), buffers[0, :n])  # (n, V) student logits
            if live:
                t = chunk_target(target, s, s + chunk, spec, buffers[2, :n])
            else:
                t = None if target is None else target[s:s + chunk]
            loss, sft, kd, dz = loss_of_chunk(z, targets[s:s + chunk], t, spec, buffers[1, :n] if t is not None else None)
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
        return grad_h.mul_(g).to(ctx.dtypes[0]), grad_W.mul_(g).to(ctx.dtypes[1]), None, None, None


def distill_loss(h, weight, labels, target, spec):
    """(loss_sum, sft_sum, kd_sum, count) over the supervised positions of a batch. h (B, T, C) student
    final hidden states, weight its lm_head, labels (B, T); target: None (SFT), {role: (hidden
    (B, T, C_t), head weight)} of the frozen models, or a StoredTarget with one row per supervised
    position (in the order of shift_labels' mask). spec.impl "chunked" (memory-flat) or "dense"
    (full (B, T, V) logits through the pure functions above: the reference the chunked path equals)."""
    V, lam = spec.vocab, spec.lam
    target = target or None  # {}: no frozen model (SFT)
    mask, targets = shift_labels(labels)
    if spec.impl == "chunked" or isinstance(target, StoredTarget):
        sel = {r: (t[:, :-1][mask], w) for r, (t, w) in target.items()} if isinstance(target, dict) else target
        return (*ChunkedDistillLoss.apply(h[:, :-1][mask], weight, targets, sel, spec), mask.sum())
    z = (h @ weight[:V].T).float()  # (B, T, V)
    sft, n = sft_loss(z, labels)
    if target is None:
        return lam * sft, sft.detach(), torch.zeros_like(sft), n
    t = target_logits({r: (th @ tw[:V].T).float() for r, (th, tw) in target.items()}, spec.alpha)
    kd, _ = kd_loss(z, F.log_softmax(t / spec.temperature, dim=-1), labels, spec.divergence, spec.temperature)
    return lam * sft + (1 - lam) * kd, sft.detach(), kd.detach(), n


def loss_spec(cfg, vocab):
    method = METHODS[cfg.method]
    divergence = cfg.divergence if method.divergence == "flag" else method.divergence or "fkl"
    return LossSpec(vocab=vocab, lam=cfg.lam if method.lam is None else method.lam, alpha=cfg.alpha,
                    temperature=cfg.temperature, divergence=divergence, chunk_size=cfg.chunk_size,
                    impl=cfg.loss_impl, compile=cfg.compile)

# -----------------------------------------------------------------------------
# distributed set-up, models, data


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


def frozen_roles(cfg):
    """The frozen models the loss reads, by role: METHODS' list, less those whose weight in the target
    (target_weights) is 0. At alpha = 0 that is the raw models (Delta-KD is then forward KL from the
    finetuned teacher): at the paper's scale a 7B and a 1.5B model neither loaded nor run."""
    roles = METHODS[cfg.method].frozen
    weights = target_weights(roles, cfg.alpha)
    return tuple(r for r in roles if weights[r] != 0)


def needed_models(cfg):
    # role -> directory; only what the method needs is loaded (and a given --teacher_ft, for evaluation)
    method = METHODS[cfg.method]
    roles = () if cfg.eval_only else frozen_roles(cfg) + ((method.generator,) if method.generator else ())
    roles += ("teacher_ft",) if cfg.teacher_ft and "teacher_ft" not in roles else ()
    return {role: (cfg.student_raw or cfg.student) if role == "student_raw" else getattr(cfg, role) for role in roles}


def frozen_models(cfg):
    # role -> directory of the frozen models the loss reads (frozen_roles; seqkd's generator is not one)
    return {role: path for role, path in needed_models(cfg).items() if role in frozen_roles(cfg)}


def check_inputs(cfg):
    """Everything that can be checked before loading weights: paths, tokenizer agreement, vocab sizes,
    an output directory we can write. Returns the tokenizer and its path."""
    dirs = {"student": cfg.student, **needed_models(cfg)}
    for role, path in dirs.items():
        if not path:
            raise SystemExit(f"--method={cfg.method} needs --{role}")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise SystemExit(f"--{role}={path}: no config.json there (not an HF model directory)")
    if cfg.eval_only and not cfg.eval_data:
        raise SystemExit("--eval_only needs --eval_data (the held-out file to score --student on)")
    for key in ("train_data", "eval_data"):
        path = getattr(cfg, key)
        if (path or (key == "train_data" and not cfg.eval_only)) and not os.path.isfile(path):
            raise SystemExit(f"--{key}={path}: no such file")
    tok_path = cfg.tokenizer or os.path.join(cfg.student, "tokenizer.json")
    if not os.path.isfile(tok_path):
        raise SystemExit(f"no tokenizer: {tok_path} does not exist (pass --tokenizer=.../tokenizer.json)")
    tokenizer = Tokenizer.from_file(tok_path)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    for role, path in dirs.items():
        other = os.path.join(path, "tokenizer.json")
        if os.path.isfile(other) and os.path.abspath(other) != os.path.abspath(tok_path):
            if Tokenizer.from_file(other).get_vocab(with_added_tokens=True) != vocab:
                raise SystemExit(f"tokenizer mismatch: {other} (--{role}) differs from {tok_path}; "
                                 "all models must share one tokenizer")
        n = qwen.QwenConfig.from_json(os.path.join(path, "config.json")).vocab_size
        if n < len(vocab):
            raise SystemExit(f"--{role}={path}: vocab_size {n} is smaller than the tokenizer's {len(vocab)} tokens")
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cfg.out_dir):
            pass
    except OSError as e:
        raise SystemExit(f"--out_dir={cfg.out_dir} is not writable: {e}") from None
    return tokenizer, tok_path


def wait_until(ready, what, rank, every=300):
    """Polls the file system until ready() is true. Not a collective: a wait on a build that takes
    hours outlives NCCL's 10-minute timeout. If the builder dies, torchrun stops this rank too."""
    t0 = next_note = time.time()
    while not ready():
        if rank == 1 and time.time() >= next_note:  # one rank speaks for the waiting ones
            print(f"rank 1: waiting for {what} ({time.time() - t0:.0f}s so far)", flush=True)
            next_note += every
        time.sleep(1)


def token_cache(cfg, path, tok_path, tokenizer, rank):
    """The TokenCache of a data file: built by rank 0 if no complete one exists, memory-mapped by all."""
    key = data.cache_key(path, tok_path, cfg.max_len, cfg.system_prompt, cfg.max_rows, cfg.skip_bad_rows)
    root = cfg.cache_dir or os.path.join(cfg.out_dir, "cache")
    where = data.cache_dir_for(root, key)
    log = print if rank == 0 and not cfg.quiet else None
    if rank == 0:
        why = data.check_cache(where, key)
        if why:
            if os.path.exists(where):
                print(f"token cache {where}: {why}; rebuilding it", flush=True)
            elif log:
                log(f"token cache: tokenizing {path} into {where}")
            stats = data.build_cache(path, tokenizer, where, key, cfg.max_len, cfg.system_prompt, cfg.max_rows,
                                     cfg.skip_bad_rows, log)
            with open(os.path.join(root, "build.log"), "a") as f:  # one line per build: who built what, when
                f.write(json.dumps({"cache": os.path.basename(where), "time": time.time(), "pid": os.getpid(),
                                    "host": os.uname().nodename, **stats}) + "\n")
    else:
        wait_until(lambda: data.check_cache(where, key) is None, f"rank 0 to build or check the token cache {where}",
                   rank)
    cache = data.TokenCache(where)
    if log:
        log(f"data {path}: {cache.meta['stats']} (cache {where})")
    if len(cache) == 0:
        raise SystemExit(f"{path}: no example has a supervised (assistant) token within max_len={cfg.max_len}")
    return cache


def load_data(cfg, tokenizer, tok_path, rank, world, device):
    """(cache, training example indices, evaluation rows). The held-out rows are chosen by seed among the
    file's rows (data.held_out_rows) and read back from the file alone; the cache is shared by
    every split."""
    cache = token_cache(cfg, cfg.train_data, tok_path, tokenizer, rank)
    if cfg.eval_data or cfg.eval_size <= 0:
        train_idx = np.arange(len(cache))
        eval_rows = data.read_rows(cfg.eval_data) if cfg.eval_data else []
    else:
        held = data.held_out_rows(cache.meta["stats"]["rows"], cfg.eval_size, cfg.seed)
        train_idx = np.flatnonzero(~np.isin(cache.rows, held))
        found = data.read_rows_at(cfg.train_data, held, cache.line_offsets)
        eval_rows = [found[n] for n in held.tolist()]
    if METHODS[cfg.method].generator:
        path = seqkd_data(cfg, cache, train_idx, tokenizer, device, rank, world)
        cache = token_cache(cfg, path, tok_path, tokenizer, rank)
        train_idx = np.arange(len(cache))
    if len(train_idx) == 0:
        raise SystemExit(f"{cfg.train_data}: no training example left after holding out {cfg.eval_size} rows")
    return cache, train_idx, eval_rows


def seqkd_data(cfg, cache, train_idx, tokenizer, device, rank, world):
    """SeqKD (Kim & Rush 2016): a data file whose answers are the finetuned teacher's greedy answers to
    each training example's first user turn. The prompt is the cached example up to its first
    supervised token, which is exactly the template's generation prompt. Written once into out_dir
    (a resumed run does not regenerate); returns its path."""
    path = os.path.join(cfg.out_dir, "seqkd_data.jsonl")
    if not os.path.isfile(path):
        teacher = qwen.Qwen.from_pretrained(cfg.teacher_ft, dtype=dtype_of(cfg.teacher_dtype), device=device).eval()
        prompts = [cache.input_ids[cache.offsets[i]:cache.offsets[i] + cache.spans[cache.span_offsets[i]][0]]
                   .astype(np.int64).tolist() for i in train_idx]
        answers = generate_all(teacher, prompts, tokenizer, cfg.seqkd_max_new_tokens, cfg.eval_batch_size, rank, world)
        del teacher
        if rank == 0:
            wanted = set(cache.rows[train_idx].tolist())  # row numbers, ascending like train_idx
            firsts = (data.to_messages(row) for n, _, row in data.iter_rows(cfg.train_data, cfg.max_rows) if n in wanted)
            with open(path + ".tmp", "w") as f:
                for msgs, answer in zip(firsts, answers):
                    head = msgs[:2] if msgs[0]["role"] == "system" else msgs[:1]
                    if answer.strip():  # an empty teacher answer cannot be supervised
                        f.write(json.dumps({"messages": head + [{"role": "assistant", "content": answer}]}) + "\n")
            os.replace(path + ".tmp", path)
        wait_until(lambda: os.path.isfile(path), f"rank 0 to write {path}", rank)
    if os.path.getsize(path) == 0:
        raise SystemExit(f"seqkd: the finetuned teacher {cfg.teacher_ft} gave an empty answer to every training "
                         f"prompt ({path}); nothing to train on")
    return path


def dtype_of(name):
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]

# -----------------------------------------------------------------------------
# stored targets ("decoupled teachers", as the paper served its teachers apart from training): the
# frozen models run once over the token cache; for every supervised position the top-K ids of the
# target, their log-probabilities and the log of the rest's mass go to disk, and training loads no
# frozen model at all. fkl and rkl share one store (same target); delta has its own per alpha.


def model_identity(path):
    # what changes a model's outputs: its config and its weight files (name, size, mtime)
    with open(os.path.join(path, "config.json"), "rb") as f:
        config = hashlib.sha256(f.read()).hexdigest()
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    return {"config_sha256": config,
            "weights": [[os.path.basename(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in files]}


def targets_key(cfg, cache, vocab, device):
    roles = frozen_roles(cfg)
    return {"format": 1, "tokens": cache.meta["key"], "vocab": vocab, "topk": min(cfg.topk, vocab),
            "models": {role: model_identity(path) for role, path in frozen_models(cfg).items()},
            "alpha": cfg.alpha if "teacher_raw" in roles else None, "temperature": cfg.temperature,
            "teacher_dtype": cfg.teacher_dtype, "autocast": autocast_dtype(device, cfg.autocast) is not None,
            "targets_dtype": cfg.targets_dtype, "shard": cfg.targets_shard}


def differing(a, b, prefix=""):
    # the dotted names of the keys whose values differ between two nested dicts ("tokens.max_len")
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [prefix or "(everything)"]
    return [d for k in sorted(set(a) | set(b)) for d in differing(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)]


class TargetStore:
    """DIR/shard-NNNNN/{ids,logp,rest}.bin: (M, K) uint32 ids, (M, K) log-probabilities and (M,) float32
    log rest mass for the M supervised positions of examples [N*shard, (N+1)*shard) of the cache, in
    example order and, within an example, position order (shift_labels' mask order). A shard
    directory gets its name only when complete, so a half-written shard is never read."""

    def __init__(self, directory, cache, key):
        self.dir, self.key, self.k, self.shard = directory, key, key["topk"], key["shard"]
        self.logp_dtype = np.dtype(key["targets_dtype"])
        self.offsets = np.concatenate([[0], np.cumsum(cache.n_targets())])
        self.n_examples = len(cache)
        self.n_shards = math.ceil(self.n_examples / self.shard)
        self.maps = {}

    def open_or_claim(self, rank):
        """Refuses a directory built for something else, naming what differs; writes the key if new."""
        path = os.path.join(self.dir, "key.json")
        if rank == 0 and not os.path.isfile(path):
            os.makedirs(self.dir, exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(self.key, f, indent=1)
            os.replace(path + ".tmp", path)
        wait_until(lambda: os.path.isfile(path), f"rank 0 to write {path}", rank)
        with open(path) as f:
            theirs = json.load(f)
        if theirs != self.key:
            raise SystemExit(f"--targets_dir={self.dir} holds targets for another run (differs in: "
                             f"{', '.join(differing(theirs, self.key))}); use another directory or delete it")

    def rows(self, s):
        return int(self.offsets[min((s + 1) * self.shard, self.n_examples)] - self.offsets[s * self.shard])

    def files(self, s, directory=None):
        d = directory or os.path.join(self.dir, f"shard-{s:05d}")
        M = self.rows(s)
        return {"ids": (os.path.join(d, "ids.bin"), np.uint32, (M, self.k)),
                "logp": (os.path.join(d, "logp.bin"), self.logp_dtype, (M, self.k)),
                "rest": (os.path.join(d, "rest.bin"), np.float32, (M,))}

    def complete(self, s):
        return all(os.path.isfile(p) and os.path.getsize(p) == np.dtype(dt).itemsize * math.prod(shape)
                   for p, dt, shape in self.files(s).values())

    def write(self, s, target):
        arrays = {"ids": target.ids.cpu().numpy(), "logp": target.logp.float().cpu().numpy(),
                  "rest": target.log_rest.float().cpu().numpy()}
        with qwen.atomic_dir(os.path.join(self.dir, f"shard-{s:05d}")) as tmp:  # over a damaged one, if any
            for name, (p, dt, shape) in self.files(s, tmp).items():
                assert arrays[name].shape == shape, (name, arrays[name].shape, shape)
                arrays[name].astype(dt).tofile(p)

    def get(self, examples, device):
        """The StoredTarget rows of these examples, concatenated in the given order."""
        parts = {"ids": [], "logp": [], "rest": []}
        for i in examples:
            s = int(i) // self.shard
            if s not in self.maps:
                self.maps[s] = {n: np.memmap(p, dtype=dt, mode="r", shape=shape) if shape[0] else np.zeros(shape, dt)
                                for n, (p, dt, shape) in self.files(s).items()}
            lo = int(self.offsets[i] - self.offsets[s * self.shard])
            hi = lo + int(self.offsets[i + 1] - self.offsets[i])
            for n in parts:
                parts[n].append(self.maps[s][n][lo:hi])
        cat = {n: torch.from_numpy(np.concatenate(v)) for n, v in parts.items()}
        return StoredTarget(cat["ids"].long().to(device), cat["logp"].float().to(device),
                            cat["rest"].to(device))


def compute_targets(cfg, cache, store, pad_id, spec, device, rank, world):
    """The target pass: each rank takes every world-th unfinished shard, runs the frozen models over it
    and writes it; then all ranks wait (on the file system, not a collective) for every shard.
    A killed pass resumes from the finished shards."""
    store.open_or_claim(rank)
    todo = [s for s in range(rank, store.n_shards, world) if not store.complete(s)]
    if todo:
        frozen = load_frozen(cfg, device)
        t0, rows = time.time(), 0
        for n, s in enumerate(todo):
            examples = sorted(range(s * store.shard, min((s + 1) * store.shard, len(cache))),
                              key=lambda i: -int(cache.lengths[i]))  # similar lengths together: less padding
            pieces = {}
            for b in range(0, len(examples), cfg.batch_size):
                idx = examples[b:b + cfg.batch_size]
                input_ids, labels, _ = data.collate([cache.example(i) for i in idx], pad_id)
                live = frozen_target(frozen, input_ids.to(device), cfg.autocast)
                mask, _ = shift_labels(labels.to(device))
                live = {r: (h[:, :-1][mask], w) for r, (h, w) in live.items()}
                with torch.no_grad():
                    parts = [topk_target(chunk_target(live, c, c + cfg.chunk_size, spec) / spec.temperature,
                                         store.k) for c in range(0, int(mask.sum()), cfg.chunk_size)]
                counts = mask.sum(1).tolist()  # each example's supervised positions, in mask order
                for i, *fields in zip(idx, *(torch.cat(x).split(counts) for x in zip(*parts))):
                    pieces[i] = StoredTarget(*fields)
            ordered = [pieces[i] for i in sorted(pieces)]
            store.write(s, StoredTarget(*(torch.cat(x) for x in zip(*ordered))))
            rows += store.rows(s)
            if rank == 0 and not cfg.quiet:
                print(f"targets: shard {s + 1}/{store.n_shards} | {rows / (time.time() - t0):.0f} supervised "
                      f"tokens/s on rank 0 | eta {(time.time() - t0) / (n + 1) * (len(todo) - n - 1):.0f}s", flush=True)
        del frozen
    wait_until(lambda: all(store.complete(s) for s in range(store.n_shards)), f"all target shards in {store.dir}",
               rank)


# -----------------------------------------------------------------------------
# generation and evaluation


def generate_all(model, prompts, tokenizer, max_new_tokens, batch_size, rank, world, temperature=0.0, seed=0):
    """Answers (decoded text) for all prompts, each rank generating a share; returned on every rank. Greedy
    at temperature 0, else sampled (top_p 1) with batch b of this rank seeded by (seed, b): the same
    answers for the same seed, batch size and world size."""
    eos = [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")]
    mine = list(range(rank, len(prompts), world))
    mine.sort(key=lambda i: len(prompts[i]))  # similar lengths per batch: less padding
    out = {}
    was_training = model.training
    model.eval()
    for s in range(0, len(mine), batch_size):
        idx = mine[s:s + batch_size]
        with autocast(model.lm_head.weight.device):
            gen = model.generate([prompts[i] for i in idx], max_new_tokens, eos_token_id=eos,
                                 vocab_limit=tokenizer.get_vocab_size(), temperature=temperature,
                                 seed=seed * 1_000_003 + s)
        for i, ids in zip(idx, gen):
            out[i] = tokenizer.decode(ids, skip_special_tokens=True)
    model.train(was_training)
    if dist.is_initialized():
        parts = [None] * world
        dist.all_gather_object(parts, out)
        out = {k: v for p in parts for k, v in p.items()}
    return [out[i] for i in range(len(prompts))]


class EvalSet(NamedTuple):
    prompts: list  # token ids of each held-out prompt (data.eval_pairs' single-turn protocol)
    refs: list     # the reference answers
    forced: list   # (input_ids, labels) of each prompt with its reference answer, for teacher forcing


def eval_set(rows, tokenizer, cfg):
    prompts, refs, _ = data.eval_pairs(rows, tokenizer, cfg.system_prompt, cfg.max_len)
    first = [{"messages": data.first_exchange(r)} for r in rows]
    forced, _ = data.encode_rows(first, tokenizer, cfg.max_len, cfg.system_prompt, source="eval data")
    return EvalSet(prompts, refs, [f for f in forced if any(y != data.IGNORE_INDEX for y in f[1])])


@torch.no_grad()
def forced_scores(model, teacher, forced, pad_id, vocab, cfg, rank, world):
    """Teacher-forced figures on the held-out reference answers, per answer token: the student's NLL of the
    reference, and with the finetuned teacher KL(pi_t^ft || student) at tau = 1 and top-1 agreement (the
    share of positions where both models' most probable token is the same). Smooth, cheap, and what
    distillation optimises directly, where ROUGE of generations is noisy and coarse."""
    dev = model.lm_head.weight.device
    sums = torch.zeros(4, dtype=torch.float64, device=dev)  # nll, kl, agreements, tokens
    was_training = model.training
    model.eval()
    mine = forced[rank::world]
    for s in range(0, len(mine), cfg.eval_batch_size):
        input_ids, labels, attention_mask = (x.to(dev) for x in data.collate(mine[s:s + cfg.eval_batch_size], pad_id))
        mask, targets = shift_labels(labels)
        with autocast(dev, cfg.autocast):
            hs = {m: m(input_ids, attention_mask, return_hidden=True)[:, :-1][mask] for m in (model, teacher) if m}
        for c in range(0, len(targets), cfg.chunk_size):
            z = {m: logits(h[c:c + cfg.chunk_size], m.lm_head.weight[:vocab]) for m, h in hs.items()}
            logq = F.log_softmax(z[model], dim=-1)
            sums[0] += negative_log_likelihood(logq, targets[c:c + cfg.chunk_size])
            if teacher:
                sums[1] += forward_kl(F.log_softmax(z[teacher], dim=-1), logq).sum()
                sums[2] += (z[model].argmax(-1) == z[teacher].argmax(-1)).sum()
        sums[3] += len(targets)
    model.train(was_training)
    nll, kl, agree, n = all_reduce(sums).tolist()
    n = max(n, 1)
    return {"nll": nll / n, **({"kl_teacher": kl / n, "top1_teacher": agree / n} if teacher else {})}


def evaluate(model, evalset, teacher, tokenizer, cfg, rank, world, tag):
    """ROUGE-1/2/L/Lsum F1 (stemmed, mean over examples) of greedy answers, and with --eval_temperature > 0
    also of sampled ones (top_p 1, the mean over --eval_seeds answers per prompt: the MiniLLM / DistiLLM
    protocol) as sampled_*; answer_sanity of the greedy answers; forced_scores. Answers to
    eval-{tag}.jsonl (and eval-{tag}-sampled.jsonl)."""
    protocols = [("", 0.0, 1)] + ([("sampled_", cfg.eval_temperature, cfg.eval_seeds)] if cfg.eval_temperature else [])
    scores = {}
    for prefix, temperature, n_seeds in protocols:
        preds = [generate_all(model, evalset.prompts, tokenizer, cfg.eval_max_new_tokens, cfg.eval_batch_size, rank,
                              world, temperature, cfg.seed + k) for k in range(n_seeds)]
        per_seed = [rouge_f1(evalset.refs, p) for p in preds]
        scores.update({prefix + t: statistics.mean(s[t] for s in per_seed) for t in per_seed[0]})
        if not prefix:
            scores.update(answer_sanity(preds[0]))
        if rank == 0:
            with open(os.path.join(cfg.out_dir, f"eval-{tag}{'-' + prefix[:-1] if prefix else ''}.jsonl"), "w") as f:
                for k, p in enumerate(preds):
                    for a, r in zip(p, evalset.refs):
                        seed = {"seed": cfg.seed + k, "temperature": temperature} if prefix else {}
                        f.write(json.dumps({**seed, "prediction": a, "reference": r}) + "\n")
    forced = forced_scores(model, teacher, evalset.forced, tokenizer.token_to_id("<|endoftext|>"),
                           tokenizer.get_vocab_size(), cfg, rank, world)
    return {**scores, **forced}


def rouge_f1(refs, preds):
    # ROUGE-1/2/L/Lsum F1, stemmed, mean over examples: what every table here reports
    return {t: s.fmeasure for t, s in rouge.corpus_score(refs, preds, use_stemmer=True).items()}


def answer_sanity(preds):
    """What ROUGE cannot see: the share of distinct answers; the mean share of each answer's word 4-grams
    that repeat an earlier 4-gram of the same answer (a looping answer scores near 1); the share of sound
    answers (given to no other prompt and repeating no 4-gram at all); the mean length in words."""
    def repeated(words):
        grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
        return 1 - len(set(grams)) / len(grams) if grams else 0.0
    words = [p.split() for p in preds]
    rep = [repeated(w) for w in words]
    n, count = max(len(preds), 1), collections.Counter(preds)
    sound = sum(count[p] == 1 and r == 0 for p, r in zip(preds, rep))
    return {"distinct": len(count) / n, "repeated_4grams": sum(rep) / n, "sound": sound / n,
            "words": sum(map(len, words)) / n}


def autocast_dtype(device, mode="auto"):
    # --autocast: bf16 on CUDA by default; on CPU only when asked (so the tests cover that path)
    on = mode == "bf16" or (mode == "auto" and torch.device(device).type == "cuda")
    return torch.bfloat16 if on else None


def autocast(device, mode="auto"):
    dtype = autocast_dtype(device, mode)
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()

# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(cfg, step, model, optimizer, tokenizer_path, rank):
    """out_dir/ckpt-{step}: a complete Hugging Face model directory (weights, config, tokenizer with its
    chat template, generation config) + trainer_state.pt (optimizer, step, RNG states), written
    atomically: a kill leaves the previous checkpoint intact and no half-written one."""
    if cfg.zero:
        optimizer.consolidate_state_dict(to=0)  # every rank must join; rank 0 receives the full state
    if rank != 0:
        return
    with qwen.atomic_dir(checkpoint_dir(cfg.out_dir, step)) as tmp:
        model.write_pretrained(tmp)
        write_tokenizer_files(tmp, tokenizer_path, cfg.system_prompt)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "config": dataclasses.asdict(cfg),
                    "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                            "numpy": np.random.get_state(),
                            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
                   os.path.join(tmp, "trainer_state.pt"))
    for old in checkpoints(cfg.out_dir)[:-cfg.keep_last] if cfg.keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def write_tokenizer_files(directory, tokenizer_path, system_prompt):
    """tokenizer.json, tokenizer_config.json and generation_config.json beside the weights, so that
    transformers' AutoTokenizer renders exactly data.render_chat (the official Qwen2.5 chat template
    with this run's system prompt as its default) and a serving stack stops where evaluation stops."""
    shutil.copy(tokenizer_path, os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(HERE, "assets/qwen2.5/Qwen2.5-1.5B-Instruct/tokenizer_config.json")) as f:
        tc = json.load(f)
    literal = system_prompt.replace("\\", "\\\\").replace("'", "\\'")  # inside a jinja '...' string
    tc["chat_template"] = tc["chat_template"].replace(data.SYSTEM_PROMPT_INSTRUCT, literal)
    with open(tokenizer_path) as f:
        added = json.load(f).get("added_tokens", [])
    tc["added_tokens_decoder"] = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                   "single_word", "special")} for t in added}
    names = {t["content"] for t in added}
    tc["additional_special_tokens"] = [t for t in tc["additional_special_tokens"] if t in names]
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f, indent=2)
    ids = {t["content"]: t["id"] for t in added}
    gen = {"bos_token_id": ids.get("<|endoftext|>"), "pad_token_id": ids.get("<|endoftext|>"), "do_sample": False,
           "eos_token_id": [ids.get("<|im_end|>"), ids.get("<|endoftext|>")]}
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)


def load_checkpoint(cfg, model, optimizer, device):
    """The step of the newest complete checkpoint, with the weights, optimizer and RNG states restored."""
    last = checkpoints(cfg.out_dir)[-1]
    state = torch.load(os.path.join(last, "trainer_state.pt"), map_location=device, weights_only=False)
    model.load_state_dict(qwen.Qwen.from_pretrained(last, dtype=torch.float32, device=device).state_dict())
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"].cpu())
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    if not cfg.quiet and (not dist.is_initialized() or dist.get_rank() == 0):
        print(f"resumed from {last} at step {state['step']}")
    return state["step"]


def checkpoint_dir(out_dir, step):
    return os.path.join(out_dir, f"ckpt-{step:07d}")


def checkpoints(out_dir):
    # complete checkpoints only: a directory gets its final name after everything in it was written
    return sorted(d for d in glob.glob(os.path.join(out_dir, "ckpt-*"))
                  if os.path.isfile(os.path.join(d, "trainer_state.pt")))

# -----------------------------------------------------------------------------
# training


def load_frozen(cfg, device):
    # the frozen models the loss reads, by role (METHODS), in teacher_dtype, without gradients
    return {role: qwen.Qwen.from_pretrained(path, dtype=dtype_of(cfg.teacher_dtype), device=device)
            .eval().requires_grad_(False)
            for role, path in frozen_models(cfg).items()}


def eval_teacher(cfg, frozen, device):
    # the finetuned teacher for the teacher-forced figures: the live one, or loaded for the evaluation alone
    if not cfg.teacher_ft:
        return None
    if "teacher_ft" in frozen:
        return getattr(frozen["teacher_ft"], "_orig_mod", frozen["teacher_ft"])  # a compiled one: its module
    return qwen.Qwen.from_pretrained(cfg.teacher_ft, dtype=dtype_of(cfg.teacher_dtype), device=device).eval()


def frozen_target(frozen, input_ids, mode="auto"):
    """{role: (final hidden states (B, T, C_t), lm_head weight)} of the frozen models, no grad."""
    with torch.no_grad(), autocast(input_ids.device, mode):
        return {r: (m(input_ids, return_hidden=True), m.lm_head.weight) for r, m in frozen.items()}


def forward_loss(ddp_model, model, input_ids, labels, target, spec, mode="auto"):
    """One micro-batch: the student's hidden states and distill_loss against target (see there).
    Right padding only, so no attention mask: under causal attention pad positions never influence
    real ones, and SDPA can take its fastest (causal) kernels."""
    with autocast(input_ids.device, mode):
        h = ddp_model(input_ids, return_hidden=True)
    return distill_loss(h, model.lm_head.weight, labels, target, spec)


def flops_per_token(c, T, train):
    """Model FLOPs of one token in a sequence of T tokens (PaLM's accounting): 2 per parameter per
    token forward (the embedding lookup is no matmul; a tied lm_head is), plus attention's
    QK^T and AV, 4 * layers * hidden * T forward; training is 3x forward (no recomputation counted)."""
    n = (c.num_hidden_layers * (4 * c.hidden_size * c.hidden_size * (1 + c.num_key_value_heads / c.num_attention_heads) / 2
         + 3 * c.hidden_size * c.intermediate_size) + c.vocab_size * c.hidden_size)
    forward = 2 * n + 4 * c.num_hidden_layers * c.hidden_size * T
    return 3 * forward if train else forward


def peak_flops(cfg, device):
    # bf16 dense peak per device, from the device name unless --peak_tflops says otherwise
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((p * 1e12 for k, p in (("H100", 989), ("H200", 989), ("A100", 312)) if k in name), None)


class Preemption:
    """SIGTERM / SIGUSR1 (what SLURM and most clusters send before a kill) only set a flag; the loop
    finishes the optimizer step, all ranks agree, a checkpoint is written and the run exits 0, so
    a requeued job with --resume=true continues bit-exactly."""

    def __init__(self):
        self.requested = None
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def agreed(self, device):
        # one rank's signal stops every rank at the same step
        return all_reduce(torch.tensor(float(self.requested is not None), device=device)).item() > 0


# (chunk, vocab) fp32 tensors live at once in the chunked loss: SFT alone, the student's logits (which become
# dz); forward KL, those plus the target's logits and its probabilities; a divergence differentiated by
# autograd, those plus its graph's copies of logq and of the elementwise terms. (Measured: a CPU step peaks
# inside the loss; test_deltakd's dry-run test holds the plan to 20%.)
LOSS_BUFFERS = {"sft": 1, "fkl": 3, "autograd": 9}


def activation_bytes(c, tokens, act_bytes, checkpointing):
    """Activations kept for backward: per layer and token, the fp32 residual stream into both RMSNorms
    (8C) and, in the autocast dtype, the normed inputs, q/k before and after RoPE, v, the attention
    output and its re-layout, and SwiGLU's gate, up, silu and product (6C + 3 C_kv + 4I). With
    checkpointing only each layer's input (4C) stays, plus one layer's worth during recomputation."""
    C, I = c.hidden_size, c.intermediate_size
    kv = C * c.num_key_value_heads // c.num_attention_heads
    layer = 8 * C + act_bytes * (6 * C + 3 * kv + 4 * I)
    if checkpointing:
        return tokens * (4 * C * c.num_hidden_layers + layer)
    return tokens * layer * c.num_hidden_layers


def act_bytes(cfg):
    # the plan is for the GPUs of the run: bf16 autocast unless it is switched off or the device is the CPU
    return 4 if cfg.autocast == "none" or (cfg.autocast == "auto" and cfg.device == "cpu") else 2


def memory_plan(cfg, configs, world):
    """[(item, bytes per GPU)] of a run: configs {role: QwenConfig} with the student under "student"."""
    def params(c):
        with torch.device("meta"):
            return qwen.num_parameters(qwen.Qwen(c))
    s = configs["student"]
    n = params(s)
    dtype_bytes = {"bfloat16": 2, "float16": 2, "float32": 4}[cfg.teacher_dtype]
    act = act_bytes(cfg)
    rows = [(f"student weights fp32 ({n:,} params)", 4 * n), ("student gradients fp32", 4 * n),
            (f"AdamW m + v fp32{f' (ZeRO over {world} ranks)' if cfg.zero else ''}", 8 * n // (world if cfg.zero else 1))]
    for role, c in configs.items():
        if role != "student":
            m = params(c)
            rows.append((f"{role} {cfg.teacher_dtype} ({m:,} params)", dtype_bytes * m))
    divergence = loss_spec(cfg, s.vocab_size).divergence if METHODS[cfg.method].divergence else None
    buffers = LOSS_BUFFERS[{None: "sft", "fkl": "fkl"}.get(divergence, "autograd")]
    buffers += act == 2  # under bf16 autocast, half-size bf16 logits and dz on their way into and out of them
    rows.append((f"loss: {buffers} ({cfg.chunk_size} x vocab) fp32 buffers + fp32 lm_head gradient",
                 4 * (buffers * cfg.chunk_size * s.vocab_size + s.vocab_size * s.hidden_size)))
    tokens = cfg.batch_size * cfg.max_len
    rows.append((f"activations {cfg.batch_size} x {cfg.max_len}, {'bf16' if act == 2 else 'fp32'}, "
                 f"checkpointing={'on' if cfg.grad_checkpointing else 'off'}",
                 activation_bytes(s, tokens, act, cfg.grad_checkpointing)))
    return rows


def dry_run(cfg):
    """--dry_run=true: every model of the run built on the meta device from its config.json (no weight
    is read), the per-GPU memory plan and the model FLOPs of one optimizer step; returns the plan."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    roles = {"student": cfg.student, **({} if cfg.targets_dir else frozen_models(cfg))}
    configs = {r: qwen.QwenConfig.from_json(os.path.join(p, "config.json")) for r, p in roles.items()}
    rows = memory_plan(cfg, configs, world)
    T = cfg.max_len
    flops = world * cfg.grad_accum * cfg.batch_size * T * (
        flops_per_token(configs["student"], T, True)
        + sum(flops_per_token(c, T, False) for r, c in configs.items() if r != "student"))
    other = activation_bytes(configs["student"], cfg.batch_size * T, act_bytes(cfg), not cfg.grad_checkpointing)
    print(f"memory plan per GPU (world size {world}, --method={cfg.method}"
          f"{', stored targets' if cfg.targets_dir else ''}):")
    for item, b in rows:
        print(f"  {item:<78} {b / 1e9:7.2f} GB")
    print(f"  {'total':<78} {sum(b for _, b in rows) / 1e9:7.2f} GB")
    print(f"  (activations with checkpointing {'off' if cfg.grad_checkpointing else 'on'} instead: {other / 1e9:.2f} GB)")
    print(f"model FLOPs per optimizer step (all ranks, every sequence {T} tokens): {flops:.3e}")
    return rows


def build_optimizer(cfg, model, device):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # biases and norms: no weight decay
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    adam = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    if cfg.zero:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **adam)
    return torch.optim.AdamW(groups, **adam)


def lr_at(step, cfg, total):
    # linear warmup, then cosine decay from lr to lr * min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class Batches:
    """The data position as a function of the step: resuming at step s replays nothing and skips nothing.
    Each optimizer step takes world * grad_accum micro-batches of one epoch's length-grouped order."""

    def __init__(self, cfg, lengths, world):
        self.cfg, self.lengths, self.per_step = cfg, lengths, world * cfg.grad_accum
        self.epoch, self.batches = 0, data.make_batches(lengths, cfg.batch_size, cfg.seed, 0, self.per_step)
        self.steps_per_epoch = len(self.batches) // self.per_step

    def at(self, step, rank, world):
        epoch, offset = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self.batches = data.make_batches(self.lengths, self.cfg.batch_size, self.cfg.seed, epoch, self.per_step)
        return self.batches[offset * self.per_step:(offset + 1) * self.per_step][rank::world]


def train_step(cfg, step, total, micro, target_of, ddp_model, model, optimizer, spec, world, device, flops):
    """One optimizer step over this rank's micro-batches [(input_ids, labels, example ids)] (flops: their
    model FLOPs); returns the loss sums (loss, sft, kd) per supervised token, the grad norm, the lr,
    and the token counts and FLOPs of all ranks."""
    # normalise by the supervised tokens of the whole step, all micro-batches and ranks together
    n_tokens = all_reduce(torch.tensor(sum(int((lab[:, 1:] != data.IGNORE_INDEX).sum()) for _, lab, _ in micro),
                                       dtype=torch.float64, device=device)).item()
    lr = lr_at(step, cfg, total)
    for g in optimizer.param_groups:
        g["lr"] = lr
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for i, (input_ids, labels, examples) in enumerate(micro):
        input_ids, labels = input_ids.to(device), labels.to(device)
        sync = i == len(micro) - 1 or not dist.is_initialized()
        with contextlib.nullcontext() if sync else ddp_model.no_sync():  # all-reduce on the last only
            loss, sft, kd, _ = forward_loss(ddp_model, model, input_ids, labels, target_of(input_ids, examples), spec,
                                            cfg.autocast)
            # DDP averages gradients over ranks; * world turns that into the global token mean
            (loss * (world / n_tokens)).backward()
        sums += torch.stack([loss.detach(), sft, kd]).double()
    sums = all_reduce(sums) / n_tokens
    if not torch.isfinite(sums).all():
        raise SystemExit(f"non-finite loss at step {step + 1} ({sums.tolist()}); stopping without saving. "
                         f"The last good checkpoint in {cfg.out_dir} is untouched.")
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    if not torch.isfinite(gnorm):
        raise SystemExit(f"non-finite gradient norm at step {step + 1}; stopping without saving. "
                         f"The last good checkpoint in {cfg.out_dir} is untouched.")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    n_in, flops = all_reduce(torch.tensor([sum(x[0].numel() for x in micro), flops], dtype=torch.float64,
                                          device=device)).tolist()
    return {"loss": sums[0].item(), "sft": sums[1].item(), "kd": sums[2].item(), "lr": lr, "grad_norm": gnorm.item(),
            "tokens": n_in, "flops": flops, "supervised_tokens": n_tokens}


def step_flops(micro, lengths, student_config, frozen_configs):
    # model FLOPs of this rank's micro-batches: the student trained on every real token, each frozen model forward
    total = 0.0
    for _, _, examples in micro:
        for T in lengths[examples].tolist():
            total += T * flops_per_token(student_config, T, True)
            total += sum(T * flops_per_token(c, T, False) for c in frozen_configs)
    return total


def log_step(cfg, step, total, rec, dt, t_start, metrics_path, peak, world):
    flops = rec["flops"]
    rec = {"step": step, **{k: v for k, v in rec.items() if k not in ("tokens", "flops")},
           "tokens_per_s": rec["tokens"] / dt, "tflops_per_device": flops / dt / world / 1e12,
           "mfu": flops / dt / world / peak if peak else None}
    with open(metrics_path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    if not cfg.quiet:
        eta = (time.time() - t_start) / step * (total - step)
        mfu = f"mfu {rec['mfu']:.1%}" if peak else f"{rec['tflops_per_device']:.2f} TFLOP/s/device"
        print(f"step {step}/{total} | loss {rec['loss']:.4f} (sft {rec['sft']:.4f} kd {rec['kd']:.4f}) | "
              f"lr {rec['lr']:.2e} | gnorm {rec['grad_norm']:.3f} | {rec['tokens_per_s']:.0f} tok/s | {mfu} | "
              f"eta {eta:.0f}s")


def log_eval(cfg, step, scores, master, metrics_path):
    if not master:
        return
    with open(metrics_path, "a") as f:
        f.write(json.dumps({"step": step, "eval": scores}) + "\n")
    if not cfg.quiet:
        print(f"eval step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in scores.items()))


def train(cfg):
    """One run of the configured method; returns the final evaluation scores (rank 0) or {}."""
    rank, world, device = setup_distributed(cfg.device)
    master = rank == 0
    tokenizer, tok_path = check_inputs(cfg)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if master and not cfg.quiet:
        print("config:", json.dumps(dataclasses.asdict(cfg)))
        if frozen_roles(cfg) != METHODS[cfg.method].frozen:
            print("--alpha=0: the target is the finetuned teacher's alone; the raw models are not loaded")
    if cfg.eval_only:  # a model given, not trained (a base model, a teacher): scored as every trained one is
        model = qwen.Qwen.from_pretrained(cfg.student, dtype=torch.float32, device=device)
        evalset = eval_set(data.read_rows(cfg.eval_data), tokenizer, cfg)
        scores = evaluate(model, evalset, eval_teacher(cfg, {}, device), tokenizer, cfg, rank, world, "final")
        log_eval(cfg, 0, scores, master, os.path.join(cfg.out_dir, "metrics.jsonl"))
        return scores if master else {}

    # data: tokenized once into a memory-mapped cache; held-out prompts for evaluation
    cache, train_idx, eval_rows = load_data(cfg, tokenizer, tok_path, rank, world, device)
    evalset = eval_set(eval_rows, tokenizer, cfg)
    pad_id = tokenizer.token_to_id("<|endoftext|>")
    spec = loss_spec(cfg, tokenizer.get_vocab_size())

    # the target: stored once on disk (no frozen model while training), or the frozen models live
    store, frozen = None, {}
    if cfg.targets_dir:
        store = TargetStore(cfg.targets_dir, cache, targets_key(cfg, cache, spec.vocab, device))
        compute_targets(cfg, cache, store, pad_id, spec, device, rank, world)
        if cfg.targets_only:
            return {}
    elif METHODS[cfg.method].frozen:
        frozen = load_frozen(cfg, device)
        if cfg.compile:
            frozen = {r: torch.compile(m) for r, m in frozen.items()}

    def target_of(input_ids, examples):
        if store:
            return store.get(examples, device)
        return frozen_target(frozen, input_ids, cfg.autocast) if frozen else None

    # the student and its optimizer
    model = qwen.Qwen.from_pretrained(cfg.student, dtype=torch.float32, device=device)
    model.gradient_checkpointing = cfg.grad_checkpointing
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if dist.is_initialized() else model
    if cfg.compile:  # the lengths are padded to a multiple of 64 below: few shapes, each compiled once
        ddp_model = torch.compile(ddp_model)
    optimizer = build_optimizer(cfg, model, device)

    batches = Batches(cfg, cache.lengths[train_idx], world)
    total = cfg.max_steps or cfg.epochs * batches.steps_per_epoch
    if master and not cfg.quiet:
        print(f"padding: {data.padding_fraction(batches.batches, batches.lengths):.1%} of batch tokens")
    step = load_checkpoint(cfg, model, optimizer, device) if cfg.resume and checkpoints(cfg.out_dir) else 0

    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    frozen_configs = [m.config for m in frozen.values()]
    peak, preemption = peak_flops(cfg, device), Preemption()
    model.train()
    t_start, scores = time.time(), {}
    while step < total:
        t0 = time.time()
        micro = []
        for b in batches.at(step, rank, world):
            examples = train_idx[b]
            micro.append((*data.collate([cache.example(i) for i in examples], pad_id, 64 if cfg.compile else 1)[:2],
                          examples))
        rec = train_step(cfg, step, total, micro, target_of, ddp_model, model, optimizer, spec, world, device,
                         step_flops(micro, cache.lengths, model.config, frozen_configs))
        step += 1
        if master:
            log_step(cfg, step, total, rec, time.time() - t0, t_start, metrics_path, peak, world)
        if preemption.agreed(device):
            save_checkpoint(cfg, step, model, optimizer, tok_path, rank)
            if master:
                print(f"{preemption.requested or 'a signal on another rank'}: saved step {step} to {cfg.out_dir}; "
                      "exiting (continue with --resume=true)", flush=True)
            return {}
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total and evalset.prompts:
            scores = evaluate(model, evalset, eval_teacher(cfg, frozen, device), tokenizer, cfg, rank, world,
                              f"step{step}")
            log_eval(cfg, step, scores, master, metrics_path)
        if (cfg.save_every and step % cfg.save_every == 0) or step == total:
            save_checkpoint(cfg, step, model, optimizer, tok_path, rank)

    if evalset.prompts:
        scores = evaluate(model, evalset, eval_teacher(cfg, frozen, device), tokenizer, cfg, rank, world, "final")
        log_eval(cfg, step, scores, master, metrics_path)
    return scores if master else {}


# -----------------------------------------------------------------------------
# the embedded demo: the whole method on bundled data, on a 2-core CPU in minutes

DEMO = dict(
    chat_data=os.path.join(HERE, "assets/data/ultrachat_200k/ultrachat_small.jsonl"),  # general English and chat
    task_data=os.path.join(HERE, "assets/data/gsm8k/test.jsonl"),  # GSM8K word problems: the task's inputs
    raw_models=os.path.join(HERE, "assets/demo"),  # the bundled raw models and tokenizer (demo_raw_models)
    vocab_size=4096, max_len=192, eval_size=120, eval_max_new_tokens=48, eval_temperature=1.0, eval_seeds=2,
    task_sentences=3,  # the task's input: the problem's last 3 sentences (shorter prompts: cheaper steps)
    # pretraining text in passages written twice (see demo_raw_models); one in four is 200 characters, as
    # 19% of the task's answers are longer than 100 (with 100 alone, long copies looped)
    repeat_chars=(100, 100, 100, 200),
    teacher=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
    student=dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    # one learning rate for every stage (at 1e-2 the finetuned teacher gave 13% distinct answers); constant
    # in pretraining, where copying appears abruptly, at a step that varies with the seed (600 steps: on
    # some seeds not yet)
    pretrain_teacher=dict(max_steps=3000, lr=3e-3, min_lr_ratio=1.0, warmup_steps=10, batch_size=16),
    pretrain_student=dict(max_steps=3000, lr=3e-3, min_lr_ratio=1.0, warmup_steps=10, batch_size=16),
    finetune=dict(max_steps=1000, lr=3e-3, warmup_steps=10, batch_size=16),  # 700: one seed's teacher 87% sound
    distill=dict(max_steps=400, lr=3e-3, warmup_steps=10, batch_size=16),
    # the full comparison (--full_comparison=true): seeds, Delta-KD's alphas, and its stored top-k run
    full=dict(seeds=3, alphas=(0.0, 0.5, 1.0), topk=16),
)
TASK_INSTRUCTION = "What does this problem ask? Answer with its question sentence.\n\n"


def demo_task(row):
    """The demo's task: the last sentences of a GSM8K word problem -> the one that asks the question (the
    last), copied. Short and different for every problem: a 1M-parameter teacher that has learned to copy
    from its context in pretraining becomes a real model of it (on worked solutions it looped)."""
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(row["question"].split()))
    return {"messages": [{"role": "user", "content": TASK_INSTRUCTION + " ".join(sentences[-DEMO["task_sentences"]:])},
                         {"role": "assistant", "content": sentences[-1]}]}


def trivial_baselines(train_rows, eval_rows):
    """What ROUGE gives for nothing: the most frequent training answer for every prompt, and the training
    answer of the most similar training prompt (most shared words)."""
    answers = [r["messages"][1]["content"] for r in train_rows]
    words = [set(r["messages"][0]["content"].lower().split()) for r in train_rows]
    nearest = []
    for r in eval_rows:
        w = set(r["messages"][0]["content"].lower().split())
        nearest.append(answers[max(range(len(words)), key=lambda i: len(w & words[i]))])
    count = collections.Counter(answers)
    common = max(count, key=lambda a: (count[a], a))
    return {"most frequent answer": [common] * len(eval_rows), "nearest training answer": nearest}


def demo(cfg):
    """The raw models (bundled: demo_raw_models) -> finetune the teacher on the task (GSM8K problem -> its
    question sentence) -> distill students from the raw student (SFT, FKL, RKL, SeqKD, Delta-KD) -> a table
    on held-out problems: ROUGE greedy and sampled, teacher-forced NLL, KL to the finetuned teacher, top-1
    agreement, and the answers' sanity. Every stage is a call of train() with its own Config: the same loop
    and loss as a real run. --full_comparison=true: every stage over several seeds (the raw models'
    initialisation and every data order), Delta-KD at several alphas and with stored top-k targets."""
    t_start, root = time.time(), cfg.out_dir
    os.makedirs(root, exist_ok=True)
    print(f"demo: no --student given, so running the embedded demo into {root}/ (see README)")
    full = DEMO["full"] if cfg.full_comparison else dict(seeds=1, alphas=(cfg.alpha,), topk=0)
    seeds = range(cfg.seed, cfg.seed + full["seeds"])
    tok_path, raw = demo_raw_models(cfg, seeds)
    tok = Tokenizer.from_file(tok_path)
    task = [demo_task(r) for r in data.read_rows(DEMO["task_data"])]
    train_rows, eval_rows = data.split_rows(task, DEMO["eval_size"], cfg.seed)
    # evaluation skips prompts longer than max_len: drop them here, so the baselines score the same problems
    eval_rows = [r for r in eval_rows if len(data.eval_pairs([r], tok, cfg.system_prompt, DEMO["max_len"])[0])]
    task_train, task_eval = demo_write(root, "task_train.jsonl", train_rows), demo_write(root, "task_eval.jsonl", eval_rows)

    results = {}  # name -> {seed: scores}
    for seed in seeds:
        demo_seed(cfg, seed, os.path.join(root, f"seed{seed}") if full["seeds"] > 1 else root, tok_path, *raw[seed],
                  task_train, task_eval, full, results)
    refs = [r["messages"][1]["content"] for r in eval_rows]
    for name, preds in trivial_baselines(train_rows, eval_rows).items():
        results[f"baseline: {name}"] = {"-": {**rouge_f1(refs, preds), **answer_sanity(preds)}}
    # the sanity figures of the references themselves: some questions repeat a 4-gram ("... jelly beans
    # than blue jelly beans ..."), so a perfect copier is not 100% sound
    results["references"] = {"-": answer_sanity(refs)}
    table = demo_table(results)
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\n{len(eval_rows)} held-out problems, {DEMO['eval_max_new_tokens']} new tokens; ROUGE F1 stemmed, greedy "
          f"and sampled (temperature {DEMO['eval_temperature']}, top_p 1, mean of {DEMO['eval_seeds']} seeds); "
          f"teacher-forced figures per reference token:\n{table}\ndemo took {time.time() - t_start:.0f}s; "
          f"table in {root}/results.md")
    return results


def demo_write(root, name, rows):
    with open(os.path.join(root, name), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return os.path.join(root, name)


def demo_run(cfg, out_dir, seed, tok_path, **kw):
    """One stage of the demo: train() at the demo's settings into a fresh out_dir; returns its scores."""
    c = Config(**{**dataclasses.asdict(cfg), "out_dir": out_dir, "quiet": True, "eval_size": 0,
                  "max_len": DEMO["max_len"], "eval_max_new_tokens": DEMO["eval_max_new_tokens"],
                  "eval_temperature": DEMO["eval_temperature"], "eval_seeds": DEMO["eval_seeds"],
                  "eval_batch_size": DEMO["eval_size"], "seqkd_max_new_tokens": DEMO["eval_max_new_tokens"],
                  "teacher_dtype": "float32", "keep_last": 1, "resume": False, "tokenizer": tok_path, "seed": seed,
                  "method": "sft", **kw})
    shutil.rmtree(c.out_dir, ignore_errors=True)
    scores = train(c)
    if not c.eval_only and checkpoint_dir(out_dir, c.max_steps) not in checkpoints(out_dir):
        # a SIGTERM / SIGUSR1 checkpointed the stage before its last step: the demo stops with it
        raise SystemExit(f"demo: stage {out_dir} stopped by a signal; `python deltakd.py` starts the demo again")
    return scores


def demo_raw_models(cfg, seeds):
    """The demo's raw models, standing in for Qwen2.5's base checkpoints: per seed a raw teacher and a raw
    student pretrained on general English and general chat in the ChatML format (the bundled Ultrachat
    conversations, disjoint from the task), and the byte-level BPE they share, trained on the same text.
    assets/demo holds them for seeds 1337-1339, made by this function (bfloat16, as Qwen2.5 ships its
    weights); whatever --demo_raw_models lacks is pretrained into it first (7-8 minutes a seed on 2 cores).
    Returns the tokenizer's path and {seed: (raw teacher, raw student)}."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    root = cfg.demo_raw_models or DEMO["raw_models"]
    tok_path = os.path.join(root, "tokenizer.json")
    raw = {s: tuple(os.path.join(root, f"seed{s}", r) for r in ("raw-teacher", "raw-student")) for s in seeds}
    missing = [s for s in seeds if not all(os.path.isfile(os.path.join(p, "config.json")) for p in raw[s])]
    if not missing:
        return tok_path, raw
    print(f"demo: pretraining the raw models of seed(s) {', '.join(map(str, missing))} into {root}/")
    os.makedirs(root, exist_ok=True)
    chats = data.read_rows(DEMO["chat_data"])
    english = [m["content"] for r in chats for m in data.to_messages(r)]
    if not os.path.isfile(tok_path):  # a small byte-level BPE with the ChatML special tokens
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(english, trainers.BpeTrainer(
            vocab_size=DEMO["vocab_size"], special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        tok.save(tok_path)
    vocab = Tokenizer.from_file(tok_path).get_vocab_size()
    # the Ultrachat text and the same conversations in the chat format. A real base model can copy from its
    # context (induction heads), a skill web-scale text teaches and a few thousand steps of plain text do
    # not; so each text passage is written twice, the quick route to it (Olsson et al., 2022)
    text, lens, docs, i = "\n\n".join(english), DEMO["repeat_chars"], [], 0
    while i < len(text):
        n = lens[len(docs) % len(lens)]
        docs.append({"text": text[i:i + n] + "\n\n" + text[i:i + n]})
        i += n
    work = os.path.join(cfg.out_dir, "pretraining")
    os.makedirs(work, exist_ok=True)
    pretrain = demo_write(work, "pretrain.jsonl", docs + chats)
    for seed in missing:
        for (role, arch, steps, init_seed), dst in zip((("teacher", DEMO["teacher"], DEMO["pretrain_teacher"], seed),
                                                         ("student", DEMO["student"], DEMO["pretrain_student"], seed + 1)),
                                                        raw[seed]):
            t0, out = time.time(), os.path.join(work, f"seed{seed}-raw-{role}")
            c = qwen.QwenConfig(vocab_size=vocab, max_position_embeddings=DEMO["max_len"], tie_word_embeddings=True,
                                bos_token_id=0, eos_token_id=2, torch_dtype="float32", **arch)
            qwen.init_weights(qwen.Qwen(c), seed=init_seed).save_pretrained(out + "-init")
            demo_run(cfg, out, seed, tok_path, student=out + "-init", train_data=pretrain, **steps)
            with qwen.atomic_dir(dst) as tmp:  # stored like a downloaded base model: bfloat16, with its tokenizer
                qwen.Qwen.from_pretrained(checkpoints(out)[-1], dtype=torch.bfloat16).save_pretrained(tmp)
                shutil.copy(tok_path, tmp)
            print(f"  seed {seed} raw-{role:<17} {time.time() - t0:5.1f}s  pretrained, {dst}")
    return tok_path, raw


def demo_seed(cfg, seed, root, tok_path, raw_t, raw_s, task_train, task_eval, full, results):
    # every stage of the demo for one seed, its scores added to results[name][seed]
    def run(name, **kw):
        t0 = time.time()
        out = os.path.join(root, name)
        scores = demo_run(cfg, out, seed, tok_path, eval_data=task_eval, **kw)
        results.setdefault(name, {})[seed] = scores
        print(f"  seed {seed} {name:<22} {time.time() - t0:5.1f}s  " +
              " ".join(f"{k} {scores[k]:.4f}" for k in ("rougeL", "sampled_rougeL", "nll", "distinct")))
        return (checkpoints(out) or [None])[-1]  # the raw models' evaluations write none

    # the raw models are evaluated on the task too: what finetuning and distillation start from
    run("raw-teacher", student=raw_t, eval_only=True)
    run("raw-student", student=raw_s, eval_only=True)
    ft_t = run("teacher-ft", student=raw_t, train_data=task_train, **DEMO["finetune"])
    students = [(m, {"method": m}) for m in ("sft", "fkl", "rkl", "seqkd")]
    students += [(f"delta-a{a:g}", {"method": "delta", "alpha": a}) for a in full["alphas"]]
    if full["topk"]:
        students.append((f"delta-a{cfg.alpha:g}-top{full['topk']}", {
            "method": "delta", "alpha": cfg.alpha, "topk": full["topk"], "targets_dtype": "float32",
            "targets_dir": os.path.join(root, "targets")}))
    for name, kw in students:
        run(f"student-{name}", student=raw_s, teacher_ft=ft_t, teacher_raw=raw_t, train_data=task_train,
            **{**DEMO["distill"], **kw})


DEMO_NAMES = {"raw-teacher": "Raw teacher (pretrained only)", "teacher-ft": "Teacher (finetuned)",
              "raw-student": "Raw student (pretrained only)", "student-sft": "SFT", "student-fkl": "Forward KL",
              "student-rkl": "Reverse KL", "student-seqkd": "SeqKD",
              "references": "Reference answers (sanity only)"}


def demo_table(results):
    # mean (± std over seeds where there are several) of every figure, one row per stage
    cols = [("ROUGE-1", "rouge1", "{:.4f}"), ("ROUGE-2", "rouge2", "{:.4f}"), ("ROUGE-L", "rougeL", "{:.4f}"),
            ("sampled ROUGE-L", "sampled_rougeL", "{:.4f}"), ("NLL", "nll", "{:.3f}"),
            ("KL(teacher ‖ model)", "kl_teacher", "{:.3f}"), ("top-1 = teacher", "top1_teacher", "{:.1%}"),
            ("distinct", "distinct", "{:.0%}"), ("repeated 4-grams", "repeated_4grams", "{:.0%}"),
            ("sound", "sound", "{:.0%}"), ("words", "words", "{:.1f}")]
    lines = ["| Method | " + " | ".join(c for c, _, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, by_seed in results.items():
        label = DEMO_NAMES.get(name) or (name[:1].upper() + name[1:] if name.startswith("baseline")
                                         else "Delta-KD (" + name.removeprefix("student-delta-").replace("a", "α=", 1)
                                         .replace("-top", ", stored top-") + ")")
        cells = []
        for _, key, fmt in cols:
            vals = [s[key] for s in by_seed.values() if key in s]
            if not vals:
                cells.append("–")
                continue
            cell = fmt.format(statistics.mean(vals))
            if len(vals) > 1:
                cell += " ± " + re.sub(r"^0(?=\.)", "", fmt.format(statistics.stdev(vals)))  # 0.0123 -> .0123
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv):
    cfg = parse_args(argv)
    if cfg.eval_only and not cfg.student:
        raise SystemExit("--eval_only scores a given model: pass --student=DIR and --eval_data=FILE")
    if not cfg.student and not cfg.dry_run and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise SystemExit("the demo (no --student) runs in one process; under torchrun every rank would rebuild "
                         "the same directories. Run `python deltakd.py`, or pass --student=... to train")
    try:
        if cfg.dry_run:
            dry_run(cfg)
        elif cfg.student:
            train(cfg)
        else:
            demo(cfg)
    except (OSError, data.DataError, qwen.CheckpointError) as e:  # bad files, rows, checkpoints: one line
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
