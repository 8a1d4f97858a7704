"""RULER sample generation (classic protocol, NVIDIA/RULER), sized with the
evaluated model's tokenizer.

Thirteen tasks (parameters in eval/benchmarks/ruler.json): niah_* (needle in
a haystack), vt (variable tracking), cwe (common words), fwe (frequent
words), qa_1 / qa_2 (SQuAD v2 / HotpotQA documents).

A sample is ``prompt = input + answer_prefix`` where ``input`` is the task
text, wrapped in the model's chat template when one is used (plain for base
models), and the answer prefix pre-fills the start of the answer. Every
sample fits: tokens(prompt) + tokens_to_generate <= length, counting the ids
the model is fed (special tokens added for plain prompts, none added on top
of a chat template).

Fitting (`fit_units`): the haystack size is counted in units (noise or needle
lines, essay words, words, documents). For niah, vt and qa the largest
number of units whose probe sample fits is found by doubling then binary
search (step 1 unit, so niah and vt fill >= 97% of the budget); cwe and fwe
start from the number of words the official scripts' own searches choose
(`official_units`: the same start, steps and stopping rule, and the same
random draws for the same seed). Then each sample steps back by the task's
step (1 unit; 10 words for cwe, length // 32 for fwe, their official
increments) while it is over budget (its random draws change its length a
little). A task whose smallest sample does not fit raises `DoesNotFit`.

Differences from the official scripts, none of which changes the task:
one seeded `random.Random` per sample (so a sample does not depend on how
many others were generated); distinct keys (also from distractor needles)
and distinct variable names are guaranteed; sentences of an essay corpus are
split by a regular expression instead of nltk's punkt; the single-needle
rewrite touches the task template and answer prefix only, never the model's
chat template; with a chat template, cwe's worked example and its task share
one user turn (the official script repeats the whole model template around
the example); cwe never uses more words than wonderwords' 8169 (the official
script switches to a second list beyond them, past about 100K tokens).
"""
from __future__ import annotations

import functools
import json
import math
import random
import re
import string
import uuid
from dataclasses import dataclass
from pathlib import Path

from focusft_jax.evaluation import wordlists
from focusft_jax.evaluation.errors import DoesNotFit, EvalError
from focusft_jax.evaluation.manifest import files_digest, load_benchmark
from focusft_jax.evaluation.tokenizing import chat_wrap, count_tokens

BENCH = load_benchmark("ruler")
TASKS = tuple(BENCH["tasks"])
FAMILIES = BENCH["task_families"]
NOISE = BENCH["noise_sentence"]
NEEDLE = BENCH["needle_sentence"]
DEPTHS = [int(round(100 * i / 39)) for i in range(40)]  # np.round(np.linspace(0, 100, 40))
ESSAY_TASKS = tuple(t for t, c in BENCH["tasks"].items() if c["args"].get("type_haystack") == "essay")
QA_TASKS = ("qa_1", "qa_2")
VT_ICL_BUDGET = 500


def family(task: str) -> str:
    return BENCH["tasks"][task]["task"]


def tokens_to_generate(task: str) -> int:
    return int(FAMILIES[family(task)]["tokens_to_generate"])


# ---------------------------------------------------------------- model formatting


@dataclass
class Formatter:
    """The model side of a prompt: the chat template (or none) and the
    tokenizer counting the ids the model will be fed."""

    tokenizer: object
    chat: bool

    def input_text(self, task_text: str) -> str:
        return chat_wrap(self.tokenizer, task_text) if self.chat else task_text

    def tokens(self, text: str) -> int:
        return count_tokens(self.tokenizer, text, add_special_tokens=not self.chat)

    def plain_tokens(self, text: str) -> int:
        return count_tokens(self.tokenizer, text, add_special_tokens=False)


@dataclass
class Built:
    """One generated sample before fitting: the task text (the user message),
    the answer prefix and the reference outputs."""

    task_text: str
    answer_prefix: str
    outputs: list


# ---------------------------------------------------------------- random values


