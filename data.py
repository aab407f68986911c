"""
Chat data -> supervised token batches for Qwen-2.5, with the exact ChatML chat template.

    rows = read_rows("assets/data/ultrachat_200k/ultrachat_small.jsonl")   # .jsonl, .json, .parquet
    examples, stats = encode_rows(rows, tokenizer, max_len=1024)           # (input_ids, labels) pairs
    for idx in make_batches([len(e[0]) for e in examples], 8, seed=0, epoch=0)[rank::world_size]:
        batch = collate([examples[i] for i in idx], pad_id)

Row formats, recognised by their fields: `messages` (Ultrachat-200k; list of {role, content}),
`problem` + `generated_solution` (OpenMathReasoning), `prompt` + `response`, `instruction` [+ `input`]
+ `output` (Alpaca), `question` + `answer` (GSM8K); and `text` alone for plain-text pretraining
(no chat template, every token + <|endoftext|> supervised).

Label convention (as HF): labels align with input_ids, -100 where nothing is learned; the one
next-token shift happens in the loss. Supervised = every assistant turn's content plus its
<|im_end|> (so the model learns to stop); never the system/user turns, headers or padding.
"""

import json
import math
import os
import random

IGNORE_INDEX = -100
# the default system prompts of the two chat templates in Qwen2.5's tokenizer_config.json
SYSTEM_PROMPT_BASE = "You are a helpful assistant."
SYSTEM_PROMPT_INSTRUCT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    pass

# -----------------------------------------------------------------------------
# reading rows


