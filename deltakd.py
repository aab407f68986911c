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

import contextlib
import dataclasses
import glob
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time

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
    # models (HF-format directories). delta loads all three; fkl/rkl/seqkd the finetuned teacher; sft none
    student: str = ""           # raw student: the initialisation, and pi_s^raw for delta. Empty: run the demo
    teacher_ft: str = ""        # finetuned teacher pi_t^ft (e.g. Qwen2.5-7B-Instruct)
    teacher_raw: str = ""       # raw teacher pi_t^raw (e.g. Qwen2.5-7B)
    student_raw: str = ""       # pi_s^raw if it is not the initialisation (default: --student)
    tokenizer: str = ""         # tokenizer.json; default: the one in --student
    # data
    train_data: str = ""        # .jsonl / .json / .parquet (formats: see data.py)
    eval_data: str = ""         # held-out file; empty: hold out eval_size rows of train_data
    eval_size: int = 64
    max_len: int = 1024         # tokens per example, longer ones are truncated
    system_prompt: str = data.SYSTEM_PROMPT_BASE
    skip_bad_rows: bool = False  # skip (and count) malformed rows instead of stopping
    # method
    method: str = "delta"       # sft | fkl | rkl | delta | seqkd
    divergence: str = "fkl"     # for delta: fkl = KL(pi* || pi_theta) (the paper), rkl = KL(pi_theta || pi*)
    lam: float = 0.5            # weight of the SFT term (forced to 1 for sft and seqkd)
    alpha: float = 1.0          # strength of the finetuning shift
    temperature: float = 1.0
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
    loss_impl: str = "chunked"  # chunked (memory-flat) | dense (full logits, for checking)
    chunk_size: int = 512       # supervised tokens per loss chunk: ~8 (chunk, vocab) fp32 buffers live
    teacher_dtype: str = "bfloat16"  # frozen models; the student trains in fp32 (bf16 autocast on CUDA)
    # evaluation (ROUGE of greedy answers on held-out prompts)
    eval_every: int = 0         # 0: only at the end
    eval_max_new_tokens: int = 256
    eval_batch_size: int = 16
    seqkd_max_new_tokens: int = 256
    # run
    out_dir: str = "out"
    save_every: int = 0         # 0: only at the end
    keep_last: int = 2
    resume: bool = False
    seed: int = 1337
    device: str = "auto"
    quiet: bool = False         # no per-step lines (metrics.jsonl is still written)


def parse_args(argv, cfg=None):
    cfg = cfg or Config()
    types = {f.name: f.type for f in dataclasses.fields(Config)}
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
    if cfg.method not in ("sft", "fkl", "rkl", "delta", "seqkd"):
        raise SystemExit(f"--method={cfg.method}: expected sft, fkl, rkl, delta or seqkd")
    if cfg.divergence not in ("fkl", "rkl") or cfg.loss_impl not in ("chunked", "dense"):
        raise SystemExit("--divergence is fkl or rkl; --loss_impl is chunked or dense")
    if not 0.0 <= cfg.lam <= 1.0 or cfg.temperature <= 0:
        raise SystemExit("--lam must be in [0, 1] and --temperature > 0")
    return cfg

# -----------------------------------------------------------------------------
# the loss: pure functions on logits (the reference), then the chunked path used in training


def delta_kd_target(ft_teacher_logits, raw_teacher_logits, raw_student_logits, alpha, temperature):
    """float32 log pi*, pi* = softmax((z_ft + alpha (z_s^raw - z_t^raw)) / tau) over the last dim, which
    equals pi_t^ft (pi_s^raw / pi_t^raw)^alpha / Z with every pi = softmax(z / tau). All three
    logits must already be sliced to the tokenizer's real tokens."""
    z = ft_teacher_logits.float() + alpha * (raw_student_logits.float() - raw_teacher_logits.float())
    return F.log_softmax(z / temperature, dim=-1)


def shift_labels(labels):
    """The one next-token shift: position t's logits predict labels[t + 1]. Returns the (B, T-1) mask
    of supervised positions and their target ids (N,)."""
    mask = labels[:, 1:] != data.IGNORE_INDEX
    return mask, labels[:, 1:][mask]