def random_number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def random_value(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return random_number(rng)
    if kind == "words":
        return wordlists.random_key_word(rng)
    if kind == "uuids":
        return random_uuid(rng)
    raise EvalError(f"unknown needle type {kind!r}")


def _distinct(draw, n: int, avoid=()) -> list:
    out: list = []
    while len(out) < n:
        v = draw()
        if v not in out and v not in avoid:
            out.append(v)
    return out


# ---------------------------------------------------------------- text sources

_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'\u201d\u2019)\]])\s+")


def split_sentences(text: str) -> list[str]:
    text = text.strip()
    return [s for s in _SENT_SPLIT.split(text) if s] if text else []


@functools.lru_cache(maxsize=4)
def essay_words(corpus_dir: str) -> tuple[str, ...]:
    """Words of every *.txt under corpus_dir (sorted paths, whitespace-split),
    the unit of an essay haystack."""
    root = Path(corpus_dir).expanduser()
    if not root.is_dir():
        raise EvalError(f"{root}: essay corpus directory does not exist")
    files = sorted(p for p in root.rglob("*.txt") if p.is_file())
    if not files:
        raise EvalError(f"{root}: no *.txt files in the essay corpus")
    text = " ".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    words = tuple(w for w in re.sub(r"\s+", " ", text).split(" ") if w)
    if not words:
        raise EvalError(f"{root}: the essay corpus is empty")
    return words


def corpus_digest(corpus_dir: str) -> str:
    """`files_digest` of the essay corpus's *.txt files, in sorted path order."""
    return files_digest(sorted(Path(corpus_dir).expanduser().rglob("*.txt")))


# ---------------------------------------------------------------- task generators


class TaskGen:
    """A task's sample builder. Units are the haystack size; `step` the
    per-sample step back; `min_units`/`max_units` the range of units."""

    step = 1
    min_units = 1
    max_units: int | None = None

    def build(self, units: int, rng: random.Random, index: int) -> Built:  # pragma: no cover - abstract
        raise NotImplementedError


def singular(text: str) -> str:
    """The official rewrite for one query and one value."""
    return (
        text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")
    )


class Niah(TaskGen):
    def __init__(self, args: dict, corpus_dir: str | None = None):
        self.a = dict(args)
        self.num_k = max(self.a["num_needle_k"], self.a["num_needle_q"])
        self.num_needles = self.num_k * self.a["num_needle_v"]
        self.kind = self.a["type_haystack"]
        if self.kind == "essay":
            if not corpus_dir:
                raise EvalError("an essay haystack needs a text corpus (--corpus DIR)")
            self.words = essay_words(str(corpus_dir))
        elif self.kind not in ("noise", "needle"):
            raise EvalError(f"unknown haystack type {self.kind!r}")
        self.min_units = 1 if self.kind == "essay" else self.num_needles

    def build(self, units: int, rng: random.Random, index: int) -> Built:
        a = self.a
        tv = a["type_needle_v"]
        keys = _distinct(lambda: random_value(a["type_needle_k"], rng), self.num_k)
        values, needles = [], []
        for key in keys:
            vals = _distinct(lambda: random_value(tv, rng), a["num_needle_v"])
            values.append(vals)
            needles += [NEEDLE.format(type_needle_v=tv, key=key, value=v) for v in vals]
        rng.shuffle(needles)

        if self.kind == "essay":
            words = self.words
            if units > len(words):
                words = words * (units // len(words) + 1)
            sents = split_sentences(" ".join(words[:units]))
            cuts = [0] + sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(needles))) + [len(sents)]
            pieces = []
            for i in range(1, len(cuts)):
                pieces.append(" ".join(sents[cuts[i - 1] : cuts[i]]))
                if i - 1 < len(needles):
                    pieces.append(needles[i - 1])
            context = " ".join(pieces)
        else:
            if self.kind == "noise":
                lines = [NOISE] * units
            else:
                lines = []
                for _ in range(units):
                    k = _distinct(lambda: random_value(a["type_needle_k"], rng), 1, avoid=keys)[0]
                    lines.append(NEEDLE.format(type_needle_v=tv, key=k, value=random_value(tv, rng)))
            for pos, needle in zip(sorted(rng.sample(range(units), len(needles)), reverse=True), needles):
                lines.insert(pos, needle)
            context = "\n".join(lines)

        picked = rng.sample(range(self.num_k), a["num_needle_q"])
        queries = [keys[i] for i in picked]
        outputs = [v for i in picked for v in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template = FAMILIES["niah"]["template"]
        prefix = FAMILIES["niah"]["answer_prefix"]
        if a["num_needle_q"] * a["num_needle_v"] == 1:
            template, prefix, tv = singular(template), singular(prefix), tv[:-1]
        return Built(
            template.format(type_needle_v=tv, context=context, query=query),
            prefix.format(type_needle_v=tv, query=query),
            outputs,
        )


def vt_chain(rng: random.Random, num_chains: int, num_hops: int, icl: bool) -> tuple[list[list[str]], list[list[str]]]:
    """Variables (5 capitals; 3 for the worked example) and their chains
    ``VAR A = 12345``, ``VAR B = VAR A `` (trailing space, as official)."""
    k = 3 if icl else 5
    hops = min(10, num_hops) if icl else num_hops
    names = _distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=k)), (hops + 1) * num_chains)
    all_vars, chains = [], []
    for c in range(num_chains):
        vs = names[c * (hops + 1) : (c + 1) * (hops + 1)]
        value = "12345" if icl else str(rng.randint(10000, 99998))  # np.random.randint(10000, 99999)
        chain = [f"VAR {vs[0]} = {value}"] + [f"VAR {vs[j + 1]} = VAR {vs[j]} " for j in range(hops)]
        all_vars.append(vs)
        chains.append(chain)
    return all_vars, chains


