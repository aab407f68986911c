"""
Every speed and memory claim of deltakd, each measured side by side with its peer in the same run.

    python bench.py                       # all of them (liger needs the optional .[bench] extra)
    python bench.py rouge loss            # some
    python bench.py --gpu                 # the GPU measurements (needs CUDA; under 8 minutes on one H100)

- forward:  Qwen forward vs transformers Qwen2ForCausalLM, same weights, fp32, same input.
- generate: greedy, batch 8, 128 new tokens, left-padded prompts of different lengths, vs HF generate.
- loss:     chunked vs dense Delta-KD loss + backward from hidden states at vocab 151,936, hidden 1,536
            (time in this process; peak memory of each in its own child process, from VmHWM).
- liger:    the chunked loss vs Liger-Kernel's fused linear forward KL, eager and compiled (pip install -e '.[bench]').
- rouge:    rouge.py vs rouge-score on 1,000 pairs of real answers, 4 types, stemming, numbers asserted equal.
- step:     one Delta-KD training step vs one SFT step of the same student (the three frozen forwards' price).
Timings are medians of interleaved repeats after a warm-up. Prints ratios (>1 means deltakd is faster).
"""

import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import torch

import data
import deltakd
import qwen
import rouge

HERE = os.path.dirname(os.path.abspath(__file__))