def kd_loss(student_logits, target_logprobs, labels, divergence="fkl", temperature=1.0):
    """Sum over supervised positions of KL(p || q) (fkl) or KL(q || p) (rkl), where p = exp(target_logprobs)
    and q = softmax(student_logits / tau); logits (B, T, V) aligned with labels (B, T). Returns
    (sum, count): the caller divides once by the global count. No tau^2 factor."""
    mask, _ = shift_labels(labels)
    z = student_logits[:, :-1][mask].float()
    logp = target_logprobs[:, :-1][mask].float()
    logq = F.log_softmax(z / temperature, dim=-1)
    if divergence == "fkl":
        per_token = (logp.exp() * (logp - logq)).sum(-1)
    else:
        per_token = (logq.exp() * (logq - logp)).sum(-1)
    return per_token.sum(), mask.sum()


def sft_loss(student_logits, labels):
    """Sum of -log softmax(z)[y] over supervised positions, and their count."""
    mask, targets = shift_labels(labels)
    z = student_logits[:, :-1][mask].float()
    return F.cross_entropy(z, targets, reduction="sum"), mask.sum()


class ChunkedDistillLoss(torch.autograd.Function):
    """lam * SFT + (1 - lam) * KD summed over N supervised positions, from final hidden states, holding
    one chunk of (chunk, vocab) logits at a time. The gradient w.r.t. the student's logits is
    closed-form ((softmax(z) - onehot) for SFT, (q - p*)/tau for forward KL), so it is computed
    while the chunk is live and projected onto the hidden states and the lm_head right away:
    backward only scales the stored gradients, and no logits are ever recomputed or stored."""

    @staticmethod
    def forward(ctx, h, weight, targets, teachers, spec):
        V, chunk = spec["vocab"], spec["chunk_size"]
        need_grad = h.requires_grad or weight.requires_grad  # grad mode itself is off in here
        W = weight[:V]  # the real tokens only: Qwen's padded rows never enter a softmax
        # fp32 gradient buffers; padded vocab rows stay zero
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_grad else None
        grad_W = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_grad else None
        totals = torch.zeros(3, dtype=torch.float64, device=h.device)  # loss, sft, kd
        for s in range(0, h.shape[0], chunk):
            hc = h[s:s + chunk]
            z = (hc @ W.to(hc.dtype).T).float()  # (n, V) student logits
            loss, sft, kd, dz = chunk_loss(z, targets[s:s + chunk], [(t[s:s + chunk], w[:V]) for t, w in teachers],
                                           spec)
            del z
            totals += torch.stack([loss, sft, kd]).double()
            if need_grad:
                dz = dz.to(hc.dtype)
                grad_h[s:s + chunk] = dz @ W.to(hc.dtype)
                if hc.dtype == torch.float32:
                    grad_W[:V].addmm_(dz.T, hc)
                else:  # bf16 matmul, accumulated in fp32 across chunks
                    grad_W[:V] += dz.T @ hc
            del dz
        ctx.save_for_backward(grad_h, grad_W)
        ctx.dtypes = (h.dtype, weight.dtype)
        ctx.mark_non_differentiable(totals)
        return totals[0].float(), totals[1].float(), totals[2].float()

    @staticmethod
    def backward(ctx, g, _g_sft, _g_kd):
        # scaled in place: this graph is backpropagated once (no retain_graph), so no copy is needed
        grad_h, grad_W = ctx.saved_tensors
        return grad_h.mul_(g).to(ctx.dtypes[0]), grad_W.mul_(g).to(ctx.dtypes[1]), None, None, None


