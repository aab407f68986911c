"""
ROUGE-N / ROUGE-L / ROUGE-Lsum, equal bit for bit to Google's `rouge-score` 0.1.2, standard library only; and
answer_sanity, what ROUGE cannot see (distinct, looping and sound answers).

    from rouge import RougeScorer
    RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True).score(target, prediction)

    python rouge.py REFS PREDS [--types=rouge1,rouge2,rougeL,rougeLsum] [--no-stem] [--json=OUT]

The surface mirrors rouge_score.rouge_scorer (argument order: target = reference first). The
behaviour follows rouge-score (Apache-2.0, google-research) and NLTK's PorterStemmer (Apache-2.0)
exactly, including the tokenizer, the stemmer's NLTK extensions and rougeLsum's LCS tie-breaking;
this is our own code, written from their documented behaviour. What is faster: tokens and stems
are computed once per text, stems are cached, and LCS uses a bit-parallel row update.
"""

import collections
import json
import re
import sys

Score = collections.namedtuple("Score", ["precision", "recall", "fmeasure"])

# -----------------------------------------------------------------------------
# Porter stemmer, NLTK_EXTENSIONS mode (nltk.stem.porter.PorterStemmer()), for lowercase [a-z0-9]+

_POOL = {"sky": "sky", "skies": "sky", "dying": "die", "lying": "lie", "tying": "tie", "news": "news",
         "innings": "inning", "inning": "inning", "outings": "outing", "outing": "outing",
         "cannings": "canning", "canning": "canning", "howe": "howe", "proceed": "proceed",
         "exceed": "exceed", "succeed": "succeed"}


def _cons(w, i):
    # digits and everything except aeiou are consonants; y is a consonant after a vowel or at the start
    c = w[i]
    if c in "aeiou":
        return False
    if c == "y":
        return i == 0 or not _cons(w, i - 1)
    return True


def _measure(s):
    # m in [C](VC)^m[V]: the number of vowel->consonant transitions
    pattern = "".join("c" if _cons(s, i) else "v" for i in range(len(s)))
    return pattern.count("vc")


def _has_vowel(s):
    return any(not _cons(s, i) for i in range(len(s)))


def _double_c(w):
    return len(w) >= 2 and w[-1] == w[-2] and _cons(w, len(w) - 1)


def _cvc(w):
    if len(w) >= 3 and _cons(w, len(w) - 3) and not _cons(w, len(w) - 2) and _cons(w, len(w) - 1):
        return w[-1] not in "wxy"
    return len(w) == 2 and not _cons(w, 0) and _cons(w, 1)  # NLTK extension, no w/x/y check


def _rules(word, rules):
    # the first matching suffix decides: if its condition fails the word is returned unchanged
    for suffix, repl, cond in rules:
        if suffix == "*d":
            if _double_c(word):
                stem = word[:-2]
                return stem + repl if cond is None or cond(stem) else word
            continue
        if word.endswith(suffix):
            stem = word[:-len(suffix)] if suffix else word
            return stem + repl if cond is None or cond(stem) else word
    return word


def _m_gt0(s):
    return _measure(s) > 0


def _m_gt1(s):
    return _measure(s) > 1


def _step1b(word):
    if word.endswith("ied"):
        return word[:-3] + ("ie" if len(word) == 4 else "i")
    if word.endswith("eed"):
        stem = word[:-3]
        return stem + "ee" if _measure(stem) > 0 else word
    for suffix in ("ed", "ing"):
        if word.endswith(suffix) and _has_vowel(word[:-len(suffix)]):
            inter = word[:-len(suffix)]
            return _rules(inter, [("at", "ate", None), ("bl", "ble", None), ("iz", "ize", None),
                                  ("*d", inter[-1:], lambda s: inter[-1] not in "lsz"),
                                  ("", "e", lambda s: _measure(s) == 1 and _cvc(s))])
    return word


