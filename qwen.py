"""
A hand-written Qwen-2.5 decoder in plain PyTorch that loads and saves Hugging Face checkpoints.

    config, _ = check_model_dir("path/to/Qwen2.5-1.5B")       # config.json + safetensors headers: ms
    model = Qwen.from_pretrained("path/to/Qwen2.5-1.5B", dtype=torch.bfloat16, device="cuda")
    logits = model(input_ids)                                  # (B, T, vocab_size)
    out = model.generate([[151644, 872, 198], [...]], max_new_tokens=128, eos_token_id=[151645])
    out = model.generate(prompts, 128, [151645], Sampling(temperature=0.7, top_p=0.9, seed=1))

Parameter names equal transformers' Qwen2ForCausalLM (model.layers.0.self_attn.q_proj.weight, ...),
so checkpoints load with strict=True and no renaming. Read bottom-up: config -> norm -> rope ->
attention -> MLP -> block -> sampling -> the model (forward, generation, loading/saving) ->
checkpoint files and their check -> atomic directories -> init_weights, num_parameters and the
accounting of FLOPs and activation memory.
"""

import contextlib
import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# config


class CheckpointError(ValueError):
    """A model directory this implementation cannot load (named file, key and reason)."""


def finite(tensor, key, file):
    # a diverged or damaged model would only show later, as NaN samples or scores, naming nothing
    if not torch.isfinite(tensor).all():
        raise CheckpointError(f"{file}: {key} holds non-finite values (NaN or inf)")
    return tensor


def parse_json(raw, source):
    # config.json, the shard index and each safetensors header: what is not a JSON object stops in one line
    try:
        d = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        where = f"line {e.lineno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise CheckpointError(f"{source}: not valid JSON ({where})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{source}: not a JSON object")
    return d


@dataclass
class QwenConfig:
    # field names are exactly those of HF's config.json for model_type "qwen2"
    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    max_position_embeddings: int = 32768
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    bos_token_id: int = 151643
    eos_token_id: int | list = 151643
    torch_dtype: str = "bfloat16"
    extra: dict = field(default_factory=dict, repr=False)  # unused HF keys, written back on save

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d, source="config"):
        # the sizes first: every check below reads them
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in sizes if d.get(k) is None]
        if missing:
            raise CheckpointError(f"{source}: missing key(s) {missing}")
        bad = [f"{k}={d[k]!r}" for k in (*sizes, "num_key_value_heads")
               if d.get(k) is not None and not (type(d[k]) is int and d[k] > 0)]
        if bad:
            raise CheckpointError(f"{source}: {', '.join(bad)}: sizes must be positive integers")
        # Refuse what this model does not implement rather than silently computing something else.
        if d.get("model_type", "qwen2") != "qwen2":
            raise CheckpointError(f"{source}: model_type={d['model_type']!r}; only 'qwen2' (Qwen-2/2.5) is implemented")
        rs = d.get("rope_scaling") or d.get("rope_parameters")
        if rs and rs.get("rope_type", rs.get("type", "default")) != "default":
            raise CheckpointError(f"{source}: rope_scaling={rs!r} is not implemented (only default RoPE)")
        if d.get("use_sliding_window", False) or "sliding_attention" in (d.get("layer_types") or []):
            raise CheckpointError(f"{source}: use_sliding_window=true is not implemented (Qwen2.5 ships it off)")
        if d.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{source}: hidden_act={d['hidden_act']!r}; only 'silu' is implemented")
        if d.get("head_dim") not in (None, d["hidden_size"] // d["num_attention_heads"]):
            raise CheckpointError(f"{source}: head_dim={d['head_dim']} != hidden_size/num_attention_heads")
        names = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: v for k, v in d.items() if k in names and v is not None}
        if rs and "rope_theta" in rs:  # transformers >= 5 nests rope_theta in rope_parameters
            kw["rope_theta"] = rs["rope_theta"]
        kw.setdefault("num_key_value_heads", d["num_attention_heads"])
        cfg = cls(**kw, extra={k: v for k, v in d.items() if k not in names})
        if cfg.hidden_size % cfg.num_attention_heads or cfg.num_attention_heads % cfg.num_key_value_heads:
            raise CheckpointError(f"{source}: num_attention_heads={cfg.num_attention_heads} must divide hidden_size"
                             f"={cfg.hidden_size} and be a multiple of num_key_value_heads={cfg.num_key_value_heads}")
        return cfg

    @classmethod
    def from_json(cls, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json at {path}")
        with open(path, "rb") as f:
            return cls.from_dict(parse_json(f.read(), path), source=path)

    def to_dict(self):
        # rope_theta is written at the top level (the form of the official Qwen2.5 configs), which
        # transformers 4.x and 5.x both read
        skip = ("rope_scaling", "rope_parameters", "transformers_version")
        d = {k: v for k, v in self.extra.items() if k not in skip}
        d.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        d.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu",
                 use_sliding_window=False, attention_dropout=0.0)
        return d

