"""
Chat data -> supervised token batches for Qwen-2.5, with the exact ChatML chat template.

    rows = read_rows("assets/data/ultrachat_200k/ultrachat_small.jsonl")   # .jsonl, .json, .parquet
    examples, stats = encode_rows(rows, tokenizer, max_len=1024)           # (input_ids, labels) pairs
    for idx in make_batches([len(e[0]) for e in examples], 8, seed=0, epoch=0)[rank::world_size]:
        batch = collate([examples[i] for i in idx], pad_id)
    evals = eval_examples(eval_rows, tokenizer, max_len=1024)              # prompt, reference, forced pair

In file order: reading rows (streamed) -> row formats -> the chat template (the tokenizer, and the files a
checkpoint carries) -> tokenization -> sealed directories (seal: every file's size and CRC-32, the one record
of checkpoints, the token cache and target shards) and the out_dir lock -> the token cache (tokenized once)
-> the target store (a distillation target computed once) -> batching -> held-out and evaluation examples.

Faults end in one line: a bad row is named by file and line (path:LINE, from 1; 'path: row N' where a
file has no lines), or skipped and counted with skip_bad_rows; a cache file or target shard changed
after it was written fails its seal and is built again, never trained on.

Row formats, recognised by their fields: `messages` (Ultrachat-200k; list of {role, content}),
`problem` + `generated_solution` (OpenMathReasoning), `prompt` + `response`, `instruction` [+ `input`]
+ `output` (Alpaca), `question` + `answer` (GSM8K); and `text` alone for plain-text pretraining
(no chat template, every token + <|endoftext|> supervised).

Label convention (as HF): labels align with input_ids, -100 where nothing is learned; the one
next-token shift happens in the loss. Supervised = every assistant turn's content plus its
<|im_end|> (so the model learns to stop); never the system/user turns, headers or padding.
"""

import concurrent.futures
import contextlib
import fcntl
import hashlib
import itertools
import json
import math
import os
import shutil
import time
import zlib
from typing import NamedTuple

import numpy as np
from tokenizers import Tokenizer

from qwen import atomic_dir, remove_leftovers

IGNORE_INDEX = -100
# the default system prompts of the two chat templates in Qwen2.5's tokenizer_config.json
SYSTEM_PROMPT_BASE = "You are a helpful assistant."
SYSTEM_PROMPT_INSTRUCT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ROLES = ("system", "user", "assistant")
# the official Qwen2.5 tokenizer_config.json, whose chat template checkpoints carry (write_tokenizer_files)
QWEN_TOKENIZER_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                     "assets/qwen2.5/Qwen2.5-1.5B-Instruct/tokenizer_config.json")


class DataError(ValueError):
    pass

# -----------------------------------------------------------------------------
# reading rows: streamed, so a 3M-row file never sits in memory as Python objects


def check_data_file(path):
    """Before any long work, without parsing rows: the data file exists, can be read and is not empty, and a
    .parquet's footer opens. The rows themselves are checked as they are read."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    with open(path, "rb") as f:  # OSError (no permission, a directory) names the file
        if not f.read(1):
            raise DataError(f"{path}: the data file is empty")
    if path.endswith(".parquet"):
        parquet_file(path)


def iter_rows(path, max_rows=0, keep_bad=False):
    """Yields (row_number, byte_offset, row) for the first max_rows rows (0: all) of a .jsonl (line by
    line), .parquet (row group by row group; needs pyarrow) or .json file (a list of objects, read
    whole). Row n of a .jsonl is its n-th non-empty line, counted from 0, whether or not it parses;
    byte_offset is where it starts (read_rows_at seeks there), -1 in other formats. A row that is not a
    JSON object (a malformed line, invalid UTF-8, a list) stops the read naming its line, or, with
    keep_bad, comes as the DataError saying what is wrong (encode_block's skip_bad_rows skips it)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    # islice stops reading at max_rows: the rest of the file (a .parquet's later row groups) is never read
    for n, offset, row in itertools.islice(file_rows(path), max_rows if max_rows > 0 else None):
        yield n, offset, row if keep_bad else checked_row(row, path, n, offset)


