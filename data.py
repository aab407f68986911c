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

import concurrent.futures
import hashlib
import itertools
import json
import math
import os
import time

import numpy as np

from qwen import atomic_dir

IGNORE_INDEX = -100
# the default system prompts of the two chat templates in Qwen2.5's tokenizer_config.json
SYSTEM_PROMPT_BASE = "You are a helpful assistant."
SYSTEM_PROMPT_INSTRUCT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    pass

# -----------------------------------------------------------------------------
# reading rows: streamed, so a 3M-row file never sits in memory as Python objects


def iter_rows(path, max_rows=0):
    """Yields (row_number, byte_offset, row) for the first max_rows rows (0: all) of a .jsonl (line by
    line), .parquet (row group by row group; needs pyarrow) or .json file (a list of objects, read
    whole). byte_offset is where a .jsonl row starts (read_rows_at seeks there); -1 otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    limit = max_rows if max_rows > 0 else float("inf")
    if path.endswith(".parquet"):
        pf = parquet_file(path)
        n = 0
        for g in range(pf.num_row_groups):
            if n >= limit:
                return  # the remaining row groups are never read
            for row in pf.read_row_group(g).to_pylist():
                if n >= limit:
                    return
                yield n, -1, check_row(row, path, n)
                n += 1
    elif path.endswith(".json"):
        with open(path, "rb") as f:
            text = decode_utf8(f.read(), path, 1)
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json data file must hold a list of rows")
        for n, row in enumerate(rows[:max_rows] if max_rows > 0 else rows):
            yield n, -1, check_row(row, path, n)
    else:
        n, offset = 0, 0
        with open(path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                start, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                if n >= limit:
                    return
                yield n, start, parse_line(line, path, line_no, n)
                n += 1


def read_rows(path, max_rows=0):
    """All rows (or the first max_rows) as a list: for small files (evaluation sets, tests, the demo)."""
    return [row for _, _, row in iter_rows(path, max_rows)]


def read_rows_at(path, numbers, byte_offsets=None):
    """{row_number: row} for a few rows of a big file: .jsonl seeks to byte_offsets[number] (as stored by
    the token cache), .parquet reads only the row groups that hold them, .json reads the file."""
    want = sorted(set(int(n) for n in numbers))
    if not want:
        return {}
    if path.endswith(".parquet"):
        pf, out, first = parquet_file(path), {}, 0
        for g in range(pf.num_row_groups):
            size = pf.metadata.row_group(g).num_rows
            inside = [n for n in want if first <= n < first + size]
            if inside:
                table = pf.read_row_group(g)
                out.update({n: check_row(table.slice(n - first, 1).to_pylist()[0], path, n) for n in inside})
            first += size
        return out
    if path.endswith(".jsonl") and byte_offsets is not None:
        out = {}
        with open(path, "rb") as f:
            for n in want:
                f.seek(int(byte_offsets[n]))
                out[n] = parse_line(f.readline(), path, None, n)
        return out
    wanted = set(want)
    return {n: row for n, _, row in iter_rows(path, max(want) + 1) if n in wanted}


def parquet_file(path):
    try:
        import pyarrow.parquet as pq  # optional: not a dependency of deltakd
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow), "
                        "or convert the file to .jsonl") from None
    return pq.ParquetFile(path)


def decode_utf8(raw, path, line_no):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = line_no + raw[:e.start].count(b"\n")
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start} of the line)") from None


def parse_line(line, path, line_no, n):
    where = f"{path}:{line_no}" if line_no else f"{path}: row {n}"
    try:
        row = json.loads(decode_utf8(line, path, line_no or 0))
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON line ({e.msg})") from None
    return check_row(row, path, n)


def check_row(row, path, n):
    if not isinstance(row, dict):
        raise DataError(f"{path}: row {n} is a {type(row).__name__}, not an object")
    return row


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


def encode_block(rows, tokenizer, max_len, system_prompt=SYSTEM_PROMPT_BASE, skip_bad_rows=False, source="data",
                 numbers=None, stats=None):
    """Rows -> one (input_ids, spans, row_number) per kept example, spans the [start, end) runs of
    supervised positions. Each supervised piece is tokenized on its own, as at inference, where the
    prompt ends with `<|im_start|>assistant\\n` and the model continues from there; runs of
    unsupervised text are tokenized together (one encode_batch call for the whole block). Examples
    truncated to max_len with no supervised target left are dropped and counted in stats."""
    specials = {t: tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")}
    for t, i in specials.items():
        if i is None:
            raise DataError(f"the tokenizer has no {t} token: not a Qwen-2.5 (ChatML) tokenizer")
    stats = stats if stats is not None else new_stats()
    numbers = numbers if numbers is not None else range(len(rows))
    convs = []
    for n, row in zip(numbers, rows):
        try:
            convs.append((n, merge_segments(row_segments(row, system_prompt))))
        except DataError as e:
            if not skip_bad_rows:
                raise DataError(f"{source}: row {n}: {e} (pass skip_bad_rows to skip such rows)") from None
            stats["bad_rows_skipped"] += 1
    stats["rows"] += len(rows)
    pieces = [t for _, segs in convs for t, _ in segs if t not in specials]
    encoded = iter(tokenizer.encode_batch(pieces, add_special_tokens=False))
    out = []
    for n, segs in convs:
        ids, spans = [], []
        for text, supervised in segs:
            piece = [specials[text]] if text in specials else next(encoded).ids
            if supervised and spans and spans[-1][1] == len(ids):
                spans[-1][1] += len(piece)  # content and its <|im_end|> form one run
            elif supervised:
                spans.append([len(ids), len(ids) + len(piece)])
            ids += piece
        if len(ids) > max_len:
            ids = ids[:max_len]
            spans = [[s, min(e, max_len)] for s, e in spans if s < max_len]
            stats["truncated"] += 1
        # position 0 has no previous token to predict it from, so it never counts as a target
        n_sup = sum(e - max(s, 1) for s, e in spans if e > 1)
        if n_sup == 0:
            stats["dropped_no_target"] += 1
            continue
        stats["examples"] += 1
        stats["supervised_tokens"] += n_sup
        stats["tokens"] += len(ids)
        out.append((ids, spans, n))
    return out


def new_stats():
    return dict.fromkeys(("rows", "examples", "tokens", "supervised_tokens", "bad_rows_skipped", "truncated",
                          "dropped_no_target"), 0)


def labels_from_spans(ids, spans):
    """int64 labels aligned with ids: the ids inside the supervised [start, end) spans, -100 elsewhere."""
    ids = np.asarray(ids, dtype=np.int64)
    labels = np.full_like(ids, IGNORE_INDEX)
    for s, e in spans:
        labels[s:e] = ids[s:e]
    return labels


def encode_rows(rows, tokenizer, max_len, system_prompt=SYSTEM_PROMPT_BASE, skip_bad_rows=False, source="data"):
    """Rows held in memory -> list of (input_ids, labels) lists and a stats dict (small data; big files
    go through the TokenCache below, which uses the same encode_block)."""
    stats = new_stats()
    out = encode_block(rows, tokenizer, max_len, system_prompt, skip_bad_rows, source, stats=stats)
    return [(ids, labels_from_spans(ids, spans).tolist()) for ids, spans, _ in out], stats


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
# the token cache: every example of a data file tokenized once, memory-mapped by every rank
#
#   input_ids.u32   all examples' token ids back to back (uint32: Qwen's ids exceed 65,535)
#   offsets.i64     (N + 1,) where example i starts in input_ids
#   spans.i32       (S, 2) [start, end) supervised runs, positions within their example
#   span_offsets.i64  (N + 1,) where example i's spans start
#   rows.i64        (N,) the data file's row number of each example
#   line_offsets.i64  (R,) byte offset of every .jsonl row (evaluation rows are read back by seeking)
#   meta.json       the key, counts and statistics; written last, and the directory is renamed into
#                   place only when complete, so a killed build never leaves a cache a run trusts

CACHE_FORMAT = 1
CACHE_ARRAYS = {"input_ids": np.uint32, "offsets": np.int64, "spans": np.int32, "span_offsets": np.int64,
                "rows": np.int64, "line_offsets": np.int64}


def file_identity(path):
    # size, mtime and a hash of the first and last MiB: cheap for a 30 GB file, catches edits and copies
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, st.st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256_ends": h.hexdigest()}


def cache_key(data_path, tokenizer_path, max_len, system_prompt, max_rows, skip_bad_rows):
    """Everything that changes the tokens. The directory name is a hash of it; meta.json keeps it whole."""
    with open(tokenizer_path, "rb") as f:
        tok_hash = hashlib.sha256(f.read()).hexdigest()
    return {"format": CACHE_FORMAT, "data": file_identity(data_path),
            "data_name": os.path.basename(data_path), "tokenizer_sha256": tok_hash, "max_len": max_len,
            "system_prompt": system_prompt, "max_rows": max_rows, "skip_bad_rows": skip_bad_rows}


def cache_dir_for(root, key):
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = os.path.splitext(key["data_name"])[0]
    return os.path.join(root, f"tokens-{stem}-{digest}")


class TokenCache:
    """A built cache, memory-mapped: nothing is read until an example is asked for."""

    def __init__(self, path):
        self.path = path
        with open(os.path.join(path, "meta.json")) as f:
            self.meta = json.load(f)
        a = {name: np.memmap(os.path.join(path, f"{name}.bin"), dtype=dt, mode="r")
             if os.path.getsize(os.path.join(path, f"{name}.bin")) else np.zeros(0, dt)
             for name, dt in CACHE_ARRAYS.items()}
        self.input_ids, self.offsets, self.span_offsets = a["input_ids"], a["offsets"], a["span_offsets"]
        self.spans, self.rows, self.line_offsets = a["spans"].reshape(-1, 2), a["rows"], a["line_offsets"]
        self.lengths = np.diff(self.offsets)

    def __len__(self):
        return len(self.rows)

    def example(self, i):
        """(input_ids, labels) of example i as int64 numpy arrays, labels -100 outside supervised runs."""
        ids = self.input_ids[self.offsets[i]:self.offsets[i + 1]].astype(np.int64)
        return ids, labels_from_spans(ids, self.spans[self.span_offsets[i]:self.span_offsets[i + 1]])

    def n_targets(self):
        """(N,) supervised positions per example that the loss sees (position 0 never counts)."""
        s = self.spans.astype(np.int64)
        per_span = s[:, 1] - np.maximum(s[:, 0], 1)
        return np.add.reduceat(np.maximum(per_span, 0), self.span_offsets[:-1]) if len(s) else np.zeros(0, np.int64)


def check_cache(path, key):
    """None if path holds a complete cache for key, else the reason it cannot be used."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        return "no meta.json (an interrupted build)"
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        return f"meta.json unreadable ({e})"
    if meta.get("key") != key:
        return "its key differs from this run's"
    for name, dt in CACHE_ARRAYS.items():
        p, want = os.path.join(path, f"{name}.bin"), meta["counts"][name] * np.dtype(dt).itemsize
        if not os.path.isfile(p) or os.path.getsize(p) != want:
            return f"{name}.bin has {os.path.getsize(p) if os.path.isfile(p) else 'no'} bytes, meta.json says {want}"
    c = TokenCache(path)
    if len(c.offsets) != len(c.rows) + 1 or (len(c.offsets) and c.offsets[-1] != len(c.input_ids)) \
            or (len(c.span_offsets) and c.span_offsets[-1] != len(c.spans)):
        return "offsets do not add up to the arrays they index"
    return None