# -----------------------------------------------------------------------------
# the model


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # statistics in fp32 whatever the model dtype; cast back before the weight, as HF does
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(position_ids, head_dim, theta, dtype):
    # Qwen uses rotate_half RoPE: frequencies repeated over both halves, cos/sin computed in fp32
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float) / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # (B, 1, T, head_dim)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Linear(nn.Linear):
    """nn.Linear that generation may run over its weight reordered once for oneDNN (packed_linears)."""
    packed = None  # that reordered weight, only while generate runs

    def forward(self, x):
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C = cfg.hidden_size
        self.q_proj = Linear(C, self.n_head * self.head_dim, bias=True)
        self.k_proj = Linear(C, self.n_kv_head * self.head_dim, bias=True)
        self.v_proj = Linear(C, self.n_kv_head * self.head_dim, bias=True)
        self.o_proj = Linear(self.n_head * self.head_dim, C, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, cache_pos=None):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            # static KV cache (B, n_kv_head, L, head_dim): write this input's keys/values at cache_pos (T,),
            # attend over all L slots (mask says which are real): every shape is fixed, as CUDA graphs need
            k_cache, v_cache = cache
            k_cache.index_copy_(2, cache_pos, k.to(k_cache.dtype))  # under autocast, RoPE's fp32 cos makes k fp32
            v_cache.index_copy_(2, cache_pos, v.to(v_cache.dtype))
            k, v = k_cache, v_cache
        if T == 1 and cache is not None:  # decoding: each KV head's query heads as one query of G rows; the same
            # result as enable_gqa (bit for bit in bf16), which expands K and V per head: 11x faster on CPU in bf16
            y = F.scaled_dot_product_attention(q.view(B, self.n_kv_head, -1, self.head_dim), k, v, attn_mask=mask)
            return self.o_proj(y.reshape(B, T, C))
        # mask None means plain causal attention (no padding on the left), which lets SDPA pick flash kernels
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_head != self.n_kv_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, cache_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class QwenModel(nn.Module):
    # the trunk; named "model" inside Qwen so that parameter names equal HF's
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def attention_mask_4d(attention_mask, T=None):
    """(B, L) padding mask over the keys (1 = real token) -> (B, 1, T, L) boolean causal SDPA mask for
    queries at the first T positions (default all L; generation's prefill passes its static cache's
    L > T). Every query also sees itself, so a left-pad row is never fully masked (SDPA would
    return NaN there); pad positions' outputs are never used."""
    L = attention_mask.shape[1]
    T = L if T is None else T
    causal = torch.ones(T, L, dtype=torch.bool, device=attention_mask.device).tril()
    mask = causal & attention_mask.bool()[:, None, None, :]
    return mask | torch.eye(T, L, dtype=torch.bool, device=mask.device)


def position_ids_from_mask(attention_mask):
    # left padding shifts each row's positions so its first real token has position 0 (as HF generate)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def project(h, head, vocab_limit):
    """Logits (B, vocab_limit) of generation's few rows h (B, C) through the lm_head. On CPU in fp32, MKL computes
    this tall, skinny product 1.5-4x faster as weight @ h.T with at least 2 columns than as F.linear (`python
    bench.py decode`); in bf16, F.linear is the faster; the packed weight (packed_linears) is faster in both."""
    if head.packed is not None:  # inside generate, already cut to the same vocab_limit
        return head(h)
    weight = head.weight[:vocab_limit]
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return F.linear(h, weight)
    return (weight @ F.pad(h, (0, 0, 0, len(h) == 1)).T)[:, :len(h)].T.contiguous()  # one row: padded to 2


