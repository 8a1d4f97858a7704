"""BABILong harness: official strings, prompts, scoring rules and quirks,
data (local snapshot, hub path, offline generator), runner and CLI.
No model: generation is a plain Python function here."""
from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import pytest

from focusft_jax.evaluation import babilong as bl
from focusft_jax.evaluation import babilong_data as bd
from focusft_jax.evaluation.errors import EvalError
from focusft_jax.evaluation.heatmap import heatmap_figure
from focusft_jax.evaluation.manifest import BENCHMARK_DIR, MANIFEST_KEYS
from focusft_jax.evaluation.runner import length_sorted_batches, run_generation

LABELS = bl.BENCH["task_labels"]
P = bl.BENCH["prompts"]


# ---------------------------------------------------------------- official strings


def test_benchmark_strings_are_the_official_file_byte_for_byte():
    raw = (BENCHMARK_DIR / "babilong.json").read_bytes()
    # sha256 of shared/benchmarks/babilong.json (booydar/babilong @ 7a6efee)
    assert hashlib.sha256(raw).hexdigest() == "d7dd3764f56e69feca22fc3318fd479bf1fe4b13ee71b403ad6365a6c3fa43a5"
    b = json.loads(raw)
    assert "7a6efee" in b["source"] and "Apache-2.0" in b["source"]
    # typos and odd spacing are part of the benchmark
    assert "Judith come back to the kitchen." in P["qa1"]["examples"]
    assert "a question.You need" in P["qa2"]["instruction"]
    assert P["qa10"]["examples"].endswith("</example>\n<context>\n")
    assert list(bl.TASKS) == [f"qa{i}" for i in range(1, 21)]


# ---------------------------------------------------------------- prompts


@pytest.mark.parametrize("task", [f"qa{i}" for i in range(1, 21)])
def test_prompt_is_the_official_template_filled_with_the_official_strings(task):
    ctx, q = "  Mary went to the garden. Some book text.\n\n", "Where is Mary?"
    got = bl.format_prompt(task, ctx, q)
    expected = (
        P[task]["instruction"]
        + "\n\n"
        + P[task]["examples"]
        + "\n\n"
        + P[task]["post_prompt"]
        + "\n\n<context>\nMary went to the garden. Some book text.\n</context>\n\nQuestion: Where is Mary?"
    ).strip()
    assert got == expected
    assert got == bl.BENCH["default_template"].format(
        instruction=P[task]["instruction"],
        examples=P[task]["examples"],
        post_prompt=P[task]["post_prompt"],
        context=ctx.strip(),
        question=q,
    ).strip()


def test_switched_off_parts_become_empty_strings():
    ctx, q = "Facts here.", "Where is John?"
    assert bl.format_prompt("qa1", ctx, q, parts=()) == "<context>\nFacts here.\n</context>\n\nQuestion: Where is John?"
    only_instr = bl.format_prompt("qa1", ctx, q, parts=("instruction",))
    assert only_instr == P["qa1"]["instruction"] + "\n\n\n\n\n\n<context>\nFacts here.\n</context>\n\nQuestion: Where is John?"
    no_examples = bl.format_prompt("qa2", ctx, q, parts=("instruction", "post_prompt"))
    assert no_examples == (
        P["qa2"]["instruction"] + "\n\n\n\n" + P["qa2"]["post_prompt"] + "\n\n<context>\nFacts here.\n</context>\n\nQuestion: Where is John?"
    )
    assert "<example>" not in no_examples
    assert bl.prompt_config("qa3", ("examples",)) == {"instruction": "", "examples": P["qa3"]["examples"], "post_prompt": ""}
    with pytest.raises(EvalError):
        bl.prompt_config("qa1", ("preamble",))


def test_prompt_names_follow_the_official_results_files():
    name = bl.prompt_name(bl.PROMPT_PARTS, True)
    assert name == "instruction_yes_examples_yes_post_prompt_yes_chat_template_yes"
    assert bl.prompt_name(("instruction",), False) == "instruction_yes_examples_no_post_prompt_no_chat_template_no"
    assert bl.parse_prompt_name(name) == (list(bl.PROMPT_PARTS), True)
    assert bl.parse_prompt_name("instruction_no_examples_yes_post_prompt_no_chat_template_no") == (["examples"], False)


# ---------------------------------------------------------------- scoring


def ok(task, target, output, question="Where is Mary?"):
    return bl.compare_answers(target, output, question, LABELS[task])


def test_scoring_basic_and_case():
    assert ok("qa1", "bathroom", "The most recent location of Mary is bathroom.")
    assert ok("qa1", "bathroom", "BATHROOM")
    assert not ok("qa1", "bathroom", "The most recent location of Mary is kitchen.")
    assert not ok("qa1", "bathroom", "")
    assert not ok("qa1", "bathroom", "kitchen or bathroom")  # two labels found


