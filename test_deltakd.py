"""
deltakd's claims, each against an independent oracle: transformers for the model, rouge-score and
NLTK for ROUGE, jinja2 for the chat template, dense references written here for every loss.

    python -m pytest -q test_deltakd.py
"""

import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
import torch.nn.functional as F
from tokenizers import Tokenizer

import data
import deltakd
import qwen
import rouge

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo"))
import demo  # noqa: E402  (assets/demo/demo.py: the demo's own file, beside its raw models)

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "assets")
TOKENIZER = os.path.join(ASSETS, "qwen2.5", "tokenizer.json")
ULTRACHAT = os.path.join(ASSETS, "data", "ultrachat_200k", "ultrachat_small.jsonl")
OMR = os.path.join(ASSETS, "data", "openmathreasoning", "cot-00000-of-00144_filtered.jsonl")
GSM8K = os.path.join(ASSETS, "data", "gsm8k", "test.jsonl")



@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_file(TOKENIZER)


def hf_model(tmp_path, name, tie, n_head, n_kv, vocab=300, shard=None, seed=0, hidden_per_head=8, layers=2):
    """A random transformers Qwen2ForCausalLM saved by transformers itself; returns (hf_model, dir)."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=vocab, hidden_size=n_head * hidden_per_head, intermediate_size=72,
                                   num_hidden_layers=layers, num_attention_heads=n_head, num_key_value_heads=n_kv,
                                   tie_word_embeddings=tie, max_position_embeddings=4096, rope_theta=10000.0)
    m = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF zero-inits biases; random ones make the q/k/v bias path count
        for layer in m.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
            layer.input_layernorm.weight.normal_(1, 0.2)
    path = str(tmp_path / name)
    m.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return m, path

# -----------------------------------------------------------------------------
# qwen.py


CONFIGS = [  # (tied, n_head, n_kv_head, shard): query/kv head ratios 1, 2 and 7, one sharded
    (True, 4, 4, None), (False, 4, 2, None), (False, 7, 1, "20KB")]


@pytest.mark.parametrize("tie,n_head,n_kv,shard", CONFIGS)
def test_logits_equal_transformers_on_its_own_checkpoints(tmp_path, tie, n_head, n_kv, shard):
    ref, path = hf_model(tmp_path, "m", tie, n_head, n_kv, shard=shard)
    if shard:
        assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    model = qwen.Qwen.from_pretrained(path).eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    x = torch.randint(0, 300, (3, 23))
    with torch.no_grad():
        diff = (model(x) - ref(x).logits).abs().max().item()
    assert diff <= 1e-4


def test_padded_batches_equal_transformers(tmp_path):
    ref, path = hf_model(tmp_path, "m", False, 4, 2)
    model = qwen.Qwen.from_pretrained(path).eval()
    x = torch.randint(0, 300, (3, 12))
    left = torch.ones(3, 12, dtype=torch.long)
    left[0, :5], left[2, :1] = 0, 0
    right = left.flip(1)
    with torch.no_grad():
        for mask in (left, right):
            pos = qwen.position_ids_from_mask(mask)
            ours = model(x, attention_mask=mask)
            theirs = ref(x, attention_mask=mask, position_ids=pos).logits
            real = mask.bool()
            assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4


def test_hidden_states_times_lm_head_are_the_logits(tmp_path):
    _, path = hf_model(tmp_path, "m", False, 4, 2)
    model = qwen.Qwen.from_pretrained(path).eval()
    x = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(model.lm_head(model(x, return_hidden=True)), model(x))


@pytest.mark.parametrize("tie,shard", [(True, 5 * 1024**3), (False, 30_000)])
def test_save_pretrained_loads_in_transformers_with_equal_logits(tmp_path, tie, shard):
    _, path = hf_model(tmp_path, "m", tie, 4, 2)
    model = qwen.Qwen.from_pretrained(path).eval()
    out = str(tmp_path / "saved")
    model.save_pretrained(out, max_shard_size=shard)
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json")) == (shard < 1e6)
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 300, (2, 15))
    with torch.no_grad():
        assert (again(x).logits - model(x)).abs().max().item() <= 1e-5
    reloaded = qwen.Qwen.from_pretrained(out)
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == tie


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    _, path = hf_model(tmp_path, "m", True, 4, 2)
    model = qwen.Qwen.from_pretrained(path)
    out = str(tmp_path / "ckpt")
    model.save_pretrained(out)
    before = open(os.path.join(out, "model.safetensors"), "rb").read()

    def crash(*a, **k):
        raise KeyboardInterrupt("killed mid-save")
    monkeypatch.setattr(qwen, "save_file", crash)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(out)
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "m"]  # no temporary directory left behind


def test_greedy_generation_equals_transformers_on_left_padded_batch(tmp_path):
    ref, path = hf_model(tmp_path, "m", False, 4, 2, seed=3)
    model = qwen.Qwen.from_pretrained(path).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [1, 2, 3, 4], [200]]
    P = max(map(len, prompts))
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
    # eos ids: tokens this random model emits early in some rows, so stopping is exercised
    free = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    eos = [free[0, P + 3].item(), free[2, P + 5].item()]
    theirs = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)[:, P:].tolist()
    ours = model.generate(prompts, 24, eos_token_id=eos)
    for o, t in zip(ours, theirs):
        end = next((i + 1 for i, tok in enumerate(t) if tok in eos), len(t))
        assert o == t[:end]
    assert any(len(o) < 24 for o in ours)
    assert model.compile_decoding().generate(prompts, 24, eos_token_id=eos) == ours  # decode_step compiled


def test_sampling_is_seeded_and_never_emits_padded_vocab_rows(tmp_path):
    _, path = hf_model(tmp_path, "m", False, 4, 2)
    model = qwen.Qwen.from_pretrained(path).eval()
    with torch.no_grad():
        # rows beyond the "tokenizer" are 20x copies of real rows: they win wherever a logit is positive
        model.lm_head.weight[250:] = 20 * model.lm_head.weight[:50]
    prompts = [[1, 2, 3], [4, 5]]
    a, b, c = (model.generate(prompts, 16, [299], qwen.Sampling(temperature=1.0, top_p=0.9, seed=seed), vocab_limit=250)
               for seed in (7, 7, 8))
    g = model.generate(prompts, 16, eos_token_id=[299], vocab_limit=250)
    assert a == b and a != c
    assert max(max(r) for r in a + c + g) < 250
    assert max(max(r) for r in model.generate(prompts, 4, eos_token_id=[299])) >= 250  # the limit did the work


def test_cutting_stopped_rows_from_the_batch_changes_no_token(tmp_path):
    # generate cuts the batch to its live rows once half have stopped; without an eos no row stops (and no cut
    # happens), so each row up to its first eos must be what the run with that eos gives
    _, path = hf_model(tmp_path, "m", False, 4, 2, seed=3)
    model = qwen.Qwen.from_pretrained(path).eval()
    with torch.no_grad():  # weights 10x: tokens that depend on the context (a row given another's cache differs)
        for p in model.parameters():
            p.mul_(10 if p.dim() == 2 else 1)
    prompts = [[5, 6, 7, 8], [12, 13], [1, 2, 3, 4, 9], [200], [17, 18, 19]]
    decode_step, batch_sizes = model.decode_step, []
    model.decode_step = lambda x, *rest: batch_sizes.append(len(x)) or decode_step(x, *rest)
    for sampling in (qwen.Sampling(), qwen.Sampling(temperature=1.0, seed=5)):
        free = model.generate(prompts, 20, [], sampling)
        eos = [free[0][2], free[3][4], free[1][9], free[4][12]]
        batch_sizes.clear()
        stopped = model.generate(prompts, 20, eos, sampling)
        assert stopped == qwen.cut_after_eos(free, set(eos))
        ends = sorted(map(len, stopped))
        assert ends[3] < 20 and sorted(set(batch_sizes), reverse=True) == [5, 2, 1]  # cut at the 3rd and 4th stop
        assert batch_sizes.count(5) == ends[2] - 1 and batch_sizes.count(1) == ends[4] - ends[3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generation_over_packed_weights_changes_no_token(tmp_path, monkeypatch, dtype):
    # on CPU, generate runs every linear (the lm_head cut to vocab_limit) over a weight packed once for oneDNN:
    # greedy, sampled and teacher-mixed tokens must be F.linear's, and the packed weights must be used
    if not torch.backends.mkldnn.is_available() or (dtype == torch.bfloat16
                                                    and not torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        pytest.skip(f"no oneDNN {dtype} here")
    student, teacher = (qwen.Qwen.from_pretrained(hf_model(tmp_path, name, tie, n_head, 2, seed=seed)[1],
                                                  dtype=dtype).eval()
                        for name, tie, n_head, seed in (("s", True, 4, 0), ("t", False, 6, 1)))
    with torch.no_grad():  # weights 10x: tokens that depend on the context, near ties rare
        for p in [*student.parameters(), *teacher.parameters()]:
            p.mul_(10 if p.dim() == 2 else 1)
    prompts, new = [[5, 17, 42], [7], [100, 3, 9, 250, 11]], qwen.PACKING_PAYS_FROM
    decode_step, packed, down = student.decode_step, [], teacher.model.layers[1].mlp.down_proj
    student.decode_step = lambda *a: packed.append((student.lm_head.packed is not None,
                                                     down.packed is not None)) or decode_step(*a)
    runs = [(qwen.Sampling(), None), (qwen.Sampling(temperature=1.0, seed=3), None),
            (qwen.Sampling(temperature=1.0, seed=4), (teacher, 0.5))]
    fast = [student.generate(prompts, new, [], s, 250, mix) for s, mix in runs]
    assert packed == [(True, False)] * 2 * (new - 1) + [(True, True)] * (new - 1)
    assert all(l.packed is None for l in [*student.modules(), *teacher.modules()] if isinstance(l, qwen.Linear))
    monkeypatch.setattr(qwen, "PACKING_PAYS_FROM", new + 1)  # the same runs through F.linear
    packed.clear()
    assert [student.generate(prompts, new, [], s, 250, mix) for s, mix in runs] == fast
    assert packed == [(False, False)] * 3 * (new - 1)
    assert max(max(r) for r in sum(fast, [])) < 250


def test_the_sampler_draws_each_id_with_its_softmax_probability():
    # a chi-square test (5 degrees of freedom) of qwen.sample at temperature 2 over 6 ids spread across 3 of draw's
    # blocks, at both ends of a block, among ids of probability 0, which must never be drawn
    V, n = 3 * qwen.BLOCK + 5, 20_000
    ids = torch.tensor([0, 7, qwen.BLOCK - 1, qwen.BLOCK, 2 * qwen.BLOCK + 300, V - 1])
    p = torch.tensor([0.05, 0.3, 0.15, 0.1, 0.25, 0.15], dtype=torch.float64)
    logits = torch.full((500, V), float("-inf"))
    logits[:, ids] = 2 * p.log().float()
    g = torch.Generator().manual_seed(0)
    drawn = torch.cat([qwen.sample(logits, qwen.Sampling(temperature=2.0), torch.rand(500, 1, dtype=torch.float64,
                                                                                       generator=g))
                       for _ in range(n // 500)])
    counts = torch.bincount(drawn, minlength=V).double()
    assert counts[ids].sum() == n
    chi2 = ((counts[ids] - n * p) ** 2 / (n * p)).sum().item()
    assert chi2 < 20.52, chi2  # the 0.1% critical value: a sampler off by one id or one block fails by far


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    nucleus, top2 = qwen.Sampling(temperature=1.0, top_p=0.75), qwen.Sampling(temperature=1.0, top_k=2)
    u = torch.linspace(0, 1, 201, dtype=torch.float64)[:-1, None]
    seen = set(qwen.sample(logits.expand(200, 4), nucleus, u).tolist())
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.75; 0.15 and 0.05 are cut
    seen = set(qwen.sample(logits.expand(200, 4), top2, u).tolist())
    assert seen == {0, 1}  # top_k=2


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    _, path = hf_model(tmp_path, "m", True, 4, 2)
    x = torch.randint(0, 300, (2, 10))
    grads = []
    for ckpt in (False, True):
        model = qwen.Qwen.from_pretrained(path).train()
        model.gradient_checkpointing = ckpt
        model(x).float().square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


@pytest.mark.parametrize("name,count", [("Qwen2.5-0.5B", 494_032_768), ("Qwen2.5-1.5B", 1_543_714_304),
                                        ("Qwen2.5-7B", 7_615_616_512), ("Qwen2.5-7B-Instruct", 7_615_616_512)])
def test_real_configs_build_on_meta_with_exact_parameter_counts(name, count):
    cfg = qwen.QwenConfig.from_json(os.path.join(ASSETS, "qwen2.5", name, "config.json"))
    with torch.device("meta"):
        model = qwen.Qwen(cfg)
    assert qwen.num_parameters(model) == count


def test_real_tokenizer_has_chatml_ids(tokenizer):
    assert tokenizer.get_vocab_size() == 151665
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False).ids
    assert ids[0] == 151644 and ids[-1] == 151645
    assert tokenizer.token_to_id("<|endoftext|>") == 151643


def test_bad_checkpoints_are_refused_naming_file_and_key(tmp_path):
    _, path = hf_model(tmp_path, "m", False, 4, 2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        qwen.Qwen.from_pretrained(str(tmp_path / "nope"))
    _, sharded = hf_model(tmp_path, "s", False, 4, 2, shard="20KB")
    index = json.load(open(os.path.join(sharded, "model.safetensors.index.json")))
    shard = sorted(set(index["weight_map"].values()))[-1]
    os.remove(os.path.join(sharded, shard))
    with pytest.raises(FileNotFoundError, match=shard):
        qwen.Qwen.from_pretrained(sharded)

    sd = load_file(os.path.join(path, "model.safetensors"))

    def variant(name, change, cfg_change=None):
        d = tmp_path / name
        d.mkdir()
        cfg = json.load(open(os.path.join(path, "config.json")))
        if cfg_change:
            cfg.update(cfg_change)
        json.dump(cfg, open(d / "config.json", "w"))
        s = dict(sd)
        change(s)
        save_file(s, str(d / "model.safetensors"))
        return str(d)
    with pytest.raises(qwen.CheckpointError, match="missing.*model.norm.weight"):
        qwen.Qwen.from_pretrained(variant("missing", lambda s: s.pop("model.norm.weight")))
    with pytest.raises(qwen.CheckpointError, match="unexpected key 'model.extra'"):
        qwen.Qwen.from_pretrained(variant("extra", lambda s: s.update({"model.extra": torch.zeros(1)})))
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(5,\)"):
        qwen.Qwen.from_pretrained(variant("shape", lambda s: s.update({"model.norm.weight": torch.zeros(5)})))
    with pytest.raises(ValueError, match=r"(embed_tokens|lm_head).weight has shape \(300, 32\), config.json implies"):
        qwen.Qwen.from_pretrained(variant("vocab", lambda s: None, {"vocab_size": 400}))


@pytest.mark.parametrize("change,key", [({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
                                        ({"use_sliding_window": True}, "use_sliding_window"),
                                        ({"model_type": "llama"}, "model_type"),
                                        ({"hidden_act": "gelu"}, "hidden_act")])
def test_unsupported_configs_are_refused_naming_the_key(tmp_path, change, key):
    cfg = json.load(open(os.path.join(ASSETS, "qwen2.5", "Qwen2.5-1.5B", "config.json")))
    cfg.update(change)
    p = tmp_path / "config.json"
    json.dump(cfg, open(p, "w"))
    with pytest.raises(ValueError, match=key):
        qwen.QwenConfig.from_json(str(p))


def refused(path, match):
    # the cheap check and the loader refuse a directory with the same one line
    for read in (qwen.check_model_dir, qwen.Qwen.from_pretrained):
        with pytest.raises(qwen.CheckpointError, match=match):
            read(path)


@pytest.mark.parametrize("cut", [1000, 1, -3])  # bytes cut from the end; -3: three bytes appended
def test_cut_or_padded_safetensors_is_refused_naming_file_and_both_lengths(tmp_path, cut):
    _, path = hf_model(tmp_path, "m", False, 4, 2)
    file = os.path.join(path, "model.safetensors")
    # the oracle: the tensor bytes the safetensors library itself reads from the intact file
    data = sum(t.numel() * t.element_size() for t in load_file(file).values())
    raw = open(file, "rb").read()
    open(file, "wb").write(raw[:-cut] if cut > 0 else raw + b"\0" * -cut)
    what = "truncated" if cut > 0 else "longer than its header says"
    refused(path, rf"model\.safetensors: {what}: header says {data:,} bytes of tensor data, the file has "
                  rf"{data - cut:,}$")


def test_safetensors_cut_inside_its_header_is_refused_as_truncated(tmp_path):
    _, path = hf_model(tmp_path, "m", True, 4, 2)
    file = os.path.join(path, "model.safetensors")
    raw = open(file, "rb").read()
    open(file, "wb").write(raw[:100])
    refused(path, r"model\.safetensors: truncated: 100 bytes, shorter than its own header")


@pytest.mark.parametrize("text,match", [
    ('{\n  "vocab_size": 300,\n  "hidden_size" 32\n}', r"not valid JSON \(line 3: Expecting ':' delimiter\)"),
    ("", r"not valid JSON \(line 1: Expecting value\)"),
    ("[300, 32]", "not a JSON object")], ids=["bad line 3", "empty", "a list"])
def test_config_json_that_is_not_a_json_object_is_refused_naming_file_and_line(tmp_path, text, match):
    _, path = hf_model(tmp_path, "m", True, 4, 2)
    cfg = os.path.join(path, "config.json")
    open(cfg, "w").write(text)
    with pytest.raises(qwen.CheckpointError, match=r"config\.json: " + match):
        qwen.QwenConfig.from_json(cfg)
    refused(path, r"config\.json: " + match)


@pytest.mark.parametrize("change,match", [
    (lambda d: d.pop("hidden_size"), r"missing key\(s\) \['hidden_size'\]"),
    (lambda d: d.update(hidden_size=None, num_hidden_layers=None), r"missing key\(s\) \['hidden_size', 'num_hidden_layers'\]"),
    (lambda d: d.update(hidden_size="32"), r"hidden_size='32': sizes must be positive integers"),
    (lambda d: d.update(num_key_value_heads=0), r"num_key_value_heads=0: sizes must be positive integers")],
    ids=["absent", "null", "a string", "zero"])
def test_config_json_lacking_or_misspelling_a_size_is_refused_naming_file_and_key(tmp_path, change, match):
    _, path = hf_model(tmp_path, "m", False, 4, 2)
    cfg = os.path.join(path, "config.json")
    d = json.load(open(cfg))
    change(d)
    json.dump(d, open(cfg, "w"))
    refused(path, r"config\.json: " + match)


@pytest.mark.parametrize("text,match", [
    ('{"metadata": {"total_size": 1},\n "weight_map": {"a": "b",}}', r"not valid JSON \(line 2: Expecting property"),
    ('{"metadata": {"total_size": 1}}', "no 'weight_map' object"),
    ('{"weight_map": ["model-00001-of-00002.safetensors"]}', "no 'weight_map' object")],
    ids=["bad line 2", "no weight_map", "a list"])
def test_shard_index_that_is_not_json_or_lacks_weight_map_is_refused_naming_it(tmp_path, text, match):
    _, path = hf_model(tmp_path, "s", False, 7, 1, shard="20KB")
    open(os.path.join(path, "model.safetensors.index.json"), "w").write(text)
    refused(path, r"model\.safetensors\.index\.json: " + match)


def test_a_config_that_no_longer_matches_the_weights_is_refused_by_the_cheap_check(tmp_path):
    _, path = hf_model(tmp_path, "m", False, 4, 2)
    cfg = os.path.join(path, "config.json")
    json.dump({**json.load(open(cfg)), "intermediate_size": 64}, open(cfg, "w"))
    with pytest.raises(qwen.CheckpointError, match=r"mlp\.\w+_proj\.weight has shape \((72, 32|32, 72)\), "
                                                  r"config\.json implies \((64, 32|32, 64)\)"):
        qwen.check_model_dir(path)


@pytest.mark.parametrize("tie,n_head,n_kv,shard,rewrite",
                         [(*c, r) for c in CONFIGS + [(True, 4, 2, "20KB")] for r in ("transformers", "ours")]
                         + [(True, 4, 4, None, "tied lm_head stored too")])
def test_cheap_check_accepts_every_checkpoint_from_pretrained_loads(tmp_path, tie, n_head, n_kv, shard, rewrite):
    ref, path = hf_model(tmp_path, "m", tie, n_head, n_kv, shard=shard)
    if rewrite == "ours":  # save_pretrained's own files, sharded where transformers sharded
        path2 = str(tmp_path / "ours")
        qwen.Qwen.from_pretrained(path).save_pretrained(path2, max_shard_size=20_000 if shard else 5 * 1024**3)
        path = path2
    if rewrite == "tied lm_head stored too":  # some tied checkpoints hold the shared matrix twice
        file = os.path.join(path, "model.safetensors")
        sd = load_file(file)
        save_file({**sd, "lm_head.weight": sd["model.embed_tokens.weight"].clone()}, file)
    config, tensors = qwen.check_model_dir(path)
    model = qwen.Qwen.from_pretrained(path)
    assert config == model.config
    # the oracle: the tensors transformers' own model has, and the shard its index names for each
    assert set(tensors) == set(ref.state_dict()) - ({"lm_head.weight"} if tie else set())
    index = os.path.join(path, "model.safetensors.index.json")
    where = json.load(open(index))["weight_map"] if os.path.isfile(index) else {}
    assert all(os.path.basename(f) == where.get(k, "model.safetensors") for k, f in tensors.items())
    assert os.path.isfile(index) == bool(shard)

# -----------------------------------------------------------------------------
# rouge.py (frozen values: docs/rouge.md, produced by rouge-score 0.1.2 + nltk 3.10.4)

from nltk.stem.porter import PorterStemmer  # noqa: E402
from rouge_score import rouge_scorer  # noqa: E402

TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
FROZEN = [  # (target, prediction, use_stemmer, type, (P, R, F)); the two tie-rule rows list only F in ROUGE.md
    ("The quick brown fox jumps over the lazy dog", "The quick brown dog jumps on the log.", True, "rouge1",
     (0.75, 0.6666666666666666, 0.7058823529411765)),
    ("The quick brown fox jumps over the lazy dog", "The quick brown dog jumps on the log.", False, "rouge2",
     (0.2857142857142857, 0.25, 0.26666666666666666)),
    ("The quick brown fox jumps over the lazy dog", "The quick brown dog jumps on the log.", True, "rougeLsum",
     (0.625, 0.5555555555555556, 0.5882352941176471)),
    ("a b c d e", "a", False, "rouge1", (1.0, 0.2, 0.33333333333333337)),
    ("a b c d e", "a", False, "rougeLsum", (1.0, 0.2, 0.33333333333333337)),
    ("The cat sat on the mat.", "The cat is sitting on the mat.", False, "rouge2", (0.5, 0.6, 0.5454545454545454)),
    ("The cat sat on the mat.", "The cat is sitting on the mat.", False, "rougeL",
     (0.7142857142857143, 0.8333333333333334, 0.7692307692307692)),
    ("Police killed the gunman.\nThe gunman was armed.", "The gunman was killed by police.\nHe was armed.", False,
     "rouge2", (0.375, 0.42857142857142855, 0.39999999999999997)),
    ("Police killed the gunman.\nThe gunman was armed.", "The gunman was killed by police.\nHe was armed.", False,
     "rougeLsum", (0.4444444444444444, 0.5, 0.47058823529411764)),
    ("running runs ran runner", "run running", False, "rouge1", (0.5, 0.25, 0.3333333333333333)),
    ("running runs ran runner", "run running", True, "rouge1", (1.0, 0.5, 0.6666666666666666)),
    ("running runs ran runner", "run running", True, "rouge2", (1.0, 0.3333333333333333, 0.5)),
    ("w1 w2 w3 w4 w5", "w1 w2 w6 w7 w8\nw1 w3 w8 w9 w5", False, "rougeLsum", (0.4, 0.8, 0.5333333333333333)),
    ("c b\nc a b c", "a b c\na\nb b c a", False, "rougeLsum", (0.5, 0.6666666666666666, 0.5714285714285715)),
    ("b a b", "a b b\na a a", False, "rougeLsum", (0.5, 1.0, 0.6666666666666666)),
    ("a", "a", False, "rouge2", (0.0, 0.0, 0.0)),
    ("the the the", "the", False, "rougeL", (1.0, 1 / 3, 0.5)),
    ("", "", False, "rougeLsum", (0.0, 0.0, 0.0)),
    ("!!!\n???", "a b", False, "rougeLsum", (0.0, 0.0, 0.0)),
    ("a b c d", "a b c d\n", False, "rougeLsum", (1.0, 1.0, 1.0)),
]
STEMS = ("ties tie dies die lies lie flies fli spies spi died die tied tie cried cri dying die lying lie tying tie "
         "skies sky news news innings inning outings outing cannings canning howe howe proceed proceed exceed exceed "
         "succeed succeed agreed agre feed feed bled bled sing sing motoring motor hopping hop falling fall hissing "
         "hiss fizzed fizz failing fail filing file happy happi enjoy enjoy generously gener conditional condit "
         "rational ration relational relat hopefulness hope formalize formal electrical electr adjustable adjust "
         "controlling control roll roll probate probat rate rate cease ceas generalization gener sensibiliti sensibl "
         "fulli fulli geology geolog archaeology archaeolog radically radic analogousli analog 1990s 1990 2000s 2000 "
         "yyyy yyyi syzygy syzygi toys toy this thi that that being be does doe going go caresses caress ponies poni "
         "cats cat feeds feed operate oper running run friends friend meeting meet").split()


@pytest.mark.parametrize("target,prediction,stem,rtype,expected", FROZEN)
def test_rouge_frozen_vectors(target, prediction, stem, rtype, expected):
    got = rouge.RougeScorer([rtype], use_stemmer=stem).score(target, prediction)[rtype]
    assert tuple(got) == expected


def test_rougelsum_is_not_symmetric_as_in_rouge_score():
    s = rouge.RougeScorer(["rougeLsum"])
    assert s.score("a b c\na\nb b c a", "c b\nc a b c")["rougeLsum"].fmeasure == 0.7142857142857143


def test_stemmer_frozen_table_and_the_lcs_index_example():
    for word, want in zip(STEMS[::2], STEMS[1::2]):
        assert rouge.stem(word) == want, word
    assert rouge._lcs_indices([1, 2, 3, 4, 5], [2, 5, 3, 4]) == [1, 2, 3]
    assert rouge.tokenize("the friends had a meeting", True) == "the friend had a meet".split()


def corpus_texts():
    uc = [data.to_messages(r) for r in data.read_rows(ULTRACHAT)]
    answers = [m["content"] for msgs in uc for m in msgs if m["role"] == "assistant"]
    omr = [r["generated_solution"] for r in data.read_rows(OMR)]
    gsm = [r["answer"] for r in data.read_rows(GSM8K)]
    return answers, omr, gsm


def test_stemmer_equals_nltk_on_every_word_of_the_bundled_corpora():
    words = set()
    for texts in corpus_texts():
        for t in texts:
            words.update(w for w in rouge.tokenize(t, False) if len(w) > 3)
    nltk = PorterStemmer()
    wrong = [w for w in words if rouge.stem(w) != nltk.stem(w)]
    assert len(words) > 18_000 and not wrong, wrong[:10]


def assert_same_scores(pairs, use_stemmer):
    ours, oracle = rouge.RougeScorer(TYPES, use_stemmer), rouge_scorer.RougeScorer(TYPES, use_stemmer=use_stemmer)
    for target, prediction in pairs:
        a, b = ours.score(target, prediction), oracle.score(target, prediction)
        for t in TYPES:
            assert tuple(a[t]) == tuple(b[t]), (t, target[:80], prediction[:80])


@pytest.mark.parametrize("use_stemmer", [True, False])
def test_rouge_equals_rouge_score_on_real_pairs(use_stemmer):
    answers, omr, gsm = corpus_texts()
    rng = random.Random(0)
    pairs = [(answers[i], answers[(i + 1) % len(answers)]) for i in range(0, len(answers), 2)]  # ~1,500
    pairs += [(gsm[i], gsm[i + 1]) for i in range(0, len(gsm) - 1, 2)]
    omr_short = sorted(omr, key=len)[:200]  # multi-paragraph chains of thought, the shorter ones for time
    pairs += [(omr_short[i], omr_short[i + 1]) for i in range(0, 80, 2)]
    pairs += [(a, a[: len(a) // 2]) for a in rng.sample(answers, 100)]  # heavy overlap, long LCS
    assert len(pairs) > 2000
    assert_same_scores(pairs, use_stemmer)


@pytest.mark.parametrize("use_stemmer", [True, False])
def test_rouge_equals_rouge_score_on_random_stress_texts(use_stemmer):
    rng = random.Random(1 + use_stemmer)
    vocab = ["a", "b", "ab", "the", "The", "cat", "cats", "running", "runs", "ran", "1990s", "2,000", "3.14", "don't",
             "U.S.A.", "e-mail", "naïve", "café", "straße", "İstanbul", "\u212aelvin", "ﬁne", "中文", "x_y", "!!!",
             "...", "\n", "\n\n", "\r\n", "  ", "\t", "generalization", "happily", "agreed", "ponies", "—", "😀"]
    pairs = []
    for _ in range(2000):
        n, m = rng.randint(0, 25), rng.randint(0, 25)
        pairs.append(("".join(rng.choice(vocab) + rng.choice(["", " ", " ", "\n"]) for _ in range(n)),
                      "".join(rng.choice(vocab) + rng.choice(["", " ", " ", "\n"]) for _ in range(m))))
    small = "abc"  # tiny alphabets: LCS ties everywhere, the backtrack's tie rule decides rougeLsum
    for _ in range(2000):
        pairs.append(tuple("\n".join(" ".join(rng.choice(small) for _ in range(rng.randint(0, 5)))
                                     for _ in range(rng.randint(1, 4))) for _ in range(2)))
    assert_same_scores(pairs, use_stemmer)


def test_score_multi_takes_the_best_target_first_on_ties():
    ours, oracle = rouge.RougeScorer(TYPES, True), rouge_scorer.RougeScorer(TYPES, use_stemmer=True)
    for targets, pred in [(["a x", "a y"], "a"), (["the cat sat", "a dog ran", "the dog sat"], "the dog sat down")]:
        a, b = ours.score_multi(targets, pred), oracle.score_multi(targets, pred)
        assert all(tuple(a[t]) == tuple(b[t]) for t in TYPES)


def test_rouge_bad_input():
    with pytest.raises(ValueError, match="Invalid rouge type: rougeX"):
        rouge.RougeScorer(["rougeX"])
    with pytest.raises(ValueError, match="Invalid rouge type: rouge10"):
        rouge.RougeScorer(["rouge10"])
    with pytest.raises(ValueError, match="rougen requires positive n"):
        rouge.RougeScorer(["rouge0"])
    with pytest.raises(TypeError, match="prediction must be str, got int"):
        rouge.RougeScorer(["rouge1"]).score("a", 3)
    with pytest.raises(TypeError, match="target must be str, got NoneType"):
        rouge.RougeScorer(["rouge1"]).score(None, "a")
    assert all(tuple(s) == (0.0, 0.0, 0.0) for s in rouge.RougeScorer(TYPES).score("", "").values())
    with pytest.raises(ValueError, match="2 references but 1 predictions"):
        rouge.corpus_score(["a", "b"], ["a"])


def test_corpus_score_is_the_plain_mean_of_rouge_score_per_example():
    answers, _, _ = corpus_texts()
    refs, preds = answers[:50], answers[50:100]
    oracle = rouge_scorer.RougeScorer(TYPES, use_stemmer=True)
    per = [oracle.score(r, p) for r, p in zip(refs, preds)]
    got = rouge.corpus_score(refs, preds, TYPES, use_stemmer=True)
    for t in TYPES:
        assert got[t].fmeasure == sum(s[t].fmeasure for s in per) / 50
        assert got[t].precision == sum(s[t].precision for s in per) / 50


def test_rouge_command_line(tmp_path):
    refs, preds = tmp_path / "refs.jsonl", tmp_path / "preds.jsonl"
    refs.write_text(json.dumps({"reference": "the cat sat on the mat"}) + "\n" + json.dumps("a b c") + "\n")
    preds.write_text(json.dumps({"prediction": "the cat is on the mat"}) + "\n" + json.dumps("a b") + "\n")
    out = tmp_path / "scores.json"
    r = subprocess.run([sys.executable, "rouge.py", str(refs), str(preds), f"--json={out}"], cwd=HERE,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    want = rouge.corpus_score(["the cat sat on the mat", "a b c"], ["the cat is on the mat", "a b"])
    assert json.load(open(out))["rouge1"]["fmeasure"] == want["rouge1"].fmeasure
    preds.write_text(json.dumps("x") + "\n{not json\n")
    r = subprocess.run([sys.executable, "rouge.py", str(refs), str(preds)], cwd=HERE, capture_output=True, text=True)
    assert r.returncode != 0 and f"{preds}:2: malformed JSON" in r.stderr
    preds.write_text(json.dumps("x") + "\n")
    r = subprocess.run([sys.executable, "rouge.py", str(refs), str(preds)], cwd=HERE, capture_output=True, text=True)
    assert r.returncode != 0 and "2 references" in r.stderr and "1 predictions" in r.stderr

# -----------------------------------------------------------------------------
# data.py

import jinja2  # noqa: E402


def chat_template(model):
    cfg = json.load(open(os.path.join(ASSETS, "qwen2.5", model, "tokenizer_config.json")))
    return jinja2.Environment().from_string(cfg["chat_template"])


@pytest.mark.parametrize("path", [ULTRACHAT, OMR])
def test_all_bundled_rows_render_like_the_jinja_template_and_supervise_exactly_the_answers(path, tokenizer):
    rows = data.read_rows(path)
    assert len(rows) == {ULTRACHAT: 1000, OMR: 505}[path]
    for model, system in (("Qwen2.5-1.5B", data.SYSTEM_PROMPT_BASE), ("Qwen2.5-7B-Instruct", data.SYSTEM_PROMPT_INSTRUCT)):
        template = chat_template(model)
        for row in rows:
            msgs = data.to_messages(row)
            assert data.render_chat(msgs, system) == template.render(messages=msgs)
            assert data.render_chat(msgs, system, True) == template.render(messages=msgs, add_generation_prompt=True)
    examples, stats = data.encode_rows(rows, tokenizer, max_len=10**6, source=path)
    assert stats["examples"] == len(rows) and stats["dropped_no_target"] == 0
    for row, (ids, labels) in zip(rows, examples):
        msgs = data.to_messages(row)
        sup = [i for i, lab in zip(ids, labels) if lab != data.IGNORE_INDEX]
        # every assistant turn, and each one's <|im_end|>; nothing else
        assert tokenizer.decode(sup, skip_special_tokens=False) == "".join(
            m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant")
        assert all(lab in (data.IGNORE_INDEX, i) for i, lab in zip(ids, labels))
        # the pieces joined are the rendered conversation, tokenized as the template's text would be
        assert ids == tokenizer.encode(data.render_chat(msgs), add_special_tokens=False).ids


def test_row_formats_are_recognised():
    assert data.to_messages({"question": "q", "answer": "a"}) == [{"role": "user", "content": "q"},
                                                                  {"role": "assistant", "content": "a"}]
    assert data.to_messages({"prompt": "p", "response": "r"})[1]["content"] == "r"
    assert data.to_messages({"instruction": "i", "input": "x", "output": "o"})[0]["content"] == "i\n\nx"
    assert data.to_messages({"instruction": "i", "input": "", "output": "o"})[0]["content"] == "i"
    gsm = data.read_rows(GSM8K)
    assert len(gsm) == 1319 and data.to_messages(gsm[0])[1]["content"].endswith("#### 18")
    msgs = data.to_messages({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "u"},
                                          {"role": "assistant", "content": "a"}]})
    assert data.render_chat(msgs) == chat_template("Qwen2.5-1.5B").render(messages=msgs)


def test_plain_text_rows_supervise_every_token_and_end_of_text(tokenizer):
    (ids, labels), = data.encode_rows([{"text": "Hello world."}], tokenizer, 100)[0]
    assert ids == labels and ids[-1] == tokenizer.token_to_id("<|endoftext|>")
    assert tokenizer.decode(ids, skip_special_tokens=False) == "Hello world.<|endoftext|>"


def test_truncation_never_keeps_an_example_without_targets(tokenizer):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    examples, stats = data.encode_rows([long_prompt, short, long_prompt], tokenizer, max_len=64)
    assert stats["dropped_no_target"] == 2 and stats["truncated"] == 2 and len(examples) == 1
    assert all(len(ids) <= 64 for ids, _ in examples)


def test_collate_pads_right_and_never_supervises_padding():
    ex = [([1, 2, 3], [-100, 2, 3]), ([4, 5], [-100, 5])]
    ids, labels, mask = data.collate(ex, pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert labels.tolist() == [[-100, 2, 3], [-100, 5, -100]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_shards_are_disjoint_cover_the_data_and_have_equal_counts(world):
    rng = random.Random(world)
    for n in (37, 100, 101):
        lengths = [rng.randint(5, 500) for _ in range(n)]
        for accum in (1, 2):
            batches = data.make_batches(lengths, 4, seed=0, epoch=1, multiple=world * accum)
            shards = [batches[r::world] for r in range(world)]
            assert len({len(s) for s in shards}) == 1
            seen = [int(i) for s in shards for b in s for i in b]
            assert sorted(seen) == list(range(n))  # every example exactly once
            assert max(len(b) for b in batches) <= 4


def test_shuffle_is_deterministic_per_seed_and_epoch_and_grouping_cuts_padding():
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(1000)]
    as_lists = lambda batches: [b.tolist() for b in batches]  # noqa: E731
    a = as_lists(data.make_batches(lengths, 8, seed=1, epoch=0))
    assert a == as_lists(data.make_batches(lengths, 8, seed=1, epoch=0))
    assert a != as_lists(data.make_batches(lengths, 8, seed=1, epoch=1))
    assert a != as_lists(data.make_batches(lengths, 8, seed=2, epoch=0))
    plain = data.make_batches(lengths, 8, seed=1, epoch=0, group_by_length=False)
    a = data.make_batches(lengths, 8, seed=1, epoch=0)
    assert data.padding_fraction(a, lengths) < 0.2 < data.padding_fraction(plain, lengths)


def test_eval_examples_are_the_first_turn_and_the_split_is_disjoint(tokenizer):
    rows = data.read_rows(ULTRACHAT)
    train, held = data.split_rows(rows, 50, seed=3)
    assert len(held) == 50 and len(train) == 950
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in held}
    assert held == data.split_rows(rows, 50, seed=3)[1] != data.split_rows(rows, 50, seed=4)[1]
    examples = data.eval_examples(held, tokenizer, 4096)
    assert len(examples) == 50
    msgs = data.to_messages(held[0])
    first = examples[0]
    assert first.reference == msgs[1]["content"]
    assert tokenizer.decode(first.prompt, skip_special_tokens=False) == chat_template("Qwen2.5-1.5B").render(
        messages=msgs[:1], add_generation_prompt=True)
    assert first.prompt[-3:] == tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False).ids
    # one prompt: the teacher-forced pair's, and the cache's (SeqKD), each cut at the first supervised token
    assert (first.input_ids, first.labels) == data.encode_rows([{"messages": msgs[:2]}], tokenizer, 4096)[0][0]
    assert all(e.prompt == data.prompt_ids(e.input_ids, e.labels) == e.input_ids[:len(e.prompt)] for e in examples)
    # a first exchange with no supervised token within max_len is dropped; a bad row is named
    short = data.eval_examples(held[:5], tokenizer, len(first.prompt))
    assert first not in short and len(short) == sum(len(e.prompt) < len(first.prompt) for e in examples[:5])
    with pytest.raises(data.DataError, match=r"eval.jsonl: row 2: .*ends with a user turn"):
        data.eval_examples([held[0], {"messages": msgs[:1]}], tokenizer, 4096, source="eval.jsonl")


def write(tmp_path, name, content, mode="w"):
    p = tmp_path / name
    with open(p, mode) as f:
        f.write(content)
    return str(p)


def test_bad_data_is_refused_naming_file_row_and_line(tmp_path, tokenizer):
    ok = json.dumps({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]})
    p = write(tmp_path, "bad.jsonl", ok + "\n" + ok + "\n{broken\n")
    with pytest.raises(data.DataError, match=r"bad.jsonl:3: malformed JSON"):
        data.read_rows(p)
    p = write(tmp_path, "latin1.jsonl", (ok + "\n").encode() + '{"text": "caf\xe9"}\n'.encode("latin-1"), "wb")
    with pytest.raises(data.DataError, match=r"latin1.jsonl:2: not valid UTF-8"):
        data.read_rows(p)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data.read_rows(str(tmp_path / "nope.jsonl"))
    cases = [({"foo": 1}, "unknown row format"),
             ({"messages": [{"role": "user", "content": "u"}, {"role": "bot", "content": "a"}]}, "unknown role 'bot'"),
             ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": " "}]}, "empty assistant"),
             ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]}, "out of order"),
             ({"messages": [{"role": "user", "content": "u"}]}, "ends with a user turn")]
    good = json.loads(ok)
    for row, msg in cases:
        with pytest.raises(data.DataError, match=rf"train.jsonl: row 2: .*{msg}"):
            data.encode_rows([good, row, good], tokenizer, 100, source="train.jsonl")
        examples, stats = data.encode_rows([good, row, good], tokenizer, 100, skip_bad_rows=True)
        assert len(examples) == 2 and stats["bad_rows_skipped"] == 1


def test_parquet_rows_equal_jsonl_rows_and_without_pyarrow_the_message_says_so(monkeypatch):
    pq = OMR.replace(".jsonl", ".parquet")
    assert data.read_rows(pq) == data.read_rows(OMR)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed: import raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(data.DataError, match="needs pyarrow"):
        data.read_rows(pq)

def todays_encode_rows(rows, tokenizer, max_len):
    """The in-memory tokenization deltakd used before the token cache existed, kept verbatim as the
    oracle the cache must reproduce: (input_ids, labels) lists per kept row."""
    specials = {t: tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")}
    convs = [data.merge_segments(data.row_segments(row)) for row in rows]
    pieces = [t for segs in convs for t, _ in segs if t not in specials]
    encoded = iter(tokenizer.encode_batch(pieces, add_special_tokens=False))
    examples = []
    for segs in convs:
        ids, labels = [], []
        for text, supervised in segs:
            piece = [specials[text]] if text in specials else next(encoded).ids
            ids += piece
            labels += piece if supervised else [data.IGNORE_INDEX] * len(piece)
        ids, labels = ids[:max_len], labels[:max_len]
        if any(lab != data.IGNORE_INDEX for lab in labels[1:]):
            examples.append((ids, labels))
    return examples


def build(tmp_path, path, max_len=1024, max_rows=0, tok=TOKENIZER, system=data.SYSTEM_PROMPT_BASE):
    key = data.cache_key(path, tok, max_len, system, max_rows, False)
    where = data.cache_dir_for(str(tmp_path / "cache"), key)
    if data.check_cache(where, key):
        data.build_cache(path, Tokenizer.from_file(tok), where, key, log=None, block_rows=300)
    return where, key


@pytest.mark.parametrize("path", [ULTRACHAT, OMR.replace(".jsonl", ".parquet"), GSM8K])
def test_token_cache_gives_exactly_todays_tokens_and_labels_for_every_bundled_row(tmp_path, tokenizer, path):
    where, key = build(tmp_path, path, max_len=1024)  # 483 of the 505 OpenMathReasoning rows are truncated
    assert data.check_cache(where, key) is None
    cache = data.TokenCache(where)
    want = todays_encode_rows(data.read_rows(path), tokenizer, 1024)
    assert len(cache) == len(want) == len(data.read_rows(path))
    for i, (ids, labels) in enumerate(want):
        got_ids, got_labels = cache.example(i)
        assert got_ids.tolist() == ids and got_labels.tolist() == labels
        # the prompt SeqKD answers: the cached arrays up to the first supervised token
        assert data.prompt_ids(got_ids, got_labels) == ids[:next(j for j, y in enumerate(labels) if y != -100)]
    # the loss's count of supervised positions, per example
    assert cache.n_targets().tolist() == [sum(lab != -100 for lab in labels[1:]) for _, labels in want]
    size = sum(os.path.getsize(os.path.join(where, f)) for f in os.listdir(where))
    assert size / len(cache.input_ids) < 4.5  # bytes per token on disk, all files


def test_a_new_tokenizer_max_len_data_file_or_prompt_makes_a_new_cache(tmp_path):
    other_tok = tmp_path / "tok.json"
    tok = json.load(open(TOKENIZER))
    tok["added_tokens"][-1]["content"] = "<|something_else|>"
    json.dump(tok, open(other_tok, "w"))
    copy = tmp_path / "gsm.jsonl"
    copy.write_text(open(GSM8K).read())
    base = build(tmp_path, str(copy), 256)[0]
    variants = [build(tmp_path, str(copy), 257)[0], build(tmp_path, str(copy), 256, tok=str(other_tok))[0],
                build(tmp_path, str(copy), 256, max_rows=100)[0],
                build(tmp_path, str(copy), 256, system=data.SYSTEM_PROMPT_INSTRUCT)[0]]
    with open(copy, "a") as f:
        f.write(json.dumps({"question": "q?", "answer": "a."}) + "\n")
    variants.append(build(tmp_path, str(copy), 256)[0])
    assert len({base, *variants}) == 6
    assert len(data.TokenCache(variants[-1])) == 1320 and len(data.TokenCache(variants[2])) == 100


def run_of(cfg, tokenizer_path=TOKENIZER):
    # the fixed parts of a one-process CPU run, for tests that call one piece of the pipeline
    tok = Tokenizer.from_file(tokenizer_path)
    return deltakd.Run(cfg, 0, 1, torch.device("cpu"), tok, tokenizer_path, deltakd.loss_spec(cfg, tok.get_vocab_size()))


def test_a_truncated_or_half_written_cache_is_rebuilt_with_a_message(tmp_path, tokenizer, capsys):
    run = run_of(deltakd.parse_args([f"--out_dir={tmp_path}", "--max_len=256"]))
    first = deltakd.token_cache(run, GSM8K)
    ids = first.input_ids.tolist()
    with open(os.path.join(first.path, "input_ids.bin"), "r+b") as f:
        f.truncate(1000)  # a disk that filled up, a copy cut short
    again = deltakd.token_cache(run, GSM8K)
    assert "input_ids.bin has 1,000 bytes" in capsys.readouterr().out and again.input_ids.tolist() == ids
    for name in ("sealed.json", "meta.json"):  # as if killed before the last file (atomic_dir makes that unseen)
        os.remove(os.path.join(first.path, name))
        third = deltakd.token_cache(run, GSM8K)
        assert f"no {name}" in capsys.readouterr().out and third.input_ids.tolist() == ids
    # a killed build leaves only a temporary directory, which no run reads
    assert all(d.startswith(("tokens-", "build.log")) for d in os.listdir(tmp_path / "cache"))


def test_max_rows_on_parquet_reads_only_the_row_groups_it_needs(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = data.read_rows(OMR)
    path = str(tmp_path / "omr.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=50)  # 11 row groups
    read = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, g, *a, **k: read.append(g) or real(self, g, *a, **k))
    assert data.read_rows(path, max_rows=120) == rows[:120] and read == [0, 1, 2]
    read.clear()
    assert data.read_rows_at(path, [3, 260, 261]) == {3: rows[3], 260: rows[260], 261: rows[261]} and read == [0, 5]
    assert data.read_rows(GSM8K, max_rows=7) == data.read_rows(GSM8K)[:7]


def test_held_out_rows_are_read_back_by_seeking_and_never_trained_on(run_dir, tmp_path, tokenizer):
    cfg = deltakd.parse_args(args(run_dir, tmp_path, eval_size=8, max_rows=40))
    cache, train_idx, evalset = deltakd.load_data(run_of(cfg))
    rows = data.read_rows(str(run_dir / "train.jsonl"))[:40]
    held = data.held_out_rows(cache.rows, 40, 8, cfg.seed)
    assert evalset == data.eval_examples([rows[i] for i in held], tokenizer, cfg.max_len, cfg.system_prompt)
    assert len(evalset) == 8 and len(train_idx) == 32
    assert not set(cache.rows[train_idx].tolist()) & set(held.tolist())
    assert data.held_out_rows(cache.rows, 40, 8, cfg.seed).tolist() == held.tolist()  # deterministic


def flip(path, offset, n=1):
    # changes n bytes in place: the file keeps its size (and its name, and its directory)
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0x5A for b in old))


def chat(user, answer):
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})


def test_a_cache_file_changed_in_place_is_named_and_rebuilt(tmp_path, capsys):
    run = run_of(deltakd.parse_args([f"--out_dir={tmp_path}", "--max_len=256"]))
    first = deltakd.token_cache(run, GSM8K)
    ids, rows = first.input_ids.tolist(), first.rows.tolist()
    for name, offset in (("input_ids", 4 * 1000), ("rows", 8 * 17)):  # a token, a row number: same size
        flip(os.path.join(first.path, f"{name}.bin"), offset)
        capsys.readouterr()
        again = deltakd.token_cache(run, GSM8K)
        out = capsys.readouterr().out
        assert f"token cache {first.path}: {name}.bin fails its checksum (changed after it was written); " \
               "rebuilding it" in out, out
        assert again.input_ids.tolist() == ids and again.rows.tolist() == rows
    assert data.check_cache(first.path, again.meta["key"], run.tokenizer.get_vocab_size()) is None


def test_a_token_id_outside_the_vocabulary_is_refused_even_with_a_matching_checksum(tmp_path, tokenizer):
    where, key = build(tmp_path, GSM8K, max_len=256, max_rows=50)
    vocab = tokenizer.get_vocab_size()
    assert data.check_cache(where, key, vocab) is None
    largest = int(data.TokenCache(where).input_ids.max())
    assert data.check_cache(where, key, largest) == \
        f"input_ids.bin holds token id {largest:,}, outside the vocabulary of {largest:,} ids"
    # an id the tokenizer never makes, with a checksum that agrees (a build gone wrong, not a changed byte)
    ids = np.fromfile(os.path.join(where, "input_ids.bin"), dtype=np.uint32)
    ids[5] = vocab + 7
    ids.tofile(os.path.join(where, "input_ids.bin"))
    data.seal(where)  # sealed again, over the changed file
    assert data.check_cache(where, key, vocab) == \
        f"input_ids.bin holds token id {vocab + 7:,}, outside the vocabulary of {vocab:,} ids"


def test_a_rank_polling_a_damaged_cache_reads_it_once_and_the_rebuilt_one_again(tmp_path, monkeypatch):
    where, key = build(tmp_path, GSM8K, max_len=256, max_rows=50)
    flip(os.path.join(where, "spans.bin"), 8)
    scanned = []
    real = data.scan
    monkeypatch.setattr(data, "scan", lambda path, dtype=None: scanned.append(path) or real(path, dtype))
    for _ in range(5):  # wait_until's polls while rank 0 rebuilds
        assert data.check_cache(where, key) == "spans.bin fails its checksum (changed after it was written)"
    assert sum(p.endswith("spans.bin") for p in scanned) == 1
    data.build_cache(GSM8K, Tokenizer.from_file(TOKENIZER), where, key, log=None)
    scanned.clear()
    assert data.check_cache(where, key) is None and len(scanned) == len(data.CACHE_ARRAYS) + 1  # and meta.json


def test_a_cache_without_its_seal_is_not_trusted(tmp_path):
    where, key = build(tmp_path, GSM8K, max_len=256, max_rows=50)
    assert key["format"] == data.CACHE_FORMAT >= 3  # older formats live under another directory name
    os.remove(os.path.join(where, "sealed.json"))
    assert data.check_cache(where, key) == "no sealed.json (cut short, or written by an older deltakd)"


def store_of(tmp_path, vocab=1000):
    # a store over a small token cache, every shard written by TargetStore.write from seeded numbers
    where, key = build(tmp_path, GSM8K, max_len=256, max_rows=30)
    cache = data.TokenCache(where)
    store = data.TargetStore(str(tmp_path / "targets"), cache, {"topk": 4, "shard": 8, "targets_dtype": "float16",
                                                                 "vocab": vocab})
    rng = np.random.default_rng(0)
    for s in range(store.n_shards):
        M = store.rows(s)
        store.write(s, {"ids": rng.integers(0, vocab, (M, 4)).astype(np.uint32),
                        "logp": -rng.random((M, 4)).astype(np.float32), "rest": -rng.random(M).astype(np.float32)})
    return store


def test_a_target_shard_with_a_flipped_byte_is_damaged_and_says_why(tmp_path):
    store = store_of(tmp_path)
    assert store.n_shards == 4 and all(store.damage(s) is None and store.complete(s) for s in range(4))
    flip(os.path.join(store.shard_dir(1), "logp.bin"), 33)
    assert store.damage(1) == "logp.bin fails its checksum (changed after it was written)"
    assert store.complete(1)  # the polling check stays cheap: the seal and the sizes only
    with open(os.path.join(store.shard_dir(2), "rest.bin"), "r+b") as f:
        f.truncate(12)
    assert store.damage(2) == f"rest.bin has 12 bytes, {4 * store.rows(2):,} were written" and not store.complete(2)
    os.remove(os.path.join(store.shard_dir(3), "sealed.json"))  # a shard cut short
    assert store.damage(3).startswith("no sealed.json") and not store.complete(3)
    # rewritten, each is whole again; an id the vocabulary does not hold is refused though its checksum agrees
    rows = store.rows(0)
    store.write(0, {"ids": np.full((rows, 4), 1000, np.uint32), "logp": np.zeros((rows, 4), np.float32),
                    "rest": np.zeros(rows, np.float32)})
    assert store.damage(0) == "ids.bin holds token id 1,000, outside the vocabulary of 1,000 ids"
    shutil.rmtree(store.shard_dir(3))
    assert store.damage(3) == "not computed" and not store.complete(3)


def test_shard_checksums_are_of_the_bytes_written(tmp_path):
    store = store_of(tmp_path)
    sums = json.load(open(os.path.join(store.shard_dir(2), "sealed.json")))
    assert set(sums) == {"ids.bin", "logp.bin", "rest.bin"}
    for p, _, _ in store.files(2).values():
        assert sums[os.path.basename(p)] == [os.path.getsize(p), zlib.crc32(open(p, "rb").read())]


def bad_file(tmp_path):
    # line 3 is blank (no row), row 3 is line 4: malformed JSON; line 6 latin-1; line 8 a list; line 9 no format
    lines = [chat("u1", "a1").encode(), chat("u2", "a2").encode(), b"   ", b'{"messages": [', chat("u5", "a5").encode(),
             '{"question": "caf\xe9?", "answer": "yes"}'.encode("latin-1"), chat("u7", "a7").encode(), b"[1, 2]",
             b'{"foo": 1}', chat("u10", "a10").encode()]
    return write(tmp_path, "bad.jsonl", b"\n".join(lines) + b"\n", "wb")


def cache_key_of(path, skip):
    return data.cache_key(path, TOKENIZER, 256, data.SYSTEM_PROMPT_BASE, 0, skip)


def test_malformed_lines_are_skipped_counted_and_named_with_skip_bad_rows(tmp_path, tokenizer):
    path = bad_file(tmp_path)
    key = cache_key_of(path, True)
    where = data.cache_dir_for(str(tmp_path / "cache"), key)
    stats = data.build_cache(path, tokenizer, where, key, log=None, block_rows=3)
    assert stats["rows"] == 9 and stats["bad_rows_skipped"] == 4 and stats["examples"] == 5
    assert stats["first_bad_rows"] == [f"{path}:4: malformed JSON line (Expecting value)",
                                       f"{path}:6: not valid UTF-8 (byte 17 of the line)",
                                       f"{path}:8: the row is a list, not an object",
                                       f"{path}:9: unknown row format (fields ['foo']); expected messages, "
                                       "problem/generated_solution, prompt/response, instruction/output or question/answer"]
    assert data.check_cache(where, key) is None
    cache = data.TokenCache(where)
    assert cache.meta["stats"]["first_bad_rows"] == stats["first_bad_rows"]
    # a bad line keeps its row number: row n is the n-th non-empty line, and every row's offset is kept
    assert cache.rows.tolist() == [0, 1, 3, 5, 8]
    assert len(cache.line_offsets) == 9
    good = [json.loads(chat(u, a)) for u, a in (("u1", "a1"), ("u2", "a2"), ("u5", "a5"), ("u7", "a7"), ("u10", "a10"))]
    want, _ = data.encode_rows(good, tokenizer, 256)
    assert [(cache.example(i)[0].tolist(), cache.example(i)[1].tolist()) for i in range(5)] == want
    assert data.read_rows_at(path, [3, 8], cache.line_offsets) == {3: good[2], 8: good[4]}


@pytest.mark.parametrize("bad,why", [(b'{"messages": [', "malformed JSON line (Expecting value)"),
                                     ('{"text": "caf\xe9"}'.encode("latin-1"), "not valid UTF-8 (byte 13 of the line)"),
                                     (b"[1, 2]", "the row is a list, not an object"),
                                     (b'{"foo": 1}', "unknown row format")])
def test_without_skip_bad_rows_a_bad_line_stops_the_build_naming_path_and_line(tmp_path, tokenizer, bad, why):
    lines = [chat("u1", "a1").encode(), chat("u2", "a2").encode(), b"", bad, chat("u5", "a5").encode()]
    path = write(tmp_path, "one_bad.jsonl", b"\n".join(lines) + b"\n", "wb")
    key = cache_key_of(path, False)
    where = data.cache_dir_for(str(tmp_path / "cache"), key)
    with pytest.raises(data.DataError) as e:
        data.build_cache(path, tokenizer, where, key, log=None, block_rows=2)
    msg = str(e.value)  # line 4 (the blank line 3 is no row), not row 3 or 2
    assert msg.startswith(f"{path}:4: {why}") and msg.endswith("(pass skip_bad_rows to skip such rows)")
    assert "\n" not in msg and not os.path.exists(where)


def test_json_and_parquet_rows_are_named_from_1(tmp_path, tokenizer):
    rows = [json.loads(chat("u", "a")), {"foo": 1}, json.loads(chat("u", "a"))]
    path = write(tmp_path, "rows.json", json.dumps(rows))
    key = cache_key_of(path, False)
    with pytest.raises(data.DataError, match=rf"^{path}: row 2: unknown row format"):
        data.build_cache(path, tokenizer, data.cache_dir_for(str(tmp_path / "c"), key), key, log=None)
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    ppath = str(tmp_path / "rows.parquet")
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "a"}, {"question": "q", "answer": ""}]), ppath)
    key = cache_key_of(ppath, False)
    with pytest.raises(data.DataError, match=rf"^{ppath}: row 2: .*empty assistant turn"):
        data.build_cache(ppath, tokenizer, data.cache_dir_for(str(tmp_path / "c"), key), key, log=None)
    with pytest.raises(data.DataError, match=r"^train.jsonl: row 2: unknown row format"):
        data.encode_rows(rows, tokenizer, 100, source="train.jsonl")
    _, stats = data.encode_rows(rows, tokenizer, 100, skip_bad_rows=True, source="train.jsonl")
    assert stats["first_bad_rows"] == ["train.jsonl: row 2: unknown row format (fields ['foo']); expected messages, "
                                       "problem/generated_solution, prompt/response, instruction/output or question/answer"]
    strs = write(tmp_path, "strs.json", json.dumps([rows[0], "x"]))
    with pytest.raises(data.DataError, match=rf"^{strs}: row 2: the row is a str, not an object"):
        data.read_rows(strs)


def test_held_out_rows_come_only_from_rows_in_the_cache(tmp_path, tokenizer):
    n, eval_size, seed = 40, 6, 3
    order = np.random.default_rng(seed).permutation(n)
    assert data.held_out_rows(np.arange(n), n, eval_size, seed).tolist() == sorted(order[:eval_size].tolist())
    # the first three rows the permutation draws are malformed: each is replaced by the next one it draws
    bad = set(order[:3].tolist())
    lines = ["{broken" if i in bad else chat(f"u{i}", f"a{i}") for i in range(n)]
    path = write(tmp_path, "train.jsonl", "\n".join(lines) + "\n")
    key = cache_key_of(path, True)
    where = data.cache_dir_for(str(tmp_path / "cache"), key)
    data.build_cache(path, tokenizer, where, key, log=None)
    cache = data.TokenCache(where)
    held = data.held_out_rows(cache.rows, cache.meta["stats"]["rows"], eval_size, seed)
    assert held.tolist() == sorted(order[3:3 + eval_size].tolist()) and not bad & set(held.tolist())
    with pytest.raises(data.DataError, match=r"^eval_size=37 leaves no training rows out of the 37 usable of 40$"):
        data.held_out_rows(cache.rows, n, 37, seed)


def test_load_data_holds_out_only_rows_that_made_it_into_the_cache(run_dir, tmp_path, tokenizer):
    rows = data.read_rows(str(run_dir / "train.jsonl"))[:40]
    seed = deltakd.Config().seed
    bad = set(np.random.default_rng(seed).permutation(40)[:2].tolist())  # the first two rows it draws
    path = write(tmp_path, "train.jsonl", "".join(("{broken" if i in bad else json.dumps(r)) + "\n"
                                                  for i, r in enumerate(rows)))
    cfg = deltakd.parse_args(args(run_dir, tmp_path / "out", train_data=path, eval_size=8, skip_bad_rows=True))
    cache, train_idx, evalset = deltakd.load_data(run_of(cfg))
    held = data.held_out_rows(cache.rows, 40, 8, seed)
    assert len(evalset) == 8 and not bad & set(held.tolist()) and len(train_idx) == 30
    assert evalset == data.eval_examples([rows[i] for i in held], tokenizer, cfg.max_len, cfg.system_prompt)


def test_a_parquet_that_is_not_parquet_is_one_data_error_naming_the_file(tmp_path, run_dir):
    pytest.importorskip("pyarrow")
    path = write(tmp_path, "rows.parquet", "\n".join([chat("u", "a")] * 3) + "\n")  # .jsonl under another name
    for check in (data.read_rows, data.check_data_file):
        with pytest.raises(data.DataError, match=rf"^{path}: not a readable parquet file \(Parquet magic bytes "
                                                 "not found in footer"):
            check(path)
    r = subprocess.run([sys.executable, "deltakd.py", *args(run_dir, tmp_path / "out", train_data=path, method="sft")],
                       cwd=HERE, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"{path}: not a readable parquet file" in lines[0]


def test_a_damaged_parquet_row_group_is_one_data_error_naming_it(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    path = str(tmp_path / "omr.parquet")
    raw = bytearray(open(OMR.replace(".jsonl", ".parquet"), "rb").read())
    assert pq.ParquetFile(OMR.replace(".jsonl", ".parquet")).num_row_groups >= 1
    raw[len(raw) // 3:len(raw) // 3 + 256] = bytes(256)  # a damaged page; the footer intact
    open(path, "wb").write(raw)
    data.check_data_file(path)  # the footer opens: only reading the rows finds the damage
    with pytest.raises(data.DataError, match=rf"^{path}: row group \d+ of the parquet file is unreadable \("):
        data.read_rows(path)


def test_check_data_file_refuses_a_missing_or_empty_file_before_any_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file .*nope.jsonl does not exist"):
        data.check_data_file(str(tmp_path / "nope.jsonl"))
    with pytest.raises(data.DataError, match=r"empty.jsonl: the data file is empty"):
        data.check_data_file(write(tmp_path, "empty.jsonl", ""))
    data.check_data_file(GSM8K)
    data.check_data_file(OMR.replace(".jsonl", ".parquet"))

# -----------------------------------------------------------------------------
# deltakd.py: the loss, against a float64 reference written in probability space


def ref_target(ft, raw_t, raw_s, alpha, tau):
    # the paper's definition, literally: pi* = pi_ft (pi_s / pi_t)^alpha / Z, each pi = softmax(z / tau)
    p = lambda z: torch.softmax(z.double() / tau, -1)  # noqa: E731
    w = p(ft) * (p(raw_s) / p(raw_t)) ** alpha
    return w / w.sum(-1, keepdim=True)


def delta_kd_target(ft, raw_t, raw_s, alpha, tau):
    # deltakd's log pi*, as every loss path forms it: target_weights' roles and weights, summed by target_logits
    z = {"teacher_ft": ft, "teacher_raw": raw_t, "student_raw": raw_s}
    return F.log_softmax(deltakd.target_logits(z, deltakd.target_weights("fkl", alpha)) / tau, dim=-1)


def ref_kl(p, q):
    # KL(p || q) per row, probabilities in, no logs of logits anywhere
    return (p * (p / q).log()).sum(-1)


def logits(*shape, scale=3.0, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def some_labels(B, T, V, seed=0):
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
    labels[0, :4] = data.IGNORE_INDEX  # a prompt
    labels[-1, -3:] = data.IGNORE_INDEX  # padding
    return labels


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_delta_target_equals_the_papers_definition(alpha, tau):
    ft, rt, rs = logits(2, 5, 40, seed=1), logits(2, 5, 40, seed=2), logits(2, 5, 40, seed=3)
    got = delta_kd_target(ft, rt, rs, alpha, tau)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double().exp(), ref_target(ft, rt, rs, alpha, tau), atol=1e-6)


def test_alpha_zero_and_equal_raw_models_are_forward_kl_to_the_finetuned_teacher():
    ft, rt, rs = logits(2, 6, 30, seed=1), logits(2, 6, 30, seed=2), logits(2, 6, 30, seed=3)
    fkl = F.log_softmax(ft / 2.0, -1)
    assert torch.allclose(delta_kd_target(ft, rt, rs, 0.0, 2.0), fkl, atol=1e-6)
    assert torch.allclose(delta_kd_target(ft, rt, rt, 1.5, 2.0), fkl, atol=1e-6)


@pytest.mark.parametrize("divergence", ["fkl", "rkl"])
def test_kd_loss_equals_the_reference_and_is_zero_at_the_target(divergence):
    B, T, V, tau = 3, 8, 50, 2.0
    labels = some_labels(B, T, V)
    z = logits(B, T, V, seed=4)
    target = delta_kd_target(logits(B, T, V, seed=5), logits(B, T, V, seed=6), logits(B, T, V, seed=7), 1.0, tau)
    total, n = deltakd.kd_loss(z, target, labels, divergence, tau)
    mask = labels[:, 1:] != -100
    p, q = target[:, :-1][mask].double().exp(), torch.softmax(z[:, :-1][mask].double() / tau, -1)
    want = ref_kl(p, q) if divergence == "fkl" else ref_kl(q, p)
    assert n.item() == mask.sum().item() == B * (T - 1) - 3 - 3
    assert math.isclose(total.item(), want.sum().item(), rel_tol=1e-5)
    # a student whose tempered distribution is pi* has nothing to learn
    at_target = target * tau  # softmax(at_target / tau) = softmax(target) = pi*
    zero, _ = deltakd.kd_loss(at_target, target, labels, divergence, tau)
    assert abs(zero.item()) < 1e-4


def test_gradient_wrt_student_logits_is_q_minus_pi_star_over_tau():
    B, T, V, tau = 2, 7, 30, 0.5
    labels = some_labels(B, T, V)
    z = logits(B, T, V, seed=8).requires_grad_()
    ft, rt, rs = logits(B, T, V, seed=9), logits(B, T, V, seed=10), logits(B, T, V, seed=11)
    total, n = deltakd.kd_loss(z, delta_kd_target(ft, rt, rs, 1.0, tau), labels, "fkl", tau)
    (total / n).backward()
    want = torch.zeros(B, T, V, dtype=torch.float64)
    mask = labels[:, 1:] != -100
    want[:, :-1][mask] = (torch.softmax(z.detach()[:, :-1][mask].double() / tau, -1)
                          - ref_target(ft, rt, rs, 1.0, tau)[:, :-1][mask]) / tau / n
    assert torch.allclose(z.grad.double(), want, atol=1e-7)


def loss_inputs(method, B=3, T=11, C=16, V=60, seed=0):
    """Hidden states and heads: the student's head has 4 padded vocab rows, the teachers' 9 (as 1.5B vs 7B);
    the padded rows hold huge values that must never matter."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, C, generator=g) * 2
    W = torch.randn(V + 4, C, generator=g)
    W[V:] = 1e4
    alpha = 1.5 if method.startswith("delta") else None  # as resolve writes it: None without the shift
    roles = deltakd.target_weights(None if method == "sft" else "fkl", alpha)
    teachers = {}
    for role in roles:
        Wt = torch.randn(V + 9, 24, generator=g)
        Wt[V:] = -1e4 * torch.rand(9, 24, generator=g)
        teachers[role] = (torch.randn(B, T, 24, generator=g) * 2, Wt)
    spec = deltakd.LossSpec(vocab=V, lam={"sft": 1.0}.get(method, 0.3), alpha=alpha, temperature=2.0,
                            divergence=None if method == "sft" else "rkl" if "rkl" in method else "fkl", chunk_size=5)
    return h, W, some_labels(B, T, V, seed), teachers or None, spec