def build_cache(data_path, tokenizer, path, key, max_len, system_prompt, max_rows=0, skip_bad_rows=False,
                log=print, block_rows=2048):
    """Streams the data file, tokenizes blocks of rows (the tokenizer's encode_batch runs on all cores
    in a worker thread while this thread parses the next block), appends to flat files in a
    temporary directory and renames it to `path` when complete. Returns the stats."""
    files, counts = {}, dict.fromkeys(CACHE_ARRAYS, 0)
    stats, n_tok, n_spans = new_stats(), 0, 0
    total_bytes = os.path.getsize(data_path)
    total_rows = max_rows or (parquet_file(data_path).metadata.num_rows if data_path.endswith(".parquet") else 0)
    t0 = last = time.time()

    def write(name, array, count=-1):
        a = np.fromiter(array, dtype=CACHE_ARRAYS[name], count=count) if count >= 0 else \
            np.asarray(array, dtype=CACHE_ARRAYS[name])
        a.tofile(files[name])
        counts[name] += a.size

    def encode(rows, numbers):
        return encode_block(rows, tokenizer, max_len, system_prompt, skip_bad_rows, data_path, numbers, stats)

    def flush(out):
        nonlocal n_tok, n_spans
        lens = [len(ids) for ids, _, _ in out]
        write("input_ids", itertools.chain.from_iterable(ids for ids, _, _ in out), sum(lens))
        write("offsets", n_tok + np.cumsum(lens))
        n_tok += sum(lens)
        write("spans", [x for _, spans, _ in out for span in spans for x in span])
        write("span_offsets", n_spans + np.cumsum([len(spans) for _, spans, _ in out]))
        n_spans += sum(len(spans) for _, spans, _ in out)
        write("rows", [n for _, _, n in out])

    with atomic_dir(path) as tmp, concurrent.futures.ThreadPoolExecutor(1) as pool:
        files.update({name: open(os.path.join(tmp, f"{name}.bin"), "wb") for name in CACHE_ARRAYS})
        try:
            write("offsets", [0])
            write("span_offsets", [0])
            pending, rows, numbers, line_offsets, n_read, pos = None, [], [], [], 0, 0
            for n, offset, row in itertools.chain(iter_rows(data_path, max_rows), [(None, None, None)]):
                if n is not None:
                    rows.append(row)
                    numbers.append(n)
                    n_read, pos = n + 1, offset
                    if offset >= 0:
                        line_offsets.append(offset)
                if len(rows) == block_rows or (n is None and rows):
                    write("line_offsets", line_offsets)  # a block's worth per write, not one row each
                    if pending is not None:
                        flush(pending.result())
                    pending, rows, numbers, line_offsets = pool.submit(encode, rows, numbers), [], [], []
                if log and time.time() - last > 10:
                    last = time.time()
                    done = n_read / total_rows if total_rows else pos / total_bytes if pos > 0 else 0
                    eta = f", about {(last - t0) * (1 - done) / done:.0f}s left" if done else ""
                    log(f"token cache: {n_read:,} rows read, {n_tok / 1e6:.1f}M tokens written, "
                        f"{n_read / (last - t0):,.0f} rows/s, {n_tok / (last - t0) / 1e6:.2f}M tokens/s{eta}")
            if pending is not None:
                flush(pending.result())
        finally:
            for f in files.values():
                f.close()
        stats["seconds"] = round(time.time() - t0, 1)
        with open(os.path.join(tmp, "meta.json"), "w") as f:  # last: a cache without it is never trusted
            json.dump({"key": key, "counts": counts, "stats": stats}, f, indent=1)
    return stats


