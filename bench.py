"""
Every speed and memory claim of deltakd, each measured side by side with its peer in the same run, and
what a stored top-K target costs in accuracy.

    python bench.py                                   # all of them (liger needs the .[bench] extra, topk a demo run)
    python bench.py step rouge                        # some
    python bench.py step --out docs/bench-rows.md     # and append the rows to a file (the machine line first)
    python bench.py topk --demo_out=out               # topk reads a demo run's directory (assets/demo/demo.py)
    python bench.py data --data_rows=20000            # the data bench on a smaller file (default 200,000 rows)
    python bench.py --gpu                             # the GPU measurements (needs CUDA)
    python bench.py onpolicy                          # with trl installed (the .[bench] extra) also vs TRL's GKD

- forward:  Qwen forward vs transformers Qwen2ForCausalLM, same weights, fp32, same input.
- generate: greedy, batch 1 and 8, 64-token prompts, 128 new tokens, 108M and Qwen2.5-0.5B, fp32 and bf16, vs HF
            generate eager and with a static cache + torch.compile; the bandwidth floor as a fraction reached.
- decode:   a decoding step's lm_head (qwen.project vs F.linear), a 0.5B step over packed weights vs F.linear,
            the sampled token (qwen.draw vs torch.multinomial); generation where half the rows stop early vs none
            stopping and vs the long rows alone.
- exits:    2-rank torchrun jobs (MiniLLM, on-policy, on-policy stopped by SIGTERM), --runs=N (30) times each:
            how many exit 0 with a checkpoint (a rare abort at exit once made finished runs fail).
- loss:     chunked vs dense Delta-KD loss + backward from hidden states at vocab 151,936, hidden 1,536
            (time in this process; peak memory of each in its own child process, from VmHWM).
- liger:    the chunked loss vs Liger-Kernel's fused linear forward KL, eager and compiled (pip install -e '.[bench]').
- rouge:    rouge.py vs rouge-score on 1,000 pairs of real answers, 4 types, stemming, numbers asserted equal.
- step:     deltakd.kd_step itself, in real runs (deltakd.start, load_data, target_source, build_student,
            micro_batches): Delta-KD with the frozen models live and with stored top-64 targets, each vs
            the SFT step of the same student and batch; and the target pass that stores them.
- compile:  the same kd_step with --compile=true vs eager.
- onpolicy: deltakd.kd_step with --on_policy=1 (the student samples every answer, 64 tokens) vs the off-policy
            step on exactly those sequences, fkl and delta, split into sampling, frozen forwards and the
            student's step; and the fkl step vs TRL's GKDTrainer (lmbda=1, beta=0) on the same models and
            prompts (pip install -e '.[bench]'; without trl that row alone is skipped).
- data:     the token cache (deltakd.load_data) vs the in-memory path, time and peak memory, each in its own process;
            the checksum's speed and what checking the cache and the target shards costs.
- topk:     how far a stored top-K target (the target pass's own store) is from the exact one, on the
            models of a demo run: mass outside the top K, KD loss, gradient cosine. No training.
Every figure printed is measured in that run. Timings are medians of interleaved repeats after a warm-up;
each result says which way its ratio points. The output is markdown table rows: bench | what | peer |
setting | result.
"""

import argparse
import collections
import gc
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

import data
import deltakd
import qwen
import rouge

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "assets", "demo"))
import demo  # noqa: E402  (the demo's settings and raw models)

QWEN_CONFIGS = os.path.join(HERE, "assets/qwen2.5")  # the real Qwen2.5 config.json files (no weights)
TOKENIZER = os.path.join(QWEN_CONFIGS, "tokenizer.json")
ULTRACHAT = os.path.join(HERE, "assets/data/ultrachat_200k/ultrachat_small.jsonl")

USAGE = """python bench.py [NAME ...] [--out=FILE] [--demo_out=DIR] [--data_rows=N]
       python bench.py --gpu [--out=FILE]
NAME: forward generate decode loss liger rouge step compile onpolicy data topk exits (default: all of them); topk reads
the demo run in DIR (default out/, made by `python assets/demo/demo.py`) and is skipped without one; onpolicy's row
against TRL needs trl (pip install -e '.[bench]')"""

Row = collections.namedtuple("Row", "what peer setting result")


class Skipped(Exception):
    """A bench that cannot run here (a missing optional peer, no demo run): says why, writes no row."""


def timeit(fns, repeats=5, warmup=True):
    """{name: median seconds}; the candidates run interleaved so drift hits all of them alike."""
    if warmup:
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def timed(fn):
    # (seconds, result) of one call
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def hf_and_ours(cfg_kw, seed=0):
    import transformers
    torch.manual_seed(seed)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg_kw)).eval()
    path = tempfile.mkdtemp()
    hf.save_pretrained(path)
    return hf, qwen.Qwen.from_pretrained(path).eval()


MINI = dict(vocab_size=151936, hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=4096)
HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "max_position_embeddings", "rope_theta", "rms_norm_eps", "tie_word_embeddings")


def arch(config_json, **override):
    # the transformers Qwen2Config arguments of a config.json
    cfg = json.load(open(config_json))
    return {**{k: cfg[k] for k in HF_KEYS if k in cfg}, **override}


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def bench_forward():
    rows = []
    hf, ours = hf_and_ours(MINI)
    x = torch.randint(0, 151665, (4, 256))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max() < 1e-4
        t = timeit({"transformers": lambda: hf(x).logits, "deltakd": lambda: ours(x)}, repeats=5)
    rows.append(Row("model forward", "transformers `Qwen2ForCausalLM`, same weights",
                    f"{qwen.num_parameters(ours) / 1e6:.0f}M params (vocab {MINI['vocab_size']:,}), fp32, batch "
                    f"{x.shape[0]} × {x.shape[1]}; median of 5",
                    f"{x.numel() / t['deltakd']:.0f} vs {x.numel() / t['transformers']:.0f} tok/s: "
                    f"**{t['transformers'] / t['deltakd']:.2f}x** the speed"))
    # a real Qwen2.5-0.5B shape (random weights from the bundled config), full logits, 1 x 512
    hf, ours = hf_and_ours(arch(os.path.join(QWEN_CONFIGS, "Qwen2.5-0.5B/config.json")))
    x = torch.randint(0, 151665, (1, 512))
    for dtype in (torch.float32, torch.bfloat16):
        hf, ours = hf.to(dtype), ours.to(dtype)
        with torch.no_grad():
            t = timeit({"transformers": lambda: hf(x).logits, "deltakd": lambda: ours(x)}, repeats=7)
        rows.append(Row("model forward, real size", "transformers `Qwen2ForCausalLM`, same weights",
                        f"Qwen2.5-0.5B shape ({qwen.num_parameters(ours) / 1e6:.0f}M params, random weights), "
                        f"{x.shape[0]} × {x.shape[1]}, {dtype_name(dtype)}, full logits; median of 7",
                        f"{t['deltakd'] * 1e3:.0f} vs {t['transformers'] * 1e3:.0f} ms: "
                        f"**{t['transformers'] / t['deltakd']:.2f}x** the speed"))
    return rows