def timeit(fns, repeats=5):
    """{name: median seconds}; the candidates run interleaved so drift hits all of them alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def hf_and_ours(cfg_kw, seed=0):
    import transformers
    torch.manual_seed(seed)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg_kw)).eval()
    path = tempfile.mkdtemp()
    hf.save_pretrained(path)
    return hf, qwen.Qwen.from_pretrained(path).eval()


MINI = dict(vocab_size=151936, hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=4096)


def bench_forward():
    lines = []
    hf, ours = hf_and_ours(MINI)
    x = torch.randint(0, 151665, (4, 256))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max() < 1e-4
        t = timeit({"transformers": lambda: hf(x).logits, "deltakd": lambda: ours(x)}, repeats=5)
    lines.append(f"forward (B=4, T=256, fp32, {qwen.num_parameters(ours) / 1e6:.0f}M params): transformers "
                 f"{x.numel() / t['transformers']:.0f} tok/s, deltakd {x.numel() / t['deltakd']:.0f} tok/s -> "
                 f"{t['transformers'] / t['deltakd']:.2f}x")
    # a real Qwen2.5-0.5B shape (random weights from the bundled config), full logits, 1 x 512
    cfg = json.load(open(os.path.join(HERE, "assets/qwen2.5/Qwen2.5-0.5B/config.json")))
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rope_theta", "rms_norm_eps", "tie_word_embeddings")
    hf, ours = hf_and_ours({k: cfg[k] for k in keep})
    x = torch.randint(0, 151665, (1, 512))
    for dtype in (torch.float32, torch.bfloat16):
        hf, ours = hf.to(dtype), ours.to(dtype)
        with torch.no_grad():
            t = timeit({"transformers": lambda: hf(x).logits, "deltakd": lambda: ours(x)}, repeats=7)
        lines.append(f"forward Qwen2.5-0.5B shape ({qwen.num_parameters(ours) / 1e6:.0f}M params, 1 x 512, "
                     f"{str(dtype)[6:]}, full logits): transformers {t['transformers'] * 1e3:.0f} ms, deltakd "
                     f"{t['deltakd'] * 1e3:.0f} ms -> {t['transformers'] / t['deltakd']:.2f}x")
    return "\n".join(lines)


def bench_compile():
    """--compile on this CPU: the student step (256 wide x 4 layers, vocab 151,936, batch 4 x 256, SFT
    through the chunked loss) compiled vs eager: compile time and steady step time."""
    c = qwen.QwenConfig(vocab_size=151936, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2)
    student = qwen.init_weights(qwen.Qwen(c)).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    ids = torch.randint(0, 151665, (4, 256), generator=torch.Generator().manual_seed(0))
    spec = deltakd.LossSpec(vocab=151665, lam=1.0)
    compiled = torch.compile(student)

    def step(model):
        loss, _, _, n = deltakd.forward_loss(model, student, ids, ids, None, spec)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    step(compiled)
    first = time.perf_counter() - t0
    t = timeit({"eager": lambda: step(student), "compiled": lambda: step(compiled)}, repeats=3)
    return (f"compile (student 256x4, batch 4x256, SFT step, CPU): first compiled step {first:.1f}s; steady "
            f"eager {t['eager']:.2f}s, compiled {t['compiled']:.2f}s -> {t['eager'] / t['compiled']:.2f}x")


# the demo's teacher: small enough that per-step overhead, not reading weights, sets the speed
DEMO_TEACHER = dict(vocab_size=4096, tie_word_embeddings=True, max_position_embeddings=4096,
                    **deltakd.DEMO["teacher"])


def bench_generate():
    lines = []
    # bf16 is how Qwen checkpoints ship; at 108M on 2 cores both sides wait on the lm_head GEMV
    for name, arch, dtype in [("demo teacher", DEMO_TEACHER, torch.float32), ("mini", MINI, torch.bfloat16),
                              ("mini", MINI, torch.float32)]:
        hf, ours = hf_and_ours(arch)
        hf, ours = hf.to(dtype), ours.to(dtype)
        g = torch.Generator().manual_seed(0)
        V = min(arch["vocab_size"], 151665)
        prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (16, 23, 31, 40, 48, 55, 60, 64)]
        P = max(map(len, prompts))
        ids = torch.zeros(8, P, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
        eos, out = V - 1, {}

        def run_hf():
            out["hf"] = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=128, do_sample=False,
                                    eos_token_id=eos, pad_token_id=0)[:, P:].tolist()

        def run_ours():
            out["ours"] = ours.generate(prompts, 128, eos_token_id=eos, vocab_limit=V)
        with torch.no_grad():
            t = timeit({"transformers": run_hf, "deltakd": run_ours}, repeats=3)
        rate_hf = sum(len(r) for r in out["hf"]) / t["transformers"]
        rate = sum(len(r) for r in out["ours"]) / t["deltakd"]
        same = sum(o == h[:len(o)] for o, h in zip(out["ours"], out["hf"]))
        lines.append(f"generate {name} {qwen.num_parameters(ours) / 1e6:.1f}M params {str(dtype)[6:]} (greedy, batch 8, "
                     f"128 new tokens, prompts 16-64 tokens): transformers {rate_hf:.0f} tok/s, deltakd "
                     f"{rate:.0f} tok/s -> {rate / rate_hf:.2f}x ({same}/8 sequences identical)")
    return "\n".join(lines)


def loss_inputs(N, method, C=1536, V=151665, Vm=151936, Vt=152064, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(1, N + 1, C, generator=g) * 0.5
    W = torch.randn(Vm, C, generator=g) * 0.05
    labels = torch.randint(0, V, (1, N + 1), generator=g)  # every position after the first supervised
    teachers = {role: (torch.randn(1, N + 1, C, generator=g) * 0.5, torch.randn(Vt, C, generator=g) * 0.05)
                for role in deltakd.METHODS[method].frozen}
    return h, W, labels, teachers, deltakd.LossSpec(vocab=V, lam=0.5, alpha=1.0, temperature=1.0, chunk_size=512)


def loss_step(h, W, labels, teachers, spec):
    h, W = h.detach().requires_grad_(), W.detach().requires_grad_()
    loss, _, _, n = deltakd.distill_loss(h, W, labels, teachers, spec)
    (loss / n).backward()
    return loss


def vm_hwm():
    # peak RSS of this address space; unlike ru_maxrss it is not inherited across fork/exec
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024


def reset_peak():
    # VmHWM back to the current RSS (Linux), which it returns: a later vm_hwm() is the peak since now
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return vm_hwm()


def loss_child(impl, method, N):
    # runs in its own process: peak RSS above the inputs, or "oom" under an address-space cap
    h, W, labels, teachers, spec = loss_inputs(N, method)
    base = reset_peak()  # the inputs' set-up transients do not count
    limit = int(os.environ.get("BENCH_MEM_LIMIT", 0))
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        loss_step(h, W, labels, teachers, replace(spec, impl=impl))
    except (RuntimeError, MemoryError):
        print(json.dumps({"oom": True}))
        return
    print(json.dumps({"peak_gib": (vm_hwm() - base) / 2**30}))


def child_peak(impl, method, N, limit_gib=20):
    env = dict(os.environ, BENCH_MEM_LIMIT=str(limit_gib * 2**30))
    r = subprocess.run([sys.executable, __file__, "_loss_child", impl, method, str(N)], cwd=HERE, env=env,
                       capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        return {"oom": True}
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_loss():
    lines = []
    for method in ("fkl", "delta"):
        N = 1024
        h, W, labels, teachers, spec = loss_inputs(N, method)
        a = loss_step(h, W, labels, teachers, replace(spec, impl="chunked"))
        b = loss_step(h, W, labels, teachers, replace(spec, impl="dense"))
        assert abs(a.item() - b.item()) <= 1e-5 * abs(b.item())
        t = timeit({"dense": lambda: loss_step(h, W, labels, teachers, replace(spec, impl="dense")),
                    "chunked": lambda: loss_step(h, W, labels, teachers, replace(spec, impl="chunked"))}, repeats=2)
        mem = {(impl, n): child_peak(impl, method, n) for impl in ("chunked", "dense") for n in (1024, 4096)}
        fmt = lambda m: "does not fit (>20 GiB)" if m.get("oom") else f"{m['peak_gib']:.2f} GiB"  # noqa: E731
        lines.append(f"loss {method} (V 151,936, C 1,536, fp32): time at {N} tokens dense {t['dense']:.1f}s, "
                     f"chunked {t['chunked']:.1f}s -> chunked/dense {t['chunked'] / t['dense']:.2f}x; peak memory "
                     + "; ".join(f"{n} tokens dense {fmt(mem['dense', n])} chunked {fmt(mem['chunked', n])}"
                                 for n in (1024, 4096)))
        d, c = mem["dense", 1024], mem["chunked", 1024]
        if not d.get("oom"):
            lines[-1] += f" (chunked/dense at 1024: {c['peak_gib'] / d['peak_gib']:.2f})"
    return "\n".join(lines)


def bench_liger():
    """deltakd's chunked loss vs Liger-Kernel's LigerFusedLinearJSDLoss (beta = 0: forward KL, with its CE
    term as the SFT term) from hidden states, forward + backward, same inputs, eager vs eager and
    torch.compile vs torch.compile; Delta-KD (three frozen heads, no peer has it) beside them."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        return ("liger: Liger-Kernel is not installed; `pip install -e '.[bench]'` (liger-kernel, which runs on "
                "CPU too) and rerun `python bench.py liger`")
    N, C, V, chunk = 1024, 1536, 151936, 512
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(N, C, generator=g) * 0.5).requires_grad_()
    W = (torch.randn(V, C, generator=g) * 0.02).requires_grad_()
    frozen = {r: (torch.randn(N, C, generator=g) * 0.5, torch.randn(V, C, generator=g) * 0.02)
              for r in ("teacher_ft", "teacher_raw", "student_raw")}
    y = torch.randint(0, V, (N,), generator=g)
    ht, Wt = frozen["teacher_ft"]

    def ours(lam, compiled, roles=("teacher_ft",)):
        spec = deltakd.LossSpec(vocab=V, lam=lam, alpha=1.0, chunk_size=chunk, compile=compiled)
        loss = deltakd.ChunkedDistillLoss.apply(h, W, y, {r: frozen[r] for r in roles}, spec)[0] / N
        loss.backward()
        return loss

    def liger(lam, compiled, chunk_size=chunk):
        f = LigerFusedLinearJSDLoss(weight_hard_loss=lam, weight_soft_loss=1 - lam, beta=0.0, compiled=compiled,
                                    chunk_size=chunk_size)
        loss = f(h, W, ht, Wt, y)
        loss.backward()
        return loss

    def measured(fn):  # (seconds, peak GiB above the start, loss) of one call, gradients cleared first
        h.grad = W.grad = None
        base, t = reset_peak(), time.perf_counter()
        loss = fn()
        return time.perf_counter() - t, (vm_hwm() - base) / 2**30, loss.item()

    runs = {}
    for lam in (0.0, 0.5):
        for compiled in (False, True):
            runs[lam, compiled, "liger"] = lambda lam=lam, c=compiled: liger(lam, c)
            runs[lam, compiled, "deltakd"] = lambda lam=lam, c=compiled: ours(lam, c)
        runs[lam, True, "liger, its default 1024-row chunks"] = lambda lam=lam: liger(lam, True, 1024)
        for compiled in (False, True):
            runs[lam, compiled, "deltakd Delta-KD"] = lambda lam=lam, c=compiled: ours(lam, c, tuple(frozen))
    ref = {}
    for (lam, compiled, name), fn in runs.items():  # warm-up (compiles, first touch), checking equal results
        loss = measured(fn)[2]
        if name == "liger":
            ref = {"loss": loss, "grads": (h.grad.clone(), W.grad.clone())}
        elif name != "deltakd Delta-KD":
            assert math.isclose(loss, ref["loss"], rel_tol=1e-5), (name, loss, ref["loss"])  # the same loss ...
            assert all((u - v).abs().max() <= 1e-5 * v.abs().max() for u, v in zip((h.grad, W.grad), ref["grads"]))
    del ref
    times, peaks = {k: [] for k in runs}, {k: [] for k in runs}
    for _ in range(3):  # interleaved: drift hits every candidate alike
        for k, fn in runs.items():
            t, peak, _ = measured(fn)
            times[k].append(t)
            peaks[k].append(peak)
    lines = [f"liger (forward KL from hidden states + backward, N {N:,}, C {C:,}, V {V:,}, fp32, {chunk}-row chunks "
             f"unless said; median of 3 after a warm-up; peak RSS above the inputs; same losses within 1e-5, "
             f"same gradients within 1e-5 of the largest):"]
    for (lam, compiled, name) in runs:
        t, peak = statistics.median(times[lam, compiled, name]), max(peaks[lam, compiled, name])
        line = f"  lam {lam} {'compiled' if compiled else 'eager   '} {name}: {t:.2f}s, peak {peak:.2f} GiB"
        if name == "deltakd":
            t_l, p_l = statistics.median(times[lam, compiled, "liger"]), max(peaks[lam, compiled, "liger"])
            line += f" -> {t / t_l:.2f}x Liger's time, {peak / p_l:.2f}x its peak memory"
        lines.append(line)
    # Delta-KD's three heads: one buffer and three GEMMs (addmm) vs one GEMM over stacked hidden states and heads
    rows = slice(0, chunk)
    spec = deltakd.LossSpec(vocab=V, alpha=1.0)
    live = {r: (x[rows], w) for r, (x, w) in frozen.items()}
    out = torch.empty(chunk, V)
    stacked_w = torch.cat([frozen[r][1] for r in ("teacher_ft", "student_raw", "teacher_raw")], 1)
    stacked_h = torch.cat([frozen["teacher_ft"][0][rows], frozen["student_raw"][0][rows],
                           -frozen["teacher_raw"][0][rows]], 1)
    tt = timeit({"addmm": lambda: deltakd.chunk_target(live, 0, chunk, spec, out),
                 "stacked": lambda: torch.mm(stacked_h, stacked_w.T, out=out)}, repeats=3)
    lines.append(f"  Delta-KD target, {chunk} rows: three addmm into one buffer {tt['addmm']:.2f}s, one GEMM over "
                 f"stacked hidden states and heads {tt['stacked']:.2f}s (+{stacked_w.numel() * 4 / 2**30:.1f} GiB "
                 f"for the stacked heads)")
    return "\n".join(lines)