def chunk_loss(z, targets, teachers, spec):
    """One chunk: z (n, V) fp32 student logits, targets (n,), teachers [(hidden (n, C_t), head (V, C_t))]:
    [] for sft, [ft] for fkl/rkl, [ft, raw_t, raw_s] for delta. Returns the loss, its SFT and KD
    sums and dloss/dz (n, V)."""
    lam, tau = spec["lam"], spec["temperature"]
    logits_of = lambda h, w: (h @ w.T).float()  # noqa: E731
    # SFT at tau = 1: d/dz = softmax(z) - onehot(y)
    logq1 = F.log_softmax(z, dim=-1)
    sft = -logq1.gather(1, targets[:, None]).sum()
    dz = logq1.exp_().mul_(lam)
    dz[torch.arange(len(targets)), targets] -= lam
    del logq1
    if not teachers:
        return lam * sft, sft, torch.zeros_like(sft), dz
    zt = logits_of(*teachers[0])
    if len(teachers) == 3:  # delta: z_ft + alpha (z_s^raw - z_t^raw)
        zt.add_(logits_of(*teachers[2]), alpha=spec["alpha"]).sub_(logits_of(*teachers[1]), alpha=spec["alpha"])
    logp = F.log_softmax(zt.div_(tau), dim=-1)
    del zt
    logq = F.log_softmax(z / tau, dim=-1)
    q = logq.exp()
    if spec["divergence"] == "fkl":  # KL(p || q); d/dz = (q - p) / tau
        p = logp.exp()
        kd = (p * (logp - logq)).sum()
        dkd = q.sub_(p)
    else:  # KL(q || p); d/dz_k = q_k (d_k - sum_j q_j d_j) / tau with d = log q - log p
        d = logq.sub_(logp)
        qd = q * d
        kd = qd.sum()
        dkd = qd.sub_(q * qd.sum(-1, keepdim=True))
    dz.add_(dkd, alpha=(1 - lam) / tau)
    return lam * sft + (1 - lam) * kd, sft, kd, dz


def distill_loss(h, weight, labels, teachers, spec):
    """(loss_sum, sft_sum, kd_sum, count) over the supervised positions of a batch. h (B, T, C) student
    final hidden states, weight its lm_head, labels (B, T), teachers [(hidden (B, T, C_t), head
    weight)] as in chunk_loss. spec["impl"]: "chunked" (default, memory-flat) or "dense" (full
    (B, T, V) logits through the pure functions above; the reference the chunked path must equal)."""
    V, lam = spec["vocab"], spec["lam"]
    mask, targets = shift_labels(labels)
    if spec["impl"] == "chunked":
        sel = [(t[:, :-1][mask], w) for t, w in teachers]
        return (*ChunkedDistillLoss.apply(h[:, :-1][mask], weight, targets, sel, spec), mask.sum())
    z = (h @ weight[:V].T).float()  # (B, T, V)
    sft, n = sft_loss(z, labels)
    if not teachers:
        return lam * sft, sft.detach(), torch.zeros_like(sft), n
    zs = [(t @ w[:V].T).float() for t, w in teachers]
    if len(zs) == 3:
        target = delta_kd_target(zs[0], zs[1], zs[2], spec["alpha"], spec["temperature"])
    else:
        target = F.log_softmax(zs[0] / spec["temperature"], dim=-1)
    kd, _ = kd_loss(z, target, labels, spec["divergence"], spec["temperature"])
    return lam * sft + (1 - lam) * kd, sft.detach(), kd.detach(), n

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


def needed_models(cfg):
    # role -> directory; only what the method needs is loaded
    roles = {"sft": [], "fkl": ["teacher_ft"], "rkl": ["teacher_ft"], "seqkd": ["teacher_ft"],
             "delta": ["teacher_ft", "teacher_raw", "student_raw"]}[cfg.method]
    return {role: (cfg.student_raw or cfg.student) if role == "student_raw" else getattr(cfg, role) for role in roles}


def check_inputs(cfg):
    """Everything that can be checked before loading weights: paths, tokenizer agreement, vocab sizes,
    an output directory we can write. Returns the tokenizer and its path."""
    dirs = {"student": cfg.student, **needed_models(cfg)}
    for role, path in dirs.items():
        if not path:
            raise SystemExit(f"--method={cfg.method} needs --{role}")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise SystemExit(f"--{role}={path}: no config.json there (not an HF model directory)")
    for key in ("train_data", "eval_data"):
        path = getattr(cfg, key)
        if (path or key == "train_data") and not os.path.isfile(path):
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


def load_data(cfg):
    train_rows = data.read_rows(cfg.train_data)
    if cfg.eval_data:
        eval_rows = data.read_rows(cfg.eval_data)
    elif cfg.eval_size > 0:
        train_rows, eval_rows = data.split_rows(train_rows, cfg.eval_size, cfg.seed)
    else:
        eval_rows = []
    return train_rows, eval_rows


def encode(cfg, rows, tokenizer, source, rank):
    examples, stats = data.encode_rows(rows, tokenizer, cfg.max_len, cfg.system_prompt, cfg.skip_bad_rows, source)
    if not examples:
        raise SystemExit(f"{source}: no example has a supervised (assistant) token within max_len={cfg.max_len}")
    if rank == 0 and not cfg.quiet:
        print(f"data {source}: {stats}")
    return examples