def run_loss(h, W, labels, teachers, spec, dtype=torch.float32):
    h, W = h.detach().clone().to(dtype).requires_grad_(), W.detach().clone().to(dtype).requires_grad_()
    if isinstance(teachers, dict):
        teachers = {r: (t.to(dtype), w.to(dtype)) for r, (t, w) in teachers.items()}
    loss, sft, kd, n = deltakd.distill_loss(h, W, labels, teachers, spec)
    (loss / n).backward()
    return loss.detach(), sft, kd, h.grad, W.grad


# every loss test below that takes `compiled` also runs chunk_loss through torch.compile, one graph per spec,
# target kind and (from the second length on) dynamic length: more than dynamo's default 8 per function
torch._dynamo.config.recompile_limit = 64


def compiled_graphs():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("method", ["sft", "fkl", "rkl", "delta", "delta-rkl"])
def test_chunked_loss_equals_dense_loss_and_gradients(method, compiled):
    h, W, labels, teachers, spec = loss_inputs(method)
    dense = run_loss(h, W, labels, teachers, replace(spec, impl="dense"))
    if compiled:
        torch._dynamo.reset()  # this spec's graphs are compiled here, not reused from another test
    graphs = compiled_graphs()
    for chunk in (1, 5, 7, 10_000):  # one row at a time, uneven tails, everything in one chunk
        chunked = run_loss(h, W, labels, teachers, replace(spec, impl="chunked", chunk_size=chunk, compile=compiled))
        for a, b in zip(chunked, dense):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max().clamp(min=1e-6)
        assert chunked[4][60:].abs().max() == 0  # padded vocab rows get no gradient
    assert (compiled_graphs() > graphs) == compiled  # really compiled (or really not)