_STEP2 = [("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"),
          ("bli", "ble"), ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"),
          ("ization", "ize"), ("ation", "ate"), ("ator", "ate"), ("alism", "al"), ("iveness", "ive"),
          ("fulness", "ful"), ("ousness", "ous"), ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble"),
          ("fulli", "ful")]


def _step2(word):
    if word.endswith("alli") and _measure(word[:-4]) > 0:
        return _step2(word[:-4] + "al")
    # logi -> log is conditioned on the measure of the stem *including* the l (NLTK)
    rules = [(s, r, _m_gt0) for s, r in _STEP2] + [("logi", "log", lambda s: _measure(word[:-3]) > 0)]
    return _rules(word, rules)


_STEP3 = [("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"), ("ful", ""),
          ("ness", "")]
_STEP4 = ["al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ion", "ou",
          "ism", "ate", "iti", "ous", "ive", "ize"]


def stem(word):
    """NLTK PorterStemmer().stem(word) for a lowercase ASCII alphanumeric word."""
    if word in _POOL:
        return _POOL[word]
    if len(word) <= 2:
        return word
    if word.endswith("ies") and len(word) == 4:  # step 1a, NLTK: dies -> die
        word = word[:-3] + "ie"
    else:
        word = _rules(word, [("sses", "ss", None), ("ies", "i", None), ("ss", "ss", None), ("s", "", None)])
    word = _step1b(word)
    word = _rules(word, [("y", "i", lambda s: len(s) > 1 and _cons(s, len(s) - 1))])  # step 1c
    word = _step2(word)
    word = _rules(word, [(s, r, _m_gt0) for s, r in _STEP3])
    word = _rules(word, [(s, "", (lambda t: _measure(t) > 1 and t[-1:] in ("s", "t")) if s == "ion" else _m_gt1)
                         for s in _STEP4])
    if word.endswith("e"):  # step 5a
        s = word[:-1]
        m = _measure(s)
        if m > 1 or (m == 1 and not _cvc(s)):
            word = s
    return _rules(word, [("ll", "l", lambda s: _measure(word[:-1]) > 1)])  # step 5b


_stem_cache = {}


def tokenize(text, use_stemmer):
    # rouge-score's tokenize: str.lower() (Unicode), runs of non [a-z0-9] -> space, split,
    # stem tokens longer than 3 characters, keep [a-z0-9]+ (drops the empty strings)
    tokens = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    if use_stemmer:
        out = []
        for t in tokens:
            if len(t) > 3:
                s = _stem_cache.get(t)
                if s is None:
                    s = _stem_cache[t] = stem(t)
                t = s
            out.append(t)
        tokens = out
    return tokens

# -----------------------------------------------------------------------------
# scores


def fmeasure(precision, recall):
    # the same expression as rouge_score.scoring.fmeasure, so the doubles agree in the last bit
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def _rouge_n(target, prediction, n):
    t = collections.Counter(zip(*(target[i:] for i in range(n))))
    p = collections.Counter(zip(*(prediction[i:] for i in range(n))))
    overlap = sum(min(c, p[g]) for g, c in t.items())
    precision = overlap / max(sum(p.values()), 1)
    recall = overlap / max(sum(t.values()), 1)
    return Score(precision, recall, fmeasure(precision, recall))


def _lcs_rows(ref, pred):
    """Bit-parallel LCS (Hyyro 2004). Returns one int per row i = 0..len(ref): bit j is 0 where
    t[i][j+1] > t[i][j] of the classic table t, so t[i][j] = j - popcount(row_i & (2^j - 1))."""
    m = len(pred)
    full = (1 << m) - 1
    match = {}
    for j, tok in enumerate(pred):
        match[tok] = match.get(tok, 0) | (1 << j)
    v, rows = full, [full]
    for tok in ref:
        u = v & match.get(tok, 0)
        v = ((v + u) | (v - u)) & full
        rows.append(v)
    return rows


