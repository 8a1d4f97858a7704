"""RULER harness: official strings, task generators, fitting with a given
tokenizer, scoring and aggregation, runner and CLI. No model: generation is
a plain Python function here."""
from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter

import pytest

from focusft_jax.evaluation import ruler as rl
from focusft_jax.evaluation import ruler_data as rd
from focusft_jax.evaluation import wordlists
from focusft_jax.evaluation.errors import EvalError
from focusft_jax.evaluation.manifest import BENCHMARK_DIR, MANIFEST_KEYS
from focusft_jax.evaluation.tokenizing import load_tokenizer

FAM = rd.FAMILIES


# ---------------------------------------------------------------- fixtures


def _filler(rng: random.Random) -> str:
    subj = ["The old sailor", "A quiet traveller", "The young painter", "A tired merchant", "The shepherd"]
    verb = ["watched", "remembered", "described", "crossed", "mended"]
    obj = ["the distant hills", "a broken lantern", "the stone bridge", "the autumn leaves", "an old map"]
    return f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)} for a while."


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A word-piece tokenizer (with a chat template) trained on the benchmark
    strings and word lists, an essay corpus, and tiny SQuAD / HotpotQA files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("ruler")
    rng = random.Random(0)
    texts = [json.dumps(rd.BENCH)] + [_filler(rng) for _ in range(500)]
    texts.append(" ".join(f"{i}. {w}" for i, w in enumerate(wordlists.cwe_words())))
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(
        texts,
        trainers.BpeTrainer(vocab_size=4000, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = "<s>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    tok.save_pretrained(root / "tok")

    (root / "corpus").mkdir()
    (root / "corpus" / "essays.txt").write_text("\n\n".join(" ".join(_filler(rng) for _ in range(8)) for _ in range(200)))
    arts = []
    for a in range(4):
        paras = []
        for p in range(5):
            ctx = " ".join(_filler(rng) for _ in range(5)) + f" The code of article {a} part {p} is K{a}{p}."
            qas = [
                {"question": f"What is the code of article {a} part {p}?", "answers": [{"text": f"K{a}{p}"}, {"text": f"code K{a}{p}"}], "is_impossible": False},
                {"question": "What is unanswerable?", "answers": [], "is_impossible": True},
            ]
            paras.append({"context": ctx, "qas": qas})
        arts.append({"title": f"A{a}", "paragraphs": paras})
    (root / "squad.json").write_text(json.dumps({"version": "v2.0", "data": arts}))
    hp = []
    for q in range(30):
        ctx = [[f"Title {q}-{i}", [_filler(rng) + " ", f"Fact {q}-{i}."]] for i in range(10)]
        hp.append({"question": f"Which fact is number {q}?", "answer": f"F{q}", "context": ctx})
    (root / "hotpot.json").write_text(json.dumps(hp))
    return {
        "root": root,
        "tok_dir": root / "tok",
        "tok": load_tokenizer(root / "tok"),
        "corpus": str(root / "corpus"),
        "squad": str(root / "squad.json"),
        "hotpot": str(root / "hotpot.json"),
    }


def gen(files, task, length=4096, n=4, chat=False, seed=42):
    fmt = rd.Formatter(files["tok"], chat)
    return rd.generate_samples(task, length, n, fmt, seed=seed, corpus_dir=files["corpus"], squad=files["squad"], hotpotqa=files["hotpot"])


def built(files, task, units, length=4096, seed=1, index=0):
    fmt = rd.Formatter(files["tok"], False)
    g = rd.make_task(task, length, fmt, seed=42, corpus_dir=files["corpus"], squad=files["squad"], hotpotqa=files["hotpot"])
    return g.build(units, random.Random(seed), index)


# ---------------------------------------------------------------- official strings


def test_benchmark_strings_are_the_official_file_byte_for_byte():
    raw = (BENCHMARK_DIR / "ruler.json").read_bytes()
    # sha256 of shared/benchmarks/ruler.json (NVIDIA/RULER @ c3f5e3b)
    assert hashlib.sha256(raw).hexdigest() == "baa3d6b33dcae94992a830438e536b883c9a9cd3bf740e323a897e7c25ec576f"
    b = json.loads(raw)
    assert "c3f5e3b" in b["source"] and "Apache-2.0" in b["source"]
    assert len(rd.TASKS) == 13 and rd.ESSAY_TASKS == ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery")
    assert [rd.tokens_to_generate(t) for t in ("niah_single_1", "vt", "cwe", "fwe", "qa_1")] == [128, 30, 120, 50, 32]


def test_word_lists_are_wonderwords_2_2_0():
    assert wordlists.wonderwords_version() == "2.2.0"
    assert wordlists.version_record() == "wonderwords 2.2.0"
    adjs, nouns = wordlists.key_parts()
    assert len(adjs) > 900 and len(nouns) > 6000
    words = wordlists.cwe_words()
    assert list(words) == sorted(set(words)) and len(words) > 8000


# ---------------------------------------------------------------- niah


def _is_key_word(key: str) -> bool:
    adjs, nouns = map(set, wordlists.key_parts())
    parts = key.split("-")
    return any("-".join(parts[:i]) in adjs and "-".join(parts[i:]) in nouns for i in range(1, len(parts)))


def test_niah_single_rewrites_the_template_to_the_singular(files):
    b = built(files, "niah_single_1", 30)
    (value,) = b.outputs
    key = re.search(r"for (\S+) mentioned", b.task_text).group(1)
    assert b.task_text.startswith(
        "A special magic number is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the number afterwards.\n"
    )
    assert b.task_text.endswith(f"\nWhat is the special magic number for {key} mentioned in the provided text?")
    assert b.answer_prefix == f" The special magic number for {key} mentioned in the provided text is"
    # the needle itself keeps the official plural wording
    lines = b.task_text.split("\n")[1:-1]
    assert lines.count(f"One of the special magic numbers for {key} is: {value}.") == 1
    assert all(l == rd.NOISE for l in lines if not l.startswith("One of"))
    assert len(lines) == 31 and re.fullmatch(r"[1-9]\d{6}", value) and _is_key_word(key)
    assert rd.singular(FAM["niah"]["template"]).startswith("A special magic {type_needle_v} is hidden")


def test_niah_plural_multiquery_and_multivalue(files):
    b = built(files, "niah_multiquery", 3000)
    assert b.task_text.startswith("Some special magic numbers are hidden within the following text.")
    m = re.search(r"What are all the special magic numbers for (.+) mentioned in the provided text\?$", b.task_text)
    keys = m.group(1).split(", ")
    assert len(keys) == 4 and keys[3].startswith("and ")
    keys[3] = keys[3][4:]
    assert m.group(1) == f"{keys[0]}, {keys[1]}, {keys[2]}, and {keys[3]}"
    assert b.answer_prefix == f" The special magic numbers for {m.group(1)} mentioned in the provided text are"
    # outputs in query order: the value of each queried key
    for key, value in zip(keys, b.outputs):
        assert f"One of the special magic numbers for {key} is: {value}." in b.task_text
    mv = built(files, "niah_multivalue", 3000)
    key = re.search(r"for (\S+) mentioned in the provided text\?$", mv.task_text).group(1)
    assert len(mv.outputs) == 4
    for v in mv.outputs:
        assert f"One of the special magic numbers for {key} is: {v}." in mv.task_text
    assert mv.answer_prefix == f" The special magic numbers for {key} mentioned in the provided text are"


def test_niah_haystacks(files):
    b = built(files, "niah_multikey_2", 60)
    lines = b.task_text.split("\n")[1:-1]
    key = re.search(r"for (\S+) mentioned", b.answer_prefix).group(1)
    assert len(lines) == 61 and all(re.fullmatch(r"One of the special magic numbers for \S+ is: \d{7}\.", l) for l in lines)
    assert sum(f" for {key} is:" in l for l in lines) == 1  # distractor keys never repeat the query key
    u = built(files, "niah_multikey_3", 20)
    uuid_re = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert re.fullmatch(uuid_re, u.outputs[0])
    assert all(re.fullmatch(rf"One of the special magic uuids for {uuid_re} is: {uuid_re}\.", l) for l in u.task_text.split("\n")[1:-1])
    assert u.answer_prefix.startswith(" The special magic uuid for ")
    e = built(files, "niah_single_3", 2000)
    assert re.fullmatch(uuid_re, e.outputs[0]) and "\n" not in e.task_text.split("\n", 1)[1].rsplit("\n", 1)[0]
    assert "One of the special magic uuids for " in e.task_text
    assert " for a while. " in e.task_text  # essay sentences from the corpus


# ---------------------------------------------------------------- vt


def test_vt_chain_noise_and_worked_example(files):
    rows = gen(files, "vt", n=2)
    tok = files["tok"]
    for r in rows:
        text = r["input"]
        # the worked example comes first: the plain template, value 12345, 3-letter names, its answer
        assert text.startswith("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n")
        m = re.search(r"they are:  ([A-Z]{3}) ([A-Z]{3}) ([A-Z]{3}) ([A-Z]{3}) ([A-Z]{3})\n\nMemorize and track", text)
        assert m, text[:200]
        ex_names = m.groups()
        example = text[: m.end() - len("\nMemorize and track")]
        assert f"VAR {ex_names[0]} = 12345\n" in example
        for a, b in zip(ex_names, ex_names[1:]):
            assert f"VAR {b} = VAR {a} \n" in example
        assert " Answer: According to the chain(s) of variable assignment in the text above, 5 variables are assigned the value 12345, they are: " in example
        plain = example[: example.rindex(" they are: ") + len(" they are: ")]
        assert example == plain + " " + " ".join(ex_names) + "\n"
        assert len(tok(plain, add_special_tokens=False)["input_ids"]) <= rd.VT_ICL_BUDGET
        # the task: a 5-name chain among noise lines, in order, value in the question
        main = text[m.end() - len("Memorize and track") :]
        names = r["outputs"]
        assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
        value = re.search(rf"VAR {names[0]} = (\d{{5}})\n", main).group(1)
        lines = main.split("\n")
        pos = [lines.index(f"VAR {names[0]} = {value}")] + [lines.index(f"VAR {b} = VAR {a} ") for a, b in zip(names, names[1:])]
        assert pos == sorted(pos)
        assert main.endswith(f"\nQuestion: Find all variables that are assigned the value {value} in the text above.")
        assert r["answer_prefix"] == (
            f" Answer: According to the chain(s) of variable assignment in the text above, 5 variables are assigned the value {value}, they are: "
        )


# ---------------------------------------------------------------- cwe / fwe / qa


def _numbered(text: str) -> list[str]:
    items = re.findall(r"(\d+)\. (\S+)", text)
    assert [int(i) for i, _ in items] == list(range(1, len(items) + 1))
    return [w for _, w in items]


@pytest.mark.parametrize("length,ex_reps,main_reps", [(4096, (10, 3), (30, 3)), (2048, (3, 1), (6, 1))])
def test_cwe_one_shot_layout(files, length, ex_reps, main_reps):
    b = built(files, "cwe", 50, length=length)
    tpl_head = "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n"
    q = "\nQuestion: What are the 10 most common words in the above list?"
    prefix = FAM["common_words_extraction"]["answer_prefix"]
    assert b.answer_prefix == prefix and b.task_text.startswith(tpl_head) and b.task_text.endswith(q)
    example, main = b.task_text.split("\n" + tpl_head)
    ex_list, ex_answer = example[len(tpl_head) :].split(q + prefix)
    ex_words = _numbered(ex_list)
    counts = Counter(ex_words)
    common = [w for w, c in counts.items() if c == ex_reps[0]]
    assert len(common) == 10 and len(counts) == (40 if length >= 4096 else 20)
    assert all(c == ex_reps[1] for w, c in counts.items() if w not in common)
    assert len(_numbered(ex_answer)) == 10 and set(_numbered(ex_answer)) == set(common)
    assert ex_answer.startswith(" 1. ")  # a space after the answer prefix, as the official script writes it
    main_counts = Counter(_numbered(main[: -len(q)]))
    assert len(main_counts) == 50 and set(b.outputs) == {w for w, c in main_counts.items() if c == main_reps[0]}
    assert all(c == main_reps[1] for w, c in main_counts.items() if w not in b.outputs)


def test_fwe_zipf_counts(files):
    b = built(files, "fwe", 2000)
    tpl = FAM["freq_words_extraction"]["template"]
    head, tail = tpl.split("{context}")
    assert b.task_text.startswith(head) and b.task_text.endswith(tail.format(query=""))
    words = b.task_text[len(head) : -len(tail)].split(" ")
    counts = Counter(words)
    ranked = [w for w, _ in counts.most_common()]
    assert ranked[0] == "..." and set(b.outputs) == set(ranked[1:4])
    assert all(re.fullmatch(r"[a-z]{6}", w) for w in counts if w != "...")
    z = rd.zeta(2.0)
    assert counts["..."] == int(2000 / z)
    assert sorted(counts.values(), reverse=True)[:4] == [int(2000 * k**-2 / z) for k in range(1, 5)]
    assert rd.zeta(3.0) == pytest.approx(1.2020569031595942, rel=1e-9)


def test_qa_documents(files):
    b = built(files, "qa_1", 8, index=6)
    docs = re.findall(r"Document (\d+):\n", b.task_text)
    assert docs == [str(i) for i in range(1, 9)]
    assert b.outputs == ["K11", "code K11"] and "The code of article 1 part 1 is K11." in b.task_text
    assert b.task_text.endswith("\n\nQuestion: What is the code of article 1 part 1?") and b.answer_prefix == " Answer:"
    assert b.task_text.startswith(FAM["qa"]["template"].split("{context}")[0])
    h = built(files, "qa_2", 14, index=3)
    assert h.outputs == ["F3"] and all(f"Fact 3-{i}." in h.task_text for i in range(10))  # every paragraph of the question
    assert len(re.findall(r"Document \d+:\n", h.task_text)) == 14


# ---------------------------------------------------------------- fitting


@pytest.mark.parametrize("chat", [False, True])
def test_every_sample_fits_and_niah_vt_fill_97_percent(files, chat):
    tok = files["tok"]
    for task in rd.TASKS:
        lengths = (4096, 8192) if task in ("niah_single_1", "niah_multikey_2", "vt") and not chat else (4096,)
        for length in lengths:
            rows = gen(files, task, length=length, n=3, chat=chat)
            ttg = rd.tokens_to_generate(task)
            for r in rows:
                ids = tok(r["input"] + r["answer_prefix"], add_special_tokens=not chat)["input_ids"]
                assert len(ids) == r["prompt_tokens"] and r["length"] == len(ids) + ttg <= length, (task, length)
                assert r["input"].startswith("<s><|user|>\n") == chat and r["chat_template"] == chat
                assert r["input"].endswith("</s>\n<|assistant|>\n") == chat
            fill = sum(r["length"] for r in rows) / len(rows) / length
            if task.startswith("niah") or task == "vt":
                assert fill >= 0.97, (task, length, fill)
            if task in ("cwe", "fwe"):  # from the official search's count, down by the official step
                g = rd.make_task(task, length, rd.Formatter(tok, chat))
                start = rd.fit_units(g, rd.Formatter(tok, chat), task, length, 42)
                assert all(r["units"] <= start and (start - r["units"]) % g.step == 0 for r in rows)


# An independent re-implementation of the official searches, written from
# NVIDIA/RULER's common_words_extraction.py (binary-search version) and
# freq_words_extraction.py: a module-level random seeded once, the sorted
# vocabulary shuffled with Random(seed), every list ordered by a fresh
# Random(seed).shuffle, a plain model template ("{task_template}") with the
# answer prefix appended, numpy's Zipf counts.


def _official_prompt(task_family: str) -> str:
    return FAM[task_family]["template"] + FAM[task_family]["answer_prefix"]


def official_cwe_words(count, length: int, seed: int) -> int:
    module_random = random.Random(seed)
    words = sorted(set(wordlists.nouns() + wordlists.adjectives() + wordlists.verbs()))
    random.Random(seed).shuffle(words)
    template = _official_prompt("common_words_extraction")

    def get_example(num_words, common_repeats, uncommon_repeats):
        full = module_random.sample(words, num_words)
        word_list = full[:10] * common_repeats + full[10:] * uncommon_repeats
        random.Random(seed).shuffle(word_list)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(word_list)), full[:10]

    def input_text(num_words):
        if length < 4096:
            shot, shot_answer = get_example(20, 3, 1)
            context, _ = get_example(num_words, 6, 1)
        else:
            shot, shot_answer = get_example(40, 10, 3)
            context, _ = get_example(num_words, 30, 3)
        shot = template.format(context=shot, query="") + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(shot_answer))
        return shot + "\n" + template.format(context=context, query="")

    per_word = count(input_text(4096)) / 4096
    lower, upper = 10, max(int(length // per_word) * 2, 20)
    optimal = None
    while lower <= upper:
        mid = (lower + upper) // 2
        if count(input_text(mid)) + 120 <= length:
            optimal, lower = mid, mid + 1
        else:
            upper = mid - 1
    return optimal if optimal is not None else 10


def official_fwe_words(count, length: int, seed: int) -> int:
    import math
    import string

    import numpy as np

    module_random = random.Random(seed)
    vocab_size = length // 50
    vocab = ["".join(module_random.choices(string.ascii_lowercase, k=6)) for _ in range(vocab_size)]
    while len(set(vocab)) < vocab_size:
        vocab.append("".join(module_random.choices(string.ascii_lowercase, k=6)))
    vocab = sorted(set(vocab))
    random.Random(seed).shuffle(vocab)
    vocab[0] = "..."
    template = _official_prompt("freq_words_extraction")

    def text(num_words):
        k = np.arange(1, len(vocab) + 1)
        counts = (num_words * (k**-2.0) / (math.pi**2 / 6)).astype(int)
        sampled = [w for w, c in zip(vocab, counts) for _ in range(c)]
        random.Random(seed).shuffle(sampled)
        return template.format(context=" ".join(sampled), query="")

    increment = length // 32
    num_words = length // 6
    while count(text(num_words)) < length:
        num_words += increment
    return num_words - increment


@pytest.mark.parametrize("length", [2048, 4096, 8192])
@pytest.mark.parametrize("seed", [42, 7])
def test_cwe_and_fwe_choose_the_official_number_of_words(files, length, seed):
    tok = files["tok"]
    fmt = rd.Formatter(tok, False)

    def count(text):  # the ids the model is fed, as rd.Formatter counts them for a plain prompt
        return len(tok(text, add_special_tokens=True)["input_ids"])

    cwe = rd.fit_units(rd.make_task("cwe", length, fmt, seed=seed), fmt, "cwe", length, seed)
    fwe = rd.fit_units(rd.make_task("fwe", length, fmt, seed=seed), fmt, "fwe", length, seed)
    assert (cwe, fwe) == (official_cwe_words(count, length, seed), official_fwe_words(count, length, seed))


def test_fit_finds_the_largest_haystack(files):
    fmt = rd.Formatter(files["tok"], False)
    g = rd.make_task("niah_single_1", 4096, fmt)
    units = rd.fit_units(g, fmt, "niah_single_1", 4096, 42)

    def total(u):
        b = g.build(u, rd._rng(42, "niah_single_1", 4096, "probe"), 0)
        return fmt.tokens(b.task_text + b.answer_prefix) + 128

    assert total(units) <= 4096 < total(units + 1)
    assert rd._largest(lambda u: u <= 1000, 1, None, 1, "x") == 1000
    assert rd._largest(lambda u: u <= 1000, 10, None, 10, "x") == 1000
    assert rd._largest(lambda u: True, 10, 95, 10, "x") == 90
    with pytest.raises(EvalError, match="does not fit"):
        rd.generate_samples("cwe", 300, 1, fmt)


def test_samples_are_reproducible_per_index(files):
    a = gen(files, "niah_single_1", n=3)
    b = gen(files, "niah_single_1", n=2)
    assert a[:2] == b and a[0]["outputs"] != a[1]["outputs"]
    assert gen(files, "niah_single_1", n=1, seed=7)[0]["outputs"] != a[0]["outputs"]


# ---------------------------------------------------------------- scoring


def test_postprocess_replaces_control_characters():
    assert rl.postprocess_pred("  a\tb\x00c\x1fd\x7f \n") == "a\nb\nc\nd\x7f"
    assert rl.postprocess_pred("\x01\x02 answer \x03") == "answer"


def test_string_match_all_and_part():
    refs = [["1234567", "7654321"], ["ABC", "def"], ["x"]]
    preds = ["the numbers are 1234567 and more", "abc, DEF", "nothing"]
    assert rl.string_match_all(preds, refs) == round((0.5 + 1 + 0) / 3 * 100, 2) == 50.0
    assert rl.string_match_part(preds, refs) == round(2 / 3 * 100, 2) == 66.67
    assert rl.string_match_all(["a"], [["a"]]) == 100.0
    assert rl.string_match_all(["a", "b", "c"], [["a"], ["x"], ["x"]]) == 33.33
    assert rl.metric_of("qa_2") == "string_match_part" and rl.metric_of("cwe") == "string_match_all"
    # task_score post-processes first (control characters cannot glue references)
    assert rl.task_score("vt", ["AAAAA\x00BBBBB"], [["AAAAA", "BBBBB"]]) == 100.0
    assert rl.task_score("qa_1", ["Paris\x02"], [["paris", "Lyon"]]) == 100.0


def test_aggregation_covers_tasks_present():
    scores = {"niah_single_1": {4096: 100.0, 8192: 90.0}, "vt": {4096: 50.0}, "cwe": {4096: 60.0, 8192: 30.0}}
    agg = rl.aggregate(scores, [4096, 8192, 16384])
    assert agg["average"] == {4096: 70.0, 8192: 60.0, 16384: None}
    assert agg["average_tasks"][8192] == ["niah_single_1", "cwe"]
    assert agg["average_covers"][4096] == "3 of 13 tasks" and agg["average_covers"][16384] == "0 of 13 tasks"
    assert agg["overall_average"] == 65.0


# ---------------------------------------------------------------- runner and CLI


def _oracle_get_fn(asked, seen_prompts, answers):
    def get_fn(ttg):
        asked.append(ttg)

        def generate_fn(prompts):
            seen_prompts.extend(prompts)
            return [" " + ", ".join(answers[p]) + "\x00 junk" for p in prompts]

        return generate_fn

    return get_fn


def test_runner_and_results(files, tmp_path):
    samples = {(t, 4096): gen(files, t, n=2) for t in ("niah_single_1", "vt", "cwe", "fwe", "qa_2")}
    answers = {r["input"] + r["answer_prefix"]: r["outputs"] for rows in samples.values() for r in rows}
    asked, seen = [], []
    preds = rl.evaluate(samples, _oracle_get_fn(asked, seen, answers), batch_size=3, progress=False)
    assert sorted(asked) == [30, 32, 50, 120, 128]  # one generate_fn per family budget
    assert set(seen) == set(answers)
    assert [(p["task"], p["index"]) for p in preds] == [(t, i) for (t, _) in samples for i in range(2)]
    assert all(p["score"] == 1.0 and p["prediction"].endswith("\n junk") for p in preds)
    res = rl.build_results(preds, [t for t, _ in samples], [4096], {}, {"checkpoint": None}, "RULER")
    assert res["scores"]["cwe"] == {4096: 100.0} and res["average"] == {4096: 100.0}
    assert res["average_covers"][4096] == "5 of 13 tasks" and res["metrics"]["qa_2"] == "string_match_part"
    rl.write_report(tmp_path, preds, res)
    j = json.loads((tmp_path / "results.json").read_text())
    assert j["scores"]["vt"] == {"4096": 100.0} and j["average"] == {"4096": 100.0}
    md = (tmp_path / "results.md").read_text()
    assert "| vt | 100.00 |" in md and "| average | 100.00 |" in md and "5 of 13 tasks" in md
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 10


def test_runner_refuses_samples_longer_than_the_model_context(tmp_path):
    """A sample whose prompt + generation does not fit the model is refused
    and reported, its cell gets no score and is not averaged in (not a 0)."""

    def rows(task, length):
        return [{"index": i, "input": f"{task} {i}", "outputs": ["ans"], "length": length, "answer_prefix": " A:"} for i in range(2)]

    samples = {("vt", 4096): rows("vt", 4000), ("cwe", 4096): rows("cwe", 4000), ("vt", 8192): rows("vt", 8000)}
    seen = []

    def get_fn(ttg):
        return lambda prompts: seen.extend(prompts) or [" ans"] * len(prompts)

    preds = rl.evaluate(samples, get_fn, max_context=4096, progress=False)
    refused = [p for p in preds if p.get("refused")]
    assert [(p["length"], p["index"]) for p in refused] == [(8192, 0), (8192, 1)]
    assert all(p["score"] is None and p["output"] is None and "4096" in p["refused"] for p in refused)
    assert len(seen) == 4  # the refused ones are never generated
    res = rl.build_results(preds, ["vt", "cwe"], [4096, 8192], {}, {}, "RULER")
    assert res["refused"] == {"vt": {8192: 2}} and 8192 not in res["scores"]["vt"]
    assert res["average"] == {4096: 100.0, 8192: None} and res["overall_average"] == 100.0
    rl.write_report(tmp_path, preds, res)
    assert "Refused" in (tmp_path / "results.md").read_text()


def test_cli_generate_only_skips_tasks_without_data(files, tmp_path, capsys):
    out = tmp_path / "g"
    argv = ["--generate-only", "--tokenizer", str(files["tok_dir"]), "--lengths", "4096", "--samples", "2", "--chat-template", "off", "--out", str(out)]
    assert rl.main(argv) == 0
    made = sorted(p.name for p in (out / "samples").iterdir())
    assert made == sorted(f"{t}_4096.jsonl" for t in ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt", "cwe", "fwe"))
    rows = [json.loads(l) for l in (out / "samples" / "vt_4096.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all({"index", "input", "outputs", "length", "answer_prefix"} <= set(r) for r in rows)
    m = json.loads((out / "manifest.json").read_text())
    assert set(MANIFEST_KEYS) <= set(m) and m["wordlist_version"] == "wonderwords 2.2.0" and m["chat_template"] is False
    assert set(m["skipped"]) == set(rd.ESSAY_TASKS) | {"qa_1", "qa_2"} and "--corpus" in m["skipped"]["niah_single_2"]
    assert "skipped qa_1" in capsys.readouterr().out
    assert rl.main(["--generate-only", "--out", str(out)]) == 2  # no tokenizer
    assert rl.main(["--tokenizer", str(files["tok_dir"]), "--out", str(out)]) == 2  # no checkpoint
    assert rl.main(["--generate-only", "--tokenizer", str(files["tok_dir"]), "--tasks", "niah", "--out", str(out)]) == 2


def test_cli_skips_a_task_that_does_not_fit_and_goes_on(files, tmp_path, capsys, monkeypatch):
    """cwe's smallest sample (its worked example alone) does not fit 600
    tokens: the cell is skipped with the reason, the other cells run, and a
    run stopped later by an error leaves no sample file at all."""
    out = tmp_path / "g"
    base = ["--generate-only", "--tokenizer", str(files["tok_dir"]), "--samples", "2", "--chat-template", "off",
            "--tasks", "niah_single_1,cwe,fwe", "--out", str(out)]
    assert rl.main(base + ["--lengths", "600,4096"]) == 0
    made = sorted(p.name for p in (out / "samples").iterdir())
    assert made == ["cwe_4096.jsonl", "fwe_4096.jsonl", "fwe_600.jsonl", "niah_single_1_4096.jsonl", "niah_single_1_600.jsonl"]
    m = json.loads((out / "manifest.json").read_text())
    assert list(m["did_not_fit"]) == ["cwe"] and "does not fit" in m["did_not_fit"]["cwe"]["600"]
    assert m["samples"]["cwe"] == {"4096": 2} and "cwe" not in m["skipped"]
    assert "skipped cwe at 600: cwe at 600" in capsys.readouterr().err
    # No length fits: the task has no cell, and its reason is there once.
    assert rl.main(base + ["--lengths", "600", "--out", str(tmp_path / "h")]) == 0
    m = json.loads((tmp_path / "h" / "manifest.json").read_text())
    assert "cwe" not in m["tasks"] and "cwe" not in m["skipped"] and "does not fit" in m["did_not_fit"]["cwe"]["600"]
    # An error in a later cell: nothing written.
    real = rd.generate_samples

    def failing(task, length, *a, **k):
        if task == "fwe":
            raise EvalError("boom")
        return real(task, length, *a, **k)

    monkeypatch.setattr(rd, "generate_samples", failing)
    assert rl.main(base + ["--lengths", "600", "--out", str(tmp_path / "e")]) == 2
    assert not (tmp_path / "e" / "samples").exists()
    results = rl.build_results([], ["cwe"], [600], {}, {}, "RULER", did_not_fit={"cwe": {600: "too long"}})
    assert "- cwe at 600: too long" in rl.results_markdown({**results, "average": {600: None},
                                                             "average_covers": {600: 0}, "overall_average": None})


def test_cli_model_path_with_a_generate_fn(files, tmp_path, monkeypatch):
    """--checkpoint end to end with every task (corpus and QA files given),
    generation replaced by a fake that answers half of the references."""
    ckpt = files["tok_dir"]
    asked = []

    def fake_make_generate_fn(
        checkpoint, batch_size, prefill_attention, max_new_tokens, *, add_special_tokens=True, attention_impl="auto"
    ):
        asked.append((str(checkpoint), batch_size, prefill_attention, max_new_tokens, add_special_tokens))
        return lambda prompts: [" " + " ".join(answers[p][: (len(answers[p]) + 1) // 2]) for p in prompts]

    answers = {}
    real_generate = rd.generate_samples

    def recording_generate(*a, **kw):
        rows = real_generate(*a, **kw)
        answers.update({r["input"] + r["answer_prefix"]: r["outputs"] for r in rows})
        return rows

    monkeypatch.setattr(rl, "make_generate_fn", fake_make_generate_fn)
    monkeypatch.setattr(rd, "generate_samples", recording_generate)
    out = tmp_path / "m"
    argv = [
        "--checkpoint", str(ckpt), "--lengths", "4096", "--samples", "2", "--corpus", files["corpus"],
        "--squad", files["squad"], "--hotpotqa", files["hotpot"], "--batch-size", "4",
        "--prefill-attention", "glm_bidir", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    assert rl.main(argv) == 0
    assert {a[3] for a in asked} == {128, 30, 120, 50, 32} and all(a[4] is False and a[2] == "glm_bidir" for a in asked)
    res = json.loads((out / "results.json").read_text())
    assert res["tasks"] == list(rd.TASKS) and res["skipped"] == {}
    assert res["scores"]["niah_single_1"]["4096"] == 100.0 and res["scores"]["niah_multivalue"]["4096"] == 50.0
    assert res["scores"]["cwe"]["4096"] >= 50.0 and res["scores"]["qa_1"]["4096"] == 100.0
    assert res["scores"]["vt"]["4096"] == 60.0 and res["beyond_model_context"] == []
    assert res["average_covers"]["4096"] == "13 of 13 tasks"
    assert "user corpus" in res["label"] and res["manifest"]["prefill_attention"] == "glm_bidir"
    assert res["manifest"]["data_source"]["essay_corpus"]["path"] == files["corpus"]
    assert res["manifest"]["chat_template"] is True  # auto: the tokenizer has one
    assert len(list((out / "samples").iterdir())) == 13 and (out / "results.md").exists()
    # --samples-from reuses them
    out2 = tmp_path / "m2"
    assert rl.main(argv[:-1] + [str(out2), "--samples-from", str(out)]) == 0
    assert json.loads((out2 / "results.json").read_text())["scores"] == res["scores"]
    # samples made for the chat template cannot be reused without it
    assert rl.main(argv[:-1] + [str(tmp_path / "m3"), "--samples-from", str(out), "--chat-template", "off"]) == 2
