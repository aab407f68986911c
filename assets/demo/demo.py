"""
The demo: the whole method on bundled data, on a 2-core CPU in minutes, through deltakd's own training loop
and loss. It takes the raw models as given (beside this file: seed*/raw-{teacher,student}, made by
pretrain.py), finetunes the raw teacher on half of a task's training problems, distills students from the raw
student on the other half (SFT, forward KL, Delta-KD), finetunes the raw student as the teacher was (pi_s^ft,
the paper's premise), and scores every model on held-out problems and every target against pi_s^ft, into
out_dir/results.md and results.json. docs/demo.md says why it is built this way.

    python assets/demo/demo.py                                   # one seed, ~4-5 min on 2 cores, into out/
    python assets/demo/demo.py --full_comparison=true --out_dir=out-full   # 3 seeds, RKL, SeqKD, MiniLLM, ...
    python assets/demo/demo.py --demo_raw_models=my-raw          # on raw models pretrain.py made

Every other flag is deltakd's (--seed, --alpha, --on_policy, ...): the default of every stage's own settings.
Each stage is a deltakd.train() call with its own Config, resolved as its command line would be.
"""

import collections
import dataclasses
import json
import os
import re
import shutil
import statistics
import sys
import time
from typing import NamedTuple

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import data  # noqa: E402
import deltakd  # noqa: E402
import rouge  # noqa: E402


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    task_data: str = os.path.join(ROOT, "assets/data/gsm8k/test.jsonl")  # GSM8K word problems: the task's inputs
    raw_models: str = os.path.join(ROOT, "assets/demo")  # seed*/raw-{teacher,student} + tokenizer.json (pretrain.py)
    task_sentences: int = 3     # the task's input: the problem's last 3 sentences (short prompts, cheap steps)
    max_len: int = 192
    eval_size: int = 120
    eval_max_new_tokens: int = 48
    eval_temperature: float = 1.0
    eval_seeds: int = 2
    finetune: dict = dataclasses.field(default_factory=lambda: dict(max_steps=1000, lr=3e-3, warmup_steps=10,
                                                                    batch_size=16))
    distill: dict = dataclasses.field(default_factory=lambda: dict(max_steps=400, lr=3e-3, warmup_steps=10,
                                                                   batch_size=16))
    methods: tuple = ("sft", "fkl")  # Delta-KD's two ends: lam = 1 and alpha = 0
    # --full_comparison=true: the seeds, the other baselines, Delta-KD's alphas, its stored top-k run and its
    # on-policy run, and MiniLLM
    full_methods: tuple = ("sft", "fkl", "rkl", "seqkd")
    full_seeds: int = 3
    full_alphas: tuple = (0.0, 0.5, 1.0)
    full_topk: int = 16
    full_on_policy: float = 0.5
    minillm_steps: int = 100    # rollout batches of --ppo_epochs (4) updates each: as many updates as the others
    # MiniLLM's language-modelling term on general text: the chats the raw models were pretrained on (pretrain.py)
    minillm_pretrain_data: str = os.path.join(ROOT, "assets/data/ultrachat_200k/ultrachat_small.jsonl")
    premise_alphas: tuple = (0.5, 1.0, 2.0)  # the targets pi* scored against pi_s^ft (premise)
    premise_batch_size: int = 32


DEMO = DemoSettings()
TASK_INSTRUCTION = "What does this problem ask? Answer with its question sentence.\n\n"
DEMO_NAMES = {"raw-teacher": "Raw teacher (pretrained only)", "teacher-ft": "Teacher (finetuned)",
              "raw-student": "Raw student (pretrained only)", "student-ft": "Student finetuned as the teacher was (π_s^ft)",
              "student-sft": "SFT", "student-fkl": "Forward KL", "student-rkl": "Reverse KL", "student-seqkd": "SeqKD",
              "student-minillm": "MiniLLM (from the SFT student)",
              "teacher-ft-own": "Teacher (finetuned), on its own finetuning problems",
              "teacher-ft-distill": "Teacher (finetuned), on the distillation problems",
              "references": "Reference answers (sanity only)"}


def demo_task(row):
    """The demo's task: the last sentences of a GSM8K word problem -> the one that asks the question (the
    last), copied. Short and different for every problem, so a 1M-parameter teacher that learned to
    copy from its context in pretraining becomes a real model of it."""
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(row["question"].split()))
    return {"messages": [{"role": "user", "content": TASK_INSTRUCTION + " ".join(sentences[-DEMO.task_sentences:])},
                         {"role": "assistant", "content": sentences[-1]}]}