def file_rows(path):
    # every (row_number, byte_offset, row or the DataError that says why it is not one) of the file
    if path.endswith(".parquet"):
        pf, n = parquet_file(path), 0
        for g in range(pf.num_row_groups):
            for row in group_rows(pf, g, path):  # a table's rows are always objects
                yield n, -1, row
                n += 1
    elif path.endswith(".json"):
        with open(path, "rb") as f:
            raw = f.read()
        try:
            rows = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = 1 + raw[:e.start].count(b"\n")
            raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start} of the file)") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json data file must hold a list of rows")
        for n, row in enumerate(rows):
            yield n, -1, object_row(row)
    else:
        n, offset = 0, 0
        with open(path, "rb") as f:
            for line in f:
                start, offset = offset, offset + len(line)
                if line.strip():
                    yield n, start, parse_line(line)
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
                out.update(zip(inside, group_rows(pf, g, path, [n - first for n in inside])))
            first += size
        return out
    if path.endswith(".jsonl") and byte_offsets is not None:
        out = {}
        with open(path, "rb") as f:
            for n in want:
                f.seek(int(byte_offsets[n]))
                out[n] = checked_row(parse_line(f.readline()), path, n, int(byte_offsets[n]))
        return out
    wanted = set(want)
    return {n: checked_row(row, path, n, offset) for n, offset, row in iter_rows(path, max(want) + 1, keep_bad=True)
            if n in wanted}


def parquet_file(path):
    """pyarrow's ParquetFile of path (its footer read), or a DataError naming the file and what is wrong."""
    try:
        import pyarrow  # optional: not a dependency of deltakd
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow), "
                        "or convert the file to .jsonl") from None
    try:
        return pq.ParquetFile(path)
    except pyarrow.ArrowException as e:  # e.g. "Parquet magic bytes not found in footer"
        raise DataError(f"{path}: not a readable parquet file ({first_line(e)})") from None


def group_rows(pf, g, path, positions=None):
    # the rows of a .parquet's row group g as dicts (only those at positions within it, if given)
    import pyarrow  # imported already: pf is pyarrow's
    try:
        table = pf.read_row_group(g)
        return table.to_pylist() if positions is None else [table.slice(i, 1).to_pylist()[0] for i in positions]
    except (pyarrow.ArrowException, OSError, UnicodeDecodeError) as e:  # a damaged page
        raise DataError(f"{path}: row group {g} of the parquet file is unreadable ({first_line(e)})") from None


def first_line(e):
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def parse_line(line):
    # one .jsonl line -> the row, or the DataError saying why it is not one (raised or skipped by the caller)
    try:
        return object_row(json.loads(line.decode("utf-8")))
    except UnicodeDecodeError as e:
        return DataError(f"not valid UTF-8 (byte {e.start} of the line)")
    except json.JSONDecodeError as e:
        return DataError(f"malformed JSON line ({e.msg})")


def object_row(row):
    return row if isinstance(row, dict) else DataError(f"the row is a {type(row).__name__}, not an object")


def checked_row(row, path, n, offset):
    # a row that must be good (read_rows, a row read back): its DataError raised naming where it is
    if isinstance(row, DataError):
        raise DataError(f"{row_locations(path, [(n, offset)])[0]}: {row}")
    return row


def row_locations(path, rows):
    """Where each (row_number, byte_offset) row is, as an editor counts: 'path:LINE' for a .jsonl row (the
    lines before its offset counted, from 1: the file is read only when a message needs it), else
    'path: row N' (from 1)."""
    line_of, offsets = {}, sorted(o for _, o in rows if o >= 0)
    if offsets:
        with open(path, "rb") as f:
            line, pos = 1, 0
            for offset in offsets:
                while pos < offset:
                    chunk = f.read(min(offset - pos, 1 << 24))
                    if not chunk:
                        break
                    line, pos = line + chunk.count(b"\n"), pos + len(chunk)
                line_of[offset] = line
    return [f"{path}:{line_of[o]}" if o >= 0 else f"{path}: row {n + 1}" for n, o in rows]

# -----------------------------------------------------------------------------
# row formats: every supported row -> one checked conversation


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


def load_tokenizer(path, model_dirs):
    """The tokenizer.json at path, refused in one line where it is missing or where a tokenizer.json in one of
    model_dirs ({role: directory}) has another vocabulary: every model must share one."""
    if not os.path.isfile(path):
        raise SystemExit(f"no tokenizer: {path} does not exist (pass --tokenizer=.../tokenizer.json)")
    tokenizer = read_tokenizer(path)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    for role, directory in model_dirs.items():
        other = os.path.join(directory, "tokenizer.json")
        if os.path.isfile(other) and os.path.abspath(other) != os.path.abspath(path):
            if read_tokenizer(other).get_vocab(with_added_tokens=True) != vocab:
                raise SystemExit(f"tokenizer mismatch: {other} (--{role}) differs from {path}; "
                                 "all models must share one tokenizer")
    return tokenizer


def read_tokenizer(path):
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 -- the library's own error type for a file it cannot parse
        raise SystemExit(f"{path}: not a tokenizer.json the tokenizers library reads ({first_line(e)})") from None