def lcs_length(ref, pred):
    return len(pred) - _lcs_rows(ref, pred)[-1].bit_count() if ref and pred else 0


def _lcs_indices(ref, pred):
    # rouge-score's _backtrack_norec: diagonal on a match; move in pred only when strictly better
    rows = _lcs_rows(ref, pred)

    def t(i, j):
        return j - (rows[i] & ((1 << j) - 1)).bit_count()
    i, j, idx = len(ref), len(pred), []
    while i > 0 and j > 0:
        if ref[i - 1] == pred[j - 1]:
            idx.append(i - 1)
            i, j = i - 1, j - 1
        elif t(i, j - 1) > t(i - 1, j):
            j -= 1
        else:
            i -= 1
    return idx[::-1]


def _rouge_l(target, prediction):
    if not target or not prediction:
        return Score(0.0, 0.0, 0.0)
    lcs = lcs_length(target, prediction)
    precision, recall = lcs / len(prediction), lcs / len(target)
    return Score(precision, recall, fmeasure(precision, recall))


def _rouge_lsum(target_sents, prediction_sents):
    # summary-level LCS (Lin 2004, section 3.2) with ROUGE-1.5.5's clipping by token counts
    m = sum(len(s) for s in target_sents)
    n = sum(len(s) for s in prediction_sents)
    if not m or not n:
        return Score(0.0, 0.0, 0.0)
    cnt_r = collections.Counter(t for s in target_sents for t in s)
    cnt_c = collections.Counter(t for s in prediction_sents for t in s)
    hits = 0
    for r in target_sents:
        union = set()
        for c in prediction_sents:
            if r and c:
                union.update(_lcs_indices(r, c))
        for i in sorted(union):
            tok = r[i]
            if cnt_c[tok] > 0 and cnt_r[tok] > 0:
                hits += 1
                cnt_c[tok] -= 1
                cnt_r[tok] -= 1
    precision, recall = hits / n, hits / m
    return Score(precision, recall, fmeasure(precision, recall))


class RougeScorer:
    def __init__(self, rouge_types, use_stemmer=False):
        for t in rouge_types:
            if t in ("rougeL", "rougeLsum"):
                continue
            if not re.match(r"rouge[0-9]$", t):
                raise ValueError("Invalid rouge type: %s" % t)
            if int(t[5:]) <= 0:
                raise ValueError("rougen requires positive n: %s" % t)
        self.rouge_types = list(rouge_types)
        self.use_stemmer = use_stemmer

    def score(self, target, prediction):
        """{rouge_type: Score(precision, recall, fmeasure)}; target is the reference."""
        for name, value in (("target", target), ("prediction", prediction)):
            if not isinstance(value, str):
                raise TypeError(f"RougeScorer.score: {name} must be str, got {type(value).__name__}")
        tok_t = tokenize(target, self.use_stemmer)
        tok_p = tokenize(prediction, self.use_stemmer)
        result = {}
        for rt in self.rouge_types:
            if rt == "rougeL":
                result[rt] = _rouge_l(tok_t, tok_p)
            elif rt == "rougeLsum":
                # sentences are the non-empty lines (no strip, as rouge-score); each tokenized alone
                sents_t = [tokenize(s, self.use_stemmer) for s in target.split("\n") if len(s) > 0]
                sents_p = [tokenize(s, self.use_stemmer) for s in prediction.split("\n") if len(s) > 0]
                result[rt] = _rouge_lsum(sents_t, sents_p)
            else:
                result[rt] = _rouge_n(tok_t, tok_p, int(rt[5:]))
        return result

    def score_multi(self, targets, prediction):
        """Per type, the Score of the target with the highest F (the first one on ties)."""
        if isinstance(targets, str) or not targets:
            raise TypeError("RougeScorer.score_multi: targets must be a non-empty list of str")
        scores = [self.score(t, prediction) for t in targets]
        result = {}
        for rt in self.rouge_types:
            best = max(range(len(scores)), key=lambda k: (scores[k][rt].fmeasure, -k))
            result[rt] = scores[best][rt]
        return result