def seqkd_rows(cfg, rows, tokenizer, device, rank, world):
    """SeqKD (Kim & Rush 2016): replace each training answer by the finetuned teacher's greedy answer
    to its first user turn. Cached in out_dir, so a resumed run does not regenerate."""
    cache = os.path.join(cfg.out_dir, "seqkd_data.jsonl")
    if not os.path.isfile(cache):
        teacher = qwen.Qwen.from_pretrained(cfg.teacher_ft, dtype=dtype_of(cfg.teacher_dtype), device=device).eval()
        prompts, _, _ = data.eval_pairs(rows, tokenizer, cfg.system_prompt)
        answers = generate_all(teacher, prompts, tokenizer, cfg.seqkd_max_new_tokens, cfg.eval_batch_size, rank, world)
        del teacher
        if rank == 0:
            firsts = [data.to_messages(r) for r in rows]
            firsts = [m[:2] if m[0]["role"] != "system" else m[:3] for m in firsts]
            with open(cache + ".tmp", "w") as f:
                for msgs, ans in zip(firsts, answers):
                    f.write(json.dumps({"messages": msgs[:-1] + [{"role": "assistant", "content": ans}]}) + "\n")
            os.replace(cache + ".tmp", cache)
        if dist.is_initialized():
            dist.barrier()
    # a teacher answer that is empty cannot be supervised: skip those rows, say how many
    out = [r for r in data.read_rows(cache) if r["messages"][-1]["content"].strip()]
    if not out:
        raise SystemExit(f"seqkd: the finetuned teacher {cfg.teacher_ft} gave an empty answer to all {len(rows)} "
                         f"training prompts ({cache}); nothing to train on")
    if rank == 0 and len(out) < len(rows) and not cfg.quiet:
        print(f"seqkd: {len(rows) - len(out)} empty teacher answers skipped")
    return out


def dtype_of(name):
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]

# -----------------------------------------------------------------------------
# generation and evaluation


def generate_all(model, prompts, tokenizer, max_new_tokens, batch_size, rank, world):
    """Greedy answers (decoded text) for all prompts, each rank generating a share; returned on every rank."""
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
                                 vocab_limit=tokenizer.get_vocab_size())
        for i, ids in zip(idx, gen):
            out[i] = tokenizer.decode(ids, skip_special_tokens=True)
    model.train(was_training)
    if dist.is_initialized():
        parts = [None] * world
        dist.all_gather_object(parts, out)
        out = {k: v for p in parts for k, v in p.items()}
    return [out[i] for i in range(len(prompts))]


def evaluate(model, prompts, refs, tokenizer, cfg, rank, world, tag):
    """ROUGE-1/2/L/Lsum F1 (stemmed, mean over examples) of greedy answers; predictions to jsonl."""
    preds = generate_all(model, prompts, tokenizer, cfg.eval_max_new_tokens, cfg.eval_batch_size, rank, world)
    scores = rouge.corpus_score(refs, preds, ("rouge1", "rouge2", "rougeL", "rougeLsum"), use_stemmer=True)
    if rank == 0:
        with open(os.path.join(cfg.out_dir, f"eval-{tag}.jsonl"), "w") as f:
            for p, r in zip(preds, refs):
                f.write(json.dumps({"prediction": p, "reference": r}) + "\n")
    return {k: s.fmeasure for k, s in scores.items()}


def autocast(device):
    # bf16 autocast for the student on CUDA; plain fp32 on CPU
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()

# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(cfg, step, model, optimizer, tokenizer_path, rank):
    """out_dir/ckpt-{step}: the student in HF format + trainer_state.pt (optimizer, step, RNG states).
    Written to a temporary directory and renamed, so a kill leaves the previous checkpoint intact."""
    if cfg.zero:
        optimizer.consolidate_state_dict(to=0)  # every rank must join; rank 0 receives the full state
    if rank != 0:
        return
    final = os.path.join(cfg.out_dir, f"ckpt-{step:07d}")
    tmp = tempfile.mkdtemp(prefix=".ckpt-tmp-", dir=cfg.out_dir)
    qwen.write_pretrained(model, tmp)
    shutil.copy(tokenizer_path, os.path.join(tmp, "tokenizer.json"))
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "config": dataclasses.asdict(cfg),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "numpy": np.random.get_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
               os.path.join(tmp, "trainer_state.pt"))
    qwen.replace_dir(tmp, final)
    for old in checkpoints(cfg.out_dir)[:-cfg.keep_last] if cfg.keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def checkpoints(out_dir):
    # complete checkpoints only: a directory gets its final name after everything in it was written
    return sorted(d for d in glob.glob(os.path.join(out_dir, "ckpt-*"))
                  if os.path.isfile(os.path.join(d, "trainer_state.pt")))