@pytest.mark.parametrize("compiled", [False, True])
def test_chunked_loss_equals_an_independent_float64_reference(compiled):
    h, W, labels, teachers, spec = loss_inputs("delta")
    loss, sft, kd, _, _ = run_loss(h, W, labels, teachers, replace(spec, compile=compiled))
    mask = labels[:, 1:] != -100
    V, tau = spec.vocab, spec.temperature
    z = (h[:, :-1][mask].double() @ W[:V].double().T)
    zt = {r: t[:, :-1][mask].double() @ w[:V].double().T for r, (t, w) in teachers.items()}
    p_star = ref_target(zt["teacher_ft"], zt["teacher_raw"], zt["student_raw"], spec.alpha, tau)
    want_kd = ref_kl(p_star, torch.softmax(z / tau, -1)).sum()
    want_sft = -torch.log_softmax(z, -1).gather(1, labels[:, 1:][mask][:, None]).sum()
    assert math.isclose(kd.item(), want_kd.item(), rel_tol=1e-5)
    assert math.isclose(sft.item(), want_sft.item(), rel_tol=1e-5)
    assert math.isclose(loss.item(), (0.3 * want_sft + 0.7 * want_kd).item(), rel_tol=1e-5)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
def test_extreme_logits_give_finite_losses_and_gradients(tau, alpha):
    B, T, V = 2, 6, 40
    g = torch.Generator().manual_seed(0)
    extreme = lambda: (torch.randint(0, 2, (B, T, V), generator=g) * 2 - 1).float() * 1e4  # noqa: E731
    labels = some_labels(B, T, V)
    for dtype in (torch.float32, torch.bfloat16):
        z = extreme().to(dtype).requires_grad_()
        target = delta_kd_target(extreme().to(dtype), extreme().to(dtype), extreme().to(dtype), alpha, tau)
        for div in ("fkl", "rkl"):
            total, n = deltakd.kd_loss(z, target, labels, div, tau)
            (grad,) = torch.autograd.grad(total / n, z)
            assert torch.isfinite(total) and torch.isfinite(grad).all()
    # the chunked path from hidden states, logits near +-1e4, bf16 like the real teachers
    h, W, labels, teachers, spec = loss_inputs("delta")
    teachers = {r: (t * 50, w) for r, (t, w) in teachers.items()}
    for dtype in (torch.float32, torch.bfloat16):
        for div in ("fkl", "rkl"):
            out = run_loss(h * 50, W, labels, teachers, replace(spec, alpha=alpha, temperature=tau, divergence=div),
                           dtype)
            assert all(torch.isfinite(x).all() for x in out)

def stored_from(teachers, labels, spec, k, dtype=torch.float32):
    mask, _ = deltakd.shift_labels(labels)
    live = {r: (t[:, :-1][mask], w) for r, (t, w) in teachers.items()}
    st = deltakd.topk_target(deltakd.chunk_target(live, 0, 10**9, spec) / spec.temperature, k)
    return deltakd.StoredTarget(st.ids, st.logp.to(dtype).float(), st.log_rest)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("method", ["fkl", "rkl", "delta", "delta-rkl"])
def test_stored_targets_with_k_equal_to_the_vocabulary_equal_the_exact_loss(method, compiled):
    h, W, labels, teachers, spec = loss_inputs(method, B=4, T=30)
    exact = run_loss(h, W, labels, teachers, spec)
    spec = replace(spec, compile=compiled)
    for dtype, tol_loss, tol_grad in ((torch.float32, 1e-5, 1e-5), (torch.float16, 1e-4, None)):  # fp16: the default
        got = run_loss(h, W, labels, stored_from(teachers, labels, spec, spec.vocab, dtype), spec)
        for i, (a, b) in enumerate(zip(got, exact)):
            tol = tol_loss if i < 3 else tol_grad
            if tol:
                assert (a - b).abs().max() <= tol * b.abs().max(), (dtype, i)


