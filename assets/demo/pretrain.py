"""
The demo's raw models, standing in for Qwen2.5's base checkpoints: per seed a raw teacher and a raw
student pretrained on general English and general chat in the ChatML format (the bundled Ultrachat
conversations, disjoint from the task), and the byte-level BPE they share, trained on the same text.
This folder holds them for seeds 1337-1339, made by this script (stored in bfloat16, as Qwen2.5 ships
its weights; checksums in assets/SHA256SUMS).

    python assets/demo/pretrain.py my-raw                 # seeds 1337-1339, whichever my-raw lacks: 7-8 min a seed on 2 cores
    python assets/demo/pretrain.py my-raw --seeds=1337
    python assets/demo/demo.py --demo_raw_models=my-raw   # the demo on them

Pretraining is no part of the method, so it stays out of the demo's minutes, as a download of Qwen
stays out of a real run's. Every stage is deltakd's own train() loop, as the demo's are (demo.demo_stage).
"""

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "..")]  # demo.py beside it, deltakd.py at the top

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

import data  # noqa: E402
import deltakd  # noqa: E402
import demo  # noqa: E402
import qwen  # noqa: E402


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
    chat_data: str = os.path.join(demo.ROOT, "assets/data/ultrachat_200k/ultrachat_small.jsonl")
    vocab_size: int = 4096
    # a real base model can copy from its context (induction heads), a skill web-scale text teaches and a few
    # thousand steps of plain text do not: so each text passage is written twice, the quick route to it
    # (Olsson et al., 2022). One in four is 200 characters, as 19% of the task's answers are longer than 100
    repeat_chars: tuple = (100, 100, 100, 200)
    teacher: dict = dataclasses.field(default_factory=lambda: dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2))
    student: dict = dataclasses.field(default_factory=lambda: dict(
        hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    # constant lr: copying appears abruptly, at a step that varies with the seed (docs/demo.md)
    steps: dict = dataclasses.field(default_factory=lambda: dict(max_steps=3000, lr=3e-3, min_lr_ratio=1.0,
                                                                 warmup_steps=10, batch_size=16))


PRETRAIN = PretrainSettings()


def pretrain(root, seeds, settings=PRETRAIN):
    """Pretrains into root whatever it lacks of the tokenizer and of each seed's raw teacher and student."""
    tok_path = os.path.join(root, "tokenizer.json")
    have_tokenizer = os.path.isfile(tok_path)  # a new tokenizer: the seeds asked for are pretrained anew on its ids
    todo = [(seed, role) for seed in seeds for role in ("teacher", "student")
            if not have_tokenizer or not os.path.isfile(os.path.join(demo.demo_raw_model(root, seed, role),
                                                                      "config.json"))]
    if not todo:
        return
    os.makedirs(root, exist_ok=True)
    chats = data.read_rows(settings.chat_data)
    english = [m["content"] for r in chats for m in data.to_messages(r)]
    if not have_tokenizer:  # a small byte-level BPE with the ChatML special tokens
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(english, trainers.BpeTrainer(
            vocab_size=settings.vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        tok.save(tok_path)
    vocab = Tokenizer.from_file(tok_path).get_vocab_size()
    text, lens, docs, i = "\n\n".join(english), settings.repeat_chars, [], 0
    while i < len(text):
        n = lens[len(docs) % len(lens)]
        docs.append({"text": text[i:i + n] + "\n\n" + text[i:i + n]})
        i += n
    with tempfile.TemporaryDirectory(prefix="deltakd-pretrain-") as work:
        corpus = os.path.join(work, "pretrain.jsonl")  # the text passages, then the same conversations as chats
        with open(corpus, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in docs + chats)
        for seed, role in todo:
            t0, out = time.time(), os.path.join(work, f"seed{seed}-raw-{role}")
            config = qwen.QwenConfig(vocab_size=vocab, max_position_embeddings=demo.DEMO.max_len,
                                     tie_word_embeddings=True, bos_token_id=0, eos_token_id=2, torch_dtype="float32",
                                     **getattr(settings, role))
            init_seed = seed if role == "teacher" else seed + 1
            qwen.init_weights(qwen.Qwen(config), seed=init_seed).save_pretrained(out + "-init")
            demo.demo_stage(deltakd.Config(out_dir=work), out, seed=seed, tokenizer=tok_path,
                               student=out + "-init", train_data=corpus, **settings.steps)
            dst = demo.demo_raw_model(root, seed, role)
            with qwen.atomic_dir(dst) as tmp:  # stored like a downloaded base model: bfloat16, with its tokenizer
                qwen.Qwen.from_pretrained(deltakd.checkpoints(out)[-1], dtype=torch.bfloat16).save_pretrained(tmp)
                shutil.copy(tok_path, tmp)
            print(f"  seed {seed} raw-{role:<8} {time.time() - t0:6.1f}s  pretrained, {dst}", flush=True)


def main(argv):
    if not argv or argv[0].startswith("--") or any(not a.startswith("--seeds=") for a in argv[1:]):
        raise SystemExit("usage: python assets/demo/pretrain.py DIR [--seeds=1337,1338,1339]")
    seeds = [1337, 1338, 1339]
    for a in argv[1:]:
        seeds = [int(s) for s in a.removeprefix("--seeds=").split(",")]
    print(f"pretraining the raw models of seed(s) {', '.join(map(str, seeds))} into {argv[0]}/ (those it lacks)")
    pretrain(argv[0], seeds)


if __name__ == "__main__":
    main(sys.argv[1:])