# -----------------------------------------------------------------------------
# training


def forward_loss(ddp_model, model, frozen, roles, input_ids, labels, spec):
    """One micro-batch: the frozen models' hidden states (no grad), the student's, and distill_loss.
    Right padding only, so no attention mask: under causal attention pad positions never influence
    real ones, and SDPA can take its fastest (causal) kernels."""
    device = input_ids.device
    with torch.no_grad(), autocast(device):
        teachers = [(frozen[r](input_ids, return_hidden=True), frozen[r].lm_head.weight) for r in roles]
    with autocast(device):
        h = ddp_model(input_ids, return_hidden=True)
    return distill_loss(h, model.lm_head.weight, labels, teachers, spec)


def lr_at(step, cfg, total):
    # linear warmup, then cosine decay from lr to lr * min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


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

    train_rows, eval_rows = load_data(cfg)
    if cfg.method == "seqkd":
        train_rows = seqkd_rows(cfg, train_rows, tokenizer, device, rank, world)
    examples = encode(cfg, train_rows, tokenizer, cfg.train_data, rank)
    prompts, refs, _ = data.eval_pairs(eval_rows, tokenizer, cfg.system_prompt, cfg.max_len)
    lengths = [len(ids) for ids, _ in examples]

    model = qwen.Qwen.from_pretrained(cfg.student, dtype=torch.float32, device=device)
    model.gradient_checkpointing = cfg.grad_checkpointing
    frozen = {role: qwen.Qwen.from_pretrained(path, dtype=dtype_of(cfg.teacher_dtype), device=device).eval()
              for role, path in needed_models(cfg).items() if cfg.method != "seqkd"}
    for m in frozen.values():
        m.requires_grad_(False)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if dist.is_initialized() else model

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # biases and norms: no weight decay
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    adam = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    if cfg.zero:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        optimizer = ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **adam)
    else:
        optimizer = torch.optim.AdamW(groups, **adam)

    per_step = world * cfg.grad_accum  # micro-batches per optimizer step, all ranks together
    epoch_batches = (0, data.make_batches(lengths, cfg.batch_size, cfg.seed, 0, per_step))
    steps_per_epoch = len(epoch_batches[1]) // per_step
    if master and not cfg.quiet:
        print(f"padding: {data.padding_fraction(epoch_batches[1], lengths):.1%} of batch tokens")
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    lam = 1.0 if cfg.method in ("sft", "seqkd") else cfg.lam
    spec = dict(vocab=tokenizer.get_vocab_size(), lam=lam, alpha=cfg.alpha, temperature=cfg.temperature,
                divergence="rkl" if cfg.method == "rkl" else cfg.divergence if cfg.method == "delta" else "fkl",
                chunk_size=cfg.chunk_size, impl=cfg.loss_impl)
    teacher_roles = list(frozen)  # [ft] or [ft, raw teacher, raw student]: the order chunk_loss expects

    step = 0
    if cfg.resume and checkpoints(cfg.out_dir):
        last = checkpoints(cfg.out_dir)[-1]
        state = torch.load(os.path.join(last, "trainer_state.pt"), map_location=device, weights_only=False)
        weights = qwen.Qwen.from_pretrained(last, dtype=torch.float32, device=device).state_dict()
        model.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        torch.set_rng_state(state["rng"]["torch"].cpu())
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if master and not cfg.quiet:
            print(f"resumed from {last} at step {step}")

    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    pad_id = tokenizer.token_to_id("<|endoftext|>")
    model.train()
    t_start, scores = time.time(), {}
    while step < total:
        t0 = time.time()
        # the data position is a function of the step: resuming at step s replays nothing and skips nothing
        epoch, offset = divmod(step, steps_per_epoch)
        if epoch_batches[0] != epoch:
            epoch_batches = (epoch, data.make_batches(lengths, cfg.batch_size, cfg.seed, epoch, per_step))
        batches = epoch_batches[1][offset * per_step:(offset + 1) * per_step][rank::world]
        micro = [data.collate([examples[i] for i in b], pad_id) for b in batches]
        # normalise by the supervised tokens of the whole step, all micro-batches and ranks together
        n_tokens = all_reduce(torch.tensor(sum(int((lab[:, 1:] != data.IGNORE_INDEX).sum()) for _, lab, _ in micro),
                                           dtype=torch.float64, device=device)).item()
        lr = lr_at(step, cfg, total)
        for g in optimizer.param_groups:
            g["lr"] = lr
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        for i, (input_ids, labels, _) in enumerate(micro):
            input_ids, labels = input_ids.to(device), labels.to(device)
            sync = i == len(micro) - 1 or not dist.is_initialized()
            with contextlib.nullcontext() if sync else ddp_model.no_sync():  # all-reduce on the last only
                loss, sft, kd, _ = forward_loss(ddp_model, model, frozen, teacher_roles, input_ids, labels, spec)
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
        step += 1

        dt = time.time() - t0
        n_in = all_reduce(torch.tensor(float(sum(x[0].numel() for x in micro)), device=device)).item()
        if master:
            rec = {"step": step, "loss": sums[0].item(), "sft": sums[1].item(), "kd": sums[2].item(), "lr": lr,
                   "grad_norm": gnorm.item(), "tokens_per_s": n_in / dt, "supervised_tokens": n_tokens}
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if not cfg.quiet:
                eta = (time.time() - t_start) / step * (total - step) if step else 0
                print(f"step {step}/{total} | loss {rec['loss']:.4f} (sft {rec['sft']:.4f} kd {rec['kd']:.4f}) | "
                      f"lr {lr:.2e} | gnorm {rec['grad_norm']:.3f} | {rec['tokens_per_s']:.0f} tok/s | "
                      f"eta {eta:.0f}s")
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total and prompts:
            scores = evaluate(model, prompts, refs, tokenizer, cfg, rank, world, f"step{step}")
            log_eval(cfg, step, scores, master, metrics_path)
        if (cfg.save_every and step % cfg.save_every == 0) or step == total:
            save_checkpoint(cfg, step, model, optimizer, tok_path, rank)

    if prompts:
        scores = evaluate(model, prompts, refs, tokenizer, cfg, rank, world, "final")
        log_eval(cfg, step, scores, master, metrics_path)
    return scores if master else {}