def bucketed_reference(z, p_full, k, divergence, tau):
    # probability space, float64: the top-k ids of p, then KL over {those ids, everything else}
    q = torch.softmax(z / tau, -1)
    top = p_full.topk(k, -1).indices
    rest = torch.ones_like(p_full, dtype=torch.bool).scatter(1, top, False)  # summed, not 1 - sum: no cancellation
    pb = torch.cat([p_full.gather(1, top), (p_full * rest).sum(-1, keepdim=True)], 1)
    qb = torch.cat([q.gather(1, top), (q * rest).sum(-1, keepdim=True)], 1)
    return (ref_kl(pb, qb) if divergence == "fkl" else ref_kl(qb, pb)).sum()


@pytest.mark.parametrize("method", ["fkl", "rkl", "delta", "delta-rkl"])
@pytest.mark.parametrize("k, compiled", [(1, False), (5, False), (20, False), (5, True)])
def test_stored_targets_for_small_k_equal_a_float64_bucketed_reference(method, k, compiled):
    h, W, labels, teachers, spec = loss_inputs(method, B=3, T=12)
    spec = replace(spec, lam=0.0, compile=compiled)  # the KD term alone
    loss, _, kd, gh, gW = run_loss(h, W, labels, stored_from(teachers, labels, spec, k), spec)
    mask = labels[:, 1:] != -100
    V, tau = spec.vocab, spec.temperature
    hs, Wd = h[:, :-1][mask].double().requires_grad_(), W.double().requires_grad_()
    zt = {r: t[:, :-1][mask].double() @ w[:V].double().T for r, (t, w) in teachers.items()}
    p = ref_target(zt["teacher_ft"], zt.get("teacher_raw", zt["teacher_ft"]), zt.get("student_raw", zt["teacher_ft"]),
                   spec.alpha or 0.0, tau)
    want = bucketed_reference(hs @ Wd[:V].T, p, k, spec.divergence, tau)
    (want / mask.sum()).backward()
    assert math.isclose(kd.item(), want.item(), rel_tol=1e-5)
    # fp32 vs fp64: forward KL's closed-form gradient is within 5e-7 here, reverse KL's (fp32 autograd
    # through log q_b - log p_b, terms up to ~20) within 2e-5; a wrong formula is off by 1e-2 or more
    tol = 1e-5 if spec.divergence == "fkl" else 5e-5
    assert (gW - Wd.grad).abs().max() <= tol * Wd.grad.abs().max()
    assert (gh[:, :-1][mask] - hs.grad).abs().max() <= tol * hs.grad.abs().max()
    # a lower bound of the exact divergence (log-sum inequality)
    assert kd.item() <= run_loss(h, W, labels, teachers, spec)[2].item() + 1e-6


def test_stored_targets_with_extreme_logits_stay_finite():
    h, W, labels, teachers, spec = loss_inputs("delta")
    teachers = {r: (t * 50, w) for r, (t, w) in teachers.items()}
    for div in ("fkl", "rkl"):
        for k in (1, 8, 60):
            s = replace(spec, divergence=div)
            out = run_loss(h * 50, W, labels, stored_from(teachers, labels, s, k, torch.float16), s)
            assert all(torch.isfinite(x).all() for x in out)


def test_each_methods_settings_are_resolved_into_the_config_and_a_flag_without_effect_is_refused():
    # what a run's config says is what it does: (lam, divergence, alpha, temperature, on_policy) per method
    want = {"sft": (1.0, None, None, None, 0.0), "fkl": (0.5, "fkl", None, 1.0, 0.0), "rkl": (0.5, "rkl", None, 1.0, 0.0),
            "delta": (0.5, "fkl", 1.0, 1.0, 0.0), "seqkd": (1.0, None, None, None, 0.0),
            "minillm": (0.0, "rkl", None, 1.0, 1.0)}
    for method, values in want.items():
        cfg = deltakd.parse_args([f"--method={method}"])
        assert (cfg.lam, cfg.divergence, cfg.alpha, cfg.temperature, cfg.on_policy) == values, method
        assert (cfg.ppo_clip is None) == (method != "minillm") and cfg.topk is None
        assert cfg.on_policy_temperature == (1.0 if method == "minillm" else None)
    assert deltakd.parse_args(["--method=delta", "--divergence=rkl"]).divergence == "rkl"
    assert deltakd.parse_args(["--method=sft", "--lam=1"]).lam == 1.0  # the value the method fixes is no conflict
    assert deltakd.parse_args(["--method=fkl", "--on_policy=1"]).lam == 0.0  # samples only: no labels
    # each rule sees what the ones before it wrote: an SFT stage of an on-policy demo is off-policy, lam 1
    staged = deltakd.resolve(deltakd.Config(method="sft", on_policy=1.0, topk=8), set())
    assert (staged.on_policy, staged.lam, staged.topk) == (0.0, 1.0, None)
    for argv, text in [(["--method=sft", "--lam=0.3"], "--lam=0.3 has no effect: --method=sft fixes it at 1.0"),
                       (["--method=fkl", "--divergence=rkl"], "--divergence=rkl has no effect: --method=fkl fixes it"),
                       (["--method=sft", "--divergence=rkl"], "--divergence=rkl has no effect: --method=sft does not "
                                                              "read it"),
                       (["--method=rkl", "--alpha=0.5"], "--alpha=0.5 has no effect: --method=rkl has no finetuning"),
                       (["--method=seqkd", "--temperature=2"], "--temperature=2.0 has no effect: --method=seqkd has no "
                                                               "teacher distribution"),
                       (["--method=sft", "--targets_dir=x"], "--targets_dir=x has no effect: --method=sft has no "
                                                             "teacher distribution"),
                       (["--topk=8"], "--topk=8 has no effect: it goes with --targets_dir"),
                       (["--targets_only=true"], "--targets_only=True has no effect: it goes with --targets_dir"),
                       (["--method=sft", "--seqkd_max_new_tokens=9"], "it goes with --method=seqkd"),
                       (["--on_policy=1", "--lam=0.5"], "--lam=0.5 has no effect: at --on_policy=1 every answer is"),
                       (["--eval_seeds=3"], "--eval_seeds=3 has no effect: it goes with --eval_temperature > 0"),
                       (["--eval_data=x", "--eval_size=8"], "--eval_size=8 has no effect: --eval_data is the held-out"),
                       (["--divergence=kl"], "--divergence=kl: expected one of fkl, rkl")]:
        with pytest.raises(SystemExit, match=re.escape(text)):
            deltakd.parse_args(argv)


def test_run_json_says_what_sft_rkl_and_minillm_runs_do_and_a_flag_without_effect_never_blocks_a_resume(run_dir, tmp_path):
    for method, (lam, divergence, on_policy) in {"sft": (1.0, None, 0.0), "rkl": (0.5, "rkl", 0.0),
                                                  "minillm": (0.0, "rkl", 1.0)}.items():
        out = tmp_path / method
        deltakd.train(deltakd.parse_args(args(run_dir, out, method=method, max_steps=1, eval_size=0,
                                              on_policy_max_new_tokens=4) if method == "minillm" else
                                         args(run_dir, out, method=method, max_steps=1, eval_size=0)))
        record = json.load(open(out / "ckpt-0000001" / "run.json"))
        for part in ("config", "identity"):
            got = {k: record[part][k] for k in ("lam", "divergence", "on_policy", "alpha")}
            assert got == {"lam": lam, "divergence": divergence, "on_policy": on_policy, "alpha": None}, (method, part)
    # the same refusal on the command line: one line naming the flag and the method
    one_line_error(cli(run_dir, tmp_path / "refused", method="sft", lam=0.3), "--lam=0.3", "--method=sft")
    assert not (tmp_path / "refused").exists()
    # the raw teacher, which an sft run does not read, is no part of its identity: moving it blocks no resume
    r = cli(run_dir, tmp_path / "sft", method="sft", max_steps=2, eval_size=0, resume=True, teacher_raw=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]


# -----------------------------------------------------------------------------
# deltakd.py: the training loop


def test_answer_sanity_counts_distinct_answers_loops_and_length():
    loop = "the total of the total of the total of"  # 4-grams: 6, distinct: 3 -> half repeat
    once = "how many of the cats and how many of the dogs"  # one 4-gram ("how many of the") twice
    got = rouge.answer_sanity([loop, loop, "a b c", "one two three four five", once])
    # sound: given to no other prompt and no repeated 4-gram -> only "a b c" and "one two three four five"
    assert got == {"distinct": 4 / 5, "repeated_4grams": (0.5 + 0.5 + 0 + 0 + 1 / 8) / 5, "sound": 2 / 5,
                   "words": (9 + 9 + 3 + 5 + 11) / 5}


def test_config_overrides_are_type_checked_and_unknown_keys_named():
    cfg = deltakd.parse_args(["--lr=3e-4", "--resume=true", "--method=fkl", "--batch_size=2"])
    assert (cfg.lr, cfg.resume, cfg.method, cfg.batch_size) == (3e-4, True, "fkl", 2)
    with pytest.raises(SystemExit, match="unknown config key 'learning_rate'"):
        deltakd.parse_args(["--learning_rate=1"])
    with pytest.raises(SystemExit, match="--batch_size=two: expected int"):
        deltakd.parse_args(["--batch_size=two"])
    with pytest.raises(SystemExit, match="--zero=maybe: expected bool"):
        deltakd.parse_args(["--zero=maybe"])
    with pytest.raises(SystemExit, match=re.escape("--method=gkd: expected one of sft, fkl, rkl, delta, seqkd, "
                                                   "minillm")):
        deltakd.parse_args(["--method=gkd"])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Tiny random Qwen2 checkpoints saved by transformers, with the real tokenizer and Qwen's real vocab
    sizes (151,936 for the student, 152,064 for the teachers, 151,665 real tokens), and GSM8K rows."""
    root = tmp_path_factory.mktemp("run")
    for name, hidden, tie, vocab, seed in [("student", 32, True, 151936, 0), ("teacher_raw", 48, False, 152064, 1),
                                           ("teacher_ft", 48, False, 152064, 2)]:
        torch.manual_seed(seed)
        c = transformers.Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
        transformers.Qwen2ForCausalLM(c).save_pretrained(str(root / name))
        shutil.copy(TOKENIZER, root / name / "tokenizer.json")
    rows = data.read_rows(GSM8K)[:56]
    with open(root / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(root / "pretrain.jsonl", "w") as f:  # MiniLLM's pretraining data: plain text and chats, other rows
        f.writelines(json.dumps({"text": r["question"]} if i % 2 else r) + "\n" for i, r in enumerate(data.read_rows(GSM8K)[56:90]))
    return root


def args(run_dir, out, **kw):
    a = dict(student=run_dir / "student", teacher_ft=run_dir / "teacher_ft", teacher_raw=run_dir / "teacher_raw",
             train_data=run_dir / "train.jsonl", out_dir=out, eval_size=8, max_len=160, batch_size=2, lr=3e-3,
             teacher_dtype="float32", chunk_size=128, quiet=True, eval_max_new_tokens=8, method="delta")
    a.update(kw)
    return [f"--{k}={v}" for k, v in a.items() if v is not None]  # None: the flag left out


def weights(ckpt):
    return load_file(os.path.join(ckpt, "model.safetensors"))


def test_training_writes_hf_checkpoints_metrics_and_eval(run_dir, tmp_path):
    scores = deltakd.train(deltakd.parse_args(args(run_dir, tmp_path, max_steps=4, save_every=1, keep_last=2)))
    assert set(scores) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "distinct", "repeated_4grams", "sound", "words",
                           "nll", "entropy", "kl_teacher", "top1_teacher"}
    ckpts = deltakd.checkpoints(str(tmp_path))
    assert [os.path.basename(c) for c in ckpts] == ["ckpt-0000003", "ckpt-0000004"]  # keep_last
    ours = qwen.Qwen.from_pretrained(ckpts[-1]).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(ckpts[-1]).eval()
    x = torch.randint(0, 151665, (1, 12))
    with torch.no_grad():
        assert (ours(x) - theirs(x).logits).abs().max() <= 1e-4
    assert not torch.equal(weights(ckpts[-1])["model.norm.weight"], weights(run_dir / "student")["model.norm.weight"])
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert all(math.isclose(m["loss"], 0.5 * m["sft"] + 0.5 * m["kd"], rel_tol=1e-6) for m in steps)
    # model FLOPs: the student's 6N and each frozen model's 2N per real token; no peak assumed on a CPU
    assert all(m["tflops_per_device"] > 0 and m["mfu"] is None for m in steps)
    assert metrics[-1]["eval"] == scores
    preds = [json.loads(line) for line in open(tmp_path / "eval-final.jsonl")]
    assert len(preds) == 8 and all(set(p) == {"prediction", "reference"} for p in preds)


def test_the_evaluation_teacher_is_read_once_per_run(run_dir, tmp_path, monkeypatch):
    # sft's loss reads no teacher; a given --teacher_ft adds the teacher-forced KL to every evaluation, and
    # is read from disk once per run, not once per --eval_every
    loads, real = [], qwen.Qwen.from_pretrained.__func__
    monkeypatch.setattr(qwen.Qwen, "from_pretrained",
                        classmethod(lambda cls, path, **kw: loads.append(str(path)) or real(cls, path, **kw)))
    scores = deltakd.train(deltakd.parse_args(args(run_dir, tmp_path, method="sft", max_steps=3, eval_every=1)))
    evals = [json.loads(line)["eval"] for line in open(tmp_path / "metrics.jsonl") if '"eval"' in line]
    assert len(evals) == 3 and all("kl_teacher" in e for e in evals) and evals[-1] == scores
    assert loads.count(str(run_dir / "teacher_ft")) == 1


def test_eval_only_scores_a_checkpoint_as_its_training_run_did_and_needs_no_training_data(run_dir, tmp_path, capsys):
    (tmp_path / "eval.jsonl").write_text("".join(open(run_dir / "train.jsonl").readlines()[:6]))
    common = dict(eval_data=tmp_path / "eval.jsonl", eval_size=None, eval_temperature=1, eval_seeds=2)
    trained = deltakd.train(deltakd.parse_args(args(run_dir, tmp_path / "run", max_steps=2, method="fkl", max_len=96,
                                                    eval_max_new_tokens=6, eval_batch_size=3, seed=7, **common)))
    ckpt = deltakd.checkpoints(str(tmp_path / "run"))[-1]
    # the default method is Delta-KD, yet no raw model (here a path that does not exist) and no training data
    # is needed: only the model scored and the finetuned teacher of the teacher-forced KL. What the scores depend
    # on (the held-out file, max_len, the teacher, the generation settings, the seed) comes from the checkpoint's
    # run.json: none of it is given here
    own = dict(teacher_ft=None, max_len=None, eval_max_new_tokens=None, eval_size=None, quiet=False)
    scored = deltakd.train(deltakd.parse_args(args(run_dir, tmp_path / "eval", student=ckpt, eval_only=True,
                                                   train_data="", teacher_raw=tmp_path / "missing", **own)))
    assert scored == trained and "kl_teacher" in scored
    for f in ("eval-final.jsonl", "eval-final-sampled.jsonl"):
        assert (tmp_path / "run" / f).read_text() == (tmp_path / "eval" / f).read_text()
    assert not deltakd.checkpoints(str(tmp_path / "eval"))
    taken = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("--eval_only: from"))
    assert f"--eval_data={tmp_path / 'eval.jsonl'}" in taken and "--max_len=96" in taken and "--seed=7" in taken
    # a flag given overrides it
    cfg = deltakd.parse_args(args(run_dir, tmp_path / "eval", student=ckpt, eval_only=True, eval_max_new_tokens=3,
                                        eval_size=None))
    assert (cfg.eval_max_new_tokens, cfg.max_len, cfg.eval_seeds) == (3, 160, 2)
    with pytest.raises(SystemExit, match="--eval_only needs --eval_data"):  # a model that is not a checkpoint
        deltakd.train(deltakd.parse_args(args(run_dir, tmp_path / "eval", student=run_dir / "student",
                                              eval_only=True)))
    # into the training run's out_dir (or an earlier evaluation's): refused, its files untouched
    before = {f: (tmp_path / "run" / f).read_bytes() for f in ("metrics.jsonl", "eval-final.jsonl")}
    for out in ("run", "eval"):
        r = cli(run_dir, tmp_path / out, student=ckpt, eval_only=True, train_data="", **common)
        one_line_error(r, f"--eval_only: --out_dir={tmp_path / out} holds a run's metrics.jsonl")
    assert before == {f: (tmp_path / "run" / f).read_bytes() for f in ("metrics.jsonl", "eval-final.jsonl")}


def test_teacher_forced_scores_equal_a_per_example_float64_reference(run_dir, tokenizer):
    # batched, right-padded and chunked in the code; here one example at a time, full logits, float64
    cfg = deltakd.parse_args(args(run_dir, "unused", eval_batch_size=3, chunk_size=7, max_len=1024))  # no truncation
    rows = data.read_rows(GSM8K)[100:107]
    examples, run = data.eval_examples(rows, tokenizer, cfg.max_len, cfg.system_prompt), run_of(cfg)
    student, teacher = (qwen.Qwen.from_pretrained(str(run_dir / n)).eval() for n in ("student", "teacher_ft"))
    got = deltakd.forced_scores(run, student, teacher, examples)
    nll = kl = agree = entropy = n = 0.0
    for r in rows:
        text = data.render_chat(data.first_exchange(r), cfg.system_prompt)
        assert text.endswith("<|im_end|>\n")
        text = text[:-1]  # supervised: the answer and its <|im_end|>, not the newline after it
        prompt = data.render_chat(data.first_exchange(r)[:-1], cfg.system_prompt, add_generation_prompt=True)
        ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False).ids])
        start = len(tokenizer.encode(prompt, add_special_tokens=False).ids)  # the answer's first token
        with torch.no_grad():
            zq, zp = (m(ids)[0, start - 1:-1, :151665].double() for m in (student, teacher))
        y = ids[0, start:]
        logq, logp = zq.log_softmax(-1), zp.log_softmax(-1)
        nll += -logq.gather(1, y[:, None]).sum().item()
        entropy += -(logq.exp() * logq).sum().item()
        kl += (logp.exp() * (logp - logq)).sum().item()
        agree += (zq.argmax(-1) == zp.argmax(-1)).sum().item()
        n += len(y)
    assert math.isclose(got["nll"], nll / n, rel_tol=1e-5) and math.isclose(got["kl_teacher"], kl / n, rel_tol=1e-4)
    assert math.isclose(got["entropy"], entropy / n, rel_tol=1e-5)
    assert got["top1_teacher"] == agree / n
    itself = deltakd.forced_scores(run, teacher, teacher, examples)
    assert itself["top1_teacher"] == 1.0 and abs(itself["kl_teacher"]) < 1e-6
    assert set(deltakd.forced_scores(run, student, None, examples)) == {"nll", "entropy"}


def test_sampled_evaluation_is_scored_beside_greedy_and_reproducible_per_seed(run_dir, tmp_path):
    def run(out, **kw):
        return deltakd.train(deltakd.parse_args(args(run_dir, tmp_path / out, max_steps=1, method="sft", **kw)))
    a = run("a", eval_temperature=1.0, eval_seeds=2)
    b = run("b", eval_temperature=1.0, eval_seeds=2)
    assert a == b and {"rougeL", "sampled_rougeL", "sampled_rouge1"} <= set(a)
    sampled = [json.loads(line) for line in open(tmp_path / "a" / "eval-final-sampled.jsonl")]
    assert [s["seed"] for s in sampled] == [1337] * 8 + [1338] * 8
    assert [s["prediction"] for s in sampled[:8]] != [s["prediction"] for s in sampled[8:]]  # the seeds differ
    greedy = [json.loads(line)["prediction"] for line in open(tmp_path / "a" / "eval-final.jsonl")]
    assert greedy != [s["prediction"] for s in sampled[:8]]
    for bad in (["--eval_seeds=3"], ["--eval_temperature=-1"], ["--eval_temperature=1", "--eval_seeds=0"]):
        with pytest.raises(SystemExit, match="--eval_seeds=3 has no effect: it goes with --eval_temperature > 0|"
                                              "--eval_temperature=-1.0: must be 0 .greedy. or >= 0.001|--eval_seeds=0: must be >= 1"):
            deltakd.parse_args(bad)


def test_demo_task_asks_for_the_question_sentence_of_the_problems_last_sentences():
    row = {"question": "Ann has 3 cats.  She buys 2 more!\nEach eats 1 can a day. How many cans do\tthey eat in "
                       "a week?", "answer": "#### 35"}
    user, assistant = demo.demo_task(row)["messages"]
    assert user == {"role": "user", "content": demo.TASK_INSTRUCTION + "She buys 2 more! Each eats 1 can a day. "
                                                                          "How many cans do they eat in a week?"}
    assert assistant == {"role": "assistant", "content": "How many cans do they eat in a week?"}


def test_trivial_baselines_answer_the_most_frequent_answer_and_the_nearest_problems_answer():
    rows = lambda pairs: [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}  # noqa
                          for q, a in pairs]
    train = rows([("how many apples does tom have", "A"), ("what is the price of milk", "B"),
                  ("how many cats are there", "A")])
    got = demo.trivial_baselines(train, rows([("the price of bread", "?"), ("how many dogs are there", "?")]))
    assert got == {"most frequent answer": ["A", "A"], "nearest training answer": ["B", "A"]}


def test_checkpoints_carry_a_tokenizer_whose_chat_template_renders_exactly_ours(run_dir, tmp_path, tokenizer):
    deltakd.train(deltakd.parse_args(args(run_dir, tmp_path / "run", max_steps=1, eval_size=0)))
    ckpt = deltakd.checkpoints(str(tmp_path / "run"))[-1]
    custom = tmp_path / "custom"
    custom.mkdir()
    odd = "Answer in 'one' line \\ no more."  # quotes and a backslash inside the template's string literal
    data.write_tokenizer_files(str(custom), TOKENIZER, odd)
    rows = data.read_rows(ULTRACHAT)[:20] + [{"messages": [{"role": "system", "content": "Be brief."},
                                                          {"role": "user", "content": "u"},
                                                          {"role": "assistant", "content": "a"}]}]
    for directory, system in ((ckpt, data.SYSTEM_PROMPT_BASE), (str(custom), odd)):
        hf = transformers.AutoTokenizer.from_pretrained(directory)
        for row in rows:
            msgs = data.to_messages(row)
            assert hf.apply_chat_template(msgs, tokenize=False) == data.render_chat(msgs, system)
            first = msgs[:2] if msgs[0]["role"] == "system" else msgs[:1]
            assert hf.apply_chat_template(first, tokenize=False, add_generation_prompt=True) == data.render_chat(
                first, system, add_generation_prompt=True)
        text = data.render_chat(data.to_messages(rows[0]), system)
        assert hf(text, add_special_tokens=False).input_ids == tokenizer.encode(text, add_special_tokens=False).ids
    gen = transformers.GenerationConfig.from_pretrained(ckpt)
    assert gen.eos_token_id == [151645, 151643] and gen.pad_token_id == 151643 and not gen.do_sample


def test_bf16_autocast_on_cpu_chunked_equals_dense_and_trains_finite(run_dir, tmp_path):
    # the bf16 logits are the same matmul in both paths, so the losses agree to fp32 rounding; the gradient
    # dloss/dz is rounded to bf16 (8 mantissa bits, 3.9e-3 relative) before its matmuls in both paths but
    # at different points (autograd's dlogits vs the chunk's dz), so gradients agree to 1e-2 (measured
    # 5.5e-3), where a formula error (a lost 1/tau here: tau = 2) is off by 50% or more
    for method in ("fkl", "delta", "delta-rkl"):
        h, W, labels, teachers, spec = loss_inputs(method)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            dense = run_loss(h, W, labels, teachers, replace(spec, impl="dense"))
            chunked = run_loss(h, W, labels, teachers, spec)
        for i, (a, b) in enumerate(zip(chunked, dense)):
            assert (a.float() - b.float()).abs().max() <= (1e-5 if i < 3 else 1e-2) * b.float().abs().max()
    deltakd.train(deltakd.parse_args(args(run_dir, tmp_path, max_steps=3, eval_size=0, autocast="bf16")))
    steps = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert len(steps) == 3 and all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in steps)


def test_compiled_training_gives_the_losses_of_eager_training(run_dir, tmp_path):
    common = dict(max_steps=3, eval_size=0, cache_dir=tmp_path / "cache")
    deltakd.train(deltakd.parse_args(args(run_dir, tmp_path / "eager", **common)))
    deltakd.train(deltakd.parse_args(args(run_dir, tmp_path / "compiled", compile=True, **common)))
    losses = lambda d: [json.loads(x)["loss"] for x in open(d / "metrics.jsonl")]  # noqa: E731
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    # inductor fuses and reorders fp32 arithmetic: equal to ~1e-6; padding to 64 changes nothing real
    assert len(compiled) == 3 and all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(eager, compiled))


@pytest.mark.parametrize("stored", [False, True])
def test_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(run_dir, tmp_path, stored):
    common = dict(max_steps=8, save_every=2, keep_last=10, eval_size=0)
    if stored:
        common.update(targets_dir=tmp_path / "targets", topk=8, targets_shard=16)
    deltakd.train(deltakd.parse_args(args(run_dir, tmp_path / "straight", **common)))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "deltakd.py", *args(run_dir, killed, **common)], cwd=HERE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not deltakd.checkpoints(str(killed)) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    survived = deltakd.checkpoints(str(killed))
    assert survived and survived[-1] < str(killed / "ckpt-0000008"), proc.stderr.read()[-2000:]
    deltakd.train(deltakd.parse_args(args(run_dir, killed, resume=True, **common)))
    a, b = weights(tmp_path / "straight" / "ckpt-0000008"), weights(killed / "ckpt-0000008")
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda d: [json.loads(x)["loss"] for x in open(d / "metrics.jsonl")][-2:]  # noqa: E731
    assert losses(tmp_path / "straight") == losses(killed)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one_thread(argv, nproc=0):
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"] if nproc else []
    return subprocess.run([sys.executable, *launcher, "deltakd.py", *argv], cwd=HERE, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)


@pytest.mark.parametrize("variant", ["ddp", "zero", "stored_targets", "bf16_autocast", "on_policy", "minillm"])
def test_two_process_torchrun_equals_one_process_with_the_same_global_batch(run_dir, tmp_path, variant):
    # both sides in child processes with one thread each (torchrun's default), so the fp32 reduction
    # order, and with it the result to the last bit, does not depend on this machine's thread count
    common = dict(max_steps=3, eval_size=8, eval_max_new_tokens=4, lr=1e-2, cache_dir=tmp_path / "cache")
    stored = lambda name: dict(targets_dir=tmp_path / name, topk=8, targets_shard=8) if variant == "stored_targets" else {}  # noqa: E731
    if variant == "bf16_autocast":
        common["autocast"] = "bf16"
    if variant == "on_policy":  # each rank samples its micro-batches with the seeds one rank would use
        common.update(on_policy=0.5, on_policy_max_new_tokens=8)
    if variant == "minillm":  # every micro-batch sampled; the advantages whitened over both ranks' samples
        common.update(method="minillm", on_policy_max_new_tokens=8)
    r = run_one_thread(args(run_dir, tmp_path / "two", grad_accum=1, zero=variant == "zero", **stored("t2"), **common),
                       nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    one = run_one_thread(args(run_dir, tmp_path / "one", grad_accum=2, **stored("t1"), **common))
    assert one.returncode == 0, one.stderr[-3000:]
    builds = [json.loads(x) for x in open(tmp_path / "cache" / "build.log")]
    assert len(builds) == 1  # the 2-rank run built the token cache once (rank 0), the 1-rank run found it
    if stored("t1"):  # the 2 ranks split the target pass's shards; the result equals one rank's, byte for byte
        assert same_files(tmp_path / "t1", tmp_path / "t2")
    a, b = weights(tmp_path / "one" / "ckpt-0000003"), weights(tmp_path / "two" / "ckpt-0000003")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    one = [json.loads(x) for x in open(tmp_path / "one" / "metrics.jsonl")]
    two = [json.loads(x) for x in open(tmp_path / "two" / "metrics.jsonl")]
    assert [m["supervised_tokens"] for m in one[:3]] == [m["supervised_tokens"] for m in two[:3]]
    if variant == "on_policy":
        assert [m["sampled"] for m in one[:3]] == [m["sampled"] for m in two[:3]] == [0.5, 0.5, 0.0]
    if variant == "minillm":  # the mean reward of the step's rollout batch, over both ranks
        assert all(math.isclose(a["reward"], b["reward"], rel_tol=1e-5, abs_tol=1e-7) for a, b in zip(one[:3], two[:3]))
    ev1, ev2 = one[-1]["eval"], two[-1]["eval"]
    forced = ("nll", "entropy", "kl_teacher", "top1_teacher")  # fp32 sums over another split and padding of examples
    assert {k: v for k, v in ev1.items() if k not in forced} == {k: v for k, v in ev2.items() if k not in forced}
    assert set(forced) <= set(ev1) and all(math.isclose(ev1[k], ev2[k], rel_tol=1e-5) for k in forced)


def same_files(a, b):
    # the files of two directories, byte for byte (but a run's .lock, which names its process)
    names = lambda d: sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d)  # noqa: E731
                             for f in fs if f != ".lock")
    return names(a) == names(b) and all(open(os.path.join(a, n), "rb").read() == open(os.path.join(b, n), "rb").read()
                                        for n in names(a))


def test_target_pass_resumes_after_a_kill_without_redoing_shards_and_equals_an_uninterrupted_pass(run_dir, tmp_path):
    common = dict(topk=8, targets_shard=4, targets_only=True, eval_size=8, cache_dir=tmp_path / "cache")
    deltakd.train(deltakd.parse_args(args(run_dir, tmp_path / "o1", targets_dir=tmp_path / "straight", **common)))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "deltakd.py", *args(run_dir, tmp_path / "o2", targets_dir=killed, **common)],
                            cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (killed / "shard-00001").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shards = sorted(d for d in os.listdir(killed) if d.startswith("shard-"))
    assert shards, proc.stderr.read()[-2000:]
    # damage one finished shard (a disk that filled up) and leave a half-written one behind
    with open(killed / "shard-00000" / "logp.bin", "r+b") as f:
        f.truncate(10)
    (killed / ".tmp-shard-00013-x").mkdir(exist_ok=True)
    (killed / ".tmp-shard-00013-x" / "ids.bin").write_bytes(b"junk")
    kept = {s: os.stat(killed / s / "ids.bin").st_mtime_ns for s in shards if s != "shard-00000"}
    deltakd.train(deltakd.parse_args(args(run_dir, tmp_path / "o2", targets_dir=killed, **common)))
    assert all(os.stat(killed / s / "ids.bin").st_mtime_ns == m for s, m in kept.items())  # not redone
    shutil.rmtree(killed / ".tmp-shard-00013-x")
    assert same_files(tmp_path / "straight", killed)  # 14 shards, byte for byte


def test_the_target_pass_alone_writes_only_into_its_store(run_dir, tmp_path):
    # no --out_dir: its lock and token cache go into --targets_dir, nothing into the working directory's ./out
    argv = [a for a in args(run_dir, tmp_path, targets_dir=tmp_path / "targets", targets_only=True, topk=8, eval_size=8)
            if not a.startswith("--out_dir=")]
    r = subprocess.run([sys.executable, os.path.join(HERE, "deltakd.py"), *argv], cwd=tmp_path, capture_output=True,
                       text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.listdir(tmp_path) == ["targets"] and {".lock", "cache", "key.json"} <= set(os.listdir(tmp_path / "targets"))


def test_training_with_stored_targets_loads_no_frozen_model_and_refuses_a_foreign_store(run_dir, tmp_path, monkeypatch):
    common = dict(topk=8, targets_shard=16, eval_size=8, max_steps=3, targets_dir=tmp_path / "targets")
    deltakd.train(deltakd.parse_args(args(run_dir, tmp_path / "pass", targets_only=True, **common)))
    assert not deltakd.checkpoints(str(tmp_path / "pass"))  # the pass alone trains nothing
    monkeypatch.setattr(deltakd, "load_frozen", lambda *a: pytest.fail("a frozen model was loaded"))
    deltakd.train(deltakd.parse_args(args(run_dir, tmp_path / "train", **common)))
    steps = [json.loads(x) for x in open(tmp_path / "train" / "metrics.jsonl") if '"loss"' in x]
    assert len(steps) == 3 and all(math.isclose(m["loss"], 0.5 * m["sft"] + 0.5 * m["kd"], rel_tol=1e-6) for m in steps)
    for change, name in ((dict(alpha=0.5), "alpha"), (dict(topk=16), "topk"), (dict(max_len=120), "tokens.max_len")):
        with pytest.raises(SystemExit, match=rf"holds targets for another run \(differs in: .*{name}"):
            deltakd.train(deltakd.parse_args(args(run_dir, tmp_path / "train2", **{**common, **change})))
    # fkl and rkl read the same target (the finetuned teacher): one store serves both
    monkeypatch.undo()
    fkl = dict(common, targets_dir=tmp_path / "ft")
    deltakd.train(deltakd.parse_args(args(run_dir, tmp_path / "fkl", method="fkl", **fkl)))
    deltakd.train(deltakd.parse_args(args(run_dir, tmp_path / "rkl", method="rkl", **fkl)))


def test_delta_at_alpha_zero_reads_no_raw_model_and_trains_exactly_as_forward_kl(run_dir, tmp_path):
    # the raw models' weight in the target is 0: a --teacher_raw that does not exist is never opened
    common = dict(max_steps=3, eval_size=0)
    cfg = deltakd.parse_args(args(run_dir, tmp_path / "delta", alpha=0.0, teacher_raw=tmp_path / "absent", **common))
    assert set(deltakd.frozen_dirs(cfg)) == {"teacher_ft"}
    deltakd.train(cfg)
    deltakd.train(deltakd.parse_args(args(run_dir, tmp_path / "fkl", method="fkl", **common)))
    delta, fkl = (weights(deltakd.checkpoints(str(tmp_path / d))[-1]) for d in ("delta", "fkl"))
    assert delta.keys() == fkl.keys() and all(torch.equal(delta[k], fkl[k]) for k in delta)
    assert set(deltakd.frozen_dirs(deltakd.parse_args(args(run_dir, tmp_path, alpha=0.5)))) == {
        "teacher_ft", "teacher_raw", "student_raw"}


def test_sigterm_to_a_two_rank_job_checkpoints_exits_cleanly_and_resumes_bit_exactly(run_dir, tmp_path):
    common = dict(max_steps=8, eval_size=0, lr=1e-2, cache_dir=tmp_path / "cache")
    r = run_one_thread(args(run_dir, tmp_path / "straight", **common), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "preempted"
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    proc = subprocess.Popen([sys.executable, *launcher, "deltakd.py", *args(run_dir, out, **common)], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and (
            not (out / "metrics.jsonl").exists() or len(open(out / "metrics.jsonl").readlines()) < 2):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM does: every process of the job
    log = proc.communicate(timeout=120)[0]
    saved = deltakd.checkpoints(str(out))
    assert saved and "SIGTERM: saved step" in log, log[-3000:]
    stopped = int(saved[-1][-7:])
    assert 2 <= stopped < 8 and len(open(out / "metrics.jsonl").readlines()) == stopped
    r = run_one_thread(args(run_dir, out, resume=True, **common), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = weights(tmp_path / "straight" / "ckpt-0000008"), weights(out / "ckpt-0000008")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_rank_jobs_exit_0_without_the_interpreters_shutdown_and_a_refusal_keeps_its_line(run_dir, tmp_path):
    # the rare abort at exit: `python bench.py exits` runs each of its recipes 30 times (docs/benchmarks.md), here once
    import bench
    rows = bench.bench_exits(runs=1)
    assert [r.result.split(" (")[0] for r in rows] == ["1 of 1"] * len(bench.EXIT_RECIPES), rows
    # a refusal after the process group is up (deltakd.leave): its line from every rank, exit status 1
    r = run_one_thread(args(run_dir, tmp_path / "out", train_data=tmp_path / "missing.jsonl"), nproc=2)
    assert r.returncode != 0 and r.stderr.count(f"--train_data={tmp_path / 'missing.jsonl'}: no such file") == 2, \
        r.stderr[-3000:]


def test_dry_run_plans_the_paper_run_from_the_configs_alone(capsys, monkeypatch):
    A = os.path.join(ASSETS, "qwen2.5")
    argv = [f"--student={A}/Qwen2.5-1.5B", f"--teacher_ft={A}/Qwen2.5-7B-Instruct", f"--teacher_raw={A}/Qwen2.5-7B",
            "--max_len=2048", "--batch_size=4", "--grad_checkpointing=true", "--device=cuda", "--dry_run=true"]
    n_s, n_t = 1_543_714_304, 7_615_616_512
    plan = [b for _, b in deltakd.dry_run(deltakd.parse_args(argv))]
    assert plan[:6] == [4 * n_s, 4 * n_s, 8 * n_s, 2 * n_t, 2 * n_t, 2 * n_s]
    assert 62e9 < sum(plan) < 63e9  # the README's table: 62.7 GB per GPU without ZeRO
    monkeypatch.setenv("WORLD_SIZE", "8")
    zero = [b for _, b in deltakd.dry_run(deltakd.parse_args(argv + ["--zero=true"]))]
    assert zero[2] == 8 * n_s // 8 and 51e9 < sum(zero) < 52e9  # 51.9 GB with ZeRO over 8 ranks
    stored = [b for _, b in deltakd.dry_run(deltakd.parse_args(argv + ["--zero=true", "--targets_dir=x"]))]
    assert len(stored) == len(zero) - 3 and 18e9 < sum(stored) < 19e9  # 18.3 GB: no frozen model
    assert "model FLOPs per optimizer step" in capsys.readouterr().out


DRY_RUN_CHILD = """
import json, os, sys, torch, deltakd, qwen, data
cfg = deltakd.parse_args(sys.argv[1:])
configs = {"student": qwen.QwenConfig.from_json(os.path.join(cfg.student, "config.json")),
           "teacher_ft": qwen.QwenConfig.from_json(os.path.join(cfg.teacher_ft, "config.json"))}