def test_scoring_keeps_only_the_first_sentence():
    assert ok("qa1", "kitchen", "Mary is in the kitchen. Before that she was in the garden.")
    assert not ok("qa1", "kitchen", "Mary is in the garden. No: the kitchen.")
    assert bl.preprocess_output("A.B") == "a"


def test_scoring_cuts_at_context_and_example_tags():
    assert ok("qa1", "kitchen", "kitchen <context> Mary went to the garden")
    assert ok("qa1", "kitchen", "kitchen<example>garden")
    assert not ok("qa1", "kitchen", "garden <example> kitchen")
    assert bl.preprocess_output("Kitchen <CONTEXT> garden") == "kitchen "  # tag cut after lower-casing


def test_scoring_question_cut_never_fires_after_lower_casing():
    # The official code splits at 'Question' after lower-casing: no effect.
    assert bl.preprocess_output("Kitchen Question: garden") == "kitchen question: garden"
    assert not ok("qa1", "kitchen", "kitchen Question: where is the garden")


def test_scoring_ignores_labels_named_in_the_question():
    q3 = "Where was the apple before the kitchen?"
    assert bl.compare_answers("garden", "Before the kitchen the apple was in the garden.", q3, LABELS["qa3"])
    assert not bl.compare_answers("kitchen", "kitchen", q3, LABELS["qa3"])  # never a target
    q5 = "Who did Mary give the apple to?"
    assert bl.compare_answers("Fred", "Mary gave the apple to Fred", q5, LABELS["qa5"])
    assert not bl.compare_answers("Fred", "Mary gave the apple to Fred and Jeff", q5, LABELS["qa5"])


def test_scoring_substring_quirk_none_contains_one():
    q = "How many objects is Daniel carrying?"
    # 'none' contains the label 'one': both are found, so 'none' is never right (official behaviour)
    assert not bl.compare_answers("none", "none", q, LABELS["qa7"])
    assert bl.compare_answers("two", "two", q, LABELS["qa7"])


def test_scoring_qa8_multi_target():
    q = "What is Daniel carrying?"
    assert bl.compare_answers("apple,milk", "apple, milk", q, LABELS["qa8"])
    assert bl.compare_answers("apple,milk", "milk and apple", q, LABELS["qa8"])
    assert not bl.compare_answers("apple,milk", "apple", q, LABELS["qa8"])
    assert not bl.compare_answers("apple,milk", "apple, milk, football", q, LABELS["qa8"])
    assert bl.compare_answers("milk", "milk", q, LABELS["qa8"])
    assert bl.compare_answers("nothing", "Nothing.", q, LABELS["qa8"])


def test_scoring_short_comma_targets_take_the_single_target_path():
    # qa19 targets like "n,w" have a comma but only 3 characters: matched as one label
    q = "How do you go from the kitchen to the hallway?"
    assert bl.compare_answers("n,w", "n,w", q, LABELS["qa19"])
    assert not bl.compare_answers("n,w", "n,w or s,e", q, LABELS["qa19"])


# ---------------------------------------------------------------- the runner


def _cells():
    gen = bd.BabilongGenerator(seed=3)
    return {(t, l): gen.samples(t, l, 3) for t in ("qa1", "qa4") for l in ("0k", "1k")}


def test_runner_batches_by_length_and_restores_order():
    cells = _cells()
    answer = {}
    for (t, l), recs in cells.items():
        for r in recs:
            answer[bl.format_prompt(t, r["input"], r["question"])] = r["target"]
    batches = []

    def generate_fn(prompts):
        batches.append([len(p) for p in prompts])
        return [f"  {answer[p]}.  " for p in prompts]

    preds = bl.evaluate(cells, generate_fn, batch_size=4, progress=False)
    assert [len(b) for b in batches] == [4, 4, 4]
    flat = [n for b in batches for n in b]
    assert flat == sorted(flat, reverse=True)  # longest first, similar lengths together
    assert [(p["task"], p["length"], p["index"]) for p in preds] == [
        (t, l, i) for (t, l), recs in cells.items() for i in range(len(recs))
    ]
    assert all(p["correct"] and p["output"] == p["target"] + "." for p in preds)
    acc, counts, refused = bl.accuracy_table(preds, ["qa1", "qa4"], ["0k", "1k"])
    assert acc == {"qa1": {"0k": 100.0, "1k": 100.0}, "qa4": {"0k": 100.0, "1k": 100.0}}
    assert counts["qa1"]["1k"] == 3 and refused == {}