# -----------------------------------------------------------------------------
# batching


def make_batches(lengths, batch_size, seed, epoch, multiple=1, group_by_length=True):
    """One epoch's micro-batches, as int64 arrays of example indices; deterministic in (seed, epoch).
    The number of batches is rounded up to a multiple of `multiple` (world_size * grad_accum) by
    making some batches one example smaller, so each rank gets as many batches as every other
    (`batches[rank::world_size]`), every example is used once, and none is dropped or repeated.
    With group_by_length, examples of similar length share a batch (less padding) and the batch
    order is shuffled again. numpy throughout: 3M examples take a second, not a Python list each."""
    lengths = np.asarray(lengths)
    N = len(lengths)
    nb = math.ceil(math.ceil(N / batch_size) / multiple) * multiple
    if nb > N:
        raise DataError(f"{N} examples cannot fill {nb} batches (batch_size={batch_size}, "
                        f"world_size*grad_accum={multiple}): use more data or smaller batches")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(N)
    if group_by_length:
        window = 64 * batch_size  # sort within windows: similar lengths together, order still random
        keys = (np.arange(N) // window, -lengths[order])
        order = order[np.lexsort(keys[::-1])]  # by window, then longest first, ties in shuffled order
    sizes = N // nb + (np.arange(nb) < N % nb)
    batches = np.split(order, np.cumsum(sizes)[:-1])
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(nb)]
    return batches