def bench_rouge():
    from rouge_score import rouge_scorer
    rows = data.read_rows(os.path.join(HERE, "assets/data/ultrachat_200k/ultrachat_small.jsonl"))
    answers = [m["content"] for r in rows for m in data.to_messages(r) if m["role"] == "assistant"]
    long = [a for a in answers if len(rouge.tokenize(a, False)) >= 150]  # multi-paragraph answers
    pairs = [(long[i % len(long)], long[(i + 1 + i // len(long)) % len(long)]) for i in range(1000)]
    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    oracle, ours = rouge_scorer.RougeScorer(types, use_stemmer=True), rouge.RougeScorer(types, use_stemmer=True)
    t0 = time.perf_counter()
    want = [oracle.score(a, b) for a, b in pairs]
    t1 = time.perf_counter()
    rouge._stem_cache.clear()  # a cold cache: the stems are computed inside the timed run
    got = [ours.score(a, b) for a, b in pairs]
    t2 = time.perf_counter()
    assert all(tuple(g[k]) == tuple(w[k]) for g, w in zip(got, want) for k in types)
    n_tok = statistics.mean(len(rouge.tokenize(a, False)) for a, _ in pairs)
    return (f"rouge (1,000 real answer pairs, mean {n_tok:.0f} tokens, 4 types, stemmed, identical numbers): "
            f"rouge-score {t1 - t0:.2f}s, deltakd {t2 - t1:.2f}s -> {(t1 - t0) / (t2 - t1):.1f}x")


def bench_step():
    """SFT step vs Delta-KD step with the three frozen models live vs with stored top-k targets, same
    student and batch; and the one-off target pass (time, bytes per supervised token)."""
    path = tempfile.mkdtemp()
    arch = dict(intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2)
    for name, hidden, vocab, seed in [("student", 256, 151936, 0), ("teacher_ft", 512, 152064, 1),
                                      ("teacher_raw", 512, 152064, 2)]:
        c = qwen.QwenConfig(vocab_size=vocab, hidden_size=hidden, tie_word_embeddings=name == "student", **arch)
        qwen.init_weights(qwen.Qwen(c), seed=seed).save_pretrained(os.path.join(path, name))
    student = qwen.Qwen.from_pretrained(os.path.join(path, "student")).train()
    cfg = deltakd.Config(student=os.path.join(path, "student"), teacher_ft=os.path.join(path, "teacher_ft"),
                         teacher_raw=os.path.join(path, "teacher_raw"), teacher_dtype="float32", topk=64)
    frozen = deltakd.load_frozen(cfg, torch.device("cpu"))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 151665, (4, 256), generator=g)
    labels = ids.clone()
    labels[:, :64] = data.IGNORE_INDEX  # a prompt
    spec = deltakd.LossSpec(vocab=151665, lam=0.5)
    # the stored target of this batch, as the target pass computes it (top-64, float16 storage)
    t0 = time.perf_counter()
    mask, _ = deltakd.shift_labels(labels)
    live = {r: (h[:, :-1][mask], w) for r, (h, w) in deltakd.frozen_target(frozen, ids).items()}
    with torch.no_grad():
        st = deltakd.topk_target(deltakd.chunk_target(live, 0, 10**9, spec), 64)
    t_pass = time.perf_counter() - t0
    st = deltakd.StoredTarget(st.ids, st.logp.half().float(), st.log_rest)
    bytes_per_token = 64 * (4 + 2) + 4

    def step(target, lam):
        loss, _, _, n = deltakd.forward_loss(student, student, ids, labels, target, replace(spec, lam=lam))
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    t = timeit({"sft": lambda: step(None, 1.0), "live": lambda: step(deltakd.frozen_target(frozen, ids), 0.5),
                "stored": lambda: step(st, 0.5)}, repeats=3)
    n_sup = int(mask.sum())
    return (f"train step (student 256x4, teachers 512x4, batch 4x256, fp32): SFT {t['sft']:.2f}s, Delta-KD live "
            f"{t['live']:.2f}s ({t['live'] / t['sft']:.2f}x SFT), Delta-KD stored top-64 {t['stored']:.2f}s "
            f"({t['stored'] / t['sft']:.2f}x SFT); target pass {n_sup / t_pass:.0f} supervised tokens/s, "
            f"{bytes_per_token} bytes per supervised token")


def data_child(mode, path, n_rows):
    """Runs in its own process: 'today' (read_rows + encode_rows, the in-memory path), 'build' (token
    cache from scratch), 'warm' (a run that finds the cache, to its first optimizer step)."""
    from tokenizers import Tokenizer
    t0 = time.perf_counter()
    tok_path = os.path.join(HERE, "assets/qwen2.5/tokenizer.json")
    tok = Tokenizer.from_file(tok_path)
    out = {}
    if mode == "today":
        examples, stats = data.encode_rows(data.read_rows(path), tok, 1024)
        out["tokens"] = stats["tokens"]
    elif mode == "build":
        cache_dir = os.path.join(os.path.dirname(path), f"cache-{n_rows}")
        cfg = deltakd.Config(out_dir=cache_dir, cache_dir=cache_dir, max_len=1024, quiet=True)
        cache = deltakd.token_cache(cfg, path, tok_path, tok, rank=0)
        out["tokens"] = int(len(cache.input_ids))
        out["bytes_per_token"] = sum(os.path.getsize(os.path.join(cache.path, f))
                                     for f in os.listdir(cache.path)) / out["tokens"]
    else:  # warm: the whole run up to and including optimizer step 1, on a tiny student
        student = os.path.join(os.path.dirname(path), "student")
        if not os.path.isdir(student):
            c = qwen.QwenConfig(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2)
            qwen.init_weights(qwen.Qwen(c)).save_pretrained(student)
        cache_dir = os.path.join(os.path.dirname(path), f"cache-{n_rows}")
        cfg = deltakd.parse_args([f"--student={student}", f"--tokenizer={tok_path}", f"--train_data={path}",
                                  f"--out_dir={cache_dir}/run", f"--cache_dir={cache_dir}", "--method=sft",
                                  "--max_len=1024", "--max_steps=1", "--eval_size=64", "--eval_max_new_tokens=1",
                                  "--batch_size=4", "--quiet=true"])
        deltakd.train(cfg)
    out["seconds"] = time.perf_counter() - t0
    out["peak_gib"] = vm_hwm() / 2**30
    print(json.dumps(out))


def run_data_child(mode, path, n_rows):
    r = subprocess.run([sys.executable, __file__, "_data_child", mode, path, str(n_rows)], cwd=HERE,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def floor_ratio(lines, n_rows=20_000):
    """The build's speed as a share of the tokenizer's own encode_batch over the same pieces in one call,
    measured side by side in this process (this machine's speed drifts by 30% over minutes)."""
    from tokenizers import Tokenizer
    tok_path = os.path.join(HERE, "assets/qwen2.5/tokenizer.json")
    tok = Tokenizer.from_file(tok_path)
    root = tempfile.mkdtemp(prefix="bench-floor-")
    path = os.path.join(root, "rows.jsonl")
    with open(path, "w") as f:
        f.writelines(lines[i % len(lines)] + "\n" for i in range(n_rows))
    pieces = [t for r in data.read_rows(path) for t, s in data.merge_segments(data.row_segments(r)) if t != "<|im_end|>"]
    shares = []
    for rep in range(3):
        t0 = time.perf_counter()
        n = sum(len(e.ids) for e in tok.encode_batch(pieces, add_special_tokens=False))
        floor = time.perf_counter() - t0
        key = dict(data.cache_key(path, tok_path, 1024, data.SYSTEM_PROMPT_BASE, 0, False), rep=rep)
        t0 = time.perf_counter()
        stats = data.build_cache(path, tok, data.cache_dir_for(root, key), key, log=None)
        shares.append((floor / (time.perf_counter() - t0) * stats["tokens"] / n, n / floor))
    shutil.rmtree(root, ignore_errors=True)
    share, rate = sorted(shares)[1]
    return f"the build runs at {share:.0%} of encode_batch alone ({rate / 1e6:.2f}M tokens/s then; median of 3)"


def bench_data():
    """Today's in-memory path vs the token cache on Ultrachat-style files of 50,000 and 200,000 rows
    (the bundled 1,000 conversations repeated; 200,000 rows = 95M tokens, a third of the real set)."""
    src = os.path.join(HERE, "assets/data/ultrachat_200k/ultrachat_small.jsonl")
    lines = open(src).read().splitlines()
    root = tempfile.mkdtemp(prefix="bench-data-")
    paths = {}
    for n in (50_000, 200_000):
        paths[n] = os.path.join(root, f"ultrachat_{n}.jsonl")
        with open(paths[n], "w") as f:
            for i in range(n):
                f.write(lines[i % len(lines)] + "\n")
    ratio = floor_ratio(lines)
    res = {("build", n): run_data_child("build", paths[n], n) for n in (50_000, 200_000)}
    res["warm", 200_000] = run_data_child("warm", paths[200_000], 200_000)
    res["today", 200_000] = run_data_child("today", paths[200_000], 200_000)
    shutil.rmtree(root, ignore_errors=True)
    b, o, w = res["build", 200_000], res["today", 200_000], res["warm", 200_000]
    return "\n".join([
        f"data, 200,000 rows ({b['tokens'] / 1e6:.0f}M tokens): today's read_rows + encode_rows {o['seconds']:.0f}s, "
        f"peak RSS {o['peak_gib']:.2f} GiB; token cache build {b['seconds']:.0f}s, peak {b['peak_gib']:.2f} GiB "
        f"({o['seconds'] / b['seconds']:.2f}x faster, {o['peak_gib'] / b['peak_gib']:.0f}x less memory)",
        f"data, cache build at 50,000 vs 200,000 rows: peak {res['build', 50_000]['peak_gib']:.2f} vs "
        f"{b['peak_gib']:.2f} GiB; {b['tokens'] / b['seconds'] / 1e6:.2f}M tokens/s; "
        f"{b['bytes_per_token']:.2f} bytes per token on disk",
        f"data, build vs the floor (20,000 rows, same process, interleaved): {ratio}",
        f"data, a second run that finds the cache: first optimizer step after {w['seconds']:.1f}s "
        f"(process start to step 1, tiny student, 64 held-out rows read back), peak {w['peak_gib']:.2f} GiB"])


def bench_topk(demo_dir="out"):
    """How good is a top-K target? On the demo's models (run `python deltakd.py` first) and its task
    data: mass outside the top K, relative error of the KD loss and cosine of the stored-target and
    exact gradients w.r.t. the student's logits, for K in 8, 64, 256."""
    from tokenizers import Tokenizer
    need = ["teacher-ft", "task_train.jsonl", "task_eval.jsonl"]
    if not all(os.path.exists(os.path.join(demo_dir, n)) for n in need):
        return f"topk: skipped, run `python deltakd.py --out_dir={demo_dir}` first (needs {need})"
    # the demo's seed-1337 models: its finetuned teacher, and the bundled raw models and tokenizer it started from
    tok_path, raw = deltakd.demo_raw_models(deltakd.Config(out_dir=demo_dir), [1337])
    paths = {"teacher_ft": deltakd.checkpoints(os.path.join(demo_dir, "teacher-ft"))[-1],
             "teacher_raw": raw[1337][0], "student_raw": raw[1337][1]}
    if open(os.path.join(paths["teacher_ft"], "tokenizer.json")).read() != open(tok_path).read():
        return f"topk: skipped, {demo_dir}/ comes from an older demo (another tokenizer); run `python deltakd.py` again"
    frozen = {r: qwen.Qwen.from_pretrained(p).eval() for r, p in paths.items()}
    student = frozen["student_raw"]
    tok = Tokenizer.from_file(tok_path)
    examples, _ = data.encode_rows(data.read_rows(os.path.join(demo_dir, "task_train.jsonl"))[:64], tok, 192)
    ids, labels, _ = data.collate(examples, tok.token_to_id("<|endoftext|>"))
    spec = deltakd.LossSpec(vocab=tok.get_vocab_size(), lam=0.0)
    mask, y = deltakd.shift_labels(labels)
    live = {r: (h[:, :-1][mask], w) for r, (h, w) in deltakd.frozen_target(frozen, ids).items()}
    with torch.no_grad():
        target = deltakd.chunk_target(live, 0, 10**9, spec)
        z = student(ids)[:, :-1][mask][:, :spec.vocab].float()
    # chunk_loss overwrites its z and target buffers (workspace): every call gets copies
    exact = deltakd.chunk_loss(z.clone(), y, target.clone(), spec)
    lines = []
    for k in (8, 64, 256):
        st = deltakd.topk_target(target, k)
        st = deltakd.StoredTarget(st.ids, st.logp.half().float(), st.log_rest)
        got = deltakd.chunk_loss(z.clone(), y, st, spec)
        rest = st.log_rest.exp()
        cos = F_cos(got[3], exact[3])
        lines.append(f"topk K={k}: mass outside top-K mean {rest.mean():.4f}, worst {rest.max():.4f}; KD loss "
                     f"{got[2] / exact[2] - 1:+.2%} vs exact; gradient cosine {cos:.4f} "
                     f"({len(y)} supervised tokens, Delta-KD target of the demo's models)")
    # the demo's Delta-KD student trained both ways, same seed and data order
    scores = {}
    for name, extra in (("exact", {}), ("stored top-64", {"targets_dir": os.path.join(demo_dir, "bench-targets"),
                                                          "topk": 64})):
        out = os.path.join(demo_dir, "bench-delta-" + name.replace(" ", "-"))
        shutil.rmtree(out, ignore_errors=True)
        cfg = deltakd.Config(student=paths["student_raw"], teacher_ft=paths["teacher_ft"],
                             teacher_raw=paths["teacher_raw"], method="delta",
                             train_data=os.path.join(demo_dir, "task_train.jsonl"),
                             eval_data=os.path.join(demo_dir, "task_eval.jsonl"), out_dir=out, quiet=True,
                             tokenizer=tok_path, max_len=deltakd.DEMO["max_len"],
                             eval_max_new_tokens=deltakd.DEMO["eval_max_new_tokens"], eval_batch_size=48,
                             teacher_dtype="float32", cache_dir=os.path.join(demo_dir, "cache"),
                             **deltakd.DEMO["distill"], **extra)
        t0 = time.perf_counter()
        scores[name] = (deltakd.train(cfg), time.perf_counter() - t0)
    lines.append("demo Delta-KD student, greedy ROUGE-1/2/L: " + "; ".join(
        f"{n} {s['rouge1']:.4f}/{s['rouge2']:.4f}/{s['rougeL']:.4f} ({t:.0f}s incl. the target pass)"
        for n, (s, t) in scores.items()))
    return "\n".join(lines)


def F_cos(a, b):
    a, b = a.double(), b.double()  # 20M terms: a float32 sum is off by ~1e-3
    return float((a * b).sum() / (a.norm() * b.norm()))


def gpu_model(name, dtype, device):
    # a real Qwen2.5 config with random weights, built directly on the GPU in its dtype (no fp32 copy)
    c = qwen.QwenConfig.from_json(os.path.join(HERE, "assets/qwen2.5", name, "config.json"))
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            m = qwen.Qwen(c)
    finally:
        torch.set_default_dtype(old)
    return m


def bench_gpu():
    """The GPU measurements of the paper-scale run in one command (under 8 minutes on one H100/H200):
    student step tokens/s and MFU (Qwen2.5-1.5B config, batch 4 x 2048, bf16 autocast, with and without
    checkpointing and compile); peak memory with the paper's three frozen models resident; the chunked
    loss at 8,192 tokens vs dense; generation vs transformers at batch 16 x 256 new tokens; DDP over
    NCCL with one process."""
    if not torch.cuda.is_available():
        sys.exit("bench.py --gpu: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine")
    import torch.distributed as dist
    dev = torch.device("cuda")
    name, lines = torch.cuda.get_device_name(), []
    peak = deltakd.peak_flops(deltakd.Config(), dev)
    lines.append(f"gpu: {name}, torch {torch.__version__}, bf16 peak used for MFU: {peak / 1e12 if peak else 0:.0f} TFLOP/s")
    # 1. student step, 1.5B, batch 4 x 2048, SFT loss through the chunked path (the training step's cost)
    student = gpu_model("Qwen2.5-1.5B", torch.float32, dev).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, 151665, (4, 2048), device=dev)
    labels = ids.clone()
    spec = deltakd.LossSpec(vocab=151665, lam=1.0)
    flops = 4 * 2048 * deltakd.flops_per_token(student.config, 2048, True)

    def step(model):
        loss, _, _, n = deltakd.forward_loss(model, student, ids, labels, None, spec)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for ckpt, compiled in ((False, False), (True, False), (True, True)):
        student.gradient_checkpointing = ckpt
        model = torch.compile(student, dynamic=False) if compiled else student
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step(model)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        t = cuda_time(lambda: step(model), repeats=3)
        lines.append(f"student step 1.5B, 4x2048, bf16 autocast, checkpointing={ckpt}, compile={compiled}: "
                     f"{4 * 2048 / t:.0f} tok/s, MFU {flops / t / peak:.1%}, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB "
                     f"(first step {first:.1f}s)")
    # 2. the paper's frozen models resident beside it: two 7B and the raw 1.5B, bf16
    frozen = {"teacher_ft": gpu_model("Qwen2.5-7B-Instruct", torch.bfloat16, dev),
              "teacher_raw": gpu_model("Qwen2.5-7B", torch.bfloat16, dev),
              "student_raw": gpu_model("Qwen2.5-1.5B", torch.bfloat16, dev)}
    for m in frozen.values():
        m.eval().requires_grad_(False)
    student.gradient_checkpointing = True
    spec = deltakd.LossSpec(vocab=151665, lam=0.5)
    torch.cuda.reset_peak_memory_stats()

    def delta_step():
        loss, _, _, n = deltakd.forward_loss(student, student, ids, labels, deltakd.frozen_target(frozen, ids), spec)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    t = cuda_time(delta_step, repeats=2)
    flops += 4 * 2048 * sum(deltakd.flops_per_token(m.config, 2048, False) for m in frozen.values())
    lines.append(f"Delta-KD step with the three frozen models live (2 x 7B + 1.5B bf16), checkpointing: "
                 f"{4 * 2048 / t:.0f} tok/s, MFU {flops / t / peak:.1%}, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} "
                 f"GiB (the --dry_run plan for this run: 62.7 GB without ZeRO)")
    frozen.clear()
    torch.cuda.empty_cache()
    lines += gpu_loss_lines(dev)
    # 4. generation, batch 16 x 256 new tokens, vs transformers generate (same random weights, bf16)
    import transformers
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{k: v for k, v in student.config.to_dict().items()
                                                                  if k != "extra"})).to(dev, torch.bfloat16).eval()
    ours = gpu_model("Qwen2.5-1.5B", torch.bfloat16, dev).eval()
    ours.load_state_dict(hf.state_dict(), strict=False)
    prompts = [torch.randint(0, 151665, (n,)).tolist() for n in range(64, 64 + 16 * 8, 8)]
    P = max(map(len, prompts))
    pid = torch.zeros(16, P, dtype=torch.long, device=dev)
    mask = torch.zeros_like(pid)
    for i, p in enumerate(prompts):
        pid[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        t_hf = cuda_time(lambda: hf.generate(input_ids=pid, attention_mask=mask, max_new_tokens=256, min_new_tokens=256,
                                             do_sample=False, pad_token_id=0), repeats=2)
        t_us = cuda_time(lambda: ours.generate(prompts, 256, eos_token_id=[-1], vocab_limit=151665), repeats=2)
    lines.append(f"generation 1.5B bf16, batch 16 x 256 new tokens: transformers {16 * 256 / t_hf:.0f} tok/s, deltakd "
                 f"{16 * 256 / t_us:.0f} tok/s -> {t_hf / t_us:.2f}x")
    # 5. NCCL, one process: the DDP wrapper path of the training loop
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    dist.init_process_group("nccl", rank=0, world_size=1)
    ddp = torch.nn.parallel.DistributedDataParallel(student)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=True)
    t = cuda_time(lambda: step(ddp), repeats=2)
    lines.append(f"DDP (NCCL, 1 process) student step: {4 * 2048 / t:.0f} tok/s")
    dist.destroy_process_group()
    return "\n".join(lines)


def gpu_loss_lines(dev):
    # 3. the chunked Delta-KD loss at 8,192 tokens vs dense (where dense fits), fp32, forward + backward
    lines = []
    h, W, lab, teachers, lspec = loss_inputs(8192, "delta")
    h, W, lab = h.to(dev), W.to(dev), lab.to(dev)
    teachers = {r: (t.to(dev), w.to(dev)) for r, (t, w) in teachers.items()}
    for impl in ("chunked", "dense"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        try:
            t = cuda_time(lambda: loss_step(h, W, lab, teachers, replace(lspec, impl=impl)), repeats=3)
            lines.append(f"loss Delta-KD {impl}, 8,192 tokens, fp32: {t * 1e3:.0f} ms, peak "
                         f"{(torch.cuda.max_memory_allocated() - base) / 2**30:.2f} GiB above the inputs")
        except torch.OutOfMemoryError:
            lines.append(f"loss Delta-KD {impl}, 8,192 tokens: does not fit")
        torch.cuda.empty_cache()
    return lines


def cuda_time(fn, repeats):
    fn()  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


BENCHES = {"forward": bench_forward, "generate": bench_generate, "loss": bench_loss, "liger": bench_liger,
           "rouge": bench_rouge, "step": bench_step, "data": bench_data, "topk": bench_topk, "compile": bench_compile}

if __name__ == "__main__":
    if sys.argv[1:2] == ["_loss_child"]:
        loss_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        sys.exit()
    if sys.argv[1:2] == ["_data_child"]:
        data_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        sys.exit()
    if sys.argv[1:2] == ["--gpu"]:
        print(bench_gpu(), flush=True)
        sys.exit()
    names = sys.argv[1:] or list(BENCHES)
    unknown = set(names) - set(BENCHES)
    if unknown:
        sys.exit(f"unknown bench {sorted(unknown)}; choose from {list(BENCHES)}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for name in names:
        print(BENCHES[name](), flush=True)