PACKING_PAYS_FROM = 64  # new tokens: the reorder costs 3.5-10.5 decoding steps (fp32 the most), saves 15-50% of each


def packing_pays(linear):
    # on CPU without autocast, in fp32, or in bf16 where oneDNN has bf16 kernels
    w = linear.weight
    if w.device.type != "cpu" or torch.is_autocast_enabled("cpu") or not torch.backends.mkldnn.is_available():
        return False
    return w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@contextlib.contextmanager
def packed_linears(models, vocab_limit, batch, max_new_tokens):
    """While generate runs: every linear's weight (the lm_head's first vocab_limit rows) reordered once into oneDNN's
    blocked layout for this batch, where that pays (packing_pays: on CPU, without autocast), for PACKING_PAYS_FROM new
    tokens or more, decode_step not compiled (inductor does not lower the packed op; it packs by itself under
    freezing). F.linear has oneDNN reorder a bf16 weight on every call, and MKL's fp32 kernels at a few rows are slow:
    over the packed weights Qwen2.5-0.5B generates 1.4-1.8x faster (docs/benchmarks.md), equal bit for bit in bf16,
    within fp32 rounding (1e-6) in fp32. One more copy of the weights while it lasts."""
    linears = [(m, l) for m in models if not m.compiled_decode and max_new_tokens >= PACKING_PAYS_FROM
               for l in m.modules() if isinstance(l, Linear) and packing_pays(l)]
    try:
        for m, l in linears:
            weight = l.weight[:vocab_limit] if l is m.lm_head else l.weight
            l.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch)
        yield
    finally:
        for _, l in linears:
            l.packed = None

# -----------------------------------------------------------------------------
# sampling: how generation picks each next token


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy (argmax); else sample from softmax(logits / temperature)
    top_p: float = 1.0        # nucleus: only the smallest set of tokens whose probability reaches top_p
    top_k: int = 0            # only the top_k most probable tokens (0: all)
    seed: int = 0             # of generate's torch.Generator: the same seed gives the same tokens


def sample(logits, sampling, u):
    # logits (B, V), in the activation dtype -> next ids (B,), in fp32 (on CPU, argmax is 2x faster there than in
    # bf16); u (B, 1): float64 uniforms in [0, 1), one per row, unused when greedy
    logits = logits.float()
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        # nucleus: keep the smallest set of tokens whose probability reaches top_p (the top one always)
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= sampling.top_p
        logits = logits.scatter(-1, idx, sorted_logits.masked_fill(drop, float("-inf")))
    return draw(logits.softmax(-1), u)


BLOCK = 1024  # ids per block of draw's first level


def draw(probs, u):
    """One id per row of probs (B, V), id i with probability probs[:, i]: the inverse CDF at u (B, 1), a float64
    uniform per row, in two levels (the block of BLOCK ids, then the id inside it, each level a float64 cumulative
    sum), so that no token's share is lost to a long cumulative sum's rounding (a block's own sum moves its share by
    at most ~1e-7 of the block) and no (B, V) random tensor is drawn: on CPU, 8-31x faster than torch.multinomial
    at Qwen's vocabulary (`python bench.py decode`). Ids of probability 0 are never drawn."""
    B, V = probs.shape
    blocks = F.pad(probs, (0, -V % BLOCK)).view(B, -1, BLOCK)
    # a block's sum in the probabilities' own dtype: converting all of (B, V) to float64 first costs 5x draw's time
    mass = blocks.sum(-1).double().cumsum(-1)  # (B, number of blocks)
    u = u * mass[:, -1:]
    block = torch.searchsorted(mass, below(u, mass[:, -1:]), right=True)  # (B, 1): the first block past u
    inner = blocks[torch.arange(B, device=probs.device), block[:, 0]].cumsum(-1, dtype=torch.float64)
    rest = u - torch.where(block > 0, mass.gather(1, (block - 1).clamp(min=0)), 0.0)
    return (block * BLOCK + torch.searchsorted(inner, below(rest, inner[:, -1:]), right=True))[:, 0]


def below(x, total):
    # x kept under total (rounding may reach it): the first cumulative sum past it then ends at an id of mass > 0
    return torch.minimum(x, torch.nextafter(total, torch.zeros_like(total)))


PAD_ID = 0  # fills left padding and finished rows' slots: masked or trimmed, so its value never matters