class VariableTracking(TaskGen):
    def __init__(self, args: dict, icl_example: str = ""):
        self.a = dict(args)
        if self.a.get("type_haystack", "noise") != "noise":
            raise EvalError("only the noise haystack of vt is implemented (the official vt task uses it)")
        self.icl = icl_example
        self.min_units = self.a["num_hops"] + 1

    def plain(self, units: int, rng: random.Random, icl: bool) -> tuple[str, str, list[str]]:
        hops, chains_n = self.a["num_hops"], self.a["num_chains"]
        all_vars, chains = vt_chain(rng, chains_n, hops, icl)
        value = chains[0][0].split("=")[-1].strip()
        lines = [NOISE] * units
        for chain in chains:
            positions = sorted(rng.sample(range(len(lines)), len(chain)))
            for j, pos in enumerate(positions):
                lines.insert(pos + j, chain[j])
        context = "\n".join(lines).replace(". \n", ".\n")
        num_v = (min(10, hops) if icl else hops) + 1
        fam = FAMILIES["variable_tracking"]
        text = fam["template"].format(context=context, query=value, num_v=num_v)
        prefix = fam["answer_prefix"].format(context=context, query=value, num_v=num_v)
        return text, prefix, all_vars[0]

    def build(self, units: int, rng: random.Random, index: int) -> Built:
        text, prefix, outputs = self.plain(units, rng, icl=False)
        if self.icl:
            text = self.icl + "\n" + text
        return Built(text, prefix, outputs)


def vt_icl_example(args: dict, fmt: Formatter, seed: int) -> str:
    """The worked example before every vt task: the plain task template and
    answer prefix (3-letter names, value 12345) with the noise fitted to
    VT_ICL_BUDGET plain tokens, then a space, its answer, and a newline."""
    gen = VariableTracking(args)
    rng_for = lambda: random.Random(f"{seed}:vt:icl")  # noqa: E731

    def fits(units):
        text, prefix, _ = gen.plain(units, rng_for(), icl=True)
        return fmt.plain_tokens(text + prefix) <= VT_ICL_BUDGET

    units = _largest(fits, gen.min_units, None, step=1, what="the vt worked example")
    text, prefix, outputs = gen.plain(units, rng_for(), icl=True)
    return text + prefix + " " + " ".join(outputs) + "\n"