def demo_raw_model(root, seed, role):
    # where the raw teacher or raw student of a seed lives (role "teacher" or "student")
    return os.path.join(root, f"seed{seed}", f"raw-{role}")


def demo(cfg, comparison):
    """The raw models (given) -> the teacher finetuned on half the task's training problems, and the raw student
    finetuned alike (pi_s^ft) -> students distilled from the raw student on the other half (DEMO.methods,
    Delta-KD) -> the methods' table on the held-out problems and the premise's. cfg: deltakd's flags, as
    parse_flags gives them (each stage's defaults). A Comparison with full: every stage over several seeds, more
    baselines, Delta-KD at several alphas, with stored top-k targets and on-policy, and MiniLLM from the SFT
    student."""
    t_start, root, raw = time.time(), cfg.out_dir, comparison.raw_models or DEMO.raw_models
    seeds = range(cfg.seed, cfg.seed + (DEMO.full_seeds if comparison.full else 1))
    missing = [s for s in seeds if not all(os.path.isfile(os.path.join(demo_raw_model(raw, s, r), "config.json"))
                                           for r in ("teacher", "student"))]
    if missing or not os.path.isfile(os.path.join(raw, "tokenizer.json")):
        raise SystemExit(f"demo: {raw} lacks the raw models of seed(s) {', '.join(map(str, missing or seeds))}; "
                         f"make them with `python assets/demo/pretrain.py {raw} --seeds={','.join(map(str, seeds))}`")
    os.makedirs(root, exist_ok=True)
    print(f"demo: the whole method on bundled data, into {root}/ (README, docs/demo.md)")
    tok = data.read_tokenizer(os.path.join(raw, "tokenizer.json"))
    task = [demo_task(r) for r in data.read_rows(DEMO.task_data)]
    train_rows, eval_rows = data.split_rows(task, DEMO.eval_size, cfg.seed)
    # the teacher is finetuned on half the training problems and the students distilled on the other half: on
    # problems it was finetuned on, the teacher has memorised the answers, and its targets would be the labels
    distill_rows, teacher_rows = data.split_rows(train_rows, len(train_rows) // 2, cfg.seed)
    # evaluation skips problems too long for max_len: so do the baselines, on the same problems
    eval_rows = [r for r in eval_rows if data.eval_examples([r], tok, DEMO.max_len, cfg.system_prompt)]
    for name, rows in (("task_teacher.jsonl", teacher_rows), ("task_distill.jsonl", distill_rows),
                       ("task_eval.jsonl", eval_rows)):
        with open(os.path.join(root, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    results = {"methods": {}, "premise": {}}  # stage -> {seed: scores}; target -> {seed: {problems: KL}}
    for seed in seeds:
        demo_seed(cfg, comparison, seed, results, tok)
    refs, methods = [r["messages"][1]["content"] for r in eval_rows], results["methods"]
    for name, preds in trivial_baselines(distill_rows, eval_rows).items():
        methods[f"baseline: {name}"] = {"-": {**deltakd.rouge_f1(refs, preds), **rouge.answer_sanity(preds)}}
    methods["references"] = {"-": rouge.answer_sanity(refs)}  # a perfect copier's sanity: some questions repeat a 4-gram
    table = results_table(results)
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\n{len(eval_rows)} held-out problems, {DEMO.eval_max_new_tokens} new tokens; ROUGE F1 stemmed, greedy "
          f"and sampled (temperature {DEMO.eval_temperature}, top_p 1, mean of {DEMO.eval_seeds} seeds); "
          f"teacher-forced figures per reference token:\n\n{table}\ndemo took {time.time() - t_start:.0f}s; "
          f"table in {root}/results.md")
    return results


def demo_seed(cfg, comparison, seed, results, tok):
    # every stage of the demo for one seed, each one's scores added to results["methods"][name][seed], then the
    # premise figures of its models to results["premise"][target][seed]; tok: the raw models' tokenizer
    full, raw = comparison.full, comparison.raw_models or DEMO.raw_models
    root = os.path.join(cfg.out_dir, f"seed{seed}") if full else cfg.out_dir
    raw_teacher, raw_student = demo_raw_model(raw, seed, "teacher"), demo_raw_model(raw, seed, "student")
    teacher_ft = deltakd.checkpoint_dir(os.path.join(root, "teacher-ft"), DEMO.finetune["max_steps"])
    task_teacher, task_distill, task_eval = (os.path.join(cfg.out_dir, f"task_{f}.jsonl")
                                             for f in ("teacher", "distill", "eval"))
    alphas, topk = (DEMO.full_alphas, DEMO.full_topk) if full else ((cfg.alpha,), 0)
    students = {m: {"method": m} for m in (DEMO.full_methods if full else DEMO.methods)}
    students.update({f"delta-a{a:g}": {"method": "delta", "alpha": a} for a in alphas})
    on_policy = cfg.on_policy or (DEMO.full_on_policy if full else 0)
    if on_policy:  # on-policy Delta-KD beside the off-policy one (and with --on_policy=P, on-policy forward KL);
        # Delta-KD's alpha is the demo's --alpha, as every stage's settings not given here
        on_policy_methods = [(f"delta-a{cfg.alpha:g}", "delta")] + [("fkl", "fkl")] * bool(cfg.on_policy)
        students.update({f"{name}-onpolicy{on_policy:g}": {"method": m, "on_policy": on_policy}
                         for name, m in on_policy_methods})
    if topk:
        students[f"delta-a{cfg.alpha:g}-top{topk}"] = {"method": "delta", "topk": topk, "targets_dtype": "float32",
                                                        "targets_dir": os.path.join(root, "targets")}
    if full:  # from the SFT student, as its authors start it, with their language-modelling term (docs/minillm.md)
        students["minillm"] = {"method": "minillm", "max_steps": DEMO.minillm_steps,
                               "lr": DEMO.distill["lr"] * deltakd.METHODS["minillm"].lr / deltakd.Config.lr,  # LMOps: half its SFT's
                               "student": deltakd.checkpoint_dir(os.path.join(root, "student-sft"), DEMO.distill["max_steps"]),
                               "pretrain_data": DEMO.minillm_pretrain_data}
    finetuned = lambda model: dict(student=model, train_data=task_teacher, **DEMO.finetune)  # noqa: E731
    stages = [("raw-teacher", dict(student=raw_teacher, eval_only=True)),  # what finetuning and distillation start from
              ("raw-student", dict(student=raw_student, eval_only=True)),
              ("teacher-ft", finetuned(raw_teacher)),
              # how much the teacher knows beyond the labels of the students' problems, and of its own (teacher-forced)
              ("teacher-ft-own", dict(student=teacher_ft, eval_only=True, eval_data=task_teacher,
                                      eval_max_new_tokens=0)),
              ("teacher-ft-distill", dict(student=teacher_ft, eval_only=True, eval_data=task_distill,
                                          eval_max_new_tokens=0)),
              # pi_s^ft, what the student would have become: finetuned as the teacher was (premise)
              ("student-ft", dict(finetuned(raw_student), teacher_ft=teacher_ft))]
    stages += [(f"student-{name}", {"student": raw_student, "teacher_ft": teacher_ft, "teacher_raw": raw_teacher,
                                    "train_data": task_distill, **DEMO.distill, **kw}) for name, kw in students.items()]
    for name, kw in stages:
        t0 = time.time()
        scores = demo_stage(cfg, os.path.join(root, name), seed=seed, tokenizer=os.path.join(raw, "tokenizer.json"),
                            **{"eval_data": task_eval, **kw})
        results["methods"].setdefault(name, {})[seed] = scores
        print(f"  seed {seed} {name:<22} {time.time() - t0:5.1f}s  " +
              " ".join(f"{k} {scores[k]:.4f}" for k in ("rougeL", "sampled_rougeL", "nll", "entropy", "distinct") if k in scores))
    # the premise: pi_s^ft against every target and student, on the held-out problems and as many distillation ones
    t0 = time.time()
    models = {"raw-student": raw_student, "raw-teacher": raw_teacher,  # and every trained stage's last checkpoint
              **{name: deltakd.checkpoint_dir(os.path.join(root, name), kw["max_steps"])
                 for name, kw in stages if not kw.get("eval_only")}}
    problems = {"held_out": data.read_rows(task_eval), "distill": data.read_rows(task_distill)[:DEMO.eval_size]}
    for target, kl in demo_premise(models, problems, tok, cfg.system_prompt).items():
        results["premise"].setdefault(target, {})[seed] = kl
    print(f"  seed {seed} {'premise':<22} {time.time() - t0:5.1f}s  KL(π_s^ft ‖ target), held-out: " +
          " ".join(f"{target} {by_seed[seed]['held_out']:.3f}" for target, by_seed in results["premise"].items()))


@torch.no_grad()
def demo_premise(models, problems, tokenizer, system_prompt):
    """The premise, teacher-forced along the references (tau = 1), per reference token: {target: {problems:
    KL(pi_s^ft || target)}}, for the raw student, the finetuned teacher (pi* at alpha = 0, forward KL's target), pi*
    at each of DEMO.premise_alphas (deltakd.target_weights and target_logits: the training target's) and every distilled
    student. models: {name: checkpoint dir} of "raw-student", "raw-teacher", "teacher-ft", "student-ft" (pi_s^ft)
    and the distilled "student-*"; problems: {name: chat rows}."""
    models = {name: deltakd.qwen.Qwen.from_pretrained(path, dtype=torch.float32).eval() for name, path in models.items()}
    finetuned_student, vocab = models.pop("student-ft"), tokenizer.get_vocab_size()
    role = {"teacher_ft": "teacher-ft", "student_raw": "raw-student", "teacher_raw": "raw-teacher"}  # -> models' names
    targets = {"raw-student": {"raw-student": 1.0}, "teacher-ft": {"teacher-ft": 1.0},
               **{f"pi*-a{a:g}": {role[r]: w for r, w in deltakd.target_weights("fkl", a).items()}
                  for a in DEMO.premise_alphas},
               **{name: {name: 1.0} for name in models if name.startswith("student-")}}
    kl, B = {name: {} for name in targets}, DEMO.premise_batch_size
    for problem_set, rows in problems.items():
        examples, sums, n = data.eval_examples(rows, tokenizer, DEMO.max_len, system_prompt), dict.fromkeys(targets, 0.0), 0
        for s in range(0, len(examples), B):
            # right-padded: under causal attention no real position sees the padding, whatever its id
            input_ids, labels, _ = data.collate([(e.input_ids, e.labels) for e in examples[s:s + B]], pad_id=0)
            mask, _ = deltakd.shift_labels(labels)
            z = {name: deltakd.logits(m(input_ids, return_hidden=True)[:, :-1][mask], m.lm_head.weight[:vocab])
                 for name, m in {**models, "pi_s^ft": finetuned_student}.items()}
            logp = F.log_softmax(z.pop("pi_s^ft").double(), -1)
            for name, weights in targets.items():
                logq = F.log_softmax(deltakd.target_logits(z, weights).double(), -1)
                sums[name] += deltakd.forward_kl(logp, logq).sum().item()
            n += int(mask.sum())
        for name in targets:
            kl[name][problem_set] = sums[name] / n
    return kl


def demo_stage(cfg, out_dir, **flags):
    """One stage: train() into a fresh out_dir, run as `deltakd.py` with these flags would be (resolve), over the
    demo's settings and cfg (deltakd's flags to the demo) as the defaults; returns its scores."""
    stage = deltakd.Config(**{**dataclasses.asdict(cfg), "out_dir": out_dir, "quiet": True, "eval_size": 0,
                      "max_len": DEMO.max_len, "eval_max_new_tokens": DEMO.eval_max_new_tokens,
                      "eval_temperature": DEMO.eval_temperature, "eval_seeds": DEMO.eval_seeds,
                      "eval_batch_size": DEMO.eval_size, "seqkd_max_new_tokens": DEMO.eval_max_new_tokens,
                      "on_policy": 0.0, "on_policy_max_new_tokens": DEMO.eval_max_new_tokens,
                      "teacher_dtype": "float32", "keep_last": 1, "resume": False, "method": "sft", **flags})
    stage = deltakd.resolve(stage, set(flags))
    shutil.rmtree(out_dir, ignore_errors=True)
    scores = deltakd.train(stage)
    if not stage.eval_only and deltakd.checkpoint_dir(out_dir, stage.max_steps) not in deltakd.checkpoints(out_dir):
        # a SIGTERM / SIGUSR1 checkpointed the stage before its last step: the demo stops with it
        raise SystemExit(f"demo: stage {out_dir} stopped by a signal; `python assets/demo/demo.py` starts the demo "
                         "again")
    return scores


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


def demo_label(name):
    # a stage's row label: "student-delta-a0.5-top16" -> "Delta-KD (α=0.5, stored top-16)", "-onpolicy1" -> "on-policy p=1";
    # a premise target's: "pi*-a2" -> "π* (α=2)"
    if name.startswith("pi*-a"):
        return f"π* (α={name.removeprefix('pi*-a')})"
    name, on_policy, p = name.partition("-onpolicy")
    if name.startswith("student-delta-"):
        label = "Delta-KD (" + name.removeprefix("student-delta-").replace("a", "α=", 1).replace("-top", ", stored top-")
        return label + (f", on-policy p={p}" if on_policy else "") + ")"
    label = DEMO_NAMES.get(name) or name[:1].upper() + name[1:]  # a baseline's name is its label
    return label + (f" (on-policy p={p})" if on_policy else "")


METHOD_COLUMNS = [("ROUGE-1", "rouge1", "{:.4f}"), ("ROUGE-2", "rouge2", "{:.4f}"), ("ROUGE-L", "rougeL", "{:.4f}"),
                  ("sampled ROUGE-L", "sampled_rougeL", "{:.4f}"), ("NLL", "nll", "{:.3f}"),
                  ("entropy", "entropy", "{:.3f}"), ("KL(teacher ‖ model)", "kl_teacher", "{:.3f}"),
                  ("top-1 = teacher", "top1_teacher", "{:.1%}"), ("distinct", "distinct", "{:.0%}"),
                  ("repeated 4-grams", "repeated_4grams", "{:.0%}"), ("sound", "sound", "{:.0%}"),
                  ("words", "words", "{:.1f}")]
PREMISE_COLUMNS = [("held-out problems", "held_out", "{:.3f}"), ("distillation problems", "distill", "{:.3f}")]


def results_table(results):
    # results.md: the methods' table, then the premise's
    return (demo_table(results["methods"], METHOD_COLUMNS, "Method") + "\n\nKL(π_s^ft ‖ target) per reference token, "
            "teacher-forced: how near each target, and each distilled student, is to what the student would have become "
            "(π_s^ft, finetuned as the teacher was)\n\n" + demo_table(results["premise"], PREMISE_COLUMNS, "Target"))


def demo_table(rows, cols, first):
    # mean (± std over seeds where there are several) of every figure, one row per stage (or premise target)
    lines = [f"| {first} | " + " | ".join(c for c, _, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, by_seed in rows.items():
        cells = []
        for _, key, fmt in cols:
            vals = [s[key] for s in by_seed.values() if key in s]
            cell = fmt.format(statistics.mean(vals)) if vals else "–"
            if len(vals) > 1:
                cell += " ± " + re.sub(r"^0(?=\.)", "", fmt.format(statistics.stdev(vals)))  # 0.0123 -> .0123
            cells.append(cell)
        lines.append(f"| {demo_label(name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


class Comparison(NamedTuple):
    full: bool = False          # --full_comparison=true: 3 seeds, Delta-KD at 3 alphas, stored top-k, on-policy, MiniLLM
    raw_models: str = ""        # --demo_raw_models=DIR; empty: DEMO.raw_models


def parse_demo_args(argv):
    """(deltakd's flags as parse_flags gives them, the Comparison): the demo's own two flags, then deltakd's."""
    comparison, rest = Comparison(), []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "--full_comparison":
            if value.lower() not in deltakd.BOOLS:
                raise SystemExit(f"{arg}: expected bool")
            comparison = comparison._replace(full=deltakd.BOOLS[value.lower()])
        elif key == "--demo_raw_models" and value:
            comparison = comparison._replace(raw_models=value)
        else:
            rest.append(arg)
    return deltakd.parse_flags(rest)[0], comparison


def main(argv):
    cfg, comparison = parse_demo_args(argv)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise SystemExit("the demo runs in one process; under torchrun every rank would rebuild the same "
                         "directories. Run `python assets/demo/demo.py`")
    try:
        with data.out_dir_lock(cfg.out_dir):
            demo(cfg, comparison)
    except (OSError, data.DataError, deltakd.qwen.CheckpointError) as e:  # bad files, rows, checkpoints: one line
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C); `python assets/demo/demo.py` starts the demo again", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main(sys.argv[1:])