plan = sum(b for _, b in deltakd.memory_plan(cfg, configs, 1))
open("/proc/self/clear_refs", "w").write("5")
rss = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
base = rss("VmRSS:")
tok = deltakd.Tokenizer.from_file(os.path.join("assets", "qwen2.5", "tokenizer.json"))
run = deltakd.Run(cfg, 0, 1, torch.device("cpu"), tok, "", deltakd.loss_spec(cfg, 151665))
student = deltakd.build_student(run)
frozen = deltakd.load_frozen(run)
ids = torch.randint(0, 151665, (cfg.batch_size, cfg.max_len), generator=torch.Generator().manual_seed(0))
for _ in range(2):  # the second step holds AdamW's state too
    h = student.model(ids, return_hidden=True)
    loss, _, _, n = deltakd.distill_loss(h, student.model.lm_head.weight, ids, deltakd.frozen_hidden_states(frozen, ids), run.spec)
    (loss / n).backward()
    student.optimizer.step()
    student.optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as the plan counts them
print(json.dumps({"plan": plan, "peak": rss("VmHWM:") - base}))
"""


def test_dry_run_plan_is_within_20_percent_of_a_measured_cpu_step(tmp_path):
    # a scaled-down run whose every plan item is measurable here: 42M-parameter student, same-size
    # fp32 teacher, 2 x 256 tokens; peak RSS above the process's own, after two optimizer steps
    for name, seed in (("student", 0), ("teacher", 1)):
        c = qwen.QwenConfig(vocab_size=151936, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=2)
        qwen.init_weights(qwen.Qwen(c), seed=seed).save_pretrained(str(tmp_path / name))
    r = subprocess.run([sys.executable, "-c", DRY_RUN_CHILD, f"--student={tmp_path / 'student'}",
                        f"--teacher_ft={tmp_path / 'teacher'}", "--method=fkl", "--teacher_dtype=float32",
                        "--batch_size=2", "--max_len=256", "--chunk_size=256", "--device=cpu", "--autocast=none"],
                       cwd=HERE, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert abs(m["peak"] / m["plan"] - 1) <= 0.2, m


def test_bad_inputs_stop_before_the_first_step_with_a_message(run_dir, tmp_path):
    def fails(match, **kw):
        with pytest.raises(SystemExit, match=match):
            deltakd.train(deltakd.parse_args(args(run_dir, tmp_path / "out", **kw)))
        assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")
    fails("--teacher_raw=/nowhere: no config.json", teacher_raw="/nowhere")
    fails("--method=fkl needs --teacher_ft", method="fkl", teacher_ft="")
    # a teacher with another tokenizer
    other = tmp_path / "other_tok"
    shutil.copytree(run_dir / "teacher_ft", other)
    tok = json.load(open(TOKENIZER))
    tok["added_tokens"][0]["content"] = "<|something_else|>"
    json.dump(tok, open(other / "tokenizer.json", "w"))
    fails(r"tokenizer mismatch: .*other_tok/tokenizer.json \(--teacher_ft\) differs from", teacher_ft=other)
    small = tmp_path / "small_vocab"
    shutil.copytree(run_dir / "student", small)
    cfg = json.load(open(small / "config.json"))
    cfg["vocab_size"] = 1000
    json.dump(cfg, open(small / "config.json", "w"))
    fails("vocab_size 1000 is smaller than the tokenizer's 151665", student_raw=small)
    fails("no example has a supervised", max_len=40)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="is not writable"):
        deltakd.train(deltakd.parse_args(args(run_dir, blocker / "out")))


def test_a_model_with_non_finite_weights_is_refused_naming_its_file_and_tensor(run_dir, tmp_path):
    # a NaN student sampling on-policy or scored alone, a NaN teacher mixed into MiniLLM's sampling: refused when
    # loaded, before a sample or a score (no torch.multinomial traceback, no "nll nan" with exit 0)
    key = "model.layers.0.mlp.up_proj.weight"
    for role in ("student", "teacher_ft"):
        shutil.copytree(run_dir / role, tmp_path / role)
        w = weights(tmp_path / role)
        w[key][0, 0] = float("nan")
        save_file(w, tmp_path / role / "model.safetensors", metadata={"format": "pt"})
    for role, kw in (("student", dict(method="fkl", on_policy=1)), ("teacher_ft", dict(method="minillm")),
                     ("student", dict(eval_only=True, eval_data=run_dir / "train.jsonl", eval_size=None))):
        r = cli(run_dir, tmp_path / "out", **{**kw, role: tmp_path / role, "teacher_raw": None, "max_steps": 1})
        one_line_error(r, f"{tmp_path / role / 'model.safetensors'}: {key} holds non-finite values (NaN or inf)")


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(run_dir, tmp_path):
    deltakd.train(deltakd.parse_args(args(run_dir, tmp_path, max_steps=2, eval_size=0)))
    before = weights(tmp_path / "ckpt-0000002")
    # an absurd learning rate: step 3's update overflows the weights, step 4's loss is not finite
    with pytest.raises(SystemExit, match=r"non-finite (loss|gradient norm) at step [34].*: the newest checkpoint, "
                                         r".*ckpt-0000002, is intact"):
        deltakd.train(deltakd.parse_args(args(run_dir, tmp_path, max_steps=8, save_every=4, resume=True, lr=1e38,
                                              eval_size=0, grad_clip=0)))
    assert [os.path.basename(c) for c in deltakd.checkpoints(str(tmp_path))] == ["ckpt-0000002"]
    after = weights(tmp_path / "ckpt-0000002")
    assert all(torch.equal(before[k], after[k]) for k in before)


def cli(run_dir, out, *extra, preamble="", **kw):
    """deltakd's command line, as a user runs it (one thread, so runs compare to the last bit); with a
    preamble, `python -c` runs it first and then deltakd.main."""
    argv = args(run_dir, out, **kw) + list(extra)
    cmd = ["-c", f"{preamble}\nimport sys, deltakd; deltakd.main(sys.argv[1:])"] if preamble else ["deltakd.py"]
    return subprocess.run([sys.executable, *cmd, *argv], cwd=HERE, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)


def one_line_error(r, *pieces):
    # a refused run: exit status 1, no traceback, one line on stderr holding every piece
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert all(p in lines[0] for p in pieces), (pieces, lines[0])
    return lines[0]


def steps_logged(out):
    return [json.loads(x)["step"] for x in open(out / "metrics.jsonl") if "loss" in json.loads(x)]


def test_help_lists_every_flag_with_its_default_and_meaning_grouped_as_config():
    r = subprocess.run([sys.executable, "deltakd.py", "--help"], cwd=HERE, capture_output=True, text=True, timeout=60)
    flags = [line for line in r.stdout.splitlines() if line.startswith("  --")]
    assert r.returncode == 0 and [f.split("=")[0].strip() for f in flags] == \
        [f"--{f.name}" for f in deltakd.dataclasses.fields(deltakd.Config)]
    for f, field in zip(flags, deltakd.dataclasses.fields(deltakd.Config)):  # each with its one line of meaning
        assert f.startswith(f"  --{field.name}={field.default} ") and f.removeprefix(f"  --{field.name}={field.default}").strip()
    assert "\n  --lam=0.5" in r.stdout and "\n\nmethod (METHODS fixes some" in r.stdout


def test_out_of_range_flags_are_refused_before_any_work(run_dir, tmp_path):
    for flag, text in [("--batch_size=0", "must be >= 1"), ("--grad_accum=0", "must be >= 1"),
                       ("--topk=0", "must be >= 1"), ("--max_steps=-1", "must be >= 0"),
                       ("--alpha=-0.5", "must be >= 0"), ("--lr=nan", "must be > 0"), ("--lam=1.5", "in [0, 1]"),
                       ("--resume_allow=bogus", "bogus not among"), ("--seed=-1", "must be in [0, 2**32)"),
                       ("--seed=4294967296", "in [0, 2**32)"), ("--temperature=1e-40", "must be >= 0.001"),
                       ("--eval_temperature=1e-40", "0 (greedy) or >= 0.001"),
                       ("--on_policy_temperature=1e-9", "0 (greedy) or >= 0.001"),
                       ("--zero=true", "across torchrun's processes; one process has nothing to shard")]:
        with pytest.raises(SystemExit, match=re.escape(text)):
            deltakd.parse_args([flag, "--on_policy=0.5"])
    one_line_error(cli(run_dir, tmp_path / "out", batch_size=0), "--batch_size=0: must be >= 1")
    one_line_error(cli(run_dir, tmp_path / "out", seed=-1), "--seed=-1: must be in [0, 2**32)")
    # the smallest temperatures accepted work: the KD term at tau 0.001, on the student's samples at 0.001
    r = cli(run_dir, tmp_path / "cold", method="fkl", teacher_raw=None, temperature=0.001, on_policy=1,
            on_policy_temperature=0.001, on_policy_max_new_tokens=4, max_steps=1, eval_size=0)
    assert r.returncode == 0 and math.isfinite(json.loads(open(tmp_path / "cold" / "metrics.jsonl").readline())["loss"])
    shutil.rmtree(tmp_path / "cold")
    assert not (tmp_path / "out").exists()
    (tmp_path / "tokenizer.json").write_text('{"model": ')  # a cut tokenizer.json: named, not the library's traceback
    one_line_error(cli(run_dir, tmp_path / "out", tokenizer=tmp_path / "tokenizer.json"),
                   f"{tmp_path / 'tokenizer.json'}: not a tokenizer.json the tokenizers library reads")


def test_damaged_model_files_stop_the_run_in_one_line_before_the_data_is_tokenized(run_dir, tmp_path):
    bad, out = tmp_path / "teacher", tmp_path / "out"
    shutil.copytree(run_dir / "teacher_ft", bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(bad / "model.safetensors") - 1000)
    one_line_error(cli(run_dir, out, teacher_ft=bad), f"{bad / 'model.safetensors'}: truncated")
    assert not (out / "cache").exists()
    (bad / "config.json").write_text('{"model_type": "qwen2",')
    one_line_error(cli(run_dir, out, teacher_ft=bad), f"{bad / 'config.json'}: not valid JSON")
    # a model that was trained on fewer positions than --max_len (the args' 160)
    short = tmp_path / "short"
    shutil.copytree(run_dir / "teacher_raw", short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 100}))
    one_line_error(cli(run_dir, out, teacher_raw=short), f"--max_len=160 is beyond --teacher_raw={short}'s "
                   "max_position_embeddings 100 (its config.json)")
    assert not (out / "cache").exists()


def test_damaged_caches_and_shards_are_rebuilt_with_a_message(run_dir, tmp_path):
    common = dict(targets_dir=tmp_path / "targets", topk=8, targets_shard=16, targets_only=True, eval_size=8,
                  cache_dir=tmp_path / "cache", quiet=False)
    assert cli(run_dir, tmp_path / "o1", **common).returncode == 0
    shutil.copytree(tmp_path / "targets", tmp_path / "intact")
    (cache,) = (tmp_path / "cache").glob("tokens-*")
    flip(cache / "input_ids.bin", 4 * 100)  # one token, in place: the same size
    flip(tmp_path / "targets" / "shard-00001" / "logp.bin", 40)
    r = cli(run_dir, tmp_path / "o2", **common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"token cache {cache}: input_ids.bin fails its checksum (changed after it was written); rebuilding it" \
        in r.stdout, r.stdout
    assert f"targets: {tmp_path / 'targets' / 'shard-00001'}: logp.bin fails its checksum (changed after it was " \
           "written); computing it again" in r.stdout, r.stdout
    assert "shard-00000" not in r.stdout and same_files(tmp_path / "targets", tmp_path / "intact")
    # two ranks: rank 1 owns shard 1; rank 0 must not take the damaged one as complete while it is recomputed
    flip(tmp_path / "targets" / "shard-00001" / "ids.bin", 8)
    r = run_one_thread(args(run_dir, tmp_path / "o3", **common), nproc=2)
    assert r.returncode == 0 and "shard-00001: ids.bin fails its checksum" in r.stdout + r.stderr, r.stderr[-3000:]
    assert same_files(tmp_path / "targets", tmp_path / "intact")


def test_bad_rows_are_named_by_file_and_line_and_skipped_with_skip_bad_rows(run_dir, tmp_path):
    lines = open(run_dir / "train.jsonl").read().splitlines()
    lines[4] = lines[4][:-9]  # line 5 cut short
    lines.insert(2, "")  # blank lines are no rows: editors count them, so the message does too
    bad = tmp_path / "train.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    one_line_error(cli(run_dir, tmp_path / "o1", train_data=bad, max_steps=1), f"{bad}:6: malformed JSON line")
    r = cli(run_dir, tmp_path / "o2", train_data=bad, max_steps=1, skip_bad_rows=True, quiet=False)
    assert r.returncode == 0 and f"skipped 1 bad row(s) (--skip_bad_rows=true); the first: {bad}:6: malformed " \
        "JSON line" in r.stdout, r.stdout + r.stderr[-3000:]


def test_a_resumed_run_is_the_same_run_bit_exact_and_a_damaged_newest_checkpoint_is_skipped(run_dir, tmp_path):
    common = dict(max_steps=4, save_every=2, keep_last=3, eval_size=0, cache_dir=tmp_path / "cache")
    r = cli(run_dir, tmp_path / "straight", resume=True, **common)  # --resume=true at a first launch: said, step 0
    assert r.returncode == 0 and f"resume: no checkpoint in --out_dir={tmp_path / 'straight'}; starting at step 0" in r.stdout
    out = tmp_path / "run"
    assert cli(run_dir, out, **dict(common, save_every=1)).returncode == 0  # ckpt-2, 3 and 4 kept
    # what defines the run may not change: each differing key is named
    # (an sft run also reads no raw model and no alpha, and fixes lam at 1: the run's settings as resolve made them)
    one_line_error(cli(run_dir, out, resume=True, method="sft", batch_size=4, **common),
                   "differs from the one in", "method ('delta' -> 'sft')", "batch_size (2 -> 4)", "lam (0.5 -> 1.0)",
                   "alpha (1.0 -> None)", "--resume_allow=alpha,batch_size,divergence,lam,method,models_content,student_raw,"
                   "teacher_raw,temperature ")
    for key, value in (("seed", 7), ("alpha", 0.5), ("max_len", 128), ("grad_accum", 2), ("temperature", 2.0),
                       ("train_data", shutil.copy(run_dir / "train.jsonl", tmp_path / "moved.jsonl"))):
        line = one_line_error(cli(run_dir, out, resume=True, **{**common, key: value}), "differs from the one in")
        assert line.count(" -> ") == 1 and ("micro_batches_per_step" if key == "grad_accum" else key) in line
        assert ("--grad_accum=1 keeps its global batch on 1 process(es)" in line) == (key == "grad_accum")
    # another teacher's weights in the same directory: the same path, another run
    swapped = tmp_path / "teacher_ft"
    shutil.copytree(run_dir / "teacher_ft", swapped)
    r = cli(run_dir, tmp_path / "swap", teacher_ft=swapped, **dict(common, max_steps=2))
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.copy(run_dir / "teacher_raw" / "model.safetensors", swapped / "model.safetensors")  # same shapes
    one_line_error(cli(run_dir, tmp_path / "swap", resume=True, teacher_ft=swapped, **common),
                   "models_content.teacher_ft.model.safetensors.sha256_ends")
    changed = tmp_path / "train.jsonl"  # other data, under any name
    changed.write_text(open(run_dir / "train.jsonl").read() + json.dumps(data.read_rows(GSM8K)[60]) + "\n")
    one_line_error(cli(run_dir, out, resume=True, train_data=changed, **common), "train_data_content.size")
    one_line_error(cli(run_dir, out, **common), "holds checkpoints of an earlier run", "--resume=true")
    # the newest checkpoint, step 4, is cut short, step 3's weights have a changed byte, and a killed save left
    # a partial one: step 2 it is, bit-exactly, and the damaged two are set aside (not pruned, not named intact)
    with open(out / "ckpt-0000004" / "trainer_state.pt", "r+b") as f:
        f.truncate(1000)
    flip(out / "ckpt-0000003" / "model.safetensors", 5000)
    (out / ".tmp-ckpt-0000005-x").mkdir()
    (out / ".tmp-ckpt-0000005-x" / "model.safetensors").write_bytes(b"0" * 4096)
    r = cli(run_dir, out, "--quiet=false", resume=True, **common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "removed 1 partial checkpoint(s) left by a killed run" in r.stdout
    assert re.search(r"ckpt-0000004 is damaged \(trainer_state.pt has 1,000 bytes, [\d,]+ were written\); "
                     "trying the checkpoint before it", r.stdout), r.stdout
    assert "ckpt-0000003 is damaged (model.safetensors fails its checksum (changed after it was written))" in r.stdout
    assert len(list(out.glob("damaged-ckpt-000000[34]-*"))) == 2
    assert "ckpt-0000002 at step 2" in r.stdout and not list(out.glob(".tmp-*"))
    a, b = weights(tmp_path / "straight" / "ckpt-0000004"), weights(out / "ckpt-0000004")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert steps_logged(out) == [1, 2, 3, 4]  # the steps after the checkpoint are logged once, not again
    # the schedule may change (a finished run continued to a larger max_steps), and is named
    r = cli(run_dir, out, "--quiet=false", resume=True, **dict(common, max_steps=6, lr=1e-3))
    assert r.returncode == 0 and "the schedule changed (max_steps 4 -> 6, lr 0.003 -> 0.001)" in r.stdout, r.stdout
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]
    # a change the user names is accepted
    r = cli(run_dir, out, "--resume_allow=seed", resume=True, **dict(common, max_steps=7, lr=1e-3, seed=7))
    assert r.returncode == 0 and steps_logged(out) == [1, 2, 3, 4, 5, 6, 7], r.stderr[-3000:]
    # a checkpoint without its seal (an older deltakd wrote it) cannot be checked to be this run: one line
    os.remove(out / "ckpt-0000007" / "sealed.json")
    for resume in (True, False):
        one_line_error(cli(run_dir, out, resume=resume, **dict(common, max_steps=8)), "ckpt-0000007 has no sealed.json",
                       "an older deltakd wrote it")


def test_one_run_per_out_dir_and_a_dead_runs_lock_blocks_nothing(run_dir, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "deltakd.py", *args(run_dir, out, max_steps=10_000, eval_size=0)],
                             cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None and not (
            (out / ".lock").exists() and (out / ".lock").read_text()):
        time.sleep(0.02)
    one_line_error(cli(run_dir, out, max_steps=2, eval_size=0), "is in use by another run", f"pid {first.pid} on")
    first.kill()
    first.wait()
    r = cli(run_dir, out, max_steps=2, eval_size=0)  # the dead run's lock file is still there, its lock is not
    assert r.returncode == 0, r.stderr[-3000:]


def test_ctrl_c_finishes_the_step_and_checkpoints_and_a_second_one_stops_at_once(run_dir, tmp_path):
    # each checkpoint made 2 s slower, so that the second Ctrl-C surely lands before the first one's is written
    slow = ("import time, deltakd; save = deltakd.save_checkpoint; "
            "deltakd.save_checkpoint = lambda *a: (time.sleep(2), save(*a))[1]")

    def interrupted(out, signals):
        code = f"{slow}\nimport sys; deltakd.main(sys.argv[1:])"
        proc = subprocess.Popen([sys.executable, "-c", code, *args(run_dir, out, max_steps=10_000, eval_size=0)],
                                cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not (
                (out / "metrics.jsonl").exists() and open(out / "metrics.jsonl").read().count("\n") >= 2):
            time.sleep(0.02)
        for _ in range(signals):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.3)
        stdout, stderr = proc.communicate(timeout=120)
        return proc.returncode, stdout, stderr
    rc, stdout, stderr = interrupted(tmp_path / "once", 1)
    saved = deltakd.checkpoints(str(tmp_path / "once"))
    assert rc == 0 and "SIGINT: saved step" in stdout and saved, stdout + stderr[-3000:]
    assert steps_logged(tmp_path / "once")[-1] == int(saved[-1][-7:])
    rc, stdout, stderr = interrupted(tmp_path / "twice", 2)
    assert rc == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert "interrupted (Ctrl-C); no checkpoint has been written yet" in stderr, stderr[-3000:]
    assert not deltakd.checkpoints(str(tmp_path / "twice")) and not list((tmp_path / "twice").glob(".tmp-*"))


def test_a_signal_during_the_final_evaluation_stops_it_at_once_and_resume_runs_it(run_dir, tmp_path):
    # the final evaluation made slow; the last checkpoint is written before it begins, so nothing is left to save
    slow = ("import sys, time, deltakd; evaluate = deltakd.evaluate\n"
            "def slow(run, *a):\n    open(run.cfg.out_dir + '/evaluating', 'w').close(); time.sleep(100)\n"
            "deltakd.evaluate = slow\ndeltakd.main(sys.argv[1:])")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", slow, *args(run_dir, out, max_steps=2)], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out / "evaluating").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0 and not stderr, stderr[-3000:]
    assert f"SIGTERM: stopped the final evaluation; training is finished and saved in {out / 'ckpt-0000002'} " \
           "(--resume=true runs the evaluation)" in stdout, stdout
    assert not (out / "eval-final.jsonl").exists()
    r = cli(run_dir, out, max_steps=2, resume=True)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r.get("step") for r in records] == [1, 2, 2] and "rougeL" in records[-1]["eval"]


@pytest.mark.parametrize("limit_mb", [30, 5])  # trainer_state.pt (~40 MB) fails; model.safetensors (~20 MB) fails
def test_a_full_disk_while_checkpointing_names_the_intact_checkpoint_and_loses_nothing(run_dir, tmp_path, limit_mb):
    out, common = tmp_path / "out", dict(save_every=2, eval_size=0, keep_last=1)
    deltakd.train(deltakd.parse_args(args(run_dir, out, max_steps=2, **common)))
    before = weights(out / "ckpt-0000002")
    # files past the limit fail to write, as on a full disk, which reports no space free
    full = ("import resource, shutil, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_mb} << 20, {limit_mb} << 20)); "
            "shutil.disk_usage = lambda p: shutil._ntuple_diskusage(1 << 40, 1 << 40, 0)")
    line = one_line_error(cli(run_dir, out, resume=True, max_steps=4, preamble=full, **common),
                          f"could not write {out / 'ckpt-0000004'}: no space left on the disk holding {out}",
                          f"the newest checkpoint, {out / 'ckpt-0000002'}, is intact")
    assert "GB free" in line and not list(out.glob(".tmp-*"))
    after = weights(out / "ckpt-0000002")
    assert all(torch.equal(before[k], after[k]) for k in before)
    r = cli(run_dir, out, resume=True, max_steps=4, **common)
    assert r.returncode == 0 and deltakd.checkpoints(str(out))[-1].endswith("ckpt-0000004"), r.stderr[-3000:]


# -----------------------------------------------------------------------------
# on-policy distillation


def test_on_policy_flags_are_refused_where_they_cannot_work():
    for argv, text in [(["--on_policy=1.5"], "--on_policy=1.5: must be in [0, 1]"),
                       (["--on_policy=-0.1"], "must be in [0, 1]"),
                       (["--on_policy=0.5", "--on_policy_max_new_tokens=0"], "must be >= 1"),
                       (["--on_policy=0.5", "--on_policy_temperature=-1"], "must be 0 (greedy) or >= 0.001"),
                       (["--on_policy=0.5", "--targets_dir=t"], "no stored target can score them"),
                       (["--on_policy=0.5", "--method=sft"], "--on_policy=0.5 has no effect: --method=sft"),
                       (["--on_policy=1", "--method=seqkd"], "--on_policy=1.0 has no effect: --method=seqkd"),
                       (["--on_policy_temperature=0.7"], "--on_policy_temperature=0.7 has no effect: it goes with "
                                                         "--on_policy > 0")]:
        with pytest.raises(SystemExit, match=re.escape(text)):
            deltakd.parse_args(argv)
    for method in ("fkl", "rkl", "delta"):
        assert deltakd.parse_args([f"--method={method}", "--on_policy=1"]).on_policy == 1


def draws(step, n, p=0.5, seed=1337):
    # which of a step's n micro-batches (all ranks together) are sampled at --on_policy=p
    return [deltakd.on_policy_draw(seed, step, j)[0] < p for j in range(n)]


def test_on_policy_zero_never_samples_and_rare_draws_change_nothing_else(run_dir, tmp_path, monkeypatch):
    common = dict(max_steps=3, grad_accum=2, eval_size=0, cache_dir=tmp_path / "cache")
    calls = []
    monkeypatch.setattr(deltakd, "sample_answers", lambda *a: calls.append(a))
    deltakd.train(deltakd.parse_args(args(run_dir, tmp_path / "p0", **common)))
    assert calls == []  # p = 0: today's loop, the sampler never called
    monkeypatch.undo()
    # p = 1e-9 goes through the draw of every micro-batch and samples none: the weights of p = 0, to the bit
    assert not any(any(draws(s, 2, 1e-9)) for s in range(3))
    deltakd.train(deltakd.parse_args(args(run_dir, tmp_path / "tiny", on_policy=1e-9, **common)))
    a, b = weights(tmp_path / "p0" / "ckpt-0000003"), weights(tmp_path / "tiny" / "ckpt-0000003")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(x)["sampled"] for x in open(tmp_path / "tiny" / "metrics.jsonl")] == [0.0] * 3


@pytest.mark.parametrize("method", ["fkl", "delta"])
def test_on_policy_with_every_frozen_model_equal_to_the_student_has_no_kd_term(run_dir, tmp_path, method):
    # the student's samples, scored by itself: the target is the student's own distribution at every sampled
    # position, so the KD term vanishes (exactly for fkl: the same logits; Delta-KD's z + a z - a z rounds)
    s = run_dir / "student"
    deltakd.train(deltakd.parse_args(args(run_dir, tmp_path / "out", method=method, teacher_ft=s, teacher_raw=s,
                                          on_policy=1, on_policy_max_new_tokens=12, max_steps=2, eval_size=0,
                                          save_every=1, keep_last=5)))
    recs = [json.loads(x) for x in open(tmp_path / "out" / "metrics.jsonl")]
    assert [r["sampled"] for r in recs] == [1.0, 1.0] and all(r["sft"] == 0 for r in recs)
    assert all(r["supervised_tokens"] > 0 and 1 <= r["sampled_length"] <= 12 for r in recs)
    if method == "fkl":
        assert all(r["kd"] == 0 and r["loss"] == 0 for r in recs)
        # a zero gradient: AdamW moves nothing
        a, b = load_file(s / "model.safetensors"), weights(tmp_path / "out" / "ckpt-0000002")
        assert all(torch.equal(a[k], b[k]) for k in a if k in b)
    else:
        assert all(abs(r["kd"]) < 1e-9 for r in recs)


def test_on_policy_answers_are_the_students_own_samples_within_max_len(run_dir, tmp_path):
    cfg = deltakd.parse_args(args(run_dir, tmp_path / "out", on_policy=1, on_policy_temperature=0,
                                  on_policy_max_new_tokens=10, eval_size=0))
    run = deltakd.start(cfg)
    cache, idx, _ = deltakd.load_data(run)
    student = deltakd.build_student(run).model
    micro = deltakd.micro_batches(run, cache, [idx[:2], idx[2:4]])
    prompts = [data.prompt_ids(ids, labels) for b in micro for ids, labels in zip(b.input_ids.numpy(), b.labels.numpy())]

    def answers(batches):
        return [labels[len(p):][labels[len(p):] != -100].tolist()
                for p, labels in zip(prompts, (lab for b in batches for lab in b.labels))]
    # greedy: each answer is transformers' greedy continuation of the data's prompt by the student (real tokens only)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(str(run_dir / "student"), dtype=torch.float32).eval()
    for p, got in zip(prompts, answers(deltakd.sample_answers(run, student, micro, 0)[0])):
        want = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                           max_new_tokens=10, eos_token_id=run.stop_ids, pad_token_id=run.pad_id,
                           suppress_tokens=list(range(run.spec.vocab, 151936)))[0, len(p):].tolist()
        assert got == qwen.cut_after_eos([want], set(run.stop_ids))[0]
    # at temperature 1 the same step draws the same samples, another step others
    sampled = replace(run, cfg=replace(cfg, on_policy_temperature=1.0))
    again = [answers(deltakd.sample_answers(sampled, student, micro, s)[0]) for s in (0, 0, 1)]
    assert again[0] == again[1] != again[2]
    # a prompt that nearly fills max_len still gets a token, and no sequence passes max_len
    tight = replace(run, cfg=replace(cfg, max_len=max(map(len, prompts)) + 2))
    out = deltakd.sample_answers(tight, student, micro, 0)[0]
    assert all(1 <= len(a) <= 10 for a in answers(out)) and all(max(b.lengths) <= tight.cfg.max_len for b in out)
    assert min(map(len, answers(out))) <= 2
    # a plain-text row (every token supervised) is continued from its first token
    ids = torch.tensor([[9707, 11, 1879, 0, 5]])
    plain = deltakd.sample_answers(run, student, [deltakd.MicroBatch(ids, ids.clone(), np.arange(1), np.array([5]))], 0)[0]
    assert plain[0].input_ids[0, 0] == 9707 and plain[0].labels[0, 0] == -100 and (plain[0].labels[0, 1:] != -100).any()


def hf_float64(path):
    return transformers.Qwen2ForCausalLM.from_pretrained(str(path), dtype=torch.float64).eval()


def test_on_policy_step_equals_a_float64_reference_on_its_samples(run_dir, tmp_path):
    # a step of two micro-batches, one answered by the student and one by the data: the loss is
    # (lam SFT + (1 - lam) KD over the data's tokens + KD over the sampled ones) / all supervised tokens
    lam, alpha, tau = 0.3, 0.5, 2.0
    cfg = deltakd.parse_args(args(run_dir, tmp_path / "out", on_policy=0.5, on_policy_max_new_tokens=6, grad_accum=2,
                                  lam=lam, alpha=alpha, temperature=tau, eval_size=0))
    run = deltakd.start(cfg)
    cache, idx, _ = deltakd.load_data(run)
    source, student = deltakd.target_source(run, cache), deltakd.build_student(run)
    step = next(s for s in range(100) if draws(s, 2) == [True, False])
    micro = deltakd.micro_batches(run, cache, [idx[:2], idx[2:4]])
    sampled, _ = deltakd.sample_answers(run, student.model, micro, step)  # what kd_step samples: same seed, weights
    rec = deltakd.kd_step(run, student, source, micro, step)
    # the sampled micro-batch: each data prompt, then 1-6 supervised tokens of the student's, ending <|im_end|> or cut
    im_end = run.tokenizer.token_to_id("<|im_end|>")
    assert [b.sampled for b in sampled] == [True, False] and sampled[1] is micro[1]
    for ids, labels, data_ids, data_labels in zip(sampled[0].input_ids, sampled[0].labels, micro[0].input_ids,
                                                  micro[0].labels):
        p = data.prompt_ids(data_ids.numpy(), data_labels.numpy())
        answer = labels[len(p):][labels[len(p):] != -100].tolist()
        assert ids[:len(p)].tolist() == p and (labels[:len(p)] == -100).all()
        assert ids[len(p):len(p) + len(answer)].tolist() == answer and 1 <= len(answer) <= 6
        assert answer[-1] == im_end or len(answer) == 6
    V, total = 151665, torch.zeros(3, dtype=torch.float64)
    n = 0
    models = {r: hf_float64(run_dir / r) for r in ("student", "teacher_ft", "teacher_raw")}  # the step's weights
    for batch in sampled:
        mask = (batch.labels[:, 1:] != -100)
        att = (torch.arange(batch.input_ids.shape[1]) < torch.tensor(batch.lengths)[:, None]).long()
        with torch.no_grad():
            z = {r: m(input_ids=batch.input_ids, attention_mask=att).logits[:, :-1][mask][:, :V] for r, m in models.items()}
        logq = torch.log_softmax(z["student"] / tau, -1)
        logp = torch.log_softmax((z["teacher_ft"] + alpha * (z["student"] - z["teacher_raw"])) / tau, -1)
        kd = (logp.exp() * (logp - logq)).sum()
        sft = -torch.log_softmax(z["student"], -1).gather(1, batch.labels[:, 1:][mask][:, None]).sum()
        w = 0.0 if batch.sampled else lam
        total += torch.stack([w * sft + (1 - w) * kd, sft * (not batch.sampled), kd])
        n += int(mask.sum())
    assert rec["supervised_tokens"] == n and rec["sampled"] == 0.5
    for key, want in zip(("loss", "sft", "kd"), (total / n).tolist()):
        # fp32 sums over a 151,665-token vocabulary: the KD term of near models (3e-3 nats) to ~1e-8 absolute
        assert math.isclose(rec[key], want, rel_tol=1e-5, abs_tol=1e-7), (key, rec[key], want)


def test_on_policy_run_resumes_bit_exactly(run_dir, tmp_path):
    common = dict(on_policy=0.5, on_policy_max_new_tokens=8, grad_accum=2, max_steps=6, save_every=2, keep_last=10,
                  eval_size=0, cache_dir=tmp_path / "cache")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    deltakd.train(deltakd.parse_args(args(run_dir, straight, **common)))
    resumed.mkdir()
    shutil.copytree(straight / "ckpt-0000002", resumed / "ckpt-0000002")  # as if killed after step 2
    deltakd.train(deltakd.parse_args(args(run_dir, resumed, resume=True, **common)))
    a, b = weights(straight / "ckpt-0000006"), weights(resumed / "ckpt-0000006")
    assert all(torch.equal(a[k], b[k]) for k in a)
    recs = lambda d: [json.loads(x) for x in open(d / "metrics.jsonl")]  # noqa: E731
    assert [r["loss"] for r in recs(straight)][2:] == [r["loss"] for r in recs(resumed)]
    assert 0 < statistics.mean(r["sampled"] for r in recs(straight)[2:]) < 1  # sampled and data steps both resumed


def test_on_policy_is_part_of_the_run_a_resume_continues(run_dir, tmp_path):
    out = tmp_path / "out"
    deltakd.train(deltakd.parse_args(args(run_dir, out, on_policy=0.5, on_policy_max_new_tokens=4, max_steps=1,
                                          eval_size=0)))
    one_line_error(cli(run_dir, out, on_policy=0.25, on_policy_max_new_tokens=4, max_steps=2, eval_size=0,
                       resume=True), "on_policy (0.5 -> 0.25)", "--resume_allow=on_policy")


def test_dry_run_counts_on_policy_sampling(capsys):
    A = os.path.join(ASSETS, "qwen2.5")
    argv = [f"--student={A}/Qwen2.5-1.5B", f"--teacher_ft={A}/Qwen2.5-7B-Instruct", f"--teacher_raw={A}/Qwen2.5-7B",
            "--max_len=2048", "--batch_size=4", "--device=cuda", "--dry_run=true"]
    off = deltakd.dry_run(deltakd.parse_args(argv))
    flops_off = float(capsys.readouterr().out.split("optimizer step")[1].split(":")[1].split()[0])
    on = deltakd.dry_run(deltakd.parse_args(argv + ["--on_policy=1"]))
    flops_on = float(capsys.readouterr().out.split("optimizer step")[1].split(":")[1].split()[0])
    s = qwen.QwenConfig.from_json(os.path.join(A, "Qwen2.5-1.5B", "config.json"))
    assert on[:-1] == off and "KV cache" in on[-1][0]
    # k and v of 4 rows, each at most the longest prompt (< max_len) + the longest sample (256 by default), in bf16:
    # on a GPU the student samples under bf16 autocast, which Qwen.empty_kv_cache follows
    assert on[-1][1] == 2 * s.num_hidden_layers * s.num_key_value_heads * s.head_dim * 4 * (2048 + 256) * 2
    # printed to 4 digits
    assert math.isclose(flops_on - flops_off, 4 * 2048 * qwen.flops_per_token(s, 2048, train=False), rel_tol=1e-2)


# -----------------------------------------------------------------------------
# MiniLLM (--method=minillm): rewards, reward-to-go, importance weights, PPO's clipped term, the loss


# a fixed rollout of three right-padded samples (T = 9): a one-token answer, an answer cut at max length (no stop
# token: it runs to the last position) and a three-token one; (first, end): the columns holding the answer
ANSWERS = [(4, 5), (3, 9), (5, 8)]


def minillm_labels(V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((len(ANSWERS), 9), -100)
    for b, (first, end) in enumerate(ANSWERS):
        labels[b, first:end] = torch.randint(0, V, (end - first,), generator=g)
    return labels


def ref_reward_to_go(rewards, lengths, gamma):
    # one sequence at a time, its supervised tokens in order: R_t = sum_{k >= t} gamma^(k - t) r_k / (n - t)
    out, start = [], 0
    for n in lengths:
        r = [float(x) for x in rewards[start:start + n]]
        out += [sum(gamma ** (k - t) * r[k] for k in range(t, n)) / (n - t) for t in range(n)]
        start += n
    return torch.tensor(out, dtype=torch.float64)


def test_minillm_rewards_are_clipped_and_the_reward_to_go_is_discounted_and_normalised_per_sequence():
    labels = minillm_labels()
    mask, lengths = labels[:, 1:] != -100, [end - first for first, end in ANSWERS]
    g = torch.Generator().manual_seed(1)
    logp, logq = -6 * torch.rand(sum(lengths), generator=g), -6 * torch.rand(sum(lengths), generator=g)
    cfg = deltakd.Config(reward_scaling=0.5, reward_clip=3.0)
    r = deltakd.minillm_rewards(logp, logq, cfg)
    want = [max(-3.0, min(3.0, (p - q) / 0.5)) for p, q in zip(logp.double().tolist(), logq.double().tolist())]
    assert torch.allclose(r.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert (r == 3.0).any() and (r == -3.0).any() and (r.abs() < 3).any()  # both clips and the plain formula
    R = deltakd.reward_to_go(r, mask, 0.95)
    assert R.dtype == torch.float64 and torch.allclose(R, ref_reward_to_go(r, lengths, 0.95), rtol=1e-12, atol=1e-12)
    assert R[0] == r[0]  # a one-token answer: R = r
    # every token of the cut answer counts: its first return is the discounted sum of all six over six
    assert math.isclose(R[1].item(), sum(0.95 ** k * r[1 + k].item() for k in range(6)) / 6, rel_tol=1e-12)
    # the padding after a short answer leaks nothing into it: alone in its batch, the same returns
    assert torch.equal(deltakd.reward_to_go(r[7:], mask[2:], 0.95), R[7:])
    remaining = torch.cat([torch.arange(n, 0, -1) for n in lengths]).double()  # n_t, r_t's own token included
    assert torch.equal(deltakd.reward_to_go(r, mask, 0.0), r.double() / remaining)  # gamma 0: r_t / n_t


def test_importance_weights_are_the_students_probability_over_the_mixtures():
    g = torch.Generator().manual_seed(2)
    logq, logp = -5 * torch.rand(20, generator=g), -5 * torch.rand(20, generator=g)
    for mix in (0.2, 0.5):
        q, p = logq.double().exp(), logp.double().exp()
        w = deltakd.importance_weights(logq, logp, mix)
        assert torch.allclose(w.double(), q / ((1 - mix) * q + mix * p), rtol=1e-6)
        assert (w <= 1 / (1 - mix) + 1e-6).all() and (w < 1).any() and (w > 1).any()
    assert torch.equal(deltakd.importance_weights(logq, logp, 0.0), torch.ones(20))  # no teacher mixed in


# (ratio, advantage) pairs on both sides of [1 - c, 1 + c] = [0.8, 1.2] with either sign, and inside it
RATIOS = [(0.5, 1.3), (0.5, -0.7), (1.6, 0.9), (1.6, -1.1), (0.9, 0.4), (1.0, -1.7), (1.1, -2.0), (0.6, -0.3),
          (1.35, 0.6), (0.95, -0.8)]


def ppo_rows(logq_y, seed=0):
    # PPORows (log q_old, A, w) that give log q_theta(y) = logq_y the ratios of RATIOS: log q_old = log q + log(w / rho)
    w = 0.5 + 0.75 * torch.rand(len(logq_y), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    rho, adv = (torch.tensor(c, dtype=torch.float64) for c in zip(*RATIOS[:len(logq_y)]))
    return deltakd.PPORows(logq_y.double() + torch.log(w / rho), adv, w)


def test_long_term_term_is_ppos_clipped_surrogate_whose_clipped_side_is_flat():
    logq = -4 * torch.rand(len(RATIOS), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ppo = ppo_rows(logq)
    value, g = deltakd.long_term_term(logq, ppo, 0.2)
    want_value = 0.0
    for (rho, adv), got in zip(RATIOS, g.tolist()):
        unclipped, clipped = -adv * rho, -adv * min(max(rho, 0.8), 1.2)
        want_value += max(unclipped, clipped)
        # d/d log q of -A rho is -A rho; where the clipped side is the larger, the term is flat in q
        want = -adv * rho if unclipped >= clipped else 0.0
        assert math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-12), (rho, adv, got, want)
    assert math.isclose(value.item(), want_value, rel_tol=1e-12)
    assert (g == 0).sum() == 4  # ratios 0.5 (A < 0), 0.6 (A < 0), 1.6 (A > 0), 1.35 (A > 0): clipped
    # ... and autograd of the value agrees with g (the dense path differentiates the value)
    x = logq.clone().requires_grad_()
    deltakd.long_term_term(x, ppo, 0.2)[0].backward()
    assert torch.allclose(x.grad, g, rtol=1e-12, atol=1e-12)


def minillm_inputs(V=50, seed=0):
    """A rollout's student hidden states and head (4 padded vocab rows holding huge values), the teacher's (9
    padded rows), labels, and PPORows whose ratios at these weights are RATIOS."""
    g = torch.Generator().manual_seed(seed)
    labels = minillm_labels(V, seed)
    h, W = torch.randn(3, 9, 16, generator=g) / 4, torch.randn(V + 4, 16, generator=g)
    W[V:] = 1e4
    th, tw = torch.randn(3, 9, 24, generator=g) / 4, torch.randn(V + 9, 24, generator=g)
    tw[V:] = -1e4 * torch.rand(9, 24, generator=g)
    mask = labels[:, 1:] != -100
    logq = torch.log_softmax(h[:, :-1][mask].double() @ W[:V].double().T, -1)
    logq_y = logq.gather(1, labels[:, 1:][mask][:, None])[:, 0]
    spec = deltakd.LossSpec(vocab=V, lam=0.0, alpha=None, divergence="rkl", chunk_size=4, ppo_clip=0.2)
    return h, W, labels, {"teacher_ft": (th, tw)}, spec, deltakd.PPORows(*(x.float() for x in ppo_rows(logq_y)))


def ref_minillm_loss(h, W, labels, teacher, ppo, clip, V):
    # float64, autograd: sum_t KL(q || p) at every sampled prefix + PPO's clipped objective -sum min(rho A, clip(rho) A)
    h, W = h.double().requires_grad_(), W.double().requires_grad_()
    mask = labels[:, 1:] != -100
    (th, tw), = teacher.values()
    logq = torch.log_softmax(h[:, :-1][mask] @ W[:V].T, -1)
    logp = torch.log_softmax(th[:, :-1][mask].double() @ tw[:V].double().T, -1)
    kl = (logq.exp() * (logq - logp)).sum()
    old, adv, w = (x.double() for x in ppo)
    rho = w * torch.exp(logq.gather(1, labels[:, 1:][mask][:, None])[:, 0] - old)
    pg = -torch.min(rho * adv, rho.clamp(1 - clip, 1 + clip) * adv).sum()
    (kl + pg).backward()
    return kl.item(), pg.item(), h.grad, W.grad


@pytest.mark.parametrize("compiled", [False, True])
def test_minillm_chunked_loss_equals_an_independent_float64_reference_and_the_dense_loss(compiled):
    h, W, labels, teacher, spec, ppo = minillm_inputs()
    kl, pg, want_h, want_W = ref_minillm_loss(h, W, labels, teacher, ppo, spec.ppo_clip, spec.vocab)
    if compiled:
        torch._dynamo.reset()
    graphs = compiled_graphs()
    for impl in ("chunked", "dense"):  # chunks of 4 over 10 rows: two full ones and a tail
        x, y = h.clone().requires_grad_(), W.clone().requires_grad_()
        loss, sft, kd, n = deltakd.distill_loss(x, y, labels, teacher, replace(spec, impl=impl, compile=compiled), ppo)
        loss.backward()
        assert n == 10 and sft == 0
        assert math.isclose(kd.item(), kl, rel_tol=1e-5)
        assert math.isclose(loss.item(), kl + pg, rel_tol=1e-5, abs_tol=1e-5 * (abs(kl) + abs(pg)))
        for got, want in ((x.grad, want_h), (y.grad, want_W)):
            assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max(), impl
        assert y.grad[spec.vocab:].abs().max() == 0  # padded vocab rows get no gradient
    assert (compiled_graphs() > graphs) == compiled
    assert abs(pg) > 0.3 * kl  # both terms weigh in the comparison


def test_minillm_flags_are_refused_where_they_cannot_work(run_dir, tmp_path):
    for argv, text in [(["--method=minillm", "--on_policy=0.5"], "--on_policy=0.5 has no effect: --method=minillm "
                                                                  "fixes it at 1.0"),
                       (["--method=minillm", "--temperature=2"], "--temperature=2.0 has no effect: --method=minillm "
                                                                 "fixes it at 1.0"),
                       (["--method=minillm", "--lam=0.5"], "--lam=0.5 has no effect: --method=minillm fixes it at 0.0"),
                       (["--method=minillm", "--on_policy_temperature=0.7"], "--on_policy_temperature=0.7 has no "
                                                                             "effect: --method=minillm fixes it"),
                       (["--ppo_clip=0.3"], "--ppo_clip=0.3 has no effect: it goes with --method=minillm"),
                       (["--method=fkl", "--teacher_mix=0.1", "--reward_gamma=0.9"],
                        "--teacher_mix=0.1 has no effect: it goes with --method=minillm"),
                       (["--method=minillm", "--ppo_epochs=0"], "--ppo_epochs=0: must be >= 1"),
                       (["--method=minillm", "--teacher_mix=1"], "--teacher_mix=1.0: must be in [0, 1)"),
                       (["--method=minillm", "--teacher_mix=-0.1"], "--teacher_mix=-0.1: must be in [0, 1)"),
                       (["--method=minillm", "--ppo_clip=0"], "--ppo_clip=0.0: must be > 0"),
                       (["--method=minillm", "--reward_scaling=0"], "--reward_scaling=0.0: must be > 0"),
                       (["--method=minillm", "--reward_gamma=1.5"], "--reward_gamma=1.5: must be in [0, 1]"),
                       (["--method=minillm", "--targets_dir=t"], "--targets_dir=t has no effect: the samples "
                                                                  "change at every step, so no stored target can score them"),
                       (["--method=fkl", "--pretrain_data=p"], "--pretrain_data=p has no effect: it goes with "
                                                               "--method=minillm"),
                       (["--method=minillm", "--kd_ratio=0.3"], "--kd_ratio=0.3 has no effect: it goes with "
                                                                "--pretrain_data"),
                       (["--method=minillm", "--pretrain_data=p", "--kd_ratio=2"], "--kd_ratio=2.0: must be in [0, 1]"),
                       (["--method=minillm", "--pretrain_data=p", "--lm_coef=-1"], "--lm_coef=-1.0: must be >= 0")]:
        with pytest.raises(SystemExit, match=re.escape(text)):
            deltakd.parse_args(argv)
    cfg = deltakd.parse_args(["--method=minillm", "--ppo_epochs=2", "--teacher_mix=0", "--on_policy_max_new_tokens=64"])
    assert (cfg.ppo_epochs, cfg.teacher_mix, cfg.on_policy, cfg.lam, cfg.divergence) == (2, 0.0, 1.0, 0.0, "rkl")
    assert (cfg.pretrain_data, cfg.lm_coef, cfg.kd_ratio) == ("", None, None)  # no pretraining data: no such term
    cfg = deltakd.parse_args(["--method=minillm", "--pretrain_data=p"])
    assert (cfg.lm_coef, cfg.kd_ratio) == (1.0, 0.5)  # LMOps' lm_coef and its scripts' kd_ratio
    # LMOps' lr is MiniLLM's default (the METHODS row), a given --lr wins, and the other methods keep theirs
    assert cfg.lr == 5e-6 and deltakd.parse_args(["--method=minillm", "--lr=2e-5"]).lr == 2e-5
    assert deltakd.parse_args(["--method=fkl"]).lr == deltakd.Config.lr == 1e-5
    with pytest.raises(SystemExit, match=re.escape("--method=minillm needs --teacher_ft")):
        deltakd.train(deltakd.parse_args(args(run_dir, tmp_path / "out", method="minillm", teacher_ft="")))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_teacher_mixed_sampling_is_the_students_at_mix_0_the_teachers_at_mix_1_and_their_mixture_between(tmp_path):
    student, teacher = (qwen.Qwen.from_pretrained(hf_model(tmp_path, name, tie, n_head, 2, seed=seed)[1]).eval()
                        for name, tie, n_head, seed in (("s", True, 4, 0), ("t", False, 6, 1)))
    prompts, eos = [[5, 17, 42], [7], [100, 3, 9, 250, 11]], [299]
    sampled = qwen.Sampling(temperature=1.0, seed=3)
    alone = student.generate(prompts, 12, eos, sampled)
    assert student.generate(prompts, 12, eos, sampled, mix_in=(teacher, 0.0)) == alone
    greedy = teacher.generate(prompts, 12, eos)
    assert student.generate(prompts, 12, eos, mix_in=(teacher, 1.0)) == greedy != student.generate(prompts, 12, eos)
    # in between, the mixture of the two distributions at T (greedy: at 1), as its log-probabilities
    g = torch.Generator().manual_seed(4)
    z, zt = torch.randn(3, 40, generator=g) * 3, torch.randn(3, 40, generator=g) * 3
    for a in (0.2, 0.5):
        for T in (0.0, 0.7, 1.0, 2.0):
            got = qwen.mixture([z, zt], qwen.Sampling(temperature=T), a)
            t = T or 1.0
            want = torch.log((1 - a) * torch.softmax(z.double() / t, -1) + a * torch.softmax(zt.double() / t, -1))
            assert torch.allclose(got.double(), want, atol=1e-5), (a, T)
            # the mixture is sampled as it is (or its argmax when greedy)
            assert qwen.mixed_sampling(qwen.Sampling(temperature=T, seed=9)) == qwen.Sampling(float(T > 0), seed=9)
    # sampled at mix 0.5: tokens of both models' preferences, seeded
    mixed = [student.generate(prompts, 12, eos, qwen.Sampling(temperature=1.0, seed=s), mix_in=(teacher, 0.5))
             for s in (3, 3, 4)]
    assert mixed[0] == mixed[1] != mixed[2]


def test_generation_under_bf16_autocast_keeps_its_kv_cache_in_bf16_and_follows_the_fp32_greedy_tokens(tmp_path):
    # as an fp32 student samples on a GPU (autocast bf16): keys and values are computed in bf16, and the static
    # cache must take them (it once was fp32, the weights' dtype, and index_copy_ refused the bf16 values)
    model = qwen.Qwen.from_pretrained(hf_model(tmp_path, "s", True, 4, 2, seed=0)[1]).eval()
    prompts, eos = [[5, 17, 42], [7], [100, 3, 9, 250, 11]], [299]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert {t.dtype for k, v in model.empty_kv_cache(2, 8) for t in (k, v)} == {torch.bfloat16}
        bf16 = model.generate(prompts, 12, eos)
        mixed = model.generate(prompts, 12, eos, qwen.Sampling(temperature=1.0, seed=1), mix_in=(model, 0.5))
    assert {t.dtype for k, v in model.empty_kv_cache(2, 8) for t in (k, v)} == {torch.float32}
    fp32 = model.generate(prompts, 12, eos)
    # bf16 rounding may flip a near tie late in an answer: the first tokens agree
    assert [a[:3] for a in bf16] == [a[:3] for a in fp32] and all(len(a) >= 1 for a in mixed)


def minillm_run(run_dir, out, **kw):
    # a MiniLLM run on the tiny models: a step's two micro-batches, each to be answered by the student, teacher mixed in
    cfg = deltakd.parse_args(args(run_dir, out, method="minillm", grad_accum=2, on_policy_max_new_tokens=6,
                                  eval_size=0, **kw))
    run = deltakd.start(cfg)
    cache, idx, _ = deltakd.load_data(run)
    source, student = deltakd.target_source(run, cache), deltakd.build_student(run)
    return run, source, student, deltakd.micro_batches(run, cache, [idx[:2], idx[2:4]])


def test_minillm_rollouts_equal_a_float64_reference_whitened_over_the_step(run_dir, tmp_path):
    run, target, student, micro = minillm_run(run_dir, tmp_path / "out")
    cfg, V = run.cfg, run.spec.vocab
    sampled, _ = deltakd.sample_answers(run, student.model, micro, 0, (target.frozen["teacher_ft"], cfg.teacher_mix))
    assert all(b.sampled for b in sampled)
    rollouts, reward = deltakd.minillm_rollouts(run, student, target, sampled)
    models = {r: hf_float64(run_dir / r) for r in ("student", "teacher_ft")}  # the rollout's weights
    logq, logp, lengths = [], [], []
    for batch in sampled:
        mask = batch.labels[:, 1:] != -100
        att = (torch.arange(batch.input_ids.shape[1]) < torch.tensor(batch.lengths)[:, None]).long()
        y = batch.labels[:, 1:][mask]
        with torch.no_grad():
            lp = {r: m(input_ids=batch.input_ids, attention_mask=att).logits[:, :-1][mask][:, :V].log_softmax(-1)
                  .gather(1, y[:, None])[:, 0] for r, m in models.items()}
        logq.append(lp["student"])
        logp.append(lp["teacher_ft"])
        lengths += mask.sum(1).tolist()
    logq, logp = torch.cat(logq), torch.cat(logp)
    r = ((logp - logq) / cfg.reward_scaling).clamp(-cfg.reward_clip, cfg.reward_clip)
    R = ref_reward_to_go(r, lengths, cfg.reward_gamma)
    A = (R - R.mean()) / torch.sqrt(R.var(unbiased=False) + 1e-8)  # over every supervised token of the step
    q, p = logq.exp(), logp.exp()
    got = torch.stack([torch.cat(rows) for rows in zip(*(x.ppo for x in rollouts))], 1).double()  # (N, 3)
    assert got.shape == (len(R), 3) and len(R) == sum(lengths)
    assert torch.allclose(got[:, 0], logq, atol=1e-5)
    assert torch.allclose(got[:, 1], A, atol=1e-4)
    assert torch.allclose(got[:, 2], q / (0.8 * q + 0.2 * p), rtol=1e-5)
    assert math.isclose(reward, r.mean().item(), rel_tol=1e-5, abs_tol=1e-5)
    # whitened over the step (not per micro-batch): mean 0 and variance 1 over both micro-batches together
    assert abs(got[:, 1].mean()) < 1e-6 and abs(got[:, 1].var(unbiased=False) - 1) < 1e-5
    assert all(abs(x.ppo.advantage.double().mean()) > 1e-3 for x in rollouts)


def test_minillm_step_makes_ppo_epochs_updates_on_one_rollout_whose_first_ratio_is_one(run_dir, tmp_path, monkeypatch):
    run, target, student, micro = minillm_run(run_dir, tmp_path / "out")
    mix_in = (target.frozen["teacher_ft"], run.cfg.teacher_mix)
    sampled, _ = deltakd.sample_answers(run, student.model, micro, 0, mix_in)  # what minillm_step samples: same seed
    rollouts, reward = deltakd.minillm_rollouts(run, student, target, sampled)
    calls, real = [], deltakd.long_term_term

    def long_term_term(logq_y, ppo, clip):  # what each chunk of each pass reads
        calls.append((logq_y.clone(), deltakd.PPORows(*(x.clone() for x in ppo))))
        return real(logq_y, ppo, clip)
    monkeypatch.setattr(deltakd, "long_term_term", long_term_term)
    steps, losses, real_loss = [], [], deltakd.distill_loss
    monkeypatch.setattr(student.optimizer, "step", lambda real_step=student.optimizer.step:
                        steps.append(student.optimizer.param_groups[0]["lr"]) or real_step())
    monkeypatch.setattr(deltakd, "distill_loss", lambda *a: losses.append(real_loss(*a)) or losses[-1])
    rec = deltakd.minillm_step(run, student, target, micro, 0)
    # 4 passes over the same 2 micro-batches (one chunk each), each pass one optimizer update at the step's lr
    assert len(calls) == 4 * 2 and steps == [run.cfg.lr] * 4 and rec["reward"] == reward
    # the logged loss and KD term: the passes' mean, per supervised token of the step
    n = sum(int((b.labels[:, 1:] != -100).sum()) for b in sampled)
    assert rec["supervised_tokens"] == n
    for i, key in ((0, "loss"), (2, "kd")):
        assert math.isclose(rec[key], sum(out[i].item() for out in losses) / 4 / n, rel_tol=1e-6), key
    for i, (logq_y, ppo) in enumerate(calls):
        assert all(map(torch.equal, ppo, rollouts[i % 2].ppo))  # the rollout scored once, before the passes
        moved = (logq_y - ppo.logq_old).abs().max()
        # the first pass: log q_theta = log q_old (ratio w q_theta / q_old = w); later ones: the updated student's
        assert moved <= 1e-6 if i < 2 else moved > 1e-4, (i, moved)
    # model FLOPs: 4 training passes, the student's and the teacher's forwards while sampling and scoring
    s, t = (m.config for m in (student.model, target.frozen["teacher_ft"]))
    want = sum(T * (4 * qwen.flops_per_token(s, T, train=True) + 2 * qwen.flops_per_token(s, T, train=False)
                    + 2 * qwen.flops_per_token(t, T, train=False)) for b in sampled for T in b.lengths.tolist())
    assert math.isclose(rec["flops"], want, rel_tol=1e-12) and rec["sft"] == 0


def test_minillm_pretraining_term_equals_a_float64_reference_and_reads_a_fresh_batch_each_pass(run_dir, tmp_path):
    # LMOps' pt_loss, written out: lm_coef * mean over the pass's micro-batches of [(1 - kd_ratio) CE + kd_ratio
    # KL(teacher || student)], each a mean over its own tokens, with its gradient, in float64 through transformers
    lm_coef, kd_ratio, V = 0.7, 0.3, 151665
    run, source, student, _ = minillm_run(run_dir, tmp_path / "out", pretrain_data=run_dir / "pretrain.jsonl",
                                          lm_coef=lm_coef, kd_ratio=kd_ratio)
    pretraining = deltakd.pretraining_data(run)
    passes = [pretraining.of_pass(run, s, k) for s in range(2) for k in range(run.cfg.ppo_epochs)]
    seen = [tuple(b.input_ids.flatten().tolist()) for micro in passes for b in micro]
    assert len(passes[0]) == 2 and len(set(seen)) == len(seen)  # one per rollout micro-batch, a fresh one each pass
    micro = passes[0]
    got = deltakd.pretraining_gradients(run, student, source, micro)
    models = {r: hf_float64(run_dir / r) for r in ("student", "teacher_ft")}
    losses = []
    for b in micro:
        mask = b.labels[:, 1:] != -100
        z = {r: m(input_ids=b.input_ids).logits[:, :-1][mask][:, :V] for r, m in models.items()}
        p, logq = torch.softmax(z["teacher_ft"].detach(), -1), torch.log_softmax(z["student"], -1)
        ce = -logq.gather(1, b.labels[:, 1:][mask][:, None]).mean()
        kl = (p * (p.log() - logq)).sum(-1).mean()
        losses.append((1 - kd_ratio) * ce + kd_ratio * kl)
    want = sum(losses) / len(losses)
    (lm_coef * want).backward()
    assert math.isclose(got, want.item(), rel_tol=1e-5)
    hf = dict(models["student"].named_parameters())
    for name, param in student.model.named_parameters():
        ref = hf[name].grad[:V] if "embed" in name else hf[name].grad
        g = param.grad[:V] if "embed" in name else param.grad
        assert torch.allclose(g.double(), ref, rtol=1e-4, atol=1e-7), name


def test_minillm_run_logs_its_reward_and_resumes_bit_exactly(run_dir, tmp_path):
    # with LMOps' language-modelling term (--pretrain_data): its batches too follow the step
    common = dict(method="minillm", on_policy_max_new_tokens=6, grad_accum=2, max_steps=4, save_every=2, keep_last=10,
                  eval_size=4, cache_dir=tmp_path / "cache", pretrain_data=run_dir / "pretrain.jsonl")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    scores = deltakd.train(deltakd.parse_args(args(run_dir, straight, **common)))
    assert {"rougeL", "nll", "entropy", "kl_teacher"} <= set(scores)
    resumed.mkdir()
    shutil.copytree(straight / "ckpt-0000002", resumed / "ckpt-0000002")  # as if killed after step 2
    deltakd.train(deltakd.parse_args(args(run_dir, resumed, resume=True, **common)))
    a, b = weights(straight / "ckpt-0000004"), weights(resumed / "ckpt-0000004")
    assert all(torch.equal(a[k], b[k]) for k in a)
    recs = lambda d: [json.loads(x) for x in open(d / "metrics.jsonl") if '"loss"' in x]  # noqa: E731
    assert [(r["loss"], r["reward"]) for r in recs(straight)][2:] == [(r["loss"], r["reward"]) for r in recs(resumed)]
    assert [r["pt_loss"] for r in recs(straight)][2:] == [r["pt_loss"] for r in recs(resumed)]
    assert all(r["sampled"] == 1.0 and r["sft"] == 0 and math.isfinite(r["reward"]) and r["pt_loss"] > 0
               for r in recs(straight))
    assert len({r["reward"] for r in recs(straight)}) == 4  # a new rollout at every step
    # MiniLLM's keys are part of the run a resume continues
    with pytest.raises(SystemExit, match=re.escape("ppo_clip (0.2 -> 0.3)") + ".*--resume_allow=ppo_clip"):
        deltakd.train(deltakd.parse_args(args(run_dir, resumed, resume=True, ppo_clip=0.3, **common)))


def test_dry_run_counts_minillms_ppo_passes_and_its_teachers_sampling_and_scoring(capsys):
    A = os.path.join(ASSETS, "qwen2.5")
    argv = [f"--student={A}/Qwen2.5-1.5B", f"--teacher_ft={A}/Qwen2.5-7B-Instruct", "--max_len=2048", "--batch_size=4",
            "--grad_accum=2", "--device=cuda", "--dry_run=true"]

    def plan(*extra):
        rows = deltakd.dry_run(deltakd.parse_args(argv + list(extra)))
        return rows, float(capsys.readouterr().out.split("optimizer step")[1].split(":")[1].split()[0])
    fkl, flops_fkl = plan("--method=fkl")
    minillm, flops_minillm = plan("--method=minillm")
    s, t = (qwen.QwenConfig.from_json(os.path.join(A, n, "config.json"))
            for n in ("Qwen2.5-1.5B", "Qwen2.5-7B-Instruct"))
    train_s, fwd_s, fwd_t = (qwen.flops_per_token(c, 2048, train=tr) for c, tr in ((s, True), (s, False), (t, False)))
    tokens = 2 * 4 * 2048  # grad_accum x batch_size x max_len
    assert math.isclose(flops_fkl, tokens * (train_s + fwd_t), rel_tol=1e-3)  # printed to 4 digits
    # 4 PPO passes; the student forward twice (sampling, scoring) and the teacher twice (mixed into the sampling,
    # scoring): the teacher's hidden states then serve every pass
    assert math.isclose(flops_minillm, tokens * (4 * train_s + 2 * fwd_s + 2 * fwd_t), rel_tol=1e-3)
    names = [name for name, _ in minillm]
    assert [n for n in names if n.startswith("MiniLLM")] == names[-2:] and len(minillm) == len(fkl) + 3
    kv, hidden = (b for _, b in minillm[-2:])
    # the teacher's bf16 k and v of 4 rows of at most max_len + 256 sampled tokens; its hidden states of 2 micro-batches
    assert kv == 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * 4 * (2048 + 256) * 2
    assert hidden == 2 * 4 * 2048 * t.hidden_size * 2


def load_pretrain_script():
    # assets/demo/pretrain.py, the script beside the bundled raw models that makes them
    spec = importlib.util.spec_from_file_location("pretrain", os.path.join(ASSETS, "demo", "pretrain.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PRETRAIN = load_pretrain_script()


def shrink_demo(monkeypatch, raw_models, seeds=(1337,), **over):
    # the real demo with every stage shrunk to a few steps, on raw models pretrained into raw_models by
    # assets/demo/pretrain.py (not the bundled ones); its full-size run is measured in the README (the
    # teacher gets enough finetuning to answer with text, so SeqKD has something to learn from)
    monkeypatch.setattr(demo, "DEMO", replace(demo.DEMO, eval_max_new_tokens=6, raw_models=str(raw_models),
                                                 finetune=dict(max_steps=60, lr=3e-3, batch_size=8),
                                                 **{"minillm_steps": 1, **over}))
    PRETRAIN.pretrain(str(raw_models), seeds, SHRUNK_PRETRAINING)


def run_demo(argv):
    # assets/demo/demo.py with these flags, as its command line runs it
    return demo.demo(*demo.parse_demo_args(argv))


SHRUNK_PRETRAINING = replace(PRETRAIN.PRETRAIN, vocab_size=2000, steps=dict(max_steps=2, lr=1e-3, batch_size=4))


def test_the_demo_pipeline_runs_every_stage_writes_the_table_and_reruns_identically(tmp_path, monkeypatch):
    shrink_demo(monkeypatch, tmp_path / "raw", eval_size=6, eval_seeds=2, distill=dict(max_steps=2, lr=1e-3, batch_size=4))
    results = run_demo(([f"--out_dir={tmp_path}", "--quiet=true"]))
    raw = sorted(p.relative_to(tmp_path / "raw") for p in (tmp_path / "raw").rglob("*") if p.is_file())
    assert [str(p) for p in raw] == ["seed1337/raw-student/config.json", "seed1337/raw-student/model.safetensors",
                                     "seed1337/raw-student/tokenizer.json", "seed1337/raw-teacher/config.json",
                                     "seed1337/raw-teacher/model.safetensors", "seed1337/raw-teacher/tokenizer.json",
                                     "tokenizer.json"]
    assert all(t.dtype == torch.bfloat16 for t in weights(tmp_path / "raw/seed1337/raw-teacher").values())
    stages = {"raw-teacher", "raw-student", "teacher-ft", "student-ft", "student-sft", "student-fkl", "student-delta-a1"}
    forced = {"teacher-ft-own", "teacher-ft-distill"}  # the teacher, teacher-forced on either half of the training rows
    saved = json.load(open(tmp_path / "results.json"))
    assert saved == json.loads(json.dumps(results)) and set(saved) == {"methods", "premise"}
    methods, premise = saved["methods"], saved["premise"]
    assert set(methods) == stages | forced | {"baseline: most frequent answer", "baseline: nearest training answer",
                                              "references"}
    for stage in stages:  # every figure of the table, for every stage, from its one seed
        s = methods[stage]["1337"]
        assert {"rougeL", "sampled_rougeL", "nll", "entropy", "distinct", "repeated_4grams", "sound", "words"} <= set(s)
        assert ("kl_teacher" in s) == stage.startswith("student")
        assert 0 <= s["rougeL"] <= 1 and s["nll"] > 0 and s["entropy"] > 0
    for stage in forced:  # --eval_max_new_tokens=0: nothing generated, the teacher-forced figures only
        assert set(methods[stage]["1337"]) == {"nll", "entropy"} and not (tmp_path / stage / "eval-final.jsonl").exists()
    # the premise: pi_s^ft against the raw student, the teacher, pi* at each alpha and every distilled student
    assert list(premise) == ["raw-student", "teacher-ft", "pi*-a0.5", "pi*-a1", "pi*-a2", "student-sft", "student-fkl",
                             "student-delta-a1"]
    assert all(set(p) == {"1337"} and set(p["1337"]) == {"held_out", "distill"} and min(p["1337"].values()) > 0
               for p in premise.values())
    # pi_s^ft is the teacher's recipe on the raw student: the same steps, lr and batches (supervised tokens per step)
    recipe = lambda stage: [(r["step"], r["lr"], r["supervised_tokens"]) for r in map(  # noqa: E731
        json.loads, open(tmp_path / stage / "metrics.jsonl")) if "loss" in r]
    assert recipe("student-ft") == recipe("teacher-ft") and len(recipe("teacher-ft")) == 60
    runs = [json.load(open(os.path.join(deltakd.checkpoints(str(tmp_path / s))[-1], "run.json")))
            for s in ("teacher-ft", "student-ft")]
    assert {k for k, v in runs[0]["identity"].items() if runs[1]["identity"][k] != v} == {"student", "teacher_ft",
                                                                                           "models_content"}
    assert {k for k, v in runs[0]["config"].items() if runs[1]["config"][k] != v} == {"student", "teacher_ft", "out_dir"}
    teacher_answers = [json.loads(x) for x in open(tmp_path / "teacher-ft" / "eval-final.jsonl")]
    refs = [a["reference"] for a in teacher_answers]
    assert methods["references"]["-"] == rouge.answer_sanity(refs) and len(refs) == 6
    assert methods["teacher-ft"]["1337"]["rougeL"] == deltakd.rouge_f1(refs, [a["prediction"] for a in teacher_answers])["rougeL"]
    assert open(tmp_path / "results.md").read() == demo.results_table(results) + "\n"  # the tables are these numbers
    # seeds fixed: the same raw models, bit for bit, pretrained again into another folder; the same results
    PRETRAIN.pretrain(str(tmp_path / "raw-again"), [1337], SHRUNK_PRETRAINING)
    for p in raw:
        assert (tmp_path / "raw" / p).read_bytes() == (tmp_path / "raw-again" / p).read_bytes(), p
    again = run_demo(([f"--out_dir={tmp_path / 'again'}", "--quiet=true",
                                             f"--demo_raw_models={tmp_path / 'raw-again'}"]))
    assert json.loads(json.dumps(again)) == saved
    for stage in stages:  # ... and the same generated answers
        for f in ("eval-final.jsonl", "eval-final-sampled.jsonl"):
            a, b = (open(d / stage / f).read() for d in (tmp_path, tmp_path / "again"))
            assert a == b and a


def test_the_full_comparison_runs_every_seed_alpha_stored_targets_and_on_policy(tmp_path, monkeypatch):
    shrink_demo(monkeypatch, tmp_path / "raw", seeds=(1337, 1338), eval_size=4, eval_seeds=1,
                distill=dict(max_steps=1, lr=1e-3, batch_size=4), full_seeds=2, full_alphas=(0.0, 1.0), full_topk=4)
    run_demo(([f"--out_dir={tmp_path}", "--quiet=true", "--full_comparison=true", "--on_policy=1"]))
    results = json.load(open(tmp_path / "results.json"))
    saved = results["methods"]
    runs = {k for k in saved if not k.startswith("baseline") and k != "references"}
    assert runs == {"raw-teacher", "raw-student", "teacher-ft", "teacher-ft-own", "teacher-ft-distill", "student-ft",
                    "student-sft",
                    "student-fkl", "student-rkl", "student-seqkd", "student-delta-a0", "student-delta-a1",
                    "student-delta-a1-top4", "student-minillm",
                    "student-fkl-onpolicy1", "student-delta-a1-onpolicy1"}  # --on_policy: those two on-policy too
    # MiniLLM: DEMO.minillm_steps rollout steps from the SFT student's checkpoint, its reward logged
    minillm = tmp_path / "seed1338" / "student-minillm"
    recs = [json.loads(x) for x in open(minillm / "metrics.jsonl") if '"loss"' in x]
    assert len(recs) == 1 and recs[0]["sampled"] == 1.0 and math.isfinite(recs[0]["reward"])
    identity = json.load(open(minillm / "ckpt-0000001" / "run.json"))["identity"]
    assert identity["method"] == "minillm"
    assert identity["student"] == str(tmp_path / "seed1338" / "student-sft" / "ckpt-0000001")
    assert identity["pretrain_data"] == demo.DEMO.minillm_pretrain_data  # with its language-modelling term
    seqkd = data.read_rows(str(tmp_path / "seed1338" / "student-seqkd" / "seqkd_data.jsonl"))
    assert seqkd and all(len(r["messages"]) == 2 for r in seqkd)  # the teacher's answers
    sampled = [json.loads(x).get("sampled") for x in open(tmp_path / "seed1338" / "student-fkl-onpolicy1" / "metrics.jsonl")]
    assert sampled[0] == 1.0 and '"sampled":' not in open(tmp_path / "seed1338" / "student-fkl" / "metrics.jsonl").read()
    assert all(set(saved[k]) == {"1337", "1338"} for k in runs)  # every seed's figures, the premise's too
    assert all(set(p) == {"1337", "1338"} for p in results["premise"].values()) and "student-minillm" in results["premise"]
    assert os.path.isfile(tmp_path / "seed1338" / "targets" / "key.json")  # the stored top-k run's target pass
    # Delta-KD at alpha 0 is forward KL: the same figures, to the last digit, on every seed
    assert saved["student-delta-a0"] == saved["student-fkl"]
    table = open(tmp_path / "results.md").read()
    assert table == demo.results_table(results) + "\n"
    assert "| Forward KL (on-policy p=1) |" in table and "| Delta-KD (α=1, on-policy p=1) |" in table
    assert "| MiniLLM (from the SFT student) |" in table


def demo_stages(out, monkeypatch, *argv):
    # the stages the demo runs, none of them trained: {seed: {stage: demo_stage's keywords}}, in their order
    calls = {}
    monkeypatch.setattr(demo, "demo_stage", lambda cfg, out_dir, seed, **kw: calls.setdefault(seed, {}).update(
        {os.path.basename(out_dir): dict(kw, root=os.path.dirname(out_dir))}) or {})
    monkeypatch.setattr(demo, "demo_premise", lambda models, problems, tokenizer, system_prompt: calls.setdefault(
        "premise", []).append((models, problems)) or {})
    run_demo(([f"--out_dir={out}", "--quiet=true", *argv]))
    return calls


def test_the_premise_figures_equal_a_dense_float64_computation(tmp_path, monkeypatch):
    # tiny random models on the demo's tokenizer, their heads scaled so that the KLs are of order 1; the reference
    # scores each example alone (no padding) with transformers in float64, pi* = p_ft (p_s / p_t)^alpha / Z in
    # probability space, and sums KL(pi_s^ft || target) over supervised tokens in Python
    tok = Tokenizer.from_file(os.path.join(demo.DEMO.raw_models, "tokenizer.json"))
    names, hf, paths = ["raw-student", "raw-teacher", "teacher-ft", "student-ft", "student-sft"], {}, {}
    for i, name in enumerate(names):
        m, paths[name] = hf_model(tmp_path, name, tie=False, n_head=2, n_kv=1, vocab=tok.get_vocab_size(), seed=i)
        with torch.no_grad():
            m.lm_head.weight.mul_(20)
        m.save_pretrained(paths[name])
        hf[name] = m.double()
    rows = [demo.demo_task(r) for r in data.read_rows(GSM8K)[:11]]
    problems = {"held_out": rows[:4], "distill": rows[4:]}
    monkeypatch.setattr(demo, "DEMO", replace(demo.DEMO, premise_batch_size=3))  # padded batches, and a last short one
    got = demo.demo_premise(paths, problems, tok, data.SYSTEM_PROMPT_BASE)
    alphas = demo.DEMO.premise_alphas
    assert list(got) == ["raw-student", "teacher-ft", *(f"pi*-a{a:g}" for a in alphas), "student-sft"]
    for problem_set, rows in problems.items():
        examples = data.eval_examples(rows, tok, demo.DEMO.max_len, data.SYSTEM_PROMPT_BASE)
        sums, n = {}, 0
        for e in examples:
            with torch.no_grad():
                p = {name: torch.softmax(m(torch.tensor([e.input_ids])).logits[0, :-1].double(), -1)
                     for name, m in hf.items()}
            targets = {"raw-student": p["raw-student"], "teacher-ft": p["teacher-ft"], "student-sft": p["student-sft"],
                       **{f"pi*-a{a:g}": p["teacher-ft"] * (p["raw-student"] / p["raw-teacher"]) ** a for a in alphas}}
            for t in range(len(e.labels) - 1):
                if e.labels[t + 1] == -100:
                    continue
                ps = p["student-ft"][t].tolist()
                for name, q in targets.items():
                    q = (q[t] / q[t].sum()).tolist()
                    sums[name] = sums.get(name, 0.0) + sum(a * math.log(a / b) for a, b in zip(ps, q))
                n += 1
        for name, total in sums.items():
            assert got[name][problem_set] == pytest.approx(total / n, rel=1e-5), (problem_set, name)
            assert 0.1 < got[name][problem_set] < 20, got


def test_the_demo_finetunes_the_teacher_and_distills_the_students_on_disjoint_halves(tmp_path, monkeypatch):
    calls = demo_stages(tmp_path, monkeypatch)
    stages, [(models, problems)] = calls[1337], calls["premise"]
    rows = {n: [json.dumps(r) for r in data.read_rows(str(tmp_path / f"task_{n}.jsonl"))]
            for n in ("teacher", "distill", "eval")}
    train, _ = data.split_rows([demo.demo_task(r) for r in data.read_rows(demo.DEMO.task_data)],
                               demo.DEMO.eval_size, 1337)
    teacher, distill = set(rows["teacher"]), set(rows["distill"])
    assert len(teacher) == len(rows["teacher"]) == len(train) // 2 and len(distill) == len(rows["distill"])
    assert not teacher & distill and teacher | distill == {json.dumps(r) for r in train}  # disjoint, covering
    assert not (teacher | distill) & set(rows["eval"])
    path = lambda n: str(tmp_path / f"task_{n}.jsonl")  # noqa: E731
    teacher_ft = deltakd.checkpoint_dir(str(tmp_path / "teacher-ft"), demo.DEMO.finetune["max_steps"])
    assert list(stages) == ["raw-teacher", "raw-student", "teacher-ft", "teacher-ft-own", "teacher-ft-distill",
                            "student-ft", "student-sft", "student-fkl", "student-delta-a1"]
    assert stages["teacher-ft"]["train_data"] == path("teacher")
    # pi_s^ft: the raw student trained with exactly the teacher's flags (scored against the teacher, as the students)
    assert stages["student-ft"] == {**stages["teacher-ft"], "student": stages["raw-student"]["student"],
                                    "teacher_ft": teacher_ft}
    for name, half in (("teacher-ft-own", "teacher"), ("teacher-ft-distill", "distill")):  # teacher-forced only
        kw = stages[name]
        assert (kw["student"], kw["eval_only"], kw["eval_data"], kw["eval_max_new_tokens"]) == (teacher_ft, True,
                                                                                                 path(half), 0)
    students = [kw for name, kw in stages.items() if name.startswith("student-") and name != "student-ft"]
    assert all((kw["train_data"], kw["teacher_ft"], kw["eval_data"]) == (path("distill"), teacher_ft, path("eval"))
               for kw in students)
    # the premise scores the last checkpoint of every trained stage, on the held-out problems and as many of the
    # distillation problems
    assert list(models) == ["raw-student", "raw-teacher", "teacher-ft", "student-ft", "student-sft", "student-fkl",
                            "student-delta-a1"]
    assert (models["raw-student"], models["teacher-ft"]) == (stages["raw-student"]["student"], teacher_ft)
    assert models["student-ft"] == deltakd.checkpoint_dir(str(tmp_path / "student-ft"), demo.DEMO.finetune["max_steps"])
    assert problems == {"held_out": data.read_rows(path("eval")),
                        "distill": data.read_rows(path("distill"))[:demo.DEMO.eval_size]}


def test_the_full_comparison_adds_minillm_from_the_sft_student_and_on_policy_delta_kd(tmp_path, monkeypatch):
    full = demo_stages(tmp_path / "full", monkeypatch, "--full_comparison=true")
    assert len(full.pop("premise")) == demo.DEMO.full_seeds  # the premise of every seed
    assert set(full) == set(range(1337, 1337 + demo.DEMO.full_seeds))
    for seed, stages in full.items():
        names = list(stages)
        minillm, sft = stages["student-minillm"], stages["student-sft"]
        assert (minillm["method"], minillm["max_steps"]) == ("minillm", demo.DEMO.minillm_steps)
        # from the SFT student of the same seed, trained before it
        assert minillm["student"] == deltakd.checkpoint_dir(os.path.join(sft["root"], "student-sft"),
                                                            demo.DEMO.distill["max_steps"])
        assert sft["root"] == str(tmp_path / "full" / f"seed{seed}")
        assert names.index("student-sft") < names.index("student-minillm")
        # on-policy Delta-KD at DEMO.full_on_policy, no on-policy forward KL
        p = demo.DEMO.full_on_policy
        assert [n for n in names if "onpolicy" in n] == [f"student-delta-a1-onpolicy{p:g}"]
        assert {k: stages[f"student-delta-a1-onpolicy{p:g}"][k] for k in ("method", "on_policy")} == \
            {"method": "delta", "on_policy": p}  # at the demo's --alpha, as every setting a stage does not give
    # --on_policy=P: both on-policy runs at P instead
    given = demo_stages(tmp_path / "given", monkeypatch, "--full_comparison=true", "--on_policy=1")[1337]
    assert sorted(n for n in given if "onpolicy" in n) == ["student-delta-a1-onpolicy1", "student-fkl-onpolicy1"]
    assert given["student-fkl-onpolicy1"]["method"] == "fkl" and given["student-fkl-onpolicy1"]["on_policy"] == 1


def test_the_bundled_raw_models_are_used_as_they_are(tmp_path):
    # assets/demo: a raw teacher and a raw student per seed of the full comparison, as pretrain.py wrote them
    # (assets/SHA256SUMS), sharing the bundled tokenizer; pretrain.py has nothing left to make there
    sums = dict(line.split()[::-1] for line in open(os.path.join(HERE, "assets", "SHA256SUMS")))
    for name, digest in sums.items():
        assert hashlib.sha256(open(os.path.join(HERE, "assets", name), "rb").read()).hexdigest() == digest
    assert sum(name.startswith("./demo/") for name in sums) == 1 + 6 * demo.DEMO.full_seeds
    seeds, root = range(1337, 1337 + demo.DEMO.full_seeds), demo.DEMO.raw_models
    before = sorted(os.walk(root))
    PRETRAIN.pretrain(root, seeds)
    assert sorted(os.walk(root)) == before
    tok = Tokenizer.from_file(os.path.join(root, "tokenizer.json"))
    assert tok.get_vocab_size() == PRETRAIN.PRETRAIN.vocab_size
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    for seed in seeds:
        for role in ("teacher", "student"):
            path = demo.demo_raw_model(root, seed, role)
            c = qwen.QwenConfig.from_json(os.path.join(path, "config.json"))
            arch = getattr(PRETRAIN.PRETRAIN, role)
            assert c.vocab_size == tok.get_vocab_size() and all(getattr(c, k) == v for k, v in arch.items())
            assert open(os.path.join(path, "tokenizer.json")).read() == open(os.path.join(root, "tokenizer.json")).read()
            assert all(t.dtype == torch.bfloat16 for t in weights(path).values())
    # raw models that are not there: one line naming the folder and the command that makes them
    with pytest.raises(SystemExit, match=r"lacks the raw models of seed\(s\) 1337; make them with "
                                         r"`python assets/demo/pretrain.py .*empty --seeds=1337`"):
        run_demo(([f"--out_dir={tmp_path / 'out'}", f"--demo_raw_models={tmp_path / 'empty'}"]))


def test_the_demo_refuses_torchrun_and_deltakd_without_a_student_names_the_demo(tmp_path, monkeypatch):
    # under torchrun every rank would rebuild the same directories; deltakd.py has nothing to train or score
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match=r"the demo runs in one process"):
        demo.main([f"--out_dir={tmp_path / 'out'}"])
    monkeypatch.delenv("WORLD_SIZE")
    for argv in ([], ["--eval_only=true"]):
        with pytest.raises(SystemExit, match=re.escape("--student=DIR is the model to train (or, with --eval_only, "
                                                       "to score); the demo") + ".*python assets/demo/demo.py"):
            deltakd.main([*argv, f"--out_dir={tmp_path / 'out'}"])
    with pytest.raises(SystemExit, match="--full_comparison=maybe: expected bool"):
        demo.main(["--full_comparison=maybe"])
    assert os.listdir(tmp_path) == []


def test_demo_table_shows_mean_and_std_over_seeds():
    results = {"student-delta-a0.5": {1: {"rougeL": 0.25, "nll": 2.0, "entropy": 1.0, "distinct": 0.5},
                                      2: {"rougeL": 0.35, "nll": 2.5, "entropy": 1.5, "distinct": 0.5}},
               "baseline: most frequent answer": {"-": {"rougeL": 0.1}}}
    table = demo.demo_table(results, demo.METHOD_COLUMNS, "Method").splitlines()
    assert table[0].startswith("| Method | ROUGE-1 | ROUGE-2 | ROUGE-L | sampled ROUGE-L | NLL | entropy | KL(")
    assert table[2].startswith("| Delta-KD (α=0.5) | – | – | 0.3000 ± .0707 | – | 2.250 ± .354 | 1.250 ± .354 | – | "
                               "– | 50% ± 0% |")
    assert table[3].startswith("| Baseline: most frequent answer | – | – | 0.1000 | – |")