def corpus_score(references, predictions, rouge_types=("rouge1", "rouge2", "rougeL", "rougeLsum"),
                 use_stemmer=True):
    """Plain mean over examples: for each type, P = sum(P_i) / N, R = sum(R_i) / N, F = sum(F_i) / N,
    left-to-right Python sums (no bootstrap; HF evaluate reports a bootstrap median instead)."""
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    if not references:
        raise ValueError("corpus_score: no examples")
    scorer = RougeScorer(rouge_types, use_stemmer)
    per = [scorer.score(r, p) for r, p in zip(references, predictions)]
    N = len(per)
    return {rt: Score(*(sum(s[rt][k] for s in per) / N for k in range(3))) for rt in rouge_types}


def answer_sanity(preds):
    """What ROUGE cannot see: the share of distinct answers; the mean share of each answer's word 4-grams
    that repeat an earlier 4-gram of the same answer (a looping answer scores near 1); the share of sound
    answers (given to no other prompt and repeating no 4-gram at all); the mean length in words."""
    def repeated(words):
        grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
        return 1 - len(set(grams)) / len(grams) if grams else 0.0
    words = [p.split() for p in preds]
    rep = [repeated(w) for w in words]
    n, count = max(len(preds), 1), collections.Counter(preds)
    sound = sum(count[p] == 1 and r == 0 for p, r in zip(preds, rep))
    return {"distinct": len(count) / n, "repeated_4grams": sum(rep) / n, "sound": sound / n,
            "words": sum(map(len, words)) / n}

# -----------------------------------------------------------------------------
# command line


def read_texts(path):
    """.jsonl: one JSON string per line, or an object with one of the fields below; otherwise plain
    text, one example per line."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not path.endswith(".jsonl"):
        return lines
    texts = []
    for i, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: malformed JSON ({e.msg})") from None
        if isinstance(obj, dict):
            key = next((k for k in ("prediction", "reference", "text", "output", "response", "answer")
                        if k in obj), None)
            if key is None:
                raise ValueError(f"{path}:{i}: expected a string or an object with a 'prediction', "
                                 f"'reference' or 'text' field, got keys {sorted(obj)}")
            obj = obj[key]
        if not isinstance(obj, str):
            raise ValueError(f"{path}:{i}: expected a string, got {type(obj).__name__}")
        texts.append(obj)
    return texts


def main(argv):
    opts = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "") for a in argv if a.startswith("--"))
    files = [a for a in argv if not a.startswith("--")]
    if len(files) != 2 or set(opts) - {"types", "no-stem", "json"}:
        sys.exit("usage: python rouge.py REFS PREDS [--types=rouge1,rouge2,rougeL,rougeLsum] [--no-stem] "
                 "[--json=OUT]")
    types = opts.get("types", "rouge1,rouge2,rougeL,rougeLsum").split(",")
    refs, preds = read_texts(files[0]), read_texts(files[1])
    if len(refs) != len(preds):
        sys.exit(f"{files[0]} has {len(refs)} references but {files[1]} has {len(preds)} predictions")
    use_stemmer = "no-stem" not in opts
    scores = corpus_score(refs, preds, types, use_stemmer)
    print(f"{len(refs)} pairs, use_stemmer={use_stemmer}, mean over examples")
    print(f"{'type':<10} {'P':>8} {'R':>8} {'F':>8}")
    for rt, s in scores.items():
        print(f"{rt:<10} {s.precision:8.4f} {s.recall:8.4f} {s.fmeasure:8.4f}")
    if opts.get("json"):
        with open(opts["json"], "w") as f:
            json.dump({rt: s._asdict() for rt, s in scores.items()}, f, indent=2)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