def read_rows(path):
    """List of dict rows from .jsonl (one object per line), .json (a list of objects) or .parquet."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq  # optional: not a dependency of deltakd
        except ImportError:
            raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow), "
                            "or convert the file to .jsonl") from None
        return pq.read_table(path).to_pylist()
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start})") from None
    if path.endswith(".json"):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json data file must hold a list of rows")
    else:
        rows = []
        for i, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: malformed JSON line ({e.msg})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i} is a {type(row).__name__}, not an object")
    return rows


def to_messages(row):
    """A row of any supported format -> [{role, content}, ...]; raises DataError saying what is wrong."""
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise DataError("'messages' must be a list of {role, content} objects")
        msgs = [{"role": m.get("role"), "content": m.get("content")} for m in msgs]
    elif "problem" in row and "generated_solution" in row:
        msgs = [{"role": "user", "content": row["problem"]},
                {"role": "assistant", "content": row["generated_solution"]}]
    elif "prompt" in row and "response" in row:
        msgs = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    elif "instruction" in row and "output" in row:
        user = row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    elif "question" in row and "answer" in row:
        msgs = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
    else:
        raise DataError(f"unknown row format (fields {sorted(row)}); expected messages, problem/generated_solution,"
                        " prompt/response, instruction/output or question/answer")
    check_messages(msgs)
    return msgs


def check_messages(msgs):
    # [system] user assistant (user assistant)*: the only shape the loss and the eval protocol expect
    if not msgs:
        raise DataError("empty conversation")
    for i, m in enumerate(msgs):
        if m["role"] not in ROLES:
            raise DataError(f"message {i}: unknown role {m['role']!r} (expected one of {ROLES})")
        if not isinstance(m["content"], str):
            raise DataError(f"message {i} ({m['role']}): content must be a string")
    start = 1 if msgs[0]["role"] == "system" else 0
    for i, m in enumerate(msgs[start:], start):
        want = "user" if (i - start) % 2 == 0 else "assistant"
        if m["role"] != want:
            raise DataError(f"turns out of order: message {i} is {m['role']!r}, expected {want!r}")
        if want == "assistant" and not m["content"].strip():
            raise DataError(f"message {i}: empty assistant turn")
    if msgs[-1]["role"] != "assistant":
        raise DataError("conversation ends with a user turn: nothing to supervise")

# -----------------------------------------------------------------------------
# the Qwen-2.5 chat template (ChatML), rendered by hand


def chat_segments(msgs, system_prompt=SYSTEM_PROMPT_BASE):
    """The rendered conversation as (text, supervised) pieces whose concatenation is exactly what the
    official Qwen2.5 chat_template (no tools) renders: a system turn first (the row's own, else the
    default), then `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message."""
    if msgs and msgs[0]["role"] == "system":
        system_prompt, msgs = msgs[0]["content"], msgs[1:]
    segs = [(f"<|im_start|>system\n{system_prompt}<|im_end|>\n", False)]
    for m in msgs:
        if m["role"] == "assistant":
            segs += [("<|im_start|>assistant\n", False), (m["content"], True), ("<|im_end|>", True), ("\n", False)]
        else:
            segs.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
    return segs


def render_chat(msgs, system_prompt=SYSTEM_PROMPT_BASE, add_generation_prompt=False):
    text = "".join(t for t, _ in chat_segments(msgs, system_prompt))
    return text + "<|im_start|>assistant\n" if add_generation_prompt else text


def row_segments(row, system_prompt=SYSTEM_PROMPT_BASE):
    if "text" in row and "messages" not in row:  # plain text: pretraining
        if not isinstance(row["text"], str) or not row["text"]:
            raise DataError("'text' must be a non-empty string")
        return [(row["text"], True), ("<|endoftext|>", True)]
    return chat_segments(to_messages(row), system_prompt)


def encode_rows(rows, tokenizer, max_len, system_prompt=SYSTEM_PROMPT_BASE, skip_bad_rows=False, source="data"):
    """Rows -> list of (input_ids, labels) and a stats dict. Each supervised piece is tokenized on its
    own, as at inference, where the prompt ends with `<|im_start|>assistant\\n` and the model
    continues from there; runs of unsupervised text are tokenized together. Examples truncated to
    max_len with no supervised target left are dropped and counted."""
    specials = {t: tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")}
    for t, i in specials.items():
        if i is None:
            raise DataError(f"the tokenizer has no {t} token: not a Qwen-2.5 (ChatML) tokenizer")
    convs, bad = [], []
    for i, row in enumerate(rows):
        try:
            convs.append(merge_segments(row_segments(row, system_prompt)))
        except DataError as e:
            if not skip_bad_rows:
                raise DataError(f"{source}: row {i}: {e} (pass skip_bad_rows to skip such rows)") from None
            bad.append(i)
    pieces = [t for segs in convs for t, _ in segs if t not in specials]
    encoded = iter(tokenizer.encode_batch(pieces, add_special_tokens=False))
    examples, truncated, dropped = [], 0, 0
    for segs in convs:
        ids, labels = [], []
        for text, supervised in segs:
            piece = [specials[text]] if text in specials else next(encoded).ids
            ids += piece
            labels += piece if supervised else [IGNORE_INDEX] * len(piece)
        if len(ids) > max_len:
            ids, labels = ids[:max_len], labels[:max_len]
            truncated += 1
        # position 0 has no previous token to predict it from, so it never counts as a target
        if all(l == IGNORE_INDEX for l in labels[1:]):
            dropped += 1
            continue
        examples.append((ids, labels))
    stats = {"rows": len(rows), "examples": len(examples), "bad_rows_skipped": len(bad),
             "truncated": truncated, "dropped_no_target": dropped,
             "supervised_tokens": sum(sum(l != IGNORE_INDEX for l in lab[1:]) for _, lab in examples)}
    return examples, stats


def merge_segments(segs):
    # join neighbouring unsupervised pieces so they are tokenized as one string; keep <|im_end|> apart
    out = []
    for text, sup in segs:
        if out and not sup and not out[-1][1]:
            out[-1] = (out[-1][0] + text, False)
        else:
            out.append((text, sup))
    return out

# -----------------------------------------------------------------------------
# batching


def make_batches(lengths, batch_size, seed, epoch, multiple=1, group_by_length=True):
    """One epoch's micro-batches, as lists of example indices; deterministic in (seed, epoch).
    The number of batches is rounded up to a multiple of `multiple` (world_size * grad_accum) by
    making some batches one example smaller, so each rank gets as many batches as every other
    (`batches[rank::world_size]`), every example is used once, and none is dropped or repeated.
    With group_by_length, examples of similar length share a batch (less padding) and the batch
    order is shuffled again."""
    N = len(lengths)
    nb = math.ceil(math.ceil(N / batch_size) / multiple) * multiple
    if nb > N:
        raise DataError(f"{N} examples cannot fill {nb} batches (batch_size={batch_size}, "
                        f"world_size*grad_accum={multiple}): use more data or smaller batches")
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(N))
    rng.shuffle(order)
    if group_by_length:
        window = 64 * batch_size  # sort within windows: similar lengths together, order still random
        order = [i for w in range(0, N, window) for i in sorted(order[w:w + window], key=lambda i: -lengths[i])]
    sizes = [N // nb + (b < N % nb) for b in range(nb)]
    batches, start = [], 0
    for s in sizes:
        batches.append(order[start:start + s])
        start += s
    if group_by_length:
        rng.shuffle(batches)
    return batches


def padding_fraction(batches, lengths):
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - real / padded


def collate(examples, pad_id):
    """Right-padded tensors: input_ids, labels (-100 on padding) and attention_mask, each (B, T)."""
    import torch
    T = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(len(examples), T, dtype=torch.long)
    for b, (ids, lab) in enumerate(examples):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        labels[b, :len(lab)] = torch.tensor(lab)
        attention_mask[b, :len(ids)] = 1
    return input_ids, labels, attention_mask

# -----------------------------------------------------------------------------
# evaluation pairs


def split_rows(rows, eval_size, seed):
    """(train_rows, eval_rows): a held-out set of eval_size rows chosen by seed, disjoint from train."""
    if eval_size >= len(rows):
        raise DataError(f"eval_size={eval_size} leaves no training rows out of {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:eval_size])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def eval_pairs(rows, tokenizer, system_prompt=SYSTEM_PROMPT_BASE, max_prompt_len=None, source="eval data"):
    """Single-turn protocol (as MiniLLM / DistiLLM): the prompt is the system turn and the first user
    turn followed by `<|im_start|>assistant\\n`; the reference is the first assistant reply.
    Returns (prompt token-id lists, reference strings); prompts longer than max_prompt_len are
    skipped (counted in the third value)."""
    prompts, refs, skipped = [], [], 0
    for i, row in enumerate(rows):
        try:
            msgs = to_messages(row)
        except DataError as e:
            raise DataError(f"{source}: row {i}: {e}") from None
        start = 1 if msgs[0]["role"] == "system" else 0
        text = render_chat(msgs[:start + 1], system_prompt, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if max_prompt_len and len(ids) > max_prompt_len:
            skipped += 1
            continue
        prompts.append(ids)
        refs.append(msgs[start + 1]["content"])
    return prompts, refs, skipped