def left_pad(prompts, L):
    """Prompts (token-id lists) -> ids (B, P) left-padded to the longest prompt, and key_mask (B, L) saying
    which of the L cache slots hold real tokens (the prompts' for now; generation fills in the rest)."""
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), PAD_ID, dtype=torch.long)
    key_mask = torch.zeros(B, L, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        key_mask[i, P - len(p):P] = True
    return ids, key_mask


def cut_after_eos(rows, eos_ids):
    # each row up to and including its first eos (the slots after it hold PAD_ID)
    return [row[:next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))] for row in rows]


def mixture(logits, sampling, a):
    """log((1 - a) softmax(z / T) + a softmax(z_mix / T)) from [z, z_mix] (B, V): the mixed distribution as
    logits (at T = 1 when greedy)."""
    T = sampling.temperature or 1.0
    own, other = (F.log_softmax(z.float() / T, dim=-1) for z in logits)
    log_weight = [math.log1p(-a) if a < 1 else float("-inf"), math.log(a) if a > 0 else float("-inf")]
    return torch.logaddexp(own + log_weight[0], other + log_weight[1])


def mixed_sampling(sampling):
    # the mixture is already at the temperature: sampled as it is (or its argmax when greedy)
    return replace(sampling, temperature=1.0 if sampling.temperature > 0 else 0.0)

# -----------------------------------------------------------------------------
# the model with its head: forward, generation, loading and saving