def write_tokenizer_files(directory, tokenizer_path, system_prompt):
    """tokenizer.json, tokenizer_config.json and generation_config.json beside the weights, so that
    transformers' AutoTokenizer renders exactly render_chat (the official Qwen2.5 chat template
    with this run's system prompt as its default) and a serving stack stops where evaluation stops."""
    shutil.copy(tokenizer_path, os.path.join(directory, "tokenizer.json"))
    with open(QWEN_TOKENIZER_CONFIG) as f:
        tc = json.load(f)
    literal = system_prompt.replace("\\", "\\\\").replace("'", "\\'")  # inside a jinja '...' string
    tc["chat_template"] = tc["chat_template"].replace(SYSTEM_PROMPT_INSTRUCT, literal)
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

# -----------------------------------------------------------------------------
# tokenization: conversations -> token ids and the spans of supervised positions


def encode_rows(rows, tokenizer, max_len, system_prompt=SYSTEM_PROMPT_BASE, skip_bad_rows=False, source="data"):
    """Rows held in memory -> list of (input_ids, labels) lists and a stats dict (small data; big files
    go through the TokenCache below, which uses the same encode_block)."""
    numbered = [(n, -1, row) for n, row in enumerate(rows)]
    examples, stats = encode_block(numbered, tokenizer, max_len, system_prompt, skip_bad_rows, source)
    stats["first_bad_rows"] = bad_row_lines(source, stats["first_bad_rows"])
    return [(ids, labels_from_spans(ids, spans).tolist()) for ids, spans, _ in examples], stats