def test_runner_refuses_samples_that_do_not_fit():
    cells = _cells()
    calls = []

    def generate_fn(prompts):
        calls.extend(prompts)
        return ["kitchen"] * len(prompts)

    words = {l: [len(bl.format_prompt(t, r["input"], r["question"]).split()) for (t, l2), rs in cells.items() if l2 == l for r in rs] for l in ("0k", "1k")}
    assert min(words["1k"]) > max(words["0k"]) + 20
    preds = bl.evaluate(
        cells,
        generate_fn,
        wrap=lambda p: "<u>" + p,
        token_count=lambda s: len(s.split()),
        max_context=max(words["0k"]) + 20,
        progress=False,
    )
    refused = [p for p in preds if p.get("refused")]
    assert refused and all(p["length"] == "1k" and p["output"] is None and p["correct"] is None for p in refused)
    assert all(c.startswith("<u>") for c in calls) and len(calls) == len(preds) - len(refused)
    res = bl.build_results(preds, ["qa1", "qa4"], ["0k", "1k"], {"m": 1}, "BABILong")
    assert res["accuracy"]["qa1"]["1k"] is None and res["refused"]["qa1"]["1k"] == 3
    assert res["mean_qa1_qa5"]["1k"] is None and res["mean_qa1_qa5"]["0k"] is not None


def test_run_generation_checks_the_generate_fn():
    with pytest.raises(EvalError):
        run_generation(["a", "b"], lambda ps: ["x"], batch_size=2, progress=False)
    assert run_generation(["aa", "b", "ccc"], lambda ps: [p.upper() for p in ps], batch_size=2, progress=False) == [
        "AA",
        "B",
        "CCC",
    ]
    assert length_sorted_batches([1, 5, 3, 5], 2) == [[1, 3], [2, 0]]


# ---------------------------------------------------------------- results and reports


def _preds(task, length, flags):
    return [
        {"task": task, "length": length, "index": i, "target": "x", "output": "x", "question": "q", "correct": f}
        for i, f in enumerate(flags)
    ]


def test_results_table_mean_row_and_heatmap(tmp_path):
    preds = []
    for k, t in enumerate(bl.DEFAULT_TASKS):
        preds += _preds(t, "0k", [True] * (k + 1) + [False] * (4 - k))  # 20, 40, 60, 80, 100 %
        preds += _preds(t, "2k", [False] * 5)
    preds += _preds("qa7", "0k", [True, True, False, False])
    tasks = list(bl.DEFAULT_TASKS) + ["qa7"]
    res = bl.build_results(preds, tasks, ["0k", "2k"], {"checkpoint": "x"}, "BABILong")
    assert res["accuracy"]["qa3"]["0k"] == pytest.approx(60.0)
    assert res["accuracy"]["qa7"] == {"0k": 50.0, "2k": None}
    assert res["mean_qa1_qa5"] == {"0k": pytest.approx(60.0), "2k": 0.0}  # qa7 not in the headline
    assert res["mean_qa1_qa5_tasks"] == list(bl.DEFAULT_TASKS)
    md = bl.results_markdown(res)
    assert "| qa3 | 60.0 | 0.0 |" in md and "| mean qa1-qa5 | 60.0 | 0.0 |" in md and "| qa7 | 50.0 | - |" in md
    bl.write_report(tmp_path, preds, res)
    assert (tmp_path / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "results.json").read_text())["accuracy"]["qa1"]["0k"] == 20.0
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == len(preds)