def log_eval(cfg, step, scores, master, metrics_path):
    if not master:
        return
    with open(metrics_path, "a") as f:
        f.write(json.dumps({"step": step, "eval": scores}) + "\n")
    if not cfg.quiet:
        print(f"eval step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in scores.items()))


# -----------------------------------------------------------------------------
# the embedded demo: the whole method on bundled data, on a 2-core CPU in minutes

DEMO = dict(
    pretrain_data=os.path.join(HERE, "assets/data/ultrachat_200k/ultrachat_small.jsonl"),  # general English
    task_data=os.path.join(HERE, "assets/data/gsm8k/test.jsonl"),  # the finetuning task: question -> answer
    vocab_size=4096, max_len=192, eval_size=48, eval_max_new_tokens=64,
    teacher=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
    student=dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    # tiny models take (and need) a high learning rate; steps sized for ~5 minutes on 2 cores
    pretrain=dict(max_steps=150, lr=1e-2, warmup_steps=10, batch_size=16),
    finetune=dict(max_steps=250, lr=1e-2, warmup_steps=10, batch_size=16),
    distill=dict(max_steps=150, lr=1e-2, warmup_steps=10, batch_size=16),
)


def demo(cfg):
    """Tokenizer -> pretrain a raw teacher and a raw student on plain English text -> finetune the teacher
    on a chat task (GSM8K question -> worked answer) -> distill five students from the raw student
    (SFT, FKL, RKL, SeqKD, Delta-KD) -> ROUGE table on held-out questions. Every stage is a call of
    train() with its own Config: the same loop and loss as a real run."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    t_start, root = time.time(), cfg.out_dir
    os.makedirs(root, exist_ok=True)
    print(f"demo: no --student given, so running the embedded demo into {root}/ (see README)")
    task = data.read_rows(DEMO["task_data"])
    train_rows, eval_rows = data.split_rows(task, DEMO["eval_size"], cfg.seed)
    english = [m["content"] for r in data.read_rows(DEMO["pretrain_data"]) for m in data.to_messages(r)]

    # a small byte-level BPE with the ChatML special tokens; held-out questions are never seen
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    corpus = english + [r["question"] + "\n" + r["answer"] for r in train_rows]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=DEMO["vocab_size"], special_tokens=special,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tok_path = os.path.join(root, "tokenizer.json")
    tok.save(tok_path)

    def write(name, rs):
        with open(os.path.join(root, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rs)
        return os.path.join(root, name)
    # pretraining: the English text packed into ~1,000-character documents (no chat format, no task data)
    text = "\n\n".join(english)
    pretrain = write("pretrain.jsonl", [{"text": text[i:i + 1000]} for i in range(0, len(text), 1000)])
    chat_train, chat_eval = write("task_train.jsonl", train_rows), write("task_eval.jsonl", eval_rows)

    def init(name, arch, seed):
        c = qwen.QwenConfig(vocab_size=tok.get_vocab_size(), max_position_embeddings=DEMO["max_len"],
                            tie_word_embeddings=True, bos_token_id=0, eos_token_id=2, torch_dtype="float32", **arch)
        path = os.path.join(root, name)
        qwen.save_pretrained(qwen.init_weights(qwen.Qwen(c), seed=seed), path)
        shutil.copy(tok_path, path)
        return path

    results = {}

    def run(name, **kw):
        t0 = time.time()
        c = Config(**{**dataclasses.asdict(cfg), "out_dir": os.path.join(root, name), "quiet": True, "eval_size": 0,
                      "max_len": DEMO["max_len"], "eval_max_new_tokens": DEMO["eval_max_new_tokens"],
                      "eval_batch_size": 48, "seqkd_max_new_tokens": DEMO["eval_max_new_tokens"],
                      "teacher_dtype": "float32", "keep_last": 1, "resume": False, "tokenizer": tok_path, **kw})
        shutil.rmtree(c.out_dir, ignore_errors=True)
        scores = train(c)
        if scores:
            results[name] = scores
        print(f"  {name:<18} {time.time() - t0:5.1f}s  " + " ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        return checkpoints(c.out_dir)[-1]

    # the raw models are evaluated on the task too: what finetuning and distillation start from
    raw_t = run("raw-teacher", student=init("init-teacher", DEMO["teacher"], cfg.seed), method="sft",
                train_data=pretrain, eval_data=chat_eval, **DEMO["pretrain"])
    raw_s = run("raw-student", student=init("init-student", DEMO["student"], cfg.seed + 1), method="sft",
                train_data=pretrain, eval_data=chat_eval, **DEMO["pretrain"])
    ft_t = run("teacher-ft", student=raw_t, method="sft", train_data=chat_train, eval_data=chat_eval,
               **DEMO["finetune"])
    for method in ("sft", "fkl", "rkl", "seqkd", "delta"):
        run(f"student-{method}", student=raw_s, teacher_ft=ft_t, teacher_raw=raw_t, method=method,
            train_data=chat_train, eval_data=chat_eval, **DEMO["distill"])

    names = {"raw-teacher": "Raw teacher (pretrained only)", "teacher-ft": "Teacher (finetuned)",
             "raw-student": "Raw student (pretrained only)", "student-sft": "SFT", "student-fkl": "Forward KL",
             "student-rkl": "Reverse KL", "student-seqkd": "SeqKD", "student-delta": f"Delta-KD (alpha={cfg.alpha})"}
    lines = ["| Method | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum |", "|---|---|---|---|---|"]
    for key, label in names.items():
        s = results[key]
        lines.append(f"| {label} | {s['rouge1']:.4f} | {s['rouge2']:.4f} | {s['rougeL']:.4f} | {s['rougeLsum']:.4f} |")
    table = "\n".join(lines)
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nROUGE F1 (stemmed, mean over {len(eval_rows)} held-out prompts, greedy, "
          f"{DEMO['eval_max_new_tokens']} new tokens):\n{table}\ndemo took {time.time() - t_start:.0f}s; "
          f"table in {root}/results.md")
    return results


def main(argv):
    cfg = parse_args(argv)
    try:
        if cfg.student:
            train(cfg)
        else:
            demo(cfg)
    except (OSError, ValueError, KeyError) as e:  # bad files, rows, keys: one line that names them
        sys.exit(f"error: {e}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