class CommonWords(TaskGen):
    """cwe. The word list is the official one in the official order (the
    sorted vocabulary shuffled with `random.Random(seed)`), so that the
    official search (`official_units`) draws the same words as the official
    script for the same seed."""

    step = 10

    def __init__(self, args: dict, length: int, seed: int):
        self.a = dict(args)
        self.length = length
        self.seed = seed
        words = list(wordlists.cwe_words())
        random.Random(seed).shuffle(words)
        self.words = tuple(words)
        self.min_units = self.step
        self.max_units = len(self.words)

    def example(self, draw: random.Random, shuffle, num_words, common_repeats, uncommon_repeats, num_common):
        picked = draw.sample(self.words, num_words)
        common, uncommon = picked[:num_common], picked[num_common:]
        lst = common * common_repeats + uncommon * uncommon_repeats
        shuffle(lst)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(lst)), common

    def compose(self, units: int, draw: random.Random, shuffle) -> Built:
        """The one-shot example then the task, the words drawn from `draw`,
        each list ordered by `shuffle` (a function shuffling in place)."""
        a, n_cw = self.a, self.a["num_cw"]
        if self.length < 4096:
            ex_ctx, ex_ans = self.example(draw, shuffle, 20, 3, 1, n_cw)
            ctx, ans = self.example(draw, shuffle, units, 6, 1, n_cw)
        else:
            ex_ctx, ex_ans = self.example(draw, shuffle, 40, 10, 3, n_cw)
            ctx, ans = self.example(draw, shuffle, units, a["freq_cw"], a["freq_ucw"], n_cw)
        fam = FAMILIES["common_words_extraction"]
        example = (
            fam["template"].format(context=ex_ctx, query="")
            + fam["answer_prefix"]
            + " "
            + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_ans))
        )
        text = example + "\n" + fam["template"].format(context=ctx, query="")
        return Built(text, fam["answer_prefix"], ans)

    def build(self, units: int, rng: random.Random, index: int) -> Built:
        return self.compose(units, rng, rng.shuffle)

    def official_units(self, prompt_tokens, length: int, ttg: int) -> int:
        """The number of words of NVIDIA/RULER's common_words_extraction.py
        (binary-search version): one stream seeded with the seed draws every
        probe's words in turn, and each list is ordered by a fresh
        `Random(seed).shuffle`, as the official module-level `random` and its
        `random.Random(args.random_seed).shuffle` do. Tokens per word are
        estimated from a 4096-word probe; the search runs over every count in
        [10, 2 * length / tokens-per-word], a count fitting when its prompt
        plus `ttg` is within `length`; none fitting gives 10. Counts above the
        vocabulary (reached only past about 100K tokens) count as not fitting:
        the official script switches to a second word list there, which is
        not shipped here."""
        stream = random.Random(self.seed)

        def fixed_shuffle(lst):
            random.Random(self.seed).shuffle(lst)

        def tokens(units):
            return prompt_tokens(self.compose(units, stream, fixed_shuffle))

        estimate = min(4096, self.max_units)
        per_word = tokens(estimate) / estimate
        lo, hi = self.step, max(int(length // per_word) * 2, 2 * self.step)
        best = None
        while lo <= hi:
            mid = (lo + hi) // 2
            if mid <= self.max_units and tokens(mid) + ttg <= length:
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        return self.step if best is None else best


def zeta(alpha: float) -> float:
    """Riemann zeta for alpha > 1 (partial sum + Euler-Maclaurin tail)."""
    if alpha == 2.0:
        return math.pi**2 / 6
    n = 10000
    s = sum(k**-alpha for k in range(1, n))
    return s + n ** (1 - alpha) / (alpha - 1) + 0.5 * n**-alpha + alpha * n ** (-alpha - 1) / 12


class FrequentWords(TaskGen):
    """fwe: coded words with Zipf counts; `official_units` is the official
    search."""

    coded_wordlen = 6

    def __init__(self, args: dict, length: int, seed: int):
        self.alpha = float(args.get("alpha", 2.0))
        self.seed = seed
        self.vocab_size = max(length // 50, 5)
        self.step = max(length // 32, 1)
        self.min_units = self.step

    def vocabulary(self, draw: random.Random, shuffle) -> list[str]:
        vocab = ["".join(draw.choices(string.ascii_lowercase, k=self.coded_wordlen)) for _ in range(self.vocab_size)]
        while len(set(vocab)) < self.vocab_size:
            vocab.append("".join(draw.choices(string.ascii_lowercase, k=self.coded_wordlen)))
        vocab = sorted(set(vocab))
        shuffle(vocab)
        vocab[0] = "..."  # the top rank is noise
        return vocab

    def compose(self, vocab: list[str], units: int, shuffle) -> Built:
        z = zeta(self.alpha)
        words = []
        for k, w in enumerate(vocab, 1):
            words += [w] * int(units * k**-self.alpha / z)
        shuffle(words)
        fam = FAMILIES["freq_words_extraction"]
        return Built(fam["template"].format(context=" ".join(words), query=""), fam["answer_prefix"], vocab[1:4])

    def build(self, units: int, rng: random.Random, index: int) -> Built:
        return self.compose(self.vocabulary(rng, rng.shuffle), units, rng.shuffle)

    def official_units(self, prompt_tokens, length: int, ttg: int) -> int:
        """The number of words of NVIDIA/RULER's freq_words_extraction.py: one
        vocabulary drawn from a stream seeded with the seed and ordered by
        `Random(seed).shuffle`, as the official script's; from length // 6
        words up by length // 32 while the prompt is under `length` tokens
        (the official rule leaves `ttg` out), then one step back. A sample
        that is then over budget with its generation steps back further
        (`generate_samples`), so that every sample fits."""

        def fixed_shuffle(lst):
            random.Random(self.seed).shuffle(lst)

        vocab = self.vocabulary(random.Random(self.seed), fixed_shuffle)
        units = length // self.coded_wordlen
        while prompt_tokens(self.compose(vocab, units, fixed_shuffle)) < length:
            units += self.step
        return units - self.step


def read_squad(path: str) -> tuple[list[dict], list[str]]:
    """SQuAD v2 dev: answerable questions; documents = unique paragraphs
    (sorted); the other paragraphs of the same article come first among the
    distractors."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        docs = sorted({p["context"] for art in d["data"] for p in art["paragraphs"]})
        idx = {c: i for i, c in enumerate(docs)}
        qas = []
        for art in d["data"]:
            same = [idx[p["context"]] for p in art["paragraphs"]]
            for p in art["paragraphs"]:
                for qa in p["qas"]:
                    if qa.get("is_impossible"):
                        continue
                    qas.append(
                        {
                            "query": qa["question"],
                            "outputs": [a["text"] for a in qa["answers"]],
                            "context": [idx[p["context"]]],
                            "more_context": [i for i in same if i != idx[p["context"]]],
                        }
                    )
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise EvalError(f"{path}: not a SQuAD v2 json file ({type(e).__name__}: {e})") from None
    return qas, docs


def read_hotpotqa(path: str) -> tuple[list[dict], list[str]]:
    """HotpotQA dev (distractor): documents "title\\nparagraph"; a question's
    ten paragraphs (gold and distractors) are its own context."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        docs = sorted({f"{t}\n{''.join(p)}" for q in d for t, p in q["context"]})
        idx = {c: i for i, c in enumerate(docs)}
        qas = [
            {
                "query": q["question"],
                "outputs": [q["answer"]],
                "context": [idx[f"{t}\n{''.join(p)}"] for t, p in q["context"]],
            }
            for q in d
        ]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise EvalError(f"{path}: not a HotpotQA json file ({type(e).__name__}: {e})") from None
    return qas, docs


class QA(TaskGen):
    def __init__(self, dataset: str, path: str):
        self.qas, self.docs = read_squad(path) if dataset == "squad" else read_hotpotqa(path)
        if not self.qas:
            raise EvalError(f"{path}: no questions")
        self.max_units = len(self.docs)
        self.min_units = len(self.qas[0]["context"])  # the probe's gold documents

    def build(self, units: int, rng: random.Random, index: int) -> Built:
        if index >= len(self.qas):
            raise EvalError(f"asked for sample {index}, the QA file has {len(self.qas)} questions")
        q = self.qas[index]
        gold, more = list(q["context"]), list(q.get("more_context", []))
        if units < len(self.docs):
            n_extra = max(0, units - len(gold))
            if n_extra > len(more):
                rest = [i for i in range(len(self.docs)) if i not in set(gold) | set(more)]
                ids = gold + more + rng.sample(rest, min(len(rest), n_extra - len(more)))
            else:
                ids = gold + rng.sample(more, n_extra)
        else:
            ids = list(range(len(self.docs)))
        docs = [self.docs[i] for i in ids]
        rng.shuffle(docs)
        context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))
        fam = FAMILIES["qa"]
        return Built(fam["template"].format(context=context, query=q["query"]), fam["answer_prefix"], list(q["outputs"]))


# ---------------------------------------------------------------- fitting


def _largest(fits, lo: int, hi_cap: int | None, step: int, what: str) -> int:
    """Largest multiple-of-step unit count u >= lo (u = lo + j*step) with
    fits(u), by doubling then binary search (fits must be monotone)."""
    if not fits(lo):
        raise DoesNotFit(f"{what}: even the smallest haystack ({lo} units) does not fit")
    good, j = 0, 1
    bad = None
    while True:
        u = lo + j * step
        if hi_cap is not None and u > hi_cap:
            bad = (hi_cap - lo) // step + 1
            break
        if fits(u):
            good, j = j, j * 2
        else:
            bad = j
            break
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(lo + mid * step):
            good = mid
        else:
            bad = mid
    return lo + good * step


def _rng(seed: int, task: str, length: int, index) -> random.Random:
    return random.Random(f"{seed}:{task}:{length}:{index}")


def make_task(
    task: str,
    length: int,
    fmt: Formatter,
    *,
    seed: int = 42,
    corpus_dir: str | None = None,
    squad: str | None = None,
    hotpotqa: str | None = None,
) -> TaskGen:
    if task not in BENCH["tasks"]:
        raise EvalError(f"unknown RULER task {task!r}; tasks are {', '.join(TASKS)}")
    cfg = BENCH["tasks"][task]
    fam, args = cfg["task"], cfg["args"]
    if fam == "niah":
        return Niah(args, corpus_dir)
    if fam == "variable_tracking":
        return VariableTracking(args, vt_icl_example(args, fmt, seed))
    if fam == "common_words_extraction":
        return CommonWords(args, length, seed)
    if fam == "freq_words_extraction":
        return FrequentWords(args, length, seed)
    if fam == "qa":
        path = squad if args["dataset"] == "squad" else hotpotqa
        if not path:
            raise EvalError(f"{task} needs the {args['dataset']} file")
        return QA(args["dataset"], path)
    raise EvalError(f"unknown task family {fam!r}")  # pragma: no cover


def missing_data(task: str, corpus_dir: str | None, squad: str | None, hotpotqa: str | None) -> str | None:
    """Why `task` cannot be generated with the given files (None: it can)."""
    if task in ESSAY_TASKS and not corpus_dir:
        return "essay haystack needs a text corpus (--corpus DIR); the official essays are not redistributable"
    if task == "qa_1" and not squad:
        return "needs the SQuAD v2 dev file (--squad FILE)"
    if task == "qa_2" and not hotpotqa:
        return "needs the HotpotQA dev-distractor file (--hotpotqa FILE)"
    return None


def fit_units(gen: TaskGen, fmt: Formatter, task: str, length: int, seed: int) -> int:
    """The haystack size (units) samples start from: the official search where
    the task has one (cwe, fwe: `official_units`), else the largest count (a
    multiple of the step above min_units) whose probe sample fits."""
    ttg = tokens_to_generate(task)

    def prompt_tokens(b: Built) -> int:
        return fmt.tokens(fmt.input_text(b.task_text) + b.answer_prefix)

    official = getattr(gen, "official_units", None)
    if official is not None:
        return official(prompt_tokens, length, ttg)

    def fits(units):
        return prompt_tokens(gen.build(units, _rng(seed, task, length, "probe"), 0)) + ttg <= length

    return _largest(fits, gen.min_units, gen.max_units, gen.step, f"{task} at {length}")


def generate_samples(
    task: str,
    length: int,
    num_samples: int,
    fmt: Formatter,
    *,
    seed: int = 42,
    corpus_dir: str | None = None,
    squad: str | None = None,
    hotpotqa: str | None = None,
) -> list[dict]:
    """Samples of (task, length): index, input, outputs, length (prompt
    tokens + tokens_to_generate), answer_prefix, plus prompt_tokens, units
    (haystack size) and chat_template."""
    gen = make_task(task, length, fmt, seed=seed, corpus_dir=corpus_dir, squad=squad, hotpotqa=hotpotqa)
    ttg = tokens_to_generate(task)
    units0 = fit_units(gen, fmt, task, length, seed)
    rows = []
    for index in range(num_samples):
        units = units0
        while True:
            b = gen.build(units, _rng(seed, task, length, index), index)
            inp = fmt.input_text(b.task_text)
            n = fmt.tokens(inp + b.answer_prefix)
            if n + ttg <= length:
                break
            units -= gen.step
            if units < gen.min_units:
                raise DoesNotFit(
                    f"{task} at {length}: sample {index} does not fit even with the smallest haystack "
                    f"({gen.min_units} units)"
                )
        rows.append(
            {
                "index": index,
                "input": inp,
                "outputs": list(b.outputs),
                "length": n + ttg,
                "answer_prefix": b.answer_prefix,
                "prompt_tokens": n,
                "units": units,
                "chat_template": fmt.chat,
            }
        )
    return rows