class Qwen(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = QwenModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self.compiled_decode = None  # compile_decoding's decode_step

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, mask=None, cache=None, cache_pos=None):
        """Final-norm hidden states (B, T, hidden_size), without the lm_head: the one path through the
        decoder, for training, scoring, prefill and decoding. attention_mask (B, T) with 1 for real
        tokens; None means no padding (or right padding only, whose outputs are ignored). Generation
        passes its own 4D mask over a static KV cache (cache: one (k, v) pair per layer) instead."""
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask_4d(attention_mask)
            if position_ids is None:
                position_ids = position_ids_from_mask(attention_mask)
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, block in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache[i] if cache else None, cache_pos)
        return self.model.norm(x)

    def forward(self, input_ids, attention_mask=None, position_ids=None, return_hidden=False):
        h = self.hidden_states(input_ids, attention_mask, position_ids)
        # return_hidden: the distillation loss projects hidden states itself, in chunks
        return h if return_hidden else self.lm_head(h)  # (B, T, hidden_size) or (B, T, vocab_size)

    # -------------------------------------------------------------------------
    # generation

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, eos_token_id, sampling=Sampling(), vocab_limit=None, mix_in=None):
        """Batched generation with a static KV cache, as gpt-fast: prefill, then decode_step (fixed
        shapes, so torch.compile(mode="reduce-overhead") can capture it in a CUDA graph; on CPU over
        weights packed once, packed_linears), then trim. Once half the rows have stopped, the batch and its
        caches are cut to the rest (the same tokens, up to the rounding of a smaller batch's matrix products).
        prompts: list of token-id lists (any lengths, left-padded internally). Greedy by default, else
        as `sampling` says. Stops a row at any id in eos_token_id (an int or a list). Ids >= vocab_limit
        (Qwen's padded embedding rows, beyond the tokenizer) are never emitted. mix_in=(model, a): each
        token comes from (1 - a) softmax(z / T) + a softmax(z_mix / T), z_mix the logits of that model (same
        tokenizer; vocab_limit then cuts both to the same real tokens), run in lockstep with its own KV cache
        (MiniLLM's teacher-mixed sampling). Returns one list per prompt of the new ids, including the eos id
        when one was emitted."""
        if min(len(p) for p in prompts) == 0:
            raise ValueError("generate: every prompt needs at least one token")
        dev = self.lm_head.weight.device
        B, P = len(prompts), max(len(p) for p in prompts)
        L = P + max_new_tokens
        L += -L % 64 if self.compiled_decode else 0  # a compiled decode_step sees few cache lengths
        ids, key_mask = (t.to(dev) for t in left_pad(prompts, L))
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=dev)
        models = [self] + ([mix_in[0]] if mix_in else [])
        caches = [m.empty_kv_cache(B, L) for m in models]
        gen = torch.Generator(device=dev).manual_seed(sampling.seed) if sampling.temperature > 0 else None
        pick = mixed_sampling(sampling) if mix_in else sampling  # how each next token is drawn
        V = vocab_limit or self.config.vocab_size

        with packed_linears(models, V, B, max_new_tokens):
            # prefill: the prompts, causal within the prompt and blind to left padding (every query sees itself)
            pos_ids = position_ids_from_mask(key_mask[:, :P])
            logits = [project(m.hidden_states(ids, position_ids=pos_ids, mask=attention_mask_4d(key_mask, P), cache=c,
                                              cache_pos=torch.arange(P, device=dev))[:, -1], m.lm_head, V)
                      for m, c in zip(models, caches)]  # (B, V) each: the real vocabulary only
            out = torch.full((B, max_new_tokens), PAD_ID, dtype=torch.long, device=dev)
            live = torch.arange(B, device=dev)  # the rows of out still decoded: the batch is cut to them (below)
            done = torch.zeros(B, dtype=torch.bool, device=dev)  # of the live rows, those past their eos
            pos_ids = pos_ids[:, -1:]
            n = 0
            for n in range(max_new_tokens):
                # all B uniforms every step, so that a row's draws do not depend on which rows were cut away
                u = torch.rand(B, 1, dtype=torch.float64, device=dev, generator=gen)[live] if gen else None
                nxt = torch.where(done, PAD_ID, sample(mixture(logits, sampling, mix_in[1]) if mix_in else logits[0],
                                                       pick, u))
                out[live, n] = nxt
                done |= torch.isin(nxt, eos)
                finished = int(done.sum())
                if n == max_new_tokens - 1 or finished == len(done):
                    break
                if 2 * finished >= len(done):  # half the batch finished: decode only the rest (a compiled
                    # decode_step then sees at most log2(B) more batch sizes per call)
                    keep = ~done
                    live, done, nxt, pos_ids, key_mask = (t[keep] for t in (live, done, nxt, pos_ids, key_mask))
                    for c in caches:  # layer by layer, so that the old caches are not all held beside the new ones
                        for i, (k, v) in enumerate(c):
                            c[i] = (k[keep], v[keep])
                key_mask[:, P + n] = True
                pos_ids = pos_ids + 1
                logits = [(m.compiled_decode or m.decode_step)(nxt[:, None], pos_ids, key_mask[:, None, None, :], c,
                                                               torch.tensor([P + n], device=dev), V)
                          for m, c in zip(models, caches)]
        return cut_after_eos(out[:, :n + 1].tolist(), set(eos.tolist()))

    def empty_kv_cache(self, B, L):
        """One (k, v) pair per layer, each (B, n_kv_head, L, head_dim), in the dtype attention computes in: the
        autocast dtype under autocast (an fp32 student sampling under bf16 autocast: a bf16 cache), else the
        weights'. Zeros: masked slots must hold no NaN."""
        shape = (B, self.config.num_key_value_heads, L, self.config.head_dim)
        dev = self.lm_head.weight.device
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else self.lm_head.weight.dtype
        like = dict(device=dev, dtype=dtype)
        return [(torch.zeros(shape, **like), torch.zeros(shape, **like)) for _ in self.model.layers]

    def compile_decoding(self):
        """generate then decodes with decode_step compiled (torch.compile, fixed shapes: once per batch size and cache
        length, the length rounded up to a multiple of 64; on CUDA in reduce-overhead mode, not yet run on a GPU).
        In fp32 its greedy tokens equal the eager path's (tested); in bf16 fused kernels round otherwise and may
        flip a near tie. Each batch size a cut of stopped rows leaves compiles anew (past dynamo's recompile limit,
        decode_step runs eager)."""
        mode = "reduce-overhead" if self.lm_head.weight.is_cuda else None
        self.compiled_decode = torch.compile(self.decode_step, dynamic=False, mode=mode)
        return self

    def decode_step(self, x, position_ids, mask, cache, cache_pos, vocab_limit):
        """One token per row: x (B, 1), position_ids (B, 1), mask (B, 1, 1, L) over the cache slots,
        cache_pos (1,) the slot to write. Returns logits (B, vocab_limit) in the activation dtype. Every shape is
        fixed."""
        h = self.hidden_states(x, position_ids=position_ids, mask=mask, cache=cache, cache_pos=cache_pos)
        return project(h[:, -1], self.lm_head, vocab_limit)

    # -------------------------------------------------------------------------
    # loading and saving Hugging Face checkpoints

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """A model directory (config.json + model.safetensors or a sharded index) -> Qwen, strict: it loads
        what check_model_dir accepts, and refuses the rest with its CheckpointError."""
        cfg, tensors = check_model_dir(path)
        # build on the meta device: no memory and no random init for weights that are about to arrive
        with torch.device("meta"):
            model = cls(cfg)
        sd = {}
        for file in dict.fromkeys(tensors.values()):  # each file opened once
            with safe_open(file, framework="pt", device=str(device)) as f:
                sd.update({k: finite(f.get_tensor(k), k, file).to(dtype) for k, where in tensors.items() if where == file})
        if cfg.tie_word_embeddings:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        model.load_state_dict(sd, strict=True, assign=True)
        if cfg.tie_word_embeddings:  # assign=True replaced both Parameters; make them one again
            model.lm_head.weight = model.model.embed_tokens.weight
        return model

    def save_pretrained(self, path, max_shard_size=5 * 1024**3):
        """config.json + safetensors (sharded with an index above max_shard_size bytes), loadable by
        transformers, written atomically: an interrupted save never leaves a half checkpoint at path."""
        with atomic_dir(path) as tmp:
            self.write_pretrained(tmp, max_shard_size)

    def write_pretrained(self, directory, max_shard_size=5 * 1024**3):
        # the files of save_pretrained, into an existing directory (the trainer adds its own beside them)
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight")  # safetensors refuses shared storage; HF re-ties on load
        shards, cur, size = [], {}, 0
        for k, v in sd.items():
            nbytes = v.numel() * v.element_size()
            if cur and size + nbytes > max_shard_size:
                shards.append(cur)
                cur, size = {}, 0
            cur[k], size = v, size + nbytes
        shards.append(cur)
        cfg = self.config.to_dict()
        cfg["torch_dtype"] = str(next(iter(sd.values())).dtype).removeprefix("torch.")
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        if len(shards) == 1:
            save_file(shards[0], os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
            return
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in sd.values())
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