def test_heatmap_scale_labels_and_axes():
    fig = heatmap_figure({"qa1": {"0k": 99.6, "1k": 12.4}, "qa2": {"0k": None, "1k": 50}}, ["qa1", "qa2"], ["0k", "1k"])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "Context size" and ax.get_ylabel() == "Tasks"
    im = ax.images[0]
    assert im.get_cmap().name == "RdYlGn" and im.get_clim() == (0, 100)
    assert sorted(t.get_text() for t in ax.texts) == ["100", "12", "50"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0k", "1k"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["qa1", "qa2"]


# ---------------------------------------------------------------- offline generator

_PEOPLE = r"(Daniel|John|Mary|Sandra|Bill|Fred|Jeff)"
_MOVE = re.compile(_PEOPLE + r" (?:moved to|went to|journeyed to|travelled to|went back to) the (\w+)\.")
_TAKE = re.compile(_PEOPLE + r" (?:picked up|got|grabbed|took) the (apple|football|milk) there\.")
_DROP = re.compile(_PEOPLE + r" (?:dropped|discarded|put down|left) the (apple|football|milk)(?: there)?\.")
_GIVE = re.compile(_PEOPLE + r" (?:gave|handed|passed) the (apple|football|milk) to " + _PEOPLE + r"\.")
_REL = re.compile(r"The (\w+) is (north|south|east|west) of the (\w+)\.")
_OPP = {"north": "south", "south": "north", "east": "west", "west": "east"}


def solve(context: str, question: str) -> str:
    """An independent bAbI solver over the facts found in a context."""
    events = []
    for kind, rx in (("move", _MOVE), ("take", _TAKE), ("drop", _DROP), ("give", _GIVE)):
        events += [(m.start(), kind, m.groups()) for m in rx.finditer(context)]
    events.sort()
    loc, holder, obj_loc, hist, gives = {}, {}, {}, {}, []

    def place(o, room):
        obj_loc[o] = room
        if not hist.get(o) or hist[o][-1] != room:
            hist.setdefault(o, []).append(room)

    for _, kind, g in events:
        if kind == "move":
            loc[g[0]] = g[1]
            for o, h in holder.items():
                if h == g[0]:
                    place(o, g[1])
        elif kind == "take":
            holder[g[1]] = g[0]
            place(g[1], loc[g[0]])
        elif kind == "drop":
            holder[g[1]] = None
        else:
            holder[g[1]] = g[2]
            gives.append(g)
    if m := re.fullmatch(r"Where is " + _PEOPLE + r"\?", question):
        return loc[m.group(1)]
    if m := re.fullmatch(r"Where is the (\w+)\?", question):
        return obj_loc[m.group(1)]
    if m := re.fullmatch(r"Where was the (\w+) before the (\w+)\?", question):
        h = hist[m.group(1)]
        return h[len(h) - 1 - h[::-1].index(m.group(2)) - 1]
    rels = _REL.findall(context)
    if m := re.fullmatch(r"What is (\w+) of the (\w+)\?", question):
        return next(a for a, d, c in rels if d == m.group(1) and c == m.group(2))
    if m := re.fullmatch(r"What is the (\w+) (\w+) of\?", question):
        return next(a for a, d, c in rels if d == _OPP[m.group(2)] and c == m.group(1))
    forms = [
        (r"Who gave the (\w+) to (\w+)\?", lambda g, m: g[1] == m[1] and g[2] == m[2], 0),
        (r"Who did (\w+) give the (\w+) to\?", lambda g, m: g[0] == m[1] and g[1] == m[2], 2),
        (r"What did (\w+) give to (\w+)\?", lambda g, m: g[0] == m[1] and g[2] == m[2], 1),
        (r"Who received the (\w+)\?", lambda g, m: g[1] == m[1], 2),
        (r"Who gave the (\w+)\?", lambda g, m: g[1] == m[1], 0),
    ]
    for rx, match, slot in forms:
        if m := re.fullmatch(rx, question):
            return [g for g in gives if match(g, m)][-1][slot]
    raise AssertionError(f"unknown question {question!r}")


def test_generated_answers_follow_from_the_facts_and_are_labels():
    gen = bd.BabilongGenerator(seed=11)
    for task in bd.GENERATED_TASKS:
        for i in range(40):
            s = gen.sample(task, "0k", i)
            assert s["target"] in LABELS[task]
            assert solve(s["input"], s["question"]) == s["target"], (task, s)
            # the target itself is never named in the question (the scorer would drop it)
            assert s["target"].lower() not in s["question"].lower()
            assert bl.compare_answers(s["target"], s["target"], s["question"], LABELS[task])


def test_generated_context_hides_the_facts_in_order_within_the_budget(tmp_path):
    counter = bd.gpt2_counter()
    gen = bd.BabilongGenerator(seed=5, counter=counter)
    for task in ("qa2", "qa5"):
        facts0 = gen.sample(task, "0k", 7)
        for length in ("1k", "4k"):
            s = gen.sample(task, length, 7)
            assert (s["question"], s["target"]) == (facts0["question"], facts0["target"])  # same story at every length
            at = -1
            for fact in bd.split_sentences(facts0["input"]):  # facts keep their order
                at = s["input"].index(fact, at + 1)
            assert solve(s["input"], s["question"]) == s["target"]
            n = counter(s["input"])
            budget = bd.token_budget(length)
            assert 0.9 * budget <= n <= budget + 5, (length, n)
    assert bd.token_budget("0k") == 0 and bd.token_budget("8k") == 7700 and bd.token_budget("128k") == 127700
    assert gen.sample("qa1", "2k", 0) == bd.BabilongGenerator(seed=5, counter=counter).sample("qa1", "2k", 0)
    assert gen.sample("qa1", "2k", 0) != bd.BabilongGenerator(seed=6, counter=counter).sample("qa1", "2k", 0)
    with pytest.raises(bd.DataError):
        gen.sample("qa7", "0k", 0)


def test_generated_background_comes_from_the_corpus(tmp_path):
    book = " ".join(f"Chapter line number {i} was long and dull." for i in range(400))
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.txt").write_text(book)
    gen = bd.BabilongGenerator(seed=1, corpus_dir=str(tmp_path / "books"))
    s = gen.sample("qa1", "1k", 0)
    nums = [int(x) for x in re.findall(r"Chapter line number (\d+)", s["input"])]
    assert len(nums) > 20
    assert all((b - a) % 400 == 1 for a, b in zip(nums, nums[1:]))  # consecutive sentences from a random start
    assert "Chapter line number" not in gen.sample("qa1", "0k", 0)["input"]
    assert gen.source()["background"].startswith("corpus")


# ---------------------------------------------------------------- official data: local and hub


def _snapshot(root: Path, n=4):
    for t in ("qa1", "qa2"):
        for l in ("0k", "1k"):
            recs = [
                {"input": f"ctx {t} {l} {i}. Mary went to the kitchen.", "question": "Where is Mary?", "target": "kitchen"}
                for i in range(n)
            ]
            f = root / "data" / t / f"{l}.json"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(recs))
    return root