def encode_block(rows, tokenizer, max_len, system_prompt=SYSTEM_PROMPT_BASE, skip_bad_rows=False, source="data"):
    """(row_number, byte_offset, row) triples of source, as iter_rows(keep_bad=True) yields them -> (examples,
    stats): one (input_ids, spans, row_number) per kept example, spans the [start, end) runs of
    supervised positions. Each supervised piece is tokenized on its own, as at inference, where the
    prompt ends with `<|im_start|>assistant\\n` and the model continues from there; runs of unsupervised
    text are tokenized together (one encode_batch call for the whole block). Examples truncated to
    max_len with no supervised target left are dropped and counted. A bad row (not a JSON object, or
    content no format accepts) stops the block naming where it is (row_locations), or with
    skip_bad_rows is counted, the first few kept as (row_number, byte_offset, reason) in the stats."""
    specials = {t: tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")}
    for t, i in specials.items():
        if i is None:
            raise DataError(f"the tokenizer has no {t} token: not a Qwen-2.5 (ChatML) tokenizer")
    stats = new_stats()
    stats["rows"] = len(rows)
    convs = []
    for n, offset, row in rows:
        try:
            if isinstance(row, DataError):  # a line iter_rows could not read as an object
                raise row
            convs.append((n, merge_segments(row_segments(row, system_prompt))))
        except DataError as e:
            if not skip_bad_rows:
                where = row_locations(source, [(n, offset)])[0]
                raise DataError(f"{where}: {e} (pass skip_bad_rows to skip such rows)") from None
            stats["bad_rows_skipped"] += 1
            if len(stats["first_bad_rows"]) < FIRST_BAD_ROWS:
                stats["first_bad_rows"].append((n, offset, str(e)))
    pieces = [t for _, segs in convs for t, _ in segs if t not in specials]
    encoded = iter(tokenizer.encode_batch(pieces, add_special_tokens=False))
    examples = []
    for n, segs in convs:
        ids, spans = join_pieces(segs, specials, encoded)
        if len(ids) > max_len:
            ids, spans = ids[:max_len], [[s, min(e, max_len)] for s, e in spans if s < max_len]
            stats["truncated"] += 1
        n_sup = int(supervised_per_span(spans).sum())
        if n_sup == 0:
            stats["dropped_no_target"] += 1
            continue
        stats["examples"] += 1
        stats["supervised_tokens"] += n_sup
        stats["tokens"] += len(ids)
        examples.append((ids, spans, n))
    return examples, stats


def join_pieces(segs, specials, encoded):
    # one conversation's (text, supervised) pieces -> (input_ids, spans); each piece's ids are the next
    # of `encoded`, except the special tokens, which are never split or merged
    ids, spans = [], []
    for text, supervised in segs:
        piece = [specials[text]] if text in specials else next(encoded).ids
        if supervised and spans and spans[-1][1] == len(ids):
            spans[-1][1] += len(piece)  # content and its <|im_end|> form one run
        elif supervised:
            spans.append([len(ids), len(ids) + len(piece)])
        ids += piece
    return ids, spans


def supervised_per_span(spans):
    """The positions of each [start, end) span that the loss sees ((S, 2) array or list of pairs -> (S,)):
    all but position 0, which no token precedes to predict it from."""
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    return np.maximum(spans[:, 1] - np.maximum(spans[:, 0], 1), 0)


# skipped rows kept with their reasons in the stats (meta.json), so that a run can say which rows it skipped
FIRST_BAD_ROWS = 5


def new_stats():
    counts = dict.fromkeys(("rows", "examples", "tokens", "supervised_tokens", "bad_rows_skipped", "truncated",
                            "dropped_no_target"), 0)
    return {**counts, "first_bad_rows": []}


def bad_row_lines(source, bad):
    # encode_block's first skipped rows, (row_number, byte_offset, reason) each -> "path:LINE: reason" lines
    return [f"{where}: {why}" for where, (_, _, why) in zip(row_locations(source, [(n, o) for n, o, _ in bad]), bad)]


def labels_from_spans(ids, spans):
    """int64 labels aligned with ids: the ids inside the supervised [start, end) spans, -100 elsewhere."""
    ids = np.asarray(ids, dtype=np.int64)
    labels = np.full_like(ids, IGNORE_INDEX)
    for s, e in spans:
        labels[s:e] = ids[s:e]
    return labels


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
# checksums: every directory a run writes whole and trusts later (a checkpoint, the token cache, a target
# shard) is sealed: sealed.json, written last, holds every other file's size and CRC-32, compared when a run
# opens it. CRC-32 (zip's, gzip's) catches
# every burst of up to 32 changed bits and misses other damage with odds of 2^-32: a guard against
# accidents (bit rot, an edit in place, a copy cut short), not against an adversary. On one core of the
# bench machine zlib's runs at 5-6 GB/s, sha256 at 1.9 (with SHA-NI), blake2b at 1.3 (bench.py data).

SCAN_CHUNK = 1 << 24  # a multiple of every item size, so each chunk holds whole values


def scan(path, dtype=None):
    """(crc32, largest value) of a file, read once in 16 MiB chunks; the largest value (as dtype: a token
    id's bound) only when dtype is given, else -1."""
    crc, top, buf = 0, -1, bytearray(SCAN_CHUNK)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(memoryview(buf)[:n], crc)
            if dtype is not None:
                top = max(top, int(np.frombuffer(buf, dtype, n // np.dtype(dtype).itemsize).max(initial=0)))
    return crc, top


def out_of_vocab(name, top, vocab):
    return f"{name} holds token id {top:,}, outside the vocabulary of {vocab:,} ids"


SEAL = "sealed.json"


def seal(directory):
    """Writes directory/sealed.json: {file: [size, CRC-32]} of every other file, read back once (from the page
    cache, just written). Last, inside atomic_dir: a directory without its seal is never trusted."""
    files = {}
    for name in sorted(set(os.listdir(directory)) - {SEAL}):
        path = os.path.join(directory, name)
        files[name] = [os.path.getsize(path), scan(path)[0]]
    with open(os.path.join(directory, SEAL), "w") as f:
        json.dump(files, f, indent=1)


def seal_damage(directory, bounds=None, full=True):
    """Why the files of a sealed directory are not the ones written (None if they are): no seal, a file missing
    or of another size; with full (every file read once), one whose CRC-32 differs, or holding a value at or
    above its bound (bounds {file: (dtype, bound)}: token ids against the vocabulary). Sizes alone are cheap,
    for polling."""
    try:
        with open(os.path.join(directory, SEAL)) as f:
            files = json.load(f)
        for name, (size, _) in files.items():
            have = os.path.getsize(os.path.join(directory, name)) if os.path.isfile(os.path.join(directory, name)) \
                else None
            if have != size:
                return f"{name} has {'no' if have is None else f'{have:,}'} bytes, {size:,} were written"
        for name, (_, crc) in files.items() if full else ():
            dtype, bound = (bounds or {}).get(name, (None, None))
            got, top = scan(os.path.join(directory, name), dtype)
            if got != crc:
                return f"{name} fails its checksum (changed after it was written)"
            if bound is not None and top >= bound:
                return out_of_vocab(name, top, bound)
    except FileNotFoundError:
        return f"no {SEAL} (cut short, or written by an older deltakd)"
    except (OSError, ValueError, TypeError) as e:  # json's errors are ValueErrors; a seal of another shape
        return f"unreadable ({first_line(e)})"
    return None

# -----------------------------------------------------------------------------
# the token cache: every example of a data file tokenized once, memory-mapped by every rank
#
#   input_ids.u32   all examples' token ids back to back (uint32: Qwen's ids exceed 65,535)
#   offsets.i64     (N + 1,) where example i starts in input_ids
#   spans.i32       (S, 2) [start, end) supervised runs, positions within their example
#   span_offsets.i64  (N + 1,) where example i's spans start
#   rows.i64        (N,) the data file's row number of each example
#   line_offsets.i64  (R,) byte offset of every .jsonl row (evaluation rows are read back by seeking)
#   meta.json       the key and the statistics
#   sealed.json     every file's size and CRC-32 (seal), written last; the directory is renamed into place
#                   only when complete, so a killed build never leaves a cache a run trusts

CACHE_FORMAT = 3  # 3: sealed; a cache of another format has another key, so it is rebuilt, never trusted
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


# written by rank 0, read by every rank: the other ranks wait on the file system, and a directory whose key
# differs from the run's is refused or rebuilt, naming what differs; one run at a time per out_dir


def open_cache(data_path, tokenizer, key, root, rank, log=None):
    """The TokenCache of a data file for key, in root: rank 0 builds it unless an intact one is there (a damaged
    one is rebuilt, saying why; each build is a line of root/build.log), the other ranks wait for it. Every token
    id is checked against the tokenizer's vocabulary, with every file's checksum. log (rank 0's, or None) gets
    the progress and the statistics; skipped rows are named, and a cache with no example stops the run."""
    where, vocab = cache_dir_for(root, key), tokenizer.get_vocab_size()
    if rank == 0:
        why = check_cache(where, key, vocab)
        if why:
            if os.path.exists(where):
                print(f"token cache {where}: {why}; rebuilding it", flush=True)
            elif log:
                log(f"token cache: tokenizing {data_path} into {where}")
            stats = build_cache(data_path, tokenizer, where, key, log)
            with open(os.path.join(root, "build.log"), "a") as f:  # one line per build: who built what, when
                f.write(json.dumps({"cache": os.path.basename(where), "time": time.time(), "pid": os.getpid(),
                                    "host": os.uname().nodename, **stats}) + "\n")
    else:
        wait_until(lambda: check_cache(where, key, vocab) is None, f"rank 0 to build or check the token cache {where}",
                   rank)
    cache = TokenCache(where)
    stats = cache.meta["stats"]
    if log:
        log(f"data {data_path}: {stats} (cache {where})")
    if rank == 0 and stats["bad_rows_skipped"]:
        print(f"{data_path}: skipped {stats['bad_rows_skipped']:,} bad row(s) (--skip_bad_rows=true); the first: "
              f"{stats['first_bad_rows'][0]}", flush=True)
    if len(cache) == 0:
        raise SystemExit(f"{data_path}: no example has a supervised (assistant) token within max_len={key['max_len']}")
    return cache


def differing(a, b, prefix=""):
    # (dotted name, a's value, b's value) of each key whose values differ between two nested dicts ("tokens.max_len")
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [(prefix or "(everything)", a, b)]
    return [d for k in sorted(set(a) | set(b)) for d in differing(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)]


def wait_until(ready, what, rank, every=300):
    """Polls the file system until ready() is true. Not a collective: a wait on a build that takes
    hours outlives NCCL's 10-minute timeout. If the builder dies, torchrun stops this rank too."""
    t0 = next_note = time.time()
    while not ready():
        if rank == 1 and time.time() >= next_note:  # one rank speaks for the waiting ones
            print(f"rank 1: waiting for {what} ({time.time() - t0:.0f}s so far)", flush=True)
            next_note += every
        time.sleep(1)


@contextlib.contextmanager
def out_dir_lock(out_dir):
    """One run per out_dir: rank 0 holds an flock on out_dir/.lock for the run's life (the kernel drops it when
    the process dies, so a crashed run never blocks the next); a second run refuses, naming the holder. It
    also removes what a killed run left of a checkpoint it was writing (qwen.remove_leftovers)."""
    if int(os.environ.get("RANK", 0)) != 0:  # torchrun's other ranks share rank 0's lock
        yield
        return
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(os.path.join(out_dir, ".lock"), "a+")
    except OSError as e:
        raise SystemExit(f"{out_dir} is not writable: {e}") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "a process that has not written its name yet"
            raise SystemExit(f"{out_dir} is in use by another run ({holder}); wait for it to finish or choose "
                             "another directory") from None
        except OSError as e:  # a file system without locks (some network ones)
            raise SystemExit(f"{lock.name}: cannot lock it ({e}); use an --out_dir on a local file system") from None
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {os.uname().nodename}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        lock.flush()
        removed, size = remove_leftovers(out_dir, "ckpt-*")
        if removed:
            print(f"{out_dir}: removed {removed} partial checkpoint(s) left by a killed run ({size / 1e9:.2f} GB)",
                  flush=True)
        yield


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
        """(N,) supervised positions per example that the loss sees (supervised_per_span, summed)."""
        if not len(self.spans):
            return np.zeros(0, np.int64)
        return np.add.reduceat(supervised_per_span(self.spans), self.span_offsets[:-1])


DAMAGED_CACHES = {}  # check_cache's memory: (path, vocab, each file's inode, size, mtime) -> why it is damaged


def check_cache(path, key, vocab=None):
    """None if path holds a complete, intact cache for key, else the reason it cannot be used. Cheap checks
    first (meta.json, the key, every file's size); then every file is read once and compared with its
    checksum, and, given vocab, every token id must be below it. A cache found damaged is remembered by
    its files' identities, so a rank polling here each second (wait_until) while rank 0 rebuilds it does
    not read it again; an intact one is read in full at each call (once per run)."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
    except FileNotFoundError:
        return "no meta.json (an interrupted build)"
    except (OSError, json.JSONDecodeError) as e:
        return f"meta.json unreadable ({e})"
    if meta.get("key") != key:
        return "its key differs from this run's"
    why = seal_damage(path, full=False)
    if why:
        return why
    try:
        stats = [os.stat(os.path.join(path, name)) for name in sorted(os.listdir(path))]
        stamp = (path, vocab, *((st.st_ino, st.st_size, st.st_mtime_ns) for st in stats))
        if stamp not in DAMAGED_CACHES:
            why = seal_damage(path, {"input_ids.bin": (np.uint32, vocab)} if vocab else None) or offsets_damage(path)
            if why is None:
                return None
            DAMAGED_CACHES[stamp] = why
        return DAMAGED_CACHES[stamp]
    except OSError as e:  # a file gone while read: rank 0 replacing the cache
        return f"unreadable ({first_line(e)})"


def offsets_damage(path):
    # check_cache's last check: the offsets index the arrays they index (None), or why not
    c = TokenCache(path)
    if len(c.offsets) != len(c.rows) + 1 or (len(c.offsets) and c.offsets[-1] != len(c.input_ids)) \
            or (len(c.span_offsets) and c.span_offsets[-1] != len(c.spans)):
        return "offsets do not add up to the arrays they index"
    return None


def build_cache(data_path, tokenizer, path, key, log=print, block_rows=2048):
    """Streams the data file, tokenizes blocks of rows as the key (cache_key) says (the tokenizer's
    encode_batch runs on all cores in a worker thread while this thread parses the next block),
    appends to flat files in a temporary directory and renames it to `path` when complete.
    Returns the stats."""
    t0 = last_log = time.time()
    # progress is a share of the rows where their number is known (max_rows, a .parquet's metadata), else of the bytes
    total_rows = key["max_rows"] or (parquet_file(data_path).metadata.num_rows if data_path.endswith(".parquet") else 0)
    total_bytes = os.path.getsize(data_path)
    with atomic_dir(path) as tmp:
        with CacheWriter(tmp) as cache, concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = None  # the block the worker is encoding
            for rows in row_blocks(data_path, key["max_rows"], block_rows):
                cache.write("line_offsets", [offset for _, offset, _ in rows if offset >= 0])
                if pending is not None:
                    cache.append(*pending.result())
                pending = pool.submit(encode_block, rows, tokenizer, key["max_len"], key["system_prompt"],
                                      key["skip_bad_rows"], data_path)
                if log and time.time() - last_log > 10:
                    last_log = time.time()
                    n_read, pos = rows[-1][0] + 1, rows[-1][1]
                    done = n_read / total_rows if total_rows else pos / total_bytes if pos > 0 else 0
                    log(progress_line(n_read, cache.tokens, last_log - t0, done))
            if pending is not None:
                cache.append(*pending.result())
        stats = dict(cache.stats, seconds=round(time.time() - t0, 1))
        stats["first_bad_rows"] = bad_row_lines(data_path, stats["first_bad_rows"])
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"key": key, "stats": stats}, f, indent=1)
        seal(tmp)
    return stats


def row_blocks(data_path, max_rows, block_rows):
    """The data file's rows, block_rows at a time, as iter_rows(keep_bad=True) yields them (a bad row is
    encode_block's to skip or report)."""
    rows = []
    for row in iter_rows(data_path, max_rows, keep_bad=True):
        rows.append(row)
        if len(rows) == block_rows:
            yield rows
            rows = []
    if rows:
        yield rows


class CacheWriter:
    """The flat files of a cache under construction, open for appending; counts what each holds and totals
    encode_block's statistics, for meta.json."""

    def __init__(self, directory):
        self.files = {name: open(os.path.join(directory, f"{name}.bin"), "wb") for name in CACHE_ARRAYS}
        self.counts = dict.fromkeys(CACHE_ARRAYS, 0)
        self.stats = new_stats()
        self.write("offsets", [0])  # example i spans offsets[i]:offsets[i + 1], so the first starts at 0
        self.write("span_offsets", [0])

    @property
    def tokens(self):
        return self.counts["input_ids"]

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for f in self.files.values():
            f.close()

    def write(self, name, values):
        a = np.ascontiguousarray(values, dtype=CACHE_ARRAYS[name])
        a.tofile(self.files[name])
        self.counts[name] += a.size

    def append(self, examples, stats):
        # encode_block's output: (input_ids, spans, row_number) per example, and the block's stats
        lengths = [len(ids) for ids, _, _ in examples]
        self.write("offsets", self.counts["input_ids"] + np.cumsum(lengths))
        all_ids = itertools.chain.from_iterable(ids for ids, _, _ in examples)
        self.write("input_ids", np.fromiter(all_ids, dtype=CACHE_ARRAYS["input_ids"], count=sum(lengths)))
        self.write("span_offsets", self.counts["spans"] // 2 + np.cumsum([len(spans) for _, spans, _ in examples]))
        self.write("spans", [x for _, spans, _ in examples for span in spans for x in span])
        self.write("rows", [n for _, _, n in examples])
        for name, count in stats.items():
            self.stats[name] += count
        del self.stats["first_bad_rows"][FIRST_BAD_ROWS:]


def progress_line(rows_read, tokens, seconds, done):
    eta = f", about {seconds * (1 - done) / done:.0f}s left" if done else ""
    return (f"token cache: {rows_read:,} rows read, {tokens / 1e6:.1f}M tokens written, "
            f"{rows_read / seconds:,.0f} rows/s, {tokens / seconds / 1e6:.2f}M tokens/s{eta}")

# -----------------------------------------------------------------------------
# the target store: a distillation target kept as its top-K per supervised position, written once by
# the target pass (deltakd.compute_targets) and memory-mapped by every rank


# 3: each shard is sealed. The store's key (deltakd.targets_key) carries it: an older store is refused
STORE_FORMAT = 3


class TargetStore:
    """DIR/shard-NNNNN/{ids,logp,rest}.bin: (M, K) uint32 ids, (M, K) log-probabilities and (M,) float32
    log rest mass for the M supervised positions of examples [N*shard, (N+1)*shard) of the cache, in
    example order and, within an example, position order (the loss's), sealed (seal). A shard directory
    gets its name only when complete, so a half-written shard is never read. DIR/key.json says what the
    targets depend on (deltakd.targets_key, whose "format" is STORE_FORMAT): a store for another key is
    refused, naming what differs."""

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
                             f"{', '.join(k for k, _, _ in differing(theirs, self.key))}); use another directory or "
                             "delete it")

    def todo(self, rank, world):
        """The shards this rank computes: every world-th one that is not intact. A damaged one is removed first, so
        that no rank waiting for it takes it as complete."""
        self.open_or_claim(rank)
        todo = []
        for s in range(rank, self.n_shards, world):  # each rank reads the shards it owns, whole
            why = self.damage(s)
            if why and os.path.isdir(self.shard_dir(s)):
                print(f"targets: {self.shard_dir(s)}: {why}; computing it again", flush=True)
                shutil.rmtree(self.shard_dir(s))
            todo += [s] if why else []
        return todo

    def rows(self, s):
        return int(self.offsets[min((s + 1) * self.shard, self.n_examples)] - self.offsets[s * self.shard])

    def shard_dir(self, s):
        return os.path.join(self.dir, f"shard-{s:05d}")

    def files(self, s, directory=None):
        d = directory or self.shard_dir(s)
        M = self.rows(s)
        return {"ids": (os.path.join(d, "ids.bin"), np.uint32, (M, self.k)),
                "logp": (os.path.join(d, "logp.bin"), self.logp_dtype, (M, self.k)),
                "rest": (os.path.join(d, "rest.bin"), np.float32, (M,))}

    def complete(self, s):
        # cheap, for polling: the shard is sealed and its files have their sizes
        return seal_damage(self.shard_dir(s), full=False) is None

    def damage(self, s):
        """Why shard s cannot be used, None if it can: not written, or its seal's (seal_damage: a file missing,
        of another size or failing its checksum, an id outside the vocabulary). Reads the whole shard (the
        target pass checks each before trusting it)."""
        if not os.path.isdir(self.shard_dir(s)):
            return "not computed"
        return seal_damage(self.shard_dir(s), {"ids.bin": (np.uint32, self.key["vocab"])})

    def write(self, s, arrays):
        # arrays {"ids", "logp", "rest"} of the shard's rows
        with atomic_dir(self.shard_dir(s)) as tmp:  # over a damaged one, if any
            for name, (p, dt, shape) in self.files(s, tmp).items():
                assert arrays[name].shape == shape, (name, arrays[name].shape, shape)
                np.ascontiguousarray(arrays[name], dtype=dt).tofile(p)
            seal(tmp)

    def get(self, examples):
        """{"ids", "logp", "rest"}: the rows of these examples, concatenated in the given order."""
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
        return {n: np.concatenate(v) for n, v in parts.items()}


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


class Batches:
    """The data position as a function of the optimizer step: resuming at step s replays nothing and skips
    nothing. Each step takes per_step (world * grad_accum) micro-batches of one epoch's make_batches order;
    at(step, rank, world) is this rank's share."""

    def __init__(self, lengths, batch_size, seed, per_step):
        self.lengths, self.batch_size, self.seed, self.per_step = lengths, batch_size, seed, per_step
        self.epoch, self.batches = 0, make_batches(lengths, batch_size, seed, 0, per_step)
        self.steps_per_epoch = len(self.batches) // per_step

    def at(self, step, rank, world):
        epoch, offset = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self.batches = make_batches(self.lengths, self.batch_size, self.seed, epoch, self.per_step)
        return self.batches[offset * self.per_step:(offset + 1) * self.per_step][rank::world]


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
# evaluation examples: held-out rows, scored on their first exchange


def held_out_rows(rows, n_rows, eval_size, seed):
    """The row numbers held out for evaluation, sorted: in the order of a permutation of range(n_rows) drawn
    from seed alone, the first eval_size that are among rows (those that made it into the token cache,
    so a skipped or dropped row is never drawn). With every row present they are the permutation's
    first eval_size: a rebuilt cache, or one that skips another row, holds out the same rows."""
    present = np.zeros(n_rows, dtype=bool)
    present[np.asarray(rows, dtype=np.int64)] = True
    usable = int(present.sum())
    if eval_size >= usable:
        of = f"{usable}" if usable == n_rows else f"the {usable} usable of {n_rows}"
        raise DataError(f"eval_size={eval_size} leaves no training rows out of {of}")
    order = np.random.default_rng(seed).permutation(n_rows)
    return np.sort(order[present[order]][:eval_size])


def split_rows(rows, eval_size, seed):
    """(train_rows, eval_rows) of rows held in memory, disjoint, as held_out_rows chooses them."""
    held = set(held_out_rows(np.arange(len(rows)), len(rows), eval_size, seed).tolist())
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def held_out_split(cache, data_path, eval_size, seed):
    """(training example indices, the held-out rows) of a TokenCache of data_path: the rows held_out_rows chooses
    among those in the cache, read back from the file alone."""
    held = held_out_rows(cache.rows, cache.meta["stats"]["rows"], eval_size, seed)
    found = read_rows_at(data_path, held, cache.line_offsets)
    return np.flatnonzero(~np.isin(cache.rows, held)), [found[n] for n in held.tolist()]


def write_answered(path, data_path, max_rows, rows, answers):
    """path: a .jsonl of the first exchange (first_exchange) of each of data_path's rows (row numbers, ascending)
    with answers' answer in place of its own; a row whose answer is empty is left out. Written atomically."""
    wanted = set(rows)
    firsts = (first_exchange(row) for n, _, row in iter_rows(data_path, max_rows, keep_bad=True) if n in wanted)
    with open(path + ".tmp", "w") as f:
        for msgs, answer in zip(firsts, answers):
            if answer.strip():
                f.write(json.dumps({"messages": msgs[:-1] + [{"role": "assistant", "content": answer}]}) + "\n")
    os.replace(path + ".tmp", path)


def first_exchange(row):
    # the (optional) system message, the first user turn and the first assistant reply: what is evaluated
    msgs = to_messages(row)
    start = 1 if msgs[0]["role"] == "system" else 0
    return msgs[:start + 2]


def prompt_ids(input_ids, labels):
    """The conversation up to its first supervised token: for a chat example, exactly the chat template's
    generation prompt, ending `<|im_start|>assistant\\n`. Lists or arrays in (TokenCache.example's too),
    a list of ints out."""
    first = int(np.argmax(np.asarray(labels) != IGNORE_INDEX))
    return np.asarray(input_ids[:first], dtype=np.int64).tolist()


class EvalExample(NamedTuple):
    prompt: list     # token ids: what the model answers (prompt_ids of input_ids, labels)
    reference: str   # the first assistant reply
    input_ids: list  # the first exchange encoded as for training (encode_rows), for teacher forcing
    labels: list


def eval_examples(rows, tokenizer, max_len, system_prompt=SYSTEM_PROMPT_BASE, source="eval data"):
    """Single-turn protocol (as MiniLLM / DistiLLM): each row's first exchange (the system turn, the first
    user turn, the first assistant reply) as an EvalExample. Encoded by encode_rows' rule, so a row
    with no supervised token within max_len is dropped."""
    firsts = []
    for i, row in enumerate(rows):
        try:
            firsts.append(first_exchange(row))
        except DataError as e:
            raise DataError(f"{row_locations(source, [(i, -1)])[0]}: {e}") from None
    numbered = [(i, -1, {"messages": msgs}) for i, msgs in enumerate(firsts)]
    examples, _ = encode_block(numbered, tokenizer, max_len, system_prompt, source=source)
    out = []
    for ids, spans, i in examples:
        labels = labels_from_spans(ids, spans).tolist()
        out.append(EvalExample(prompt_ids(ids, labels), firsts[i][-1]["content"], ids, labels))
    return out