# -----------------------------------------------------------------------------
# loading and saving HF checkpoints


def checkpoint_files(path):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path} does not exist")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, "rb") as f:
            weight_map = parse_json(f.read(), index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object (tensor name -> shard file)")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(path, name)):
                raise FileNotFoundError(f"{index} lists shard {name}, which is missing from {path}")
        return [os.path.join(path, name) for name in files]
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    return [single]


def safetensors_shapes(file):
    """{key: shape} of a .safetensors file, from its header alone (8-byte little-endian length, then JSON
    {key: {dtype, shape, data_offsets}}); refuses a file whose tensor data is not as long as the header says,
    the mark of an interrupted download or copy (the safetensors library refuses it too, less plainly)."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or 8 + n > size:
            raise CheckpointError(f"{file}: truncated: {size:,} bytes, shorter than its own header")
        header = parse_json(f.read(n), f"{file}: header")
    try:
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        shapes = {k: tuple(v["shape"]) for k, v in entries.items()}
        end = max((v["data_offsets"][1] for v in entries.values()), default=0)
    except (TypeError, KeyError, IndexError):
        raise CheckpointError(f"{file}: header is not a safetensors header (each tensor needs shape and "
                              "data_offsets)") from None
    if end != size - 8 - n:
        what = "truncated" if end > size - 8 - n else "longer than its header says"
        raise CheckpointError(f"{file}: {what}: header says {end:,} bytes of tensor data, the file has "
                              f"{size - 8 - n:,}")
    return shapes


def check_model_dir(path):
    """A model directory -> (QwenConfig, {key: file} of the tensors to load), from config.json and the
    safetensors headers alone (no tensor data is read: milliseconds), so a run can check every model it
    reads before any long work; from_pretrained loads exactly this. Refused with CheckpointError naming
    the file: a config this model does not implement, a file cut short, a tensor missing, unexpected or
    of another shape than config.json implies."""
    files = checkpoint_files(path)
    cfg = QwenConfig.from_json(os.path.join(path, "config.json"))
    with torch.device("meta"):  # the model's own parameter shapes, at no memory cost
        expected = {k: tuple(v.shape) for k, v in Qwen(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")  # tied checkpoints (HF's default when tied) have no lm_head.weight
    tensors = {}
    for file in files:
        for key, shape in safetensors_shapes(file).items():
            if key not in expected:
                if cfg.tie_word_embeddings and key == "lm_head.weight":
                    continue  # some tied checkpoints store the shared matrix twice
                raise CheckpointError(f"{file}: unexpected key {key!r} for a Qwen2 model with this config.json")
            if shape != expected[key]:
                raise CheckpointError(f"{file}: {key} has shape {shape}, config.json implies {expected[key]}")
            tensors[key] = file
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{path}: checkpoint is missing {len(missing)} key(s), e.g. {missing[:3]}")
    return cfg, tensors


def model_identity(path):
    # what changes a model's outputs: its config and its weight files (name, size, mtime)
    with open(os.path.join(path, "config.json"), "rb") as f:
        config = hashlib.sha256(f.read()).hexdigest()
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    return {"config_sha256": config,
            "weights": [[os.path.basename(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in files]}


@contextlib.contextmanager
def atomic_dir(path):
    """Yields a temporary sibling directory to fill; renames it to path when the block completes (over an
    older path, if any), and removes it if the block fails or is interrupted. Every directory deltakd
    writes (checkpoints, token caches, target shards) goes through here."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=os.path.dirname(path))
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src, dst):
    # rename() cannot replace a non-empty directory: move the old one aside first, then drop it
    old = None
    if os.path.exists(dst):
        old = dst + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
    os.rename(src, dst)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(parent, names):
    """What a kill inside atomic_dir left in parent among the directories matching names (a glob): an old one
    that replace_dir had moved aside goes back in place if nothing replaced it; the temporary ones are removed.
    Returns how many were removed and their bytes."""
    for old in glob.glob(os.path.join(parent, names + ".old")):
        if not os.path.exists(old[:-4]):
            os.rename(old, old[:-4])
    leftovers = glob.glob(os.path.join(parent, f".tmp-{names}-*")) + glob.glob(os.path.join(parent, names + ".old"))
    size = sum(os.path.getsize(os.path.join(r, f)) for d in leftovers for r, _, fs in os.walk(d) for f in fs)
    for d in leftovers:
        shutil.rmtree(d, ignore_errors=True)
    return len(leftovers), size