def test_local_snapshot_loading(tmp_path):
    root = _snapshot(tmp_path / "snapshots" / ("a" * 40))
    recs, src = bd.load_local(root, "qa2", "1k", samples=2)
    assert [r["input"] for r in recs] == ["ctx qa2 1k 0. Mary went to the kitchen.", "ctx qa2 1k 1. Mary went to the kitchen."]
    assert src["files"] == ["data/qa2/1k.json"] and src["revision"] == "a" * 40 and len(src["sha256"]) == 16
    with pytest.raises(bd.DataError, match="qa3"):
        bd.load_local(root, "qa3", "0k")
    bad = tmp_path / "bad"
    (bad / "data" / "qa1").mkdir(parents=True)
    (bad / "data" / "qa1" / "0k.json").write_text(json.dumps([{"input": "x"}]))
    with pytest.raises(bd.DataError, match="record 0"):
        bd.load_local(bad, "qa1", "0k")


def test_hub_path_downloads_only_the_needed_files(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    root = _snapshot(tmp_path / "snapshots" / ("b" * 40))
    seen = {}

    def fake_snapshot_download(repo_id, **kw):
        seen.update(kw, repo_id=repo_id)
        return str(root)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = tmp_path / "out"
    rc = bl.main(["--prompts-only", "--tasks", "qa1,qa2", "--lengths", "0k,1k", "--samples", "3", "--out", str(out)])
    assert rc == 0
    assert seen["repo_id"] == "RMT-team/babilong" and seen["repo_type"] == "dataset"
    assert "data/qa1/0k.json" in seen["allow_patterns"] and not any("qa3" in p for p in seen["allow_patterns"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data_source"]["kind"] == "hub" and manifest["data_source"]["revision"] == "b" * 40
    assert manifest["benchmark"] == "BABILong"
    assert len((out / "prompts.jsonl").read_text().splitlines()) == 12

    def offline(repo_id, **kw):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert bl.main(["--prompts-only", "--out", str(tmp_path / "o2")]) == 2
    assert "--data generate" in capsys.readouterr().err


# ---------------------------------------------------------------- CLI


def test_cli_prompts_only_generated(tmp_path):
    out = tmp_path / "p"
    rc = bl.main(
        ["--prompts-only", "--data", "generate", "--samples", "2", "--lengths", "0k,1k", "--prompt-parts", "instruction,post_prompt", "--out", str(out)]
    )
    assert rc == 0
    rows = [json.loads(l) for l in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(rows) == 5 * 2 * 2
    assert {(r["task"], r["length"]) for r in rows} == {(t, l) for t in bl.DEFAULT_TASKS for l in ("0k", "1k")}
    for r in rows:
        assert set(r) >= {"task", "length", "index", "prompt"}
        assert r["prompt"].startswith(P[r["task"]]["instruction"]) and "<example>" not in r["prompt"]
        assert r["prompt"].endswith("Question: " + r["question"])
    m = json.loads((out / "manifest.json").read_text())
    assert set(MANIFEST_KEYS) <= set(m)
    assert m["benchmark"] == "BABILong-format (regenerated)" and m["data_source"]["label"] == "BABILong-format (regenerated)"
    assert m["prompt_parts"] == ["instruction", "post_prompt"] and m["prefill_attention"] == "causal"


def test_cli_prompts_only_local_and_errors(tmp_path, capsys):
    root = _snapshot(tmp_path / "snap")
    out = tmp_path / "p"
    assert bl.main(["--prompts-only", "--data", str(root), "--tasks", "qa1", "--lengths", "1k", "--prompt-parts", "", "--out", str(out)]) == 0
    rows = [json.loads(l) for l in (out / "prompts.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows][0] == "<context>\nctx qa1 1k 0. Mary went to the kitchen.\n</context>\n\nQuestion: Where is Mary?"
    assert len(rows) == 4
    assert bl.main(["--data", "generate", "--out", str(out)]) == 2  # neither --checkpoint nor --prompts-only
    assert bl.main(["--prompts-only", "--tasks", "qa99", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "qa99" in err


@pytest.mark.parametrize("tool", ["babilong", "ruler"])
@pytest.mark.parametrize("samples", ["0", "-3", "many"])
def test_cli_samples_below_one_is_a_usage_error(tool, samples, capsys):
    from focusft_jax.evaluation import ruler

    parser = {"babilong": bl, "ruler": ruler}[tool].build_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--out", "x", "--samples", samples])
    assert e.value.code == 2
    assert "argument --samples:" in capsys.readouterr().err
    assert parser.parse_args(["--out", "x", "--samples", "1"]).samples == 1


def _write_official_csv(path: Path, rows):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "target", "output", "question"])  # pandas to_csv with its index column
        for i, (target, output, question) in enumerate(rows):
            w.writerow([i, target, output, question])


def test_cli_score_official_prediction_files(tmp_path, capsys):
    d = tmp_path / "results" / "some-model"
    d.mkdir(parents=True)
    name = "instruction_yes_examples_yes_post_prompt_yes_chat_template_yes"
    q1 = "Where is Mary?"
    _write_official_csv(
        d / f"qa1_0k_{name}.csv",
        [("kitchen", "The most recent location of Mary is kitchen.", q1), ("garden", "garden, then kitchen", q1), ("office", "", q1), ("hallway", "Hallway.\nMore text", q1)],
    )
    _write_official_csv(d / f"qa1_32k_{name}.csv", [("kitchen", "kitchen", q1), ("garden", "kitchen", q1)])
    q8 = "What is Daniel carrying?"
    _write_official_csv(d / f"qa8_0k_{name}.csv", [("apple,milk", "milk, apple", q8), ("milk", "apple", q8)])
    out = tmp_path / "scored"
    assert bl.main(["--score", str(d), "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["tasks"] == ["qa1", "qa8"] and res["lengths"] == ["0k", "32k"]
    assert res["accuracy"] == {"qa1": {"0k": 50.0, "32k": 50.0}, "qa8": {"0k": 50.0, "32k": None}}
    assert res["mean_qa1_qa5"] == {"0k": 50.0, "32k": 50.0} and res["mean_qa1_qa5_tasks"] == ["qa1"]
    assert res["manifest"]["chat_template"] is True and res["manifest"]["prompt_parts"] == list(bl.PROMPT_PARTS)
    preds = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["correct"] for p in preds if p["task"] == "qa1" and p["length"] == "0k"] == [True, False, False, True]
    assert (out / "heatmap.png").exists() and "| qa1 | 50.0 | 50.0 |" in (out / "results.md").read_text()
    assert "| qa8 | 50.0 | - |" in capsys.readouterr().out
    # two prompt names: the user has to pick one
    _write_official_csv(d / "qa1_0k_instruction_no_examples_no_post_prompt_no_chat_template_no.csv", [("kitchen", "x", q1)])
    assert bl.main(["--score", str(d), "--out", str(out)]) == 2
    capsys.readouterr()
    assert bl.main(["--score", str(d), "--prompt-name", name, "--tasks", "qa1", "--out", str(tmp_path / "s2")]) == 0
    res2 = json.loads((tmp_path / "s2" / "results.json").read_text())
    assert res2["tasks"] == ["qa1"]
    other = "qa1_0k_instruction_no_examples_no_post_prompt_no_chat_template_no.csv"
    assert [e["file"] for e in res2["not_understood"]] == [other] and "not the one scored" in res2["not_understood"][0]["reason"]
    assert res2["excluded"] == [{"file": f"qa8_0k_{name}.csv", "reason": "task qa8 not asked for (--tasks)"}]
    err = capsys.readouterr().err
    assert f"not understood: {other}: prompt name" in err and "excluded by --tasks/--lengths: 1 files" in err


OFFICIAL_LENGTHS = ["0k", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k", "256k", "512k", "1M", "10M"]


@pytest.mark.parametrize(
    "length, thousands, budget",
    [("0k", 0, 0), ("1k", 1, 700), ("128k", 128, 127_700), ("512k", 512, 511_700), ("1M", 1000, 999_700), ("2M", 2000, 1_999_700), ("10M", 10_000, 9_999_700)],
)
def test_length_value_and_token_budget_of_k_and_M_lengths(length, thousands, budget):
    # 1M is 1_000_000 tokens less 300 for the prompt (booydar/babilong data/create_tasks.py)
    assert bd.length_value(length) == thousands and bd.token_budget(length) == budget


@pytest.mark.parametrize("bad", ["1G", "1.5k", "k", "M", "1K", "1m", "", "8k\n", " 8k", "-1k", "1kM", "\u0661k", "1e3k"])
def test_length_value_rejects_other_forms(bad):
    with pytest.raises(bd.DataError, match="<N>k' or '<N>M"):
        bd.length_value(bad)


def test_lengths_sort_by_size_and_the_cli_checks_their_form(tmp_path, capsys):
    shuffled = ["10M", "1M", "512k", "0k", "128k", "2k", "256k", "1k", "64k", "16k", "4k", "32k", "8k"]
    assert sorted(shuffled, key=bl._length_key) == OFFICIAL_LENGTHS
    assert sorted(["1M", "2M", "999k", "1001k"], key=bl._length_key) == ["999k", "1M", "1001k", "2M"]
    assert bl.main(["--prompts-only", "--data", "generate", "--lengths", "1k,1G", "--out", str(tmp_path)]) == 2
    assert "'1G' is not of the form '<N>k' or '<N>M'" in capsys.readouterr().err


def test_cli_score_every_official_length_and_lists_what_it_does_not_understand(tmp_path, capsys):
    d = tmp_path / "model"
    d.mkdir()
    name = "instruction_yes_examples_yes_post_prompt_yes_chat_template_no"
    q = "Where is Mary?"
    for i, length in enumerate(OFFICIAL_LENGTHS):
        right = i % 5  # 0..4 of 4 rows right: each length has its own accuracy
        rows = [("kitchen", "kitchen" if k < right else "garden", q) for k in range(4)]
        _write_official_csv(d / f"qa1_{length}_{name}.csv", rows)
    _write_official_csv(d / f"qa2_1M_{name}.csv", [("garden", "The apple is in the garden.", "Where is the apple?")])
    bad = {
        "README.md": bl.NOT_A_PREDICTION_FILE,
        "results.json": bl.NOT_A_PREDICTION_FILE,
        f"qa1_1k_{name}.CSV": bl.NOT_A_PREDICTION_FILE,
        "qa1_1k.csv": bl.NOT_A_PREDICTION_FILE,
        "plots": "a directory, not a prediction file",
        f"qa1_1G_{name}.csv": "length '1G' is not of the form",
        f"qa1_1.5k_{name}.csv": "length '1.5k' is not of the form",
        f"qa99_1k_{name}.csv": "unknown task 'qa99'",
        f"summary_1k_{name}.csv": "unknown task 'summary'",
        f"qa3_1M_{name}.csv": "missing columns ['question']",
        f"qa4_10M_{name}.csv": "no prediction rows",
        f"qa5_4k_{name}.csv": "row 2 has fewer fields than the header",
        f"qa5_8k_{name}.csv": "not readable as a UTF-8 CSV file",
    }
    (d / "README.md").write_text("predictions of some model\n")
    (d / "results.json").write_text("{}")
    (d / "plots").mkdir()
    for f in (f"qa1_1k_{name}.CSV", "qa1_1k.csv", f"qa1_1G_{name}.csv", f"qa1_1.5k_{name}.csv", f"qa99_1k_{name}.csv", f"summary_1k_{name}.csv"):
        _write_official_csv(d / f, [("kitchen", "kitchen", q)])
    (d / f"qa3_1M_{name}.csv").write_text("target,output\nkitchen,kitchen\n")
    (d / f"qa4_10M_{name}.csv").write_text(",target,output,question\n")
    (d / f"qa5_4k_{name}.csv").write_text(",target,output,question\n0,Fred,Fred,Who?\n1,Fred\n")
    (d / f"qa5_8k_{name}.csv").write_bytes(b",target,output,question\n0,Fred,\xff\xfe,Who?\n")
    out = tmp_path / "scored"
    assert bl.main(["--score", str(d), "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["tasks"] == ["qa1", "qa2"] and res["lengths"] == OFFICIAL_LENGTHS
    assert res["accuracy"]["qa1"] == {l: 25.0 * (i % 5) for i, l in enumerate(OFFICIAL_LENGTHS)}
    assert res["accuracy"]["qa2"] == {l: (100.0 if l == "1M" else None) for l in OFFICIAL_LENGTHS}
    assert res["samples"]["qa1"]["10M"] == 4 and res["manifest"]["lengths"] == OFFICIAL_LENGTHS
    md = (out / "results.md").read_text()
    assert "| task | " + " | ".join(OFFICIAL_LENGTHS) + " |" in md
    assert (out / "heatmap.png").exists()
    got = {e["file"]: e["reason"] for e in res["not_understood"]}
    assert set(got) == set(bad) and res["excluded"] == []
    err = capsys.readouterr().err
    for f, why in bad.items():
        assert got[f].startswith(why), (f, got[f])
        assert f"not understood: {f}: {got[f]}" in err
        assert f"`{f}`: {got[f]}" in md
    # only files of the folder are scored: none of the bad ones adds a row
    preds = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4 * len(OFFICIAL_LENGTHS) + 1
    # --lengths takes M lengths; what it leaves out is listed as excluded, not as not understood
    assert bl.main(["--score", str(d), "--lengths", "512k,1M,10M", "--tasks", "qa1", "--out", str(tmp_path / "s2")]) == 0
    res2 = json.loads((tmp_path / "s2" / "results.json").read_text())
    assert res2["lengths"] == ["512k", "1M", "10M"] and res2["tasks"] == ["qa1"]
    assert {e["file"] for e in res2["not_understood"]} == set(bad) - {f"qa3_1M_{name}.csv", f"qa4_10M_{name}.csv", f"qa5_4k_{name}.csv", f"qa5_8k_{name}.csv"}
    assert len(res2["excluded"]) == len(OFFICIAL_LENGTHS) - 3 + 5  # other qa1 lengths; qa2..qa5 by task


def test_cli_score_a_folder_without_prediction_files_says_what_is_there(tmp_path, capsys):
    d = tmp_path / "org"
    (d / "some-model").mkdir(parents=True)
    (d / "notes.txt").write_text("x")
    assert bl.main(["--score", str(d), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no <task>_<length>_<prompt name>.csv prediction files" in err
    assert "some-model: a directory, not a prediction file" in err and "notes.txt: not a <task>" in err


def _tiny_chat_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    texts = [json.dumps(bl.BENCH)] + list(bd.filler_sentences(0, 500))
    tk.train_from_iterator(
        texts,
        trainers.BpeTrainer(vocab_size=800, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = "<s>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    tok.save_pretrained(path)
    (path / "config.json").write_text(json.dumps({"max_position_embeddings": 1500}))
    return path


def test_cli_model_path_with_a_generate_fn(tmp_path, monkeypatch):
    """The --checkpoint path end to end, with generation replaced by an
    oracle that solves the bAbI question from the prompt it is sent."""
    ckpt = _tiny_chat_tokenizer(tmp_path / "ckpt")
    made = {}

    def fake_make_generate_fn(
        checkpoint, batch_size, prefill_attention, max_new_tokens, *, add_special_tokens=True, attention_impl="auto"
    ):
        made.update(checkpoint=checkpoint, batch_size=batch_size, prefill=prefill_attention, n=max_new_tokens, add=add_special_tokens)

        def generate_fn(prompts):
            outs = []
            for p in prompts:
                assert p.startswith("<s><|user|>\n") and p.endswith("</s>\n<|assistant|>\n")
                ctx = p.split("<context>\n")[-1].split("\n</context>")[0]
                q = p.split("Question: ")[-1].split("</s>")[0]
                outs.append(f"The answer is {solve(ctx, q)}. Then more text about the garden.")
            return outs

        return generate_fn

    monkeypatch.setattr(bl, "make_generate_fn", fake_make_generate_fn)
    out = tmp_path / "out"
    argv = ["--checkpoint", str(ckpt), "--data", "generate", "--samples", "3", "--lengths", "0k,1k,2k", "--batch-size", "2", "--no-progress", "--out", str(out)]
    assert bl.main(argv) == 0
    assert made == {"checkpoint": str(ckpt), "batch_size": 2, "prefill": "causal", "n": 20, "add": False}
    res = json.loads((out / "results.json").read_text())
    assert res["accuracy"]["qa3"]["0k"] == 100.0 and res["mean_qa1_qa5"]["1k"] == 100.0
    assert res["mean_qa1_qa5"]["2k"] is None and res["refused"]["qa1"]["2k"] == 3  # 2k does not fit 1500 tokens
    m = res["manifest"]
    assert m["chat_template"] is True and m["max_context"] == 1500 and m["decoding"]["max_new_tokens"] == 20
    assert m["prompt_name"] == "instruction_yes_examples_yes_post_prompt_yes_chat_template_yes"
    assert (out / "heatmap.png").exists()
    preds = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(p["prompt"].startswith(P[p["task"]]["instruction"]) for p in preds)  # stored before the chat template