def read_bandwidth(gib=1.0):
    # bytes/s this machine reads memory at: the best of 5 sums over a buffer far larger than the caches
    x = torch.ones(int(gib * 2**30) // 4)
    return x.numel() * 4 / min(timed(x.sum)[0] for _ in range(5))


def decode_bytes(model, batch, kv_tokens):
    # what one decoding step must read: every weight but the embedding table (a lookup of `batch` rows; a tied
    # table is read whole as the lm_head) and the keys and values of kv_tokens positions per row
    c, itemsize = model.config, model.lm_head.weight.element_size()
    untied = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    return (qwen.num_parameters(model) - untied) * itemsize + qwen.kv_cache_bytes(c, batch * kv_tokens, itemsize)


def bench_generate(prompt=64, new=128, repeats=2):
    """qwen.generate vs transformers' generate, eager and at its best (a static cache and torch.compile), greedy,
    same weights, at ~100M (MINI) and the real Qwen2.5-0.5B config, fp32 and bf16, batch 1 and 8; with the
    bandwidth floor: one step's bytes (decode_bytes, with the mean filled KV length) at the measured read bandwidth,
    as a fraction of qwen.generate's time per token."""
    import transformers
    cc = transformers.CompileConfig(mode="default")  # no CUDA graphs on a CPU
    cc._compile_all_devices = True  # transformers compiles its static-cache decoding only on accelerators otherwise
    bandwidth, rows = read_bandwidth(), []
    configs = [("mini", MINI), ("Qwen2.5-0.5B", arch(os.path.join(QWEN_CONFIGS, "Qwen2.5-0.5B", "config.json")))]
    for name, cfg in configs:
        hf32, ours32 = hf_and_ours(cfg)
        for dtype in (torch.float32, torch.bfloat16):
            hf, ours = hf32.to(dtype), ours32.to(dtype)
            for batch in (1, 8):
                g = torch.Generator().manual_seed(0)
                prompts = torch.randint(0, 151665, (batch, prompt), generator=g)
                hf_args = dict(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                               min_new_tokens=new, do_sample=False, pad_token_id=0)
                out, compiled = {}, ours.compile_decoding().compiled_decode

                def run_ours(decode):  # qwen.generate with decode_step eager or compiled
                    ours.compiled_decode = decode
                    out[decode] = ours.generate(prompts.tolist(), new, eos_token_id=151665, vocab_limit=151665)
                fns = {"transformers": lambda: out.update(hf=hf.generate(**hf_args)[:, prompt:].tolist()),
                       "transformers static+compile": lambda: hf.generate(**hf_args, cache_implementation="static",
                                                                          compile_config=cc),
                       "deltakd": lambda: run_ours(None), "deltakd compiled": lambda: run_ours(compiled)}
                with torch.no_grad():
                    t = timeit(fns, repeats=repeats)
                rate = {k: batch * new / v for k, v in t.items()}
                floor = decode_bytes(ours, batch, prompt + new // 2) / bandwidth
                same = sum(o == h for o, h in zip(out[None], out["hf"]))
                same_compiled = sum(o == c for o, c in zip(out[None], out[compiled]))
                best = max(rate["transformers"], rate["transformers static+compile"])
                rows.append(Row("generation", "transformers `generate`: eager / static cache + torch.compile",
                                f"{name} ({qwen.num_parameters(ours) / 1e6:.0f}M), {dtype_name(dtype)}, greedy, batch "
                                f"{batch}, {prompt}-token prompts, {new} new tokens; median of {repeats}",
                                f"{rate['deltakd']:.1f} (compiled {rate['deltakd compiled']:.1f}) vs "
                                f"{rate['transformers']:.1f} / {rate['transformers static+compile']:.1f} tok/s: "
                                f"**{rate['deltakd'] / best:.2f}x** transformers' best; {floor * 1e3:.1f} ms/step floor "
                                f"at {bandwidth / 1e9:.0f} GB/s: **{floor / (batch / rate['deltakd']):.0%}** of it "
                                f"({same} of {batch} sequences identical to transformers', {same_compiled} to "
                                "compiled decoding's)"))
                print(table_row(["`generate`", *rows[-1]]), file=sys.stderr, flush=True)
        del hf32, ours32  # (.to converts in place: the bf16 models are these)
        gc.collect()
    return rows


def bench_decode(repeats=7):
    """Parts of each decoding step against their plain torch forms, at Qwen's 151,665 real tokens: qwen.project
    vs F.linear for the fp32 lm_head (hidden sizes of MINI, Qwen2.5-0.5B and 1.5B, random weights), an fp32
    and a bf16 decode_step of the real Qwen2.5-0.5B config over its linears' packed weights (qwen.packed_linears)
    vs F.linear, and qwen.draw vs torch.multinomial for the sampled token (softmax of random logits); and
    qwen.generate of 8 rows, half of which stop early, vs the same rows none of which stop (what the work was before
    generate cut stopped rows away) and vs the 4 long rows alone (the least it can cost)."""
    rows, V, g = [], 151665, torch.Generator().manual_seed(0)
    for C in (MINI["hidden_size"], 896, 1536):
        head = qwen.Linear(C, V, bias=False).requires_grad_(False)
        W = head.weight.normal_(0, 0.02, generator=g)
        for batch in (1, 4, 8):
            h = torch.randn(batch, C, generator=g)
            t = timeit({"F.linear": lambda: F.linear(h, W), "project": lambda: qwen.project(h, head, V)}, repeats)
            gap = (qwen.project(h, head, V).double() - F.linear(h.double(), W.double())).abs().max().item()
            rows.append(Row("lm_head of a decoding step", "`F.linear` (as transformers)",
                            f"V {V:,}, C {C:,}, fp32, batch {batch}; median of {repeats}",
                            f"`qwen.project` {t['project'] * 1e3:.1f} vs {t['F.linear'] * 1e3:.1f} ms: **"
                            f"{t['F.linear'] / t['project']:.2f}x** the speed ({W.nbytes / t['project'] / 1e9:.0f} "
                            f"GB/s); {gap:.1e} from float64"))
    head = W = None
    model = qwen.Qwen(qwen.QwenConfig.from_dict(arch(os.path.join(QWEN_CONFIGS, "Qwen2.5-0.5B", "config.json"))))
    model, L = qwen.init_weights(model).eval(), 128  # a step at the 129th slot of a 192-slot cache
    linears = [m for m in model.modules() if isinstance(m, qwen.Linear)]
    for dtype, batch in [(d, b) for d in (torch.float32, torch.bfloat16) for b in (1, 8)]:
        model.to(dtype)
        if not qwen.packing_pays(model.lm_head):
            print(f"decode: no packed {dtype_name(dtype)} linears on this CPU (oneDNN): row skipped", file=sys.stderr)
            continue

        def pack():  # what generate does once per call; returns the packed weights
            with qwen.packed_linears([model], V, batch, qwen.PACKING_PAYS_FROM):
                return [m.packed for m in linears]
        packed = pack()
        step = (torch.zeros(batch, 1, dtype=torch.long), torch.full((batch, 1), L),
                torch.ones(batch, 1, 1, 192, dtype=torch.bool), model.empty_kv_cache(batch, 192), torch.tensor([L]), V)

        def step_over(weights):  # each linear's packed weight, or None: F.linear
            for m, w in zip(linears, weights):
                m.packed = w
            return model.decode_step(*step)
        with torch.no_grad():
            # packing timed apart: interleaved with the steps, it slowed the packed one (fp32 batch 1: 0.64x, not 1.18x)
            t = timeit({"packed": lambda: step_over(packed), "F.linear": lambda: step_over([None] * len(linears))},
                       repeats)
            t["packing"] = statistics.median(timed(pack)[0] for _ in range(3))
            gap = (step_over(packed).double() - step_over([None] * len(linears)).double()).abs().max().item()
        rows.append(Row("decoding step over packed weights", "the same step through `F.linear` (fp32: and `project`)",
                        f"`decode_step` of the Qwen2.5-0.5B config ({qwen.num_parameters(model) / 1e6:.0f}M, random "
                        f"weights), {dtype_name(dtype)}, batch {batch}, {L} cached positions; median of {repeats}",
                        f"{t['packed'] * 1e3:.1f} vs {t['F.linear'] * 1e3:.1f} ms: **{t['F.linear'] / t['packed']:.2f}x"
                        f"** the speed ({decode_bytes(model, batch, L) / t['packed'] / 1e9:.0f} GB/s), logits "
                        f"{'equal bit for bit' if gap == 0 else f'{gap:.1e} apart'}; packing the weights once "
                        f"{t['packing'] * 1e3:.0f} ms"))
    model = packed = linears = None
    for batch in (1, 8):
        probs = (3 * torch.randn(batch, V, generator=g)).softmax(-1)
        t = timeit({"multinomial": lambda: torch.multinomial(probs, 1, generator=g),
                    "draw": lambda: qwen.draw(probs, torch.rand(batch, 1, dtype=torch.float64, generator=g))}, repeats)
        rows.append(Row("sampled token", "`torch.multinomial(probs, 1)`", f"V {V:,}, fp32 probabilities, batch "
                        f"{batch}; median of {repeats}", f"`qwen.draw` {t['draw'] * 1e3:.2f} vs "
                        f"{t['multinomial'] * 1e3:.2f} ms: **{t['multinomial'] / t['draw']:.1f}x** the speed"))
    model = qwen.Qwen(qwen.QwenConfig.from_dict(MINI))
    qwen.init_weights(model)
    prompts, new = torch.randint(0, V, (8, 64), generator=g).tolist(), 128
    sampling = qwen.Sampling(temperature=1.0, seed=0)  # random weights: near-uniform draws, no id drawn twice
    free = model.eval().generate(prompts, new, [], sampling, vocab_limit=V)
    eos = [free[i][16 * (i + 1) - 1] for i in range(4)]  # rows 0-3 stop after 16, 32, 48 and 64 tokens
    answers = {}
    t = timeit({"stopping": lambda: answers.update(stopped=model.generate(prompts, new, eos, sampling, vocab_limit=V)),
                "none stop": lambda: model.generate(prompts, new, [], sampling, vocab_limit=V),
                "long rows": lambda: model.generate(prompts[4:], new, eos, sampling, vocab_limit=V)}, repeats=3)
    lengths = [len(r) for r in answers["stopped"]]
    rows.append(Row("generation with stopped rows", "the same 8 rows, none stopping / the 4 long rows alone",
                    f"108M (`MINI`), fp32, sampled, 64-token prompts, {new} new tokens, answer lengths {lengths}; "
                    "median of 3", f"{t['stopping']:.2f} vs {t['none stop']:.2f} s: **{t['stopping'] / t['none stop']:.2f}x** "
                    f"the time of none stopping; **{t['stopping'] / t['long rows']:.2f}x** the long rows alone "
                    f"({t['long rows']:.2f} s)"))
    return rows


LOSS = dict(C=1536, V=151665, Vm=151936, Vt=152064, chunk=512)


def loss_spec(method, **kw):
    # the LossSpec of a run of this method (fkl, delta at alpha 1), as deltakd.resolve writes its settings
    return deltakd.LossSpec(divergence="fkl", alpha=1.0 if method == "delta" else None, **kw)


def loss_inputs(N, method, seed=0):
    C, V, Vm, Vt = LOSS["C"], LOSS["V"], LOSS["Vm"], LOSS["Vt"]
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(1, N + 1, C, generator=g) * 0.5
    W = torch.randn(Vm, C, generator=g) * 0.05
    labels = torch.randint(0, V, (1, N + 1), generator=g)  # every position after the first supervised
    spec = loss_spec(method, vocab=V, lam=0.5, temperature=1.0, chunk_size=LOSS["chunk"])
    teachers = {role: (torch.randn(1, N + 1, C, generator=g) * 0.5, torch.randn(Vt, C, generator=g) * 0.05)
                for role in spec.weights}
    return h, W, labels, teachers, spec


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


def child_peak(impl, method, N, limit_gib):
    env = dict(os.environ, BENCH_MEM_LIMIT=str(limit_gib * 2**30))
    r = subprocess.run([sys.executable, __file__, "_loss_child", impl, method, str(N)], cwd=HERE, env=env,
                       capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        return {"oom": True}
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_loss():
    rows, N, sizes, limit = [], 1024, (1024, 4096), 20
    shape = f"V {LOSS['Vm']:,}, C {LOSS['C']:,}, fp32, forward + backward, λ = 0.5"
    for method, name in (("fkl", "forward KL"), ("delta", f"Delta-KD ({len(loss_spec('delta', vocab=LOSS['V']).weights)} frozen heads)")):
        h, W, labels, teachers, spec = loss_inputs(N, method)
        a = loss_step(h, W, labels, teachers, replace(spec, impl="chunked"))
        b = loss_step(h, W, labels, teachers, replace(spec, impl="dense"))
        assert abs(a.item() - b.item()) <= 1e-5 * abs(b.item())
        t = timeit({"dense": lambda: loss_step(h, W, labels, teachers, replace(spec, impl="dense")),
                    "chunked": lambda: loss_step(h, W, labels, teachers, replace(spec, impl="chunked"))}, repeats=2)
        rows.append(Row("KD loss, time", "dense loss (full logits, autograd)", f"{name}, {shape}, {N:,} tokens; "
                        "median of 2", f"{t['chunked']:.1f} vs {t['dense']:.1f} s: chunked takes "
                        f"**{t['chunked'] / t['dense']:.2f}x** the time (losses equal within 1e-5)"))
        mem = {(impl, n): child_peak(impl, method, n, limit) for impl in ("chunked", "dense") for n in sizes}

        def fmt(m):
            return f"does not fit under a {limit} GiB cap" if m.get("oom") else f"{m['peak_gib']:.2f} GiB"

        def ratio(n):
            c, d = mem["chunked", n], mem["dense", n]
            if c.get("oom") or d.get("oom"):
                return f" (**< {c['peak_gib'] / limit:.2f}x**)" if not c.get("oom") else ""
            return f" (**{c['peak_gib'] / d['peak_gib']:.2f}x**)"
        rows.append(Row("KD loss, peak memory", "dense loss", f"{name}, {shape}, " + " / ".join(f"{n:,}" for n in sizes)
                        + " tokens; peak RSS above the inputs, each in its own process",
                        " / ".join(f"{fmt(mem['chunked', n])} vs {fmt(mem['dense', n])}{ratio(n)}" for n in sizes)))
    return rows


def bench_liger():
    """deltakd's chunked loss vs Liger-Kernel's LigerFusedLinearJSDLoss (beta = 0: forward KL, with its CE
    term as the SFT term) from hidden states, forward + backward, same inputs, eager vs eager and
    torch.compile vs torch.compile; Delta-KD (three frozen heads, no peer has it) beside them."""
    try:
        from importlib.metadata import version

        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        raise Skipped("Liger-Kernel is not installed; `pip install -e '.[bench]'` (liger-kernel, which runs on "
                      "CPU too) and rerun `python bench.py liger`") from None
    peer = f"Liger-Kernel {version('liger-kernel')} `LigerFusedLinearJSDLoss(beta=0)`"
    N, C, V, chunk = 1024, 1536, 151936, 512
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(N, C, generator=g) * 0.5).requires_grad_()
    W = (torch.randn(V, C, generator=g) * 0.02).requires_grad_()
    frozen = {r: (torch.randn(N, C, generator=g) * 0.5, torch.randn(V, C, generator=g) * 0.02)
              for r in loss_spec("delta", vocab=V).weights}
    y = torch.randint(0, V, (N,), generator=g)
    ht, Wt = frozen["teacher_ft"]

    def ours(lam, compiled, method="fkl"):
        spec = loss_spec(method, vocab=V, lam=lam, chunk_size=chunk, compile=compiled)
        loss = deltakd.ChunkedDistillLoss.apply(h, W, y, {r: frozen[r] for r in spec.weights}, spec, None)[0] / N
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
            runs[lam, compiled, "deltakd Delta-KD"] = lambda lam=lam, c=compiled: ours(lam, c, "delta")
    ref = {}
    for (lam, compiled, name), fn in runs.items():  # warm-up (compiles, first touch), checking equal results
        loss = measured(fn)[2]
        if name == "liger":
            ref = {"loss": loss, "grads": (h.grad.clone(), W.grad.clone())}
        elif name != "deltakd Delta-KD":
            assert math.isclose(loss, ref["loss"], rel_tol=1e-5), (name, loss, ref["loss"])  # the same loss ...
            assert all((u - v).abs().max() <= 1e-5 * v.abs().max() for u, v in zip((h.grad, W.grad), ref["grads"]))
    del ref
    repeats = 3
    times, peaks = {k: [] for k in runs}, {k: [] for k in runs}
    for _ in range(repeats):  # interleaved: drift hits every candidate alike
        for k, fn in runs.items():
            t, peak, _ = measured(fn)
            times[k].append(t)
            peaks[k].append(peak)
    setting = (f"forward KL from hidden states + backward, N {N:,}, C {C:,}, V {V:,}, fp32, {chunk}-row chunks "
               f"unless said, λ = {{lam}}; same losses within 1e-5, same gradients within 1e-5 of the largest; "
               f"median of {repeats} after a warm-up; peak RSS above the inputs")
    rows = []
    for (lam, compiled, name) in runs:
        t, peak = statistics.median(times[lam, compiled, name]), max(peaks[lam, compiled, name])
        mode = "compiled" if compiled else "eager"
        if name == "deltakd":
            t_l, p_l = statistics.median(times[lam, compiled, "liger"]), max(peaks[lam, compiled, "liger"])
            rows.append(Row(f"KD loss vs Liger-Kernel, {mode}", f"{peer}, compiled={compiled}", setting.format(lam=lam),
                            f"{t:.2f} vs {t_l:.2f} s: **{t / t_l:.2f}x** the time; peak {peak:.2f} vs {p_l:.2f} GiB: "
                            f"**{peak / p_l:.2f}x**"))
        elif name != "liger":
            rows.append(Row(f"{name}, {mode}", "—", setting.format(lam=lam), f"{t:.2f} s, peak {peak:.2f} GiB"))
    # Delta-KD's three heads: one buffer and three GEMMs (addmm) vs one GEMM over stacked hidden states and heads
    rows_ = slice(0, chunk)
    spec = loss_spec("delta", vocab=V)
    live = {r: (x[rows_], w) for r, (x, w) in frozen.items()}
    out = torch.empty(chunk, V)
    stacked_w = torch.cat([frozen[r][1] for r in ("teacher_ft", "student_raw", "teacher_raw")], 1)
    stacked_h = torch.cat([frozen["teacher_ft"][0][rows_], frozen["student_raw"][0][rows_],
                           -frozen["teacher_raw"][0][rows_]], 1)
    tt = timeit({"addmm": lambda: deltakd.chunk_target(live, 0, chunk, spec, out),
                 "stacked": lambda: torch.mm(stacked_h, stacked_w.T, out=out)}, repeats=3)
    rows.append(Row("Delta-KD target, three heads", "one GEMM over stacked hidden states and stacked heads",
                    f"{chunk} rows, V {V:,}, C {C:,}, fp32; median of 3",
                    f"three `addmm` into one buffer {tt['addmm']:.2f} s vs {tt['stacked']:.2f} s; stacking copies "
                    f"the heads (+{stacked_w.numel() * 4 / 2**30:.1f} GiB)"))
    return rows


def bench_rouge():
    from rouge_score import rouge_scorer
    rows = data.read_rows(ULTRACHAT)
    answers = [m["content"] for r in rows for m in data.to_messages(r) if m["role"] == "assistant"]
    long = [a for a in answers if len(rouge.tokenize(a, False)) >= 150]  # multi-paragraph answers
    n = 1000
    pairs = [(long[i % len(long)], long[(i + 1 + i // len(long)) % len(long)]) for i in range(n)]
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
    from importlib.metadata import version
    return [Row("ROUGE", f"rouge-score {version('rouge-score')}",
                f"{n:,} pairs of real Ultrachat answers (mean {n_tok:.0f} tokens), {len(types)} types, stemmed; "
                "numbers asserted identical", f"{t2 - t1:.2f} vs {t1 - t0:.2f} s: **{(t1 - t0) / (t2 - t1):.1f}x** the speed")]

# -----------------------------------------------------------------------------
# training steps: deltakd's own runs, built as train() builds them, and deltakd.kd_step itself timed


def long_conversations(n, min_tokens, first_turn_max=48):
    """n conversations from the bundled Ultrachat sample, each longer than min_tokens (the turns of consecutive
    rows chained into one multi-turn conversation) and opening with a user turn of at most first_turn_max
    tokens: truncated to max_len = min_tokens, every example is full and mostly supervised."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(TOKENIZER)
    convs = [data.to_messages(r) for r in data.read_rows(ULTRACHAT)]

    def tokens(msgs):
        return sum(len(e.ids) for e in tok.encode_batch([m["content"] for m in msgs], add_special_tokens=False))
    out = []
    for i, first in enumerate(convs):
        if tokens(first[:1]) > first_turn_max:
            continue
        msgs, j = list(first), i
        while tokens(msgs) <= min_tokens:
            j = (j + 1) % len(convs)
            msgs += convs[j]
        out.append({"messages": msgs})
        if len(out) == n:
            return out
    raise RuntimeError(f"{ULTRACHAT}: fewer than {n} conversations open with a short user turn")


def step_files(root, models, batch, max_len):
    """Into root: a checkpoint per role (models {role: model}) and a training file of `batch` conversations
    that fill max_len; returns the flags every run of them shares (one token cache for all)."""
    for role, model in models.items():
        model.save_pretrained(os.path.join(root, role))
    with open(os.path.join(root, "train.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in long_conversations(batch, max_len))
    return ([f"--{role}={os.path.join(root, role)}" for role in models]
            + [f"--tokenizer={TOKENIZER}", f"--train_data={os.path.join(root, 'train.jsonl')}", "--eval_size=0",
               f"--max_len={max_len}", f"--batch_size={batch}", f"--cache_dir={os.path.join(root, 'cache')}",
               "--quiet=true"])


class StepRun(collections.namedtuple("StepRun", "run student source micro target_seconds")):
    """A real run up to its first step, and the step: deltakd.kd_step on the run's one micro-batch (at --lr:
    the first step of a run without warmup)."""

    def step(self):
        return deltakd.kd_step(self.run, self.student, self.source, self.micro, 0)


def step_run(root, name, flags, source=None):
    """The run of these flags as deltakd.train() sets it up: the Config (parse_args), deltakd.start (input
    checks, seeds), the token cache (load_data), where the loss's target comes from (target_source: the
    frozen models, or the target pass into --targets_dir, or none for SFT; timed), the student
    (build_student); its one micro-batch is every example of the training file, each max_len long. source: a
    deltakd.TargetSource to use instead (the GPU bench's random-weight 7B models, never written to disk)."""
    run = deltakd.start(deltakd.parse_args(flags + [f"--out_dir={os.path.join(root, 'runs', name)}"]))
    cache, train_idx, _ = deltakd.load_data(run)
    lengths = cache.lengths[train_idx]
    if not (lengths == run.cfg.max_len).all():
        raise RuntimeError(f"bench examples of {lengths.tolist()} tokens, expected every one {run.cfg.max_len}")
    seconds = 0.0
    if source is None:
        seconds, source = timed(lambda: deltakd.target_source(run, cache))
    student = deltakd.build_student(run)
    student.model.train()
    return StepRun(run, student, source, deltakd.micro_batches(run, cache, [train_idx]), seconds)


def step_models(roles=("student", "teacher_ft", "teacher_raw")):
    """The step bench's models, as in docs/benchmarks.md: a student 256 wide x 4 layers (vocab 151,936, tied)
    and two teachers 512 x 4 (vocab 152,064); random weights (seeds 0, 1, 2)."""
    layers = dict(intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2)
    shapes = {"student": (256, 151936, True), "teacher_ft": (512, 152064, False), "teacher_raw": (512, 152064, False)}
    return {role: qwen.init_weights(qwen.Qwen(qwen.QwenConfig(vocab_size=v, hidden_size=c, tie_word_embeddings=tied,
                                                              **layers)), seed=i)
            for i, (role, (c, v, tied)) in enumerate(shapes.items()) if role in roles}


def describe(models, batch, max_len, n_supervised):
    s = models["student"].config
    teachers = [m.config for r, m in models.items() if r != "student"]
    t = teachers[0]
    return (f"student {s.hidden_size} wide × {s.num_hidden_layers} layers (vocab {s.vocab_size:,}), {len(teachers)} "
            f"teachers {t.hidden_size} × {t.num_hidden_layers} (vocab {t.vocab_size:,}) + the raw student as Delta-KD's "
            f"third frozen model, fp32, batch {batch} × {max_len} ({n_supervised:,} supervised tokens)")


def bench_step(batch=4, max_len=256, repeats=5):
    """deltakd.kd_step of an SFT run, a Delta-KD run with its three frozen models live and one with stored
    top-64 targets (the target pass into a temporary --targets_dir), same student and batch, interleaved."""
    root = tempfile.mkdtemp(prefix="bench-step-")
    try:
        models = step_models()
        flags = step_files(root, models, batch, max_len)
        delta = ["--method=delta", "--lam=0.5", "--alpha=1", "--teacher_dtype=float32"]
        topk = 64
        runs = {"sft": step_run(root, "sft", flags + ["--method=sft"]),
                "live": step_run(root, "live", flags + delta),
                "stored": step_run(root, "stored", flags + delta + [f"--targets_dir={os.path.join(root, 'targets')}",
                                                                    f"--topk={topk}", "--targets_dtype=float16"])}
        recs = {k: r.step() for k, r in runs.items()}  # the warm-up step of each
        t = timeit({k: r.step for k, r in runs.items()}, repeats=repeats, warmup=False)
        n_sup = int(recs["sft"]["supervised_tokens"])
        stored = runs["stored"]
        on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(stored.run.cfg.targets_dir)
                      for f in fs if f.endswith(".bin"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    setting = (f"`deltakd.kd_step` (global token normalisation, clipping, finiteness checks); "
               f"{describe(models, batch, max_len, n_sup)}; median of {repeats} interleaved steps")
    peer = "the SFT step of the same student and batch (`--method=sft`)"
    return [Row("training step, Delta-KD, frozen models live", peer, setting,
                f"{t['live']:.2f} vs {t['sft']:.2f} s: **{t['live'] / t['sft']:.2f}x** the time"),
            Row("training step, Delta-KD, stored targets", peer,
                setting + f"; target stored as top-{topk} (float16) + rest mass",
                f"{t['stored']:.2f} vs {t['sft']:.2f} s: **{t['stored'] / t['sft']:.2f}x** the time"),
            Row("target pass (once per run)", "—", f"`target_source` with `--targets_dir`: the frozen models loaded "
                f"and run once over the same {batch} examples, top-{topk} float16",
                f"{n_sup:,} supervised tokens in {stored.target_seconds:.1f} s ({n_sup / stored.target_seconds:.0f} "
                f"tokens/s, loading included); {on_disk / n_sup:.0f} bytes per supervised token on disk")]


def bench_compile(batch=4, max_len=256, repeats=3):
    """--compile=true on this CPU: deltakd.kd_step of an SFT run (the same student and batch as bench
    step) compiled vs eager: the first compiled step (compilation) and the steady step time."""
    root = tempfile.mkdtemp(prefix="bench-compile-")
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(root, "inductor")  # a cold cache: the first step compiles
    try:
        models = step_models(["student"])
        flags = step_files(root, models, batch, max_len) + ["--method=sft"]
        runs = {"eager": step_run(root, "eager", flags), "compiled": step_run(root, "compiled", flags + ["--compile=true"])}
        first = {k: timed(r.step) for k, r in runs.items()}  # (seconds, the step's record)
        t = timeit({k: r.step for k, r in runs.items()}, repeats=repeats, warmup=False)
        n_sup = int(first["eager"][1]["supervised_tokens"])
    finally:
        if cache is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        shutil.rmtree(root, ignore_errors=True)
    s = models["student"].config
    return [Row("`--compile=true`", "the eager run, otherwise the same",
                f"`deltakd.kd_step`, SFT, student {s.hidden_size} × {s.num_hidden_layers} (vocab {s.vocab_size:,}), "
                f"batch {batch} × {max_len} ({n_sup:,} supervised tokens), fp32, CPU; median of {repeats} interleaved "
                "steps after the first",
                f"first step {first['compiled'][0]:.1f} s compiled (compilation, cold cache) vs {first['eager'][0]:.1f} s; steady "
                f"{t['compiled']:.2f} vs {t['eager']:.2f} s: **{t['eager'] / t['compiled']:.2f}x** the speed")]


class VocabSlicedTeacher(torch.nn.Module):
    """A transformers teacher whose logits (and reported config.vocab_size) are cut to the student's rows:
    TRL's GKDTrainer raises on a vocab_size mismatch (student 151,936, teacher 152,064 rows); the full
    lm_head is still computed."""

    def __init__(self, model, vocab):
        super().__init__()
        import copy
        self.model, self.vocab = model, vocab
        self.config = copy.deepcopy(model.config)
        self.config.vocab_size = vocab

    def forward(self, input_ids=None, attention_mask=None, **kw):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)
        out.logits = out.logits[..., :self.vocab]
        return out


def trl_gkd_step(root, run, prompts, new):
    """TRL's GKDTrainer (lmbda = 1: always on-policy, beta = 0: forward KL(teacher || student)) on the step
    bench's student and teacher_ft as saved in root, loaded by transformers in float32, over these prompt
    ids (left-padded, as its collator pads them), sampling `new` tokens at temperature 1, top_k 0, top_p 1.
    Returns (step, generation seconds of each call, generated length of each call, what it is): step() is
    trainer.training_step + optimizer.step + lr_scheduler.step + zero_grad. Raises Skipped without trl."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # its experimental-import warning
    try:
        from importlib.metadata import version

        import transformers
        from datasets import Dataset
        from trl.experimental.gkd import GKDConfig, GKDTrainer  # trl 1.16.0's path
    except ImportError:
        raise Skipped("TRL is not installed; `pip install -e '.[bench]'` (trl==1.16.0) and rerun "
                      "`python bench.py onpolicy` for the row against TRL's GKDTrainer") from None
    tok_dir = os.path.join(root, "hf-tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    data.write_tokenizer_files(tok_dir, TOKENIZER, run.cfg.system_prompt)  # renders exactly deltakd's chat
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    tok.padding_side = "left"
    convs = [data.to_messages(json.loads(line)) for line in open(run.cfg.train_data)]
    firsts = [c[:2] for c in convs]  # the first user turn and its answer: the prompt TRL's collator would build
    templated = [tok(tok.apply_chat_template(c[:1], add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)["input_ids"] for c in firsts]
    if sorted(templated) != sorted(prompts):
        raise RuntimeError("TRL's chat-templated prompts differ from the ones deltakd samples from")
    stops = [run.tokenizer.token_to_id("<|im_end|>"), run.pad_id]
    student = transformers.Qwen2ForCausalLM.from_pretrained(run.cfg.student, dtype=torch.float32)
    # deltakd's stops, no Instruct generation_config (whose repetition_penalty 1.1 would change the sampling)
    student.generation_config = transformers.GenerationConfig(eos_token_id=stops, pad_token_id=run.pad_id)
    teacher = transformers.Qwen2ForCausalLM.from_pretrained(run.cfg.teacher_ft, dtype=torch.float32)
    teacher = VocabSlicedTeacher(teacher, student.config.vocab_size)
    args = GKDConfig(output_dir=os.path.join(root, "trl-out"), lmbda=1.0, beta=0.0, temperature=1.0,
                     max_new_tokens=new, seq_kd=False, per_device_train_batch_size=len(prompts),
                     gradient_accumulation_steps=1, use_cpu=True, bf16=False, fp16=False,
                     gradient_checkpointing=False,  # TRL's default True turns the KV cache off in generation
                     report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=run.cfg.seed)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tok,
                         train_dataset=Dataset.from_list([{"messages": c} for c in firsts]))
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's train loop otherwise
    model, opt, sched = trainer.model, trainer.optimizer, trainer.lr_scheduler
    model.train()
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), run.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": torch.full_like(ids, data.IGNORE_INDEX),
              "prompts": ids, "prompt_attention_mask": mask}
    gen_seconds, gen_lengths, generate = [], [], trainer.generate_on_policy_outputs

    def timed_generate(model, inputs, *rest):  # shadows the staticmethod on this trainer, whatever it is passed
        t = time.perf_counter()
        out = generate(model, inputs, *rest)
        gen_seconds.append(time.perf_counter() - t)
        gen_lengths.append(out[1][:, inputs["prompts"].shape[1]:].sum(1).float().mean().item())
        return out
    trainer.generate_on_policy_outputs = timed_generate

    def step():
        trainer.training_step(model, dict(inputs))  # it replaces input_ids, attention_mask, labels by the samples
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    what = (f"TRL {version('trl')} `GKDTrainer(lmbda=1, beta=0)` (transformers {version('transformers')}): "
            f"`training_step` + `optimizer.step` ({getattr(args.optim, 'value', args.optim)}) + `lr_scheduler.step` + `zero_grad`")
    return step, gen_seconds, gen_lengths, what


def bench_onpolicy(batch=4, new=64, repeats=5):
    """deltakd.kd_step with --on_policy=1 (every micro-batch answered by the student's own samples) vs the
    off-policy step of the same run on exactly those sequences (the micro-batches sample_answers returned,
    fed with sampled=False to the run with on_policy=0, same frozen models), for fkl (one frozen teacher)
    and delta (three); the on-policy step split into sampling (sample_answers alone), the frozen forwards
    (TargetSource.of over the sampled input_ids) and the rest (the student's step); and the fkl step vs TRL's
    GKDTrainer (lmbda=1, beta=0) on the same models, prompts and sampled length. Random weights essentially
    never sample <|im_end|>, so every answer is `new` tokens (the mean is measured and reported)."""
    root = tempfile.mkdtemp(prefix="bench-onpolicy-")
    rows, skipped = [], None
    try:
        models = step_models()
        max_len = new + 128  # every prompt (a first user turn of <= 48 tokens, templated) + new: nothing is cut
        flags = step_files(root, models, batch, max_len)
        for method in ("fkl", "delta"):
            kd = [f"--method={method}", "--teacher_dtype=float32"] + (["--alpha=1"] if method == "delta" else [])
            on = step_run(root, f"{method}-on", flags + kd + ["--on_policy=1", f"--on_policy_max_new_tokens={new}"])
            off = step_run(root, f"{method}-off", flags + kd, source=on.source)
            run, dev = on.run, on.run.device
            prompts = [p for m in on.micro for p in deltakd.answer_prompts(m)]
            if max(map(len, prompts)) + new > max_len:
                raise RuntimeError(f"prompts of up to {max(map(len, prompts))} tokens + {new} exceed max_len {max_len}")
            sampled, _ = deltakd.sample_answers(run, on.student.model, on.micro, 0)
            off = off._replace(micro=[m._replace(sampled=False) for m in sampled])  # the same sequences, as data

            def frozen():
                return [on.source.of(m.to(dev), run.cfg.autocast) for m in sampled]
            recs = []
            fns = {"on": lambda: recs.append(on.step()), "off": off.step,
                   "sampling": lambda: deltakd.sample_answers(run, on.student.model, on.micro, 0), "frozen": frozen}
            peer = None
            if method == "fkl":
                try:
                    fns["trl"], gen_s, gen_len, peer = trl_gkd_step(root, run, prompts, new)
                except Skipped as e:
                    skipped = e
            t = timeit(fns, repeats=repeats)
            n_frozen = len(on.source.frozen)
            T = sampled[0].input_ids.shape[1]
            length = statistics.mean(r["sampled_length"] for r in recs)
            student_s = t["on"] - t["sampling"] - t["frozen"]
            s, f = models["student"].config, models["teacher_ft"].config
            setting = (f"`deltakd.kd_step`, `--method={method}`: student {s.hidden_size} × {s.num_hidden_layers} "
                       f"(vocab {s.vocab_size:,}), {n_frozen} frozen model{'s' * (n_frozen > 1)} live "
                       f"({'teacher_ft' if n_frozen == 1 else 'teacher_ft, teacher_raw 512 × 4 and the raw student'}; "
                       f"teachers {f.hidden_size} × {f.num_hidden_layers}, vocab {f.vocab_size:,}), fp32, CPU; {batch} "
                       f"prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
                       f"`--on_policy_max_new_tokens={new}` at temperature 1, top_p 1 (mean sampled length "
                       f"{length:.1f}), batch {batch} × {T}; median of {repeats} interleaved steps")
            rows.append(Row(f"on-policy step (p = 1), {method}, vs off-policy step on the same sequences",
                            "the off-policy step (`--on_policy=0`, λ = 0.5) of the same run on the sequences "
                            "`sample_answers` returned, fed as data (`sampled=False`)", setting,
                            f"{t['on']:.2f} vs {t['off']:.2f} s: **{t['on'] / t['off']:.2f}x** the time"))
            rows.append(Row(f"on-policy step (p = 1), {method}, split", "—", setting + "; each part timed alone, "
                            "interleaved with the steps: `sample_answers`, `TargetSource.of` over the sampled input_ids (the "
                            "frozen models' hidden states; their lm_head projections run inside the chunked loss, so "
                            "in the student's step), the student's step = the rest",
                            f"sampling {t['sampling']:.2f} s, frozen forwards {t['frozen']:.2f} s, student's step "
                            f"{student_s:.2f} s (of {t['on']:.2f} s)"))
            if "trl" in fns:
                g = statistics.median(gen_s[-repeats:])
                rows.append(Row("on-policy step, fkl, vs TRL GKDTrainer lmbda=1 beta=0", peer,
                                f"the same student and teacher_ft (`save_pretrained`, loaded by transformers "
                                f"`Qwen2ForCausalLM`, fp32), the same {batch} chat-templated prompt ids (left-padded "
                                f"for TRL), {new} new tokens at temperature 1, top_k 0, top_p 1 (mean sampled "
                                f"length {length:.1f} vs {statistics.mean(gen_len):.1f}); deltakd slices both "
                                f"distributions to the tokenizer's {run.spec.vocab:,} tokens, TRL's teacher is wrapped "
                                f"to cut its logits to the student's {s.vocab_size:,} rows (TRL refuses unequal "
                                "vocab sizes) and its loss takes full (B, T, V) logits; deltakd's step includes its "
                                f"grad clipping; median of {repeats} interleaved steps",
                                f"{t['on']:.2f} vs {t['trl']:.2f} s: **{t['on'] / t['trl']:.2f}x** the time; "
                                f"sampling {t['sampling']:.2f} s + the rest {t['on'] - t['sampling']:.2f} s vs "
                                f"generation {g:.2f} s + the rest {t['trl'] - g:.2f} s"))
            on = off = sampled = fns = None  # the method's runs and frozen models, freed before the next
            gc.collect()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"onpolicy: peak RSS of the process {vm_hwm() / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    if skipped:
        print(f"onpolicy: the TRL row skipped: {skipped}", file=sys.stderr, flush=True)
    return rows


# -----------------------------------------------------------------------------
# the data path


def data_child(mode, root, path):
    """Runs in its own process: 'today' (read_rows + encode_rows, the in-memory path), 'build' (the token
    cache from scratch: deltakd.load_data of a run), 'warm' (a run that finds the cache, to its first
    optimizer step: deltakd.train)."""
    from tokenizers import Tokenizer
    t0 = time.perf_counter()
    out = {}
    n_rows = sum(1 for _ in open(path))
    flags = [f"--student={os.path.join(root, 'student')}", f"--tokenizer={TOKENIZER}", f"--train_data={path}",
             f"--cache_dir={os.path.join(root, f'cache-{n_rows}')}", "--method=sft", "--max_len=1024", "--quiet=true"]
    if mode == "today":
        examples, stats = data.encode_rows(data.read_rows(path), Tokenizer.from_file(TOKENIZER), 1024)
        out["tokens"] = stats["tokens"]
    elif mode == "build":
        run = deltakd.start(deltakd.parse_args(flags + [f"--out_dir={os.path.join(root, f'run-build-{n_rows}')}",
                                                        "--eval_size=0"]))
        cache, _, _ = deltakd.load_data(run)
        out["tokens"] = int(len(cache.input_ids))
        out["bytes_per_token"] = sum(os.path.getsize(os.path.join(cache.path, f))
                                     for f in os.listdir(cache.path)) / out["tokens"]
    else:  # warm: the whole run up to and including optimizer step 1, on a tiny student
        deltakd.train(deltakd.parse_args(flags + [f"--out_dir={os.path.join(root, f'run-warm-{n_rows}')}",
                                                  "--max_steps=1", "--eval_size=64", "--eval_max_new_tokens=1",
                                                  "--batch_size=4"]))
    out["seconds"] = time.perf_counter() - t0
    out["peak_gib"] = vm_hwm() / 2**30
    print(json.dumps(out))


def run_data_child(mode, root, path):
    r = subprocess.run([sys.executable, __file__, "_data_child", mode, root, path], cwd=HERE,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def floor_ratio(lines, n_rows):
    """The build's speed as a share of the tokenizer's own encode_batch over the same pieces in one call,
    measured side by side in this process (this machine's speed drifts by 30% over minutes):
    (share, encode_batch tokens/s), median of 3."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(TOKENIZER)
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
        key = dict(data.cache_key(path, TOKENIZER, 1024, data.SYSTEM_PROMPT_BASE, 0, False), rep=rep)
        t0 = time.perf_counter()
        stats = data.build_cache(path, tok, data.cache_dir_for(root, key), key, log=None)
        shares.append((floor / (time.perf_counter() - t0) * stats["tokens"] / n, n / floor))
    shutil.rmtree(root, ignore_errors=True)
    return sorted(shares)[1]


def checksum_speeds(mib=256):
    """GB/s of each candidate checksum over the same random bytes in memory, one core, best of 3: why the
    token cache and the target shards carry zlib's CRC-32 (data.scan)."""
    import hashlib
    import zlib
    buf = memoryview(np.random.default_rng(0).integers(0, 2**32, (mib << 20) // 4, dtype=np.uint32)).cast("B")
    chunks = [buf[i:i + data.SCAN_CHUNK] for i in range(0, len(buf), data.SCAN_CHUNK)]

    def hashed(name):
        h = hashlib.new(name)
        for c in chunks:
            h.update(c)

    def crc32():
        crc = 0
        for c in chunks:
            crc = zlib.crc32(c, crc)
    fns = {"crc32": crc32, **{name: (lambda name=name: hashed(name)) for name in ("sha1", "sha256", "blake2b", "md5")}}
    return {name: len(buf) / min(timed(fn)[0] for _ in range(3)) / 1e9 for name, fn in fns.items()}


def evict(paths):
    # drops the files' pages from the page cache (written back first), so that the next read is the disk's
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def verify_speeds(check, paths):
    """{"warm": (seconds, GB/s), "cold": (seconds, GB/s), "gib": size} of check() reading paths from the page
    cache (best of 3) and from the disk (the files evicted first, median of 3)."""
    size = sum(os.path.getsize(p) for p in paths)
    warm = min(timed(check)[0] for _ in range(3))
    cold = []
    for _ in range(3):
        evict(paths)
        cold.append(timed(check)[0])
    cold = statistics.median(cold)
    return {"warm": (warm, size / warm / 1e9), "cold": (cold, size / cold / 1e9), "gib": size / 2**30}


def cache_verification(cache_root):
    # the check a run makes of the token cache it finds (deltakd.token_cache -> data.check_cache)
    from tokenizers import Tokenizer
    where = next(os.path.join(cache_root, d) for d in os.listdir(cache_root) if d.startswith("tokens-"))
    with open(os.path.join(where, "meta.json")) as f:
        key = json.load(f)["key"]
    vocab = Tokenizer.from_file(TOKENIZER).get_vocab_size()

    def check():
        assert data.check_cache(where, key, vocab) is None
    return verify_speeds(check, [os.path.join(where, f"{name}.bin") for name in data.CACHE_ARRAYS])


def shard_verification(root, gib=1.0, topk=64, shard=1000, per_example=200):
    """The target pass's check of every shard it finds (TargetStore.damage), on shards of topk float16
    targets written by TargetStore.write from random numbers: the store stands in for a cache whose
    examples have per_example supervised positions each."""
    class Cache:  # what TargetStore reads of a token cache: the examples' supervised positions
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def n_targets(self):
            return np.full(self.n, per_example)
    bytes_per_example = per_example * (topk * 6 + 4)
    store = data.TargetStore(os.path.join(root, "targets"), Cache(int(gib * 2**30 / bytes_per_example)),
                             {"topk": topk, "shard": shard, "targets_dtype": "float16", "vocab": 151665})
    rng = np.random.default_rng(0)
    for s in range(store.n_shards):
        M = store.rows(s)
        store.write(s, {"ids": rng.integers(0, 151665, (M, topk), dtype=np.uint32),
                        "logp": rng.standard_normal((M, topk), dtype=np.float32), "rest": np.zeros(M, np.float32)})

    def check():
        assert all(store.damage(s) is None for s in range(store.n_shards))
    return verify_speeds(check, [p for s in range(store.n_shards) for p, _, _ in store.files(s).values()])


def bench_data(n_rows=200_000):
    """The in-memory path vs the token cache on Ultrachat-style files of n_rows / 4 and n_rows rows (the
    bundled 1,000 conversations repeated; 200,000 rows are a third of the real set), each in its own process."""
    lines = open(ULTRACHAT).read().splitlines()
    root = tempfile.mkdtemp(prefix="bench-data-")
    try:
        small, paths = n_rows // 4, {}
        for n in (small, n_rows):
            paths[n] = os.path.join(root, f"ultrachat_{n}.jsonl")
            with open(paths[n], "w") as f:
                f.writelines(lines[i % len(lines)] + "\n" for i in range(n))
        c = qwen.QwenConfig(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
        qwen.init_weights(qwen.Qwen(c)).save_pretrained(os.path.join(root, "student"))
        floor_rows = min(20_000, n_rows)
        share, rate = floor_ratio(lines, floor_rows)
        res = {("build", n): run_data_child("build", root, paths[n]) for n in (small, n_rows)}
        res["warm", n_rows] = run_data_child("warm", root, paths[n_rows])
        res["today", n_rows] = run_data_child("today", root, paths[n_rows])
        speeds = checksum_speeds()
        cache_check = cache_verification(os.path.join(root, f"cache-{n_rows}"))
        shard_check = shard_verification(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    b, o, w = res["build", n_rows], res["today", n_rows], res["warm", n_rows]
    setting = f"{n_rows:,} Ultrachat-style rows ({b['tokens'] / 1e6:.0f}M tokens), max_len 1,024, each in its own process"
    return [
        Row("data path, time and memory", "the in-memory path (every row read, then encoded: `read_rows` + "
            "`encode_rows`)", setting, f"token cache build (`load_data`) {b['seconds']:.0f} s, peak RSS "
            f"**{b['peak_gib']:.2f} GiB**, vs {o['seconds']:.0f} s and **{o['peak_gib']:.2f} GiB** "
            f"({o['seconds'] / b['seconds']:.2f}x faster, {o['peak_gib'] / b['peak_gib']:.0f}x less memory)"),
        Row("data path, flat in rows", f"the same build at {small:,} rows", "peak RSS",
            f"{res['build', small]['peak_gib']:.2f} GiB at {small:,} vs {b['peak_gib']:.2f} GiB at {n_rows:,} rows; "
            f"{b['tokens'] / b['seconds'] / 1e6:.2f}M tokens/s; {b['bytes_per_token']:.2f} bytes per token on disk"),
        Row("data path, tokenizer floor", "the tokenizer's own `encode_batch` alone (one call, all cores), same "
            "pieces, same process, interleaved", f"{floor_rows:,} rows, median of 3",
            f"the build runs at **{share:.0%}** of `encode_batch` alone ({rate / 1e6:.2f}M tokens/s then)"),
        Row("data path, warm start", "—", "a second run that finds the cache, process start to optimizer step 1 "
            "(tiny student, 64 held-out rows read back by seeking; the cache's full check included)",
            f"**{w['seconds']:.1f} s**, peak {w['peak_gib']:.2f} GiB"),
        Row("checksum speed", "sha1, sha256, blake2b, md5 (hashlib)", "256 MiB in memory, 16 MiB updates, one core, "
            "best of 3", f"zlib's CRC-32 (the cache's and the shards' checksum) **{speeds['crc32']:.2f} GB/s**, vs "
            + ", ".join(f"{n} {v:.2f}" for n, v in speeds.items() if n != "crc32")),
        Row("cache verification", "—", f"the full check of the {n_rows:,}-row cache a run finds (`check_cache`: "
            f"every file's CRC-32, every token id below the vocabulary), {cache_check['gib']:.2f} GiB",
            verified(cache_check)),
        Row("target shard verification", "—", f"`TargetStore.damage` of every shard, top-64 float16 targets written "
            f"by `TargetStore.write`, {shard_check['gib']:.2f} GiB", verified(shard_check))]


def verified(speed):
    return (f"**{speed['warm'][1]:.2f} GB/s** from the page cache ({speed['warm'][0]:.2f} s), "
            f"{speed['cold'][1]:.2f} GB/s from the disk ({speed['cold'][0]:.2f} s, the files evicted first)")

# -----------------------------------------------------------------------------
# stored targets: how far from the exact target


def demo_run_files(demo_out, seed):
    """(finetuned teacher checkpoint, task_distill.jsonl) of a demo run in demo_out (`python assets/demo/demo.py`,
    or its --full_comparison=true, whose stages live under seed<N>/), or Skipped saying what is missing."""
    train = os.path.join(demo_out, "task_distill.jsonl")
    for ft in (os.path.join(demo_out, "teacher-ft"), os.path.join(demo_out, f"seed{seed}", "teacher-ft")):
        if os.path.isfile(train) and deltakd.checkpoints(ft):
            return deltakd.checkpoints(ft)[-1], train
    raise Skipped(f"{demo_out}/ holds no demo run (task_distill.jsonl and a teacher-ft checkpoint); run "
                  f"`python assets/demo/demo.py --out_dir={demo_out}` first, or pass --demo_out=DIR")


def bench_topk(demo_out="out", ks=(8, 16, 64, 256), n_examples=64, targets_dtype="float16"):
    """How good is a stored top-K target? On a demo run's models (seed 1337: the bundled raw teacher and
    student, and the run's finetuned teacher) and its first n_examples training problems: each K's store
    made by the target pass itself (target_source with --targets_dir) against the exact Delta-KD target of
    the frozen models live, both seen by the raw student (the student at step 0): mass outside the top
    K, relative error of the KD loss, cosine of the two gradients w.r.t. the student's logits. A raw
    teacher would not do as a stand-in for the finetuned one: at alpha = 1 the target z_ft + z_s^raw -
    z_t^raw would then be the raw student's own logits, and no teacher would be in it."""
    seed = deltakd.Config().seed
    teacher_ft, train = demo_run_files(demo_out, seed)
    raw = demo.DEMO.raw_models
    tok_path = os.path.join(raw, "tokenizer.json")
    if open(os.path.join(teacher_ft, "tokenizer.json")).read() != open(tok_path).read():
        raise Skipped(f"{demo_out}/ comes from an older demo (another tokenizer); run `python assets/demo/demo.py` "
                      "again")
    root = tempfile.mkdtemp(prefix="bench-topk-")
    try:
        flags = [f"--student={demo.demo_raw_model(raw, seed, 'student')}", f"--teacher_ft={teacher_ft}",
                 f"--teacher_raw={demo.demo_raw_model(raw, seed, 'teacher')}", "--method=delta", "--alpha=1",
                 f"--train_data={train}", f"--max_rows={n_examples}", "--eval_size=0", f"--tokenizer={tok_path}",
                 f"--max_len={demo.DEMO.max_len}", "--teacher_dtype=float32",
                 f"--cache_dir={os.path.join(root, 'cache')}", f"--out_dir={os.path.join(root, 'run')}", "--quiet=true"]
        run = deltakd.start(deltakd.parse_args(flags))
        cache, idx, _ = deltakd.load_data(run)
        (batch,) = deltakd.micro_batches(run, cache, [idx])
        mask, y = deltakd.shift_labels(batch.labels)
        live = deltakd.target_source(run, cache).of(batch, run.cfg.autocast)
        rows = {r: (h[:, :-1][mask], w) for r, (h, w) in live.items()}
        spec = replace(run.spec, lam=0.0)  # the KD term alone
        with torch.no_grad():
            exact = deltakd.chunk_target(rows, 0, len(y), spec)  # the target's logits (before / tau)
            h, w = rows["student_raw"]
            z = (h @ w[:spec.vocab].T).float()  # the raw student's logits: the student at step 0
            logp = torch.log_softmax(exact / spec.temperature, -1)
            entropy = float(-(logp.exp() * logp).sum(-1).mean())
        # chunk_loss overwrites its z and target buffers (workspace): every call gets copies
        want = deltakd.chunk_loss(z.clone(), y, exact.clone(), spec)
        out = []
        for k in ks:
            krun = deltakd.start(deltakd.parse_args(flags + [f"--targets_dir={os.path.join(root, f'targets-{k}')}",
                                                             f"--topk={k}", f"--targets_dtype={targets_dtype}"]))
            stored = deltakd.target_source(krun, cache).of(batch, krun.cfg.autocast)
            got = deltakd.chunk_loss(z.clone(), y, stored, spec)
            rest = stored.log_rest.exp()
            out.append((k, rest, float(got[2] / want[2] - 1), cosine(got[3], want[3])))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    setting = (f"the demo's models (seed {seed}: the bundled raw models and the finetuned teacher of {demo_out}/), its "
               f"first {n_examples} training problems ({len(y):,} supervised tokens), α = {run.cfg.alpha:g}, "
               f"{targets_dtype} storage, the raw student's logits; target entropy {entropy:.3f} nats per token")
    return [Row(f"stored top-{k} target, quality", "the exact Delta-KD target (the frozen models live)", setting,
                f"mass outside the top {k} mean {rest.mean():.4f} (worst {rest.max():.4f}); KD loss {rel:+.2%}; "
                f"gradient cosine {cos:.4f}") for k, rest, rel, cos in out]


def cosine(a, b):
    a, b = a.double(), b.double()  # 20M terms: a float32 sum is off by ~1e-3
    return float((a * b).sum() / (a.norm() * b.norm()))

# -----------------------------------------------------------------------------
# the GPU measurements


def gpu_model(name, dtype, device):
    # a real Qwen2.5 config with random weights, built directly on the device in its dtype (no fp32 copy)
    c = qwen.QwenConfig.from_json(os.path.join(QWEN_CONFIGS, name, "config.json"))
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            m = qwen.Qwen(c)
    finally:
        torch.set_default_dtype(old)
    return m


def cuda_time(fn, repeats):
    fn()  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def bench_gpu(batch=4, max_len=2048, loss_tokens=8192, student_name="Qwen2.5-1.5B",
              teachers=("Qwen2.5-7B-Instruct", "Qwen2.5-7B"), device="cuda"):
    """The GPU measurements of the paper-scale run in one command: deltakd.kd_step tokens/s and MFU of the
    Qwen2.5-1.5B student (random weights, written once to a temporary directory in bf16), batch 4 x 2048
    of real Ultrachat text, bf16 autocast, with and without checkpointing and compile; the Delta-KD step
    with the paper's three frozen models resident (the two 7B teachers built on the GPU with random weights
    and handed to kd_step as the deltakd.TargetSource that target_source would return: 2 x 15 GB are never
    written to disk), its peak memory; the chunked loss at 8,192 tokens vs dense; generation vs
    transformers at batch 16 x 256 new tokens; the DDP step over NCCL with one process vs the plain one."""
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench.py --gpu: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine")
    import torch.distributed as dist
    dev, rows = torch.device(device), []
    root = tempfile.mkdtemp(prefix="bench-gpu-")
    try:
        student = gpu_model(student_name, torch.bfloat16, dev)
        flags = step_files(root, {"student": student}, batch, max_len)
        del student
        flags += [f"--{r}={os.path.join(QWEN_CONFIGS, n)}" for r, n in zip(("teacher_ft", "teacher_raw"), teachers)]
        flags.append("--autocast=bf16")
        shape = f"{student_name} student (random weights), batch {batch} × {max_len} of Ultrachat text, bf16 autocast"

        def measure(name, run_flags, source=None):
            r = step_run(root, name, flags + run_flags, source)
            torch.cuda.reset_peak_memory_stats()
            first, rec = timed(lambda: (r.step(), torch.cuda.synchronize())[0])
            t = cuda_time(r.step, repeats=3)
            peak = deltakd.peak_flops(r.run.cfg, r.run.device)
            mfu = f"MFU {rec['flops'] / t / peak:.1%}" if peak else f"{rec['flops'] / t / 1e12:.0f} TFLOP/s (no peak known)"
            return {"t": t, "tok_s": rec["tokens"] / t, "mfu": mfu, "first": first, "rec": rec,
                    "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        sft = {}
        for ckpt, compiled in ((False, False), (True, False), (True, True)):
            m = sft[ckpt, compiled] = measure(f"sft-{ckpt}-{compiled}", ["--method=sft", f"--grad_checkpointing={ckpt}",
                                                                          f"--compile={compiled}"])
            rows.append(Row("training step, SFT", "—", f"`deltakd.kd_step`, {shape}, checkpointing={ckpt}, "
                            f"compile={compiled}; mean of 3 after the first",
                            f"{m['tok_s']:.0f} tok/s, {m['mfu']}, peak {m['peak_gib']:.1f} GiB (first step {m['first']:.1f} s)"))
            if compiled:
                torch._dynamo.reset()  # the compiled student's graphs hold its weights
            gc.collect()
            torch.cuda.empty_cache()
        # the paper's frozen models resident beside the student: the two 7B teachers and the raw student, bf16
        frozen = {"teacher_ft": gpu_model(teachers[0], torch.bfloat16, dev),
                  "teacher_raw": gpu_model(teachers[1], torch.bfloat16, dev),
                  "student_raw": qwen.Qwen.from_pretrained(os.path.join(root, "student"), torch.bfloat16, dev)}
        for m in frozen.values():
            m.eval().requires_grad_(False)
        m = measure("delta", ["--method=delta", "--lam=0.5", "--grad_checkpointing=true"], deltakd.TargetSource(frozen, None))
        base = sft[True, False]
        rows.append(Row("training step, Delta-KD, frozen models live", "the SFT step, checkpointing on (above)",
                        f"`deltakd.kd_step`, {shape}, checkpointing on, frozen {', '.join(teachers)} and the raw "
                        "student in bf16 (random weights); mean of 3 after the first",
                        f"{m['tok_s']:.0f} tok/s, {m['mfu']}, peak {m['peak_gib']:.1f} GiB; {m['t']:.2f} vs "
                        f"{base['t']:.2f} s: **{m['t'] / base['t']:.2f}x** the SFT step's time"))
        del frozen, m
        gc.collect()
        torch.cuda.empty_cache()
        rows += gpu_loss_rows(dev, loss_tokens)
        rows.append(gpu_generate_row(dev, student_name))
        # NCCL, one process: the DDP path of kd_step (the wrapper, no_sync, the all-reduces)
        env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
        os.environ.update(env)
        try:
            m = measure("ddp", ["--method=sft"])
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            for k in env:
                os.environ.pop(k, None)
        base = sft[False, False]
        rows.append(Row("training step under DDP (NCCL, 1 process)", "the plain SFT step (above)",
                        f"`deltakd.kd_step`, {shape}, checkpointing off; mean of 3 after the first",
                        f"{m['tok_s']:.0f} vs {base['tok_s']:.0f} tok/s: **{base['t'] / m['t']:.2f}x** the speed"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def gpu_loss_rows(dev, N):
    # the chunked Delta-KD loss vs dense (where dense fits), fp32, forward + backward
    rows = []
    h, W, lab, teachers, lspec = loss_inputs(N, "delta")
    h, W, lab = h.to(dev), W.to(dev), lab.to(dev)
    teachers = {r: (t.to(dev), w.to(dev)) for r, (t, w) in teachers.items()}
    for impl in ("chunked", "dense"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        try:
            t = cuda_time(lambda: loss_step(h, W, lab, teachers, replace(lspec, impl=impl)), repeats=3)
            result = (f"{t * 1e3:.0f} ms, peak {(torch.cuda.max_memory_allocated() - base) / 2**30:.2f} GiB above "
                      "the inputs")
        except torch.OutOfMemoryError:
            result = "does not fit"
        rows.append(Row(f"Delta-KD loss, {impl}", "—", f"{N:,} tokens, V {LOSS['Vm']:,}, C {LOSS['C']:,}, fp32, "
                        "forward + backward; mean of 3", result))
        torch.cuda.empty_cache()
    return rows


def gpu_generate_row(dev, name, batch=16, new=256):
    # generation vs transformers generate, same random weights, bf16
    import transformers
    config = qwen.QwenConfig.from_json(os.path.join(QWEN_CONFIGS, name, "config.json"))
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config.to_dict())).to(dev, torch.bfloat16).eval()
    ours = gpu_model(name, torch.bfloat16, dev).eval()
    ours.load_state_dict(hf.state_dict(), strict=False)
    prompts = [torch.randint(0, 151665, (n,)).tolist() for n in range(64, 64 + batch * 8, 8)]
    P = max(map(len, prompts))
    pid = torch.zeros(batch, P, dtype=torch.long, device=dev)
    mask = torch.zeros_like(pid)
    for i, p in enumerate(prompts):
        pid[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        t_hf = cuda_time(lambda: hf.generate(input_ids=pid, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                             do_sample=False, pad_token_id=0), repeats=2)
        t_us = cuda_time(lambda: ours.generate(prompts, new, eos_token_id=[-1], vocab_limit=151665), repeats=2)
    return Row("generation", "transformers `generate`, same weights", f"{name} (random weights), bf16, greedy, batch "
               f"{batch} × {new} new tokens, prompts of {min(map(len, prompts))}-{P} tokens; mean of 2",
               f"{batch * new / t_us:.0f} vs {batch * new / t_hf:.0f} tok/s: **{t_hf / t_us:.2f}x** the speed")

# -----------------------------------------------------------------------------


# the 2-rank recipes a run must leave with exit status 0 from (the rare abort at exit, #32): (flags, SIGTERM to the
# workers once the job has logged 2 steps, as a scheduler preempts them; torchrun's agent exits 1 on its own SIGTERM)
EXIT_RECIPES = {"minillm": (["--method=minillm", "--on_policy_max_new_tokens=8", "--max_steps=3"], False),
                "on-policy": (["--method=fkl", "--on_policy=0.5", "--on_policy_max_new_tokens=8", "--max_steps=3"], False),
                "on-policy, SIGTERM": (["--method=fkl", "--on_policy=1", "--on_policy_max_new_tokens=8",
                                        "--max_steps=1000"], True)}


def exit_status(argv, out, sigterm):
    # (exit status, stderr) of a 2-rank torchrun job of deltakd.py
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "deltakd.py", *argv, f"--out_dir={out}"], cwd=HERE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    metrics = os.path.join(out, "metrics.jsonl")
    while sigterm and proc.poll() is None and not (os.path.isfile(metrics) and open(metrics).read().count("\n") >= 2):
        time.sleep(0.02)
    if sigterm:
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:  # the agent's children: the workers
            for worker in f.read().split():
                os.kill(int(worker), signal.SIGTERM)
    stderr = proc.communicate()[1]
    return proc.returncode, stderr


def bench_exits(runs=30):
    """Each EXIT_RECIPES recipe, run `runs` times as 2-rank torchrun jobs of tiny random models (the real tokenizer,
    GSM8K rows, a final evaluation of 8 prompts): how many exit 0, leave a checkpoint and print no abort."""
    root = tempfile.mkdtemp(prefix="bench-exits-")
    try:
        shapes = {"student": (32, 151936), "teacher_ft": (48, 152064)}
        for i, (role, (width, vocab)) in enumerate(shapes.items()):
            config = qwen.QwenConfig(vocab_size=vocab, hidden_size=width, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=role == "student")
            qwen.init_weights(qwen.Qwen(config), seed=i).save_pretrained(os.path.join(root, role))
        with open(os.path.join(root, "train.jsonl"), "w") as f:
            f.writelines(line for _, line in zip(range(56), open(os.path.join(HERE, "assets", "data", "gsm8k",
                                                                              "test.jsonl"))))
        flags = [f"--{role}={os.path.join(root, role)}" for role in shapes] + [
            f"--tokenizer={TOKENIZER}", f"--train_data={os.path.join(root, 'train.jsonl')}", "--eval_size=8",
            "--eval_max_new_tokens=4", "--max_len=160", "--batch_size=2", "--teacher_dtype=float32",
            f"--cache_dir={os.path.join(root, 'cache')}", "--quiet=true"]
        rows = []
        for name, (recipe, sigterm) in EXIT_RECIPES.items():
            failures, t0 = [], time.time()
            for k in range(runs):
                out = os.path.join(root, f"run-{k}")
                status, stderr = exit_status(flags + recipe, out, sigterm)
                if status != 0 or "terminate called" in stderr or not deltakd.checkpoints(out):
                    failures.append(f"run {k + 1}: exit {status}, {stderr.strip().splitlines()[-1:]}")
                shutil.rmtree(out)
            seconds = time.time() - t0
            print(f"exits: {name}: {runs - len(failures)}/{runs} clean in {seconds:.0f} s; {failures}",
                  file=sys.stderr, flush=True)
            rows.append(Row(f"2-rank {name} jobs (torchrun, gloo) that exit 0 with a checkpoint", "-",
                            " ".join(recipe + ["(SIGTERM after 2 steps)"] * sigterm),
                            f"{runs - len(failures)} of {runs} ({seconds:.0f} s)" + (f"; {failures[0]}" if failures else "")))
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


BENCHES = {"forward": lambda a: bench_forward(), "generate": lambda a: bench_generate(),
           "decode": lambda a: bench_decode(), "loss": lambda a: bench_loss(),
           "liger": lambda a: bench_liger(), "rouge": lambda a: bench_rouge(), "step": lambda a: bench_step(),
           "compile": lambda a: bench_compile(), "onpolicy": lambda a: bench_onpolicy(),
           "data": lambda a: bench_data(a.data_rows), "topk": lambda a: bench_topk(a.demo_out),
           "exits": lambda a: bench_exits(a.runs)}


def machine_line(argv):
    cpu = None
    if os.path.isfile("/proc/cpuinfo"):
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), None)
    cpu = cpu or platform.processor() or platform.machine()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"machine: {cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads){gpu}; torch "
            f"{torch.__version__}, Python {platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
            f"`{' '.join(['python bench.py', *argv])}`")


def table_row(cells):
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


HEADER = [table_row(["bench", "what", "peer", "setting", "result"]), "|---|---|---|---|---|"]


def main(argv):
    p = argparse.ArgumentParser(prog="bench.py", usage=USAGE, description=__doc__.split("\n\n")[0].strip())
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--gpu", action="store_true", help="the GPU measurements (needs CUDA), alone")
    p.add_argument("--out", metavar="FILE", help="append the rows (markdown, under the machine line) to FILE")
    p.add_argument("--demo_out", default="out", metavar="DIR", help="topk: the demo run's directory (default out)")
    p.add_argument("--data_rows", type=int, default=200_000, metavar="N", help="data: rows of the large file")
    p.add_argument("--runs", type=int, default=30, metavar="N", help="exits: runs of each recipe (default 30)")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHES]
    if unknown or (args.gpu and args.names):
        p.error(f"unknown bench {unknown}" if unknown else "--gpu runs alone")
    todo = {"gpu": lambda a: bench_gpu()} if args.gpu else {n: BENCHES[n] for n in args.names or BENCHES}
    head = [machine_line(argv), ""] + HEADER
    print("\n".join(head), flush=True)
    if args.out:
        new = not os.path.isfile(args.out) or os.path.getsize(args.out) == 0
        with open(args.out, "a") as f:
            f.write(("# bench.py rows\n\nAppended by `python bench.py NAME --out=FILE`, one table per invocation under "
                     "its machine line; docs/benchmarks.md keeps the curated rows with their history.\n" if new else "")
                    + "\n" + "\n".join(head) + "\n")
    for name, fn in todo.items():
        try:
            rows = fn(args)
        except Skipped as e:
            print(f"{name}: skipped: {e}", file=sys.stderr, flush=True)
            continue
        lines = [table_row([f"`{name}`", *r]) for r in rows]
        print("\n".join(lines), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["_loss_child"]:
        loss_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1:2] == ["_data_child"]:
        data_child(*sys.argv[2:5])
    else:
        main(sys.argv[1:])