# -----------------------------------------------------------------------------
# initialisation and counting: parameters, model FLOPs, activation memory


def init_weights(model, std=0.02, seed=0):
    # HF's Qwen2 init: normal(0, initializer_range) for linear and embedding weights, zero biases
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def num_parameters(model):
    # unique parameters: a tied lm_head counts once, as in HF's num_parameters()
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def flops_per_token(config, T, train):
    """Model FLOPs of one token in a sequence of T tokens (PaLM's accounting): 2 per parameter per
    token forward (the embedding lookup is no matmul; a tied lm_head is), plus attention's
    QK^T and AV, 4 * layers * hidden * T forward; training is 3x forward (no recomputation counted)."""
    c = config
    n = (c.num_hidden_layers * (4 * c.hidden_size * c.hidden_size * (1 + c.num_key_value_heads / c.num_attention_heads) / 2
         + 3 * c.hidden_size * c.intermediate_size) + c.vocab_size * c.hidden_size)
    forward = 2 * n + 4 * c.num_hidden_layers * c.hidden_size * T
    return 3 * forward if train else forward


def activation_bytes(config, tokens, dtype_bytes, checkpointing):
    """Activations kept for backward: per layer and token, the fp32 residual stream into both RMSNorms
    (8C) and, in the autocast dtype (dtype_bytes each), the normed inputs, q/k before and after RoPE, v,
    the attention output and its re-layout, and SwiGLU's gate, up, silu and product (6C + 3 C_kv + 4I).
    With checkpointing only each layer's input (4C) stays, plus one layer's worth during recomputation."""
    C, I = config.hidden_size, config.intermediate_size
    kv = C * config.num_key_value_heads // config.num_attention_heads
    layer = 8 * C + dtype_bytes * (6 * C + 3 * kv + 4 * I)
    if checkpointing:
        return tokens * (4 * C * config.num_hidden_layers + layer)
    return tokens * layer * config.num_hidden_layers


def kv_cache_bytes(config, tokens, dtype_bytes):
    # generate's static KV cache: a key and a value per layer, KV head and token
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * tokens * dtype_bytes