def padding_fraction(batches, lengths):
    lengths = np.asarray(lengths)
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1 - real / padded


def collate(examples, pad_id, multiple=1):
    """Right-padded tensors: input_ids, labels (-100 on padding) and attention_mask, each (B, T), T rounded
    up to a multiple (so a compiled model sees few distinct shapes)."""
    import torch
    T = -(-max(len(ids) for ids, _ in examples) // multiple) * multiple
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


def held_out_rows(n_rows, eval_size, seed):
    """The row numbers held out for evaluation: eval_size of range(n_rows), chosen by seed alone (so a
    run with --max_rows or a rebuilt cache holds out the same rows), sorted."""
    if eval_size >= n_rows:
        raise DataError(f"eval_size={eval_size} leaves no training rows out of {n_rows}")
    return np.sort(np.random.default_rng(seed).permutation(n_rows)[:eval_size])


def split_rows(rows, eval_size, seed):
    """(train_rows, eval_rows) of rows held in memory, disjoint, as held_out_rows chooses them."""
    held = set(held_out_rows(len(rows), eval_size, seed).tolist())
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def first_exchange(row):
    # the (optional) system message, the first user turn and the first assistant reply: what is evaluated
    msgs = to_messages(row)
    start = 1 if msgs[0]["role"] == "system" else 0
    return msgs[:start + 2]


def eval_pairs(rows, tokenizer, system_prompt=SYSTEM_PROMPT_BASE, max_prompt_len=None, source="eval data"):
    """Single-turn protocol (as MiniLLM / DistiLLM): the prompt is the system turn and the first user
    turn followed by `<|im_start|>assistant\\n`; the reference is the first assistant reply.
    Returns (prompt token-id lists, reference strings); prompts longer than max_prompt_len are
    skipped (counted in the third value)."""
    prompts, refs, skipped = [], [], 0
    for i, row in enumerate(rows):
        try:
            msgs = first_exchange(row)
        except DataError as e:
            raise DataError(f"{source}: row {i}: {e}") from None
        text = render_chat(msgs[:-1], system_prompt, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if max_prompt_len and len(ids) > max_prompt_len:
            skipped += 1
            continue
        prompts.append(ids)
        refs.append(msgs[-1]["content"])
    return prompts, refs, skipped
