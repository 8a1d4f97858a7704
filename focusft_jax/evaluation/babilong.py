"""BABILong evaluation, as the official code (booydar/babilong) does it.

    python -m eval.babilong --checkpoint DIR --out OUT [--tasks qa1,...] [--lengths 0k,...]
    python -m eval.babilong --prompts-only --out OUT ...      # prompts, no model
    python -m eval.babilong --score RESULTS_DIR --out OUT     # re-score official prediction CSVs

Lengths are the official split names, <N>k or <N>M (0k..512k, 1M, 10M).
--score lists each file of RESULTS_DIR it does not score, with the reason
(stderr, results.json `not_understood` / `excluded`).

Prompt: the official `default_template` filled with the task's instruction,
examples and post_prompt (each may be switched off with --prompt-parts: it
becomes the empty string), the context stripped and the question as given;
the whole string stripped. With a chat template it is sent as one user
message with the generation prompt; without, as plain text with the
tokenizer's special tokens. Greedy, 20 new tokens, special tokens skipped,
answer stripped. Scoring is `compare_answers` (see its docstring), accuracy
= 100 * correct / samples, and the headline is the mean over qa1..qa5.
The prompt forward uses blockwise (memory-efficient) attention for long
prompts (--attention-impl, default auto: see `eval.runner.prefill_attention_impl`).
Options left unset (--prefill-attention, --prompt-parts, --lengths) are
chosen for the model evaluated, from its focusft.json and its context
(`eval.trained_defaults`), and printed.

Phase-2 hook: `evaluate(samples, generate_fn, ...)` runs any
`generate_fn(prompts: list[str]) -> list[str]` (prompts already chat-formatted).
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

from focusft_jax.evaluation import babilong_data as data
from focusft_jax.evaluation.cli import add_model_options, add_run_options, parse_list, positive_int, prog_name, run_cli
from focusft_jax.evaluation.errors import EvalError
from focusft_jax.evaluation.heatmap import write_heatmap
from focusft_jax.evaluation.jsonio import write_json, write_jsonl
from focusft_jax.evaluation.manifest import load_benchmark, make_manifest
from focusft_jax.evaluation.model_dir import model_max_context
from focusft_jax.evaluation.runner import GenerateFn, attention_impl_record, make_generate_fn, run_generation
from focusft_jax.evaluation.tables import manifest_markdown, markdown_table, write_results
from focusft_jax.evaluation.tokenizing import chat_wrap, count_tokens, load_tokenizer, tokenizer_name, use_chat_template
from focusft_jax.evaluation.trained_defaults import Defaults

BENCH = load_benchmark("babilong")
TASKS = tuple(BENCH["prompts"])  # qa1..qa20
PROMPT_PARTS = ("instruction", "examples", "post_prompt")
DEFAULT_TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")
HEADLINE_TASKS = DEFAULT_TASKS
DEFAULT_LENGTHS = ("0k", "1k", "2k", "4k", "8k", "16k", "32k")
MAX_NEW_TOKENS = 20
DECODING = {
    "strategy": "greedy",
    "max_new_tokens": MAX_NEW_TOKENS,
    "skip_special_tokens": True,
    "answer": "stripped",
}


# ---------------------------------------------------------------- prompts


def prompt_config(task: str, parts: Sequence[str] = PROMPT_PARTS) -> dict:
    """{instruction, examples, post_prompt} of `task`; parts not listed are ""."""
    if task not in BENCH["prompts"]:
        raise EvalError(f"unknown BABILong task {task!r}; tasks are qa1..qa20")
    bad = [p for p in parts if p not in PROMPT_PARTS]
    if bad:
        raise EvalError(f"unknown prompt parts {bad}; choose from {PROMPT_PARTS}")
    return {p: (BENCH["prompts"][task][p] if p in parts else "") for p in PROMPT_PARTS}


def format_prompt(task: str, context: str, question: str, parts: Sequence[str] = PROMPT_PARTS) -> str:
    """The official formatted input (before any chat template)."""
    cfg = prompt_config(task, parts)
    text = BENCH["default_template"].format(
        instruction=cfg["instruction"],
        examples=cfg["examples"],
        post_prompt=cfg["post_prompt"],
        context=context.strip(),
        question=question,
    )
    return text.strip()


def prompt_name(parts: Sequence[str], chat_template: bool) -> str:
    """The official results-file prompt name, e.g.
    instruction_yes_examples_yes_post_prompt_yes_chat_template_yes."""
    flags = [f"{p}_{'yes' if p in parts else 'no'}" for p in PROMPT_PARTS]
    flags.append(f"chat_template_{'yes' if chat_template else 'no'}")
    return "_".join(flags)


def parse_prompt_name(name: str) -> tuple[list[str] | None, bool | None]:
    """(prompt parts, chat template) from an official prompt name; None where absent."""
    parts = []
    known = True
    for p in PROMPT_PARTS:
        m = re.search(rf"(?:^|_){p}_(yes|no)(?:_|$)", name)
        if m is None:
            known = False
        elif m.group(1) == "yes":
            parts.append(p)
    m = re.search(r"chat_template_(yes|no)", name)
    return (parts if known else None), (None if m is None else m.group(1) == "yes")


# ---------------------------------------------------------------- scoring


def task_labels(task: str) -> list[str]:
    return list(BENCH["task_labels"][task])


def preprocess_output(output: str) -> str:
    """Lower-case; keep the text before the first '.'; cut at '<context>',
    at '<example>' and at 'Question'. The last cut runs after lower-casing,
    so it never fires: kept, as in the official code."""
    output = output.lower()
    output = output.split(".")[0]
    output = output.split("<context>")[0]
    output = output.split("<example>")[0]
    output = output.split("Question")[0]
    return output


def compare_answers(target: str, output: str, question: str, labels: Sequence[str]) -> bool:
    """The official BABILong rule.

    labels (lower-cased) that occur as substrings in the lower-cased question
    are never counted; found = the other labels occurring as substrings in
    the preprocessed output. A target with a comma and longer than 3
    characters (qa8's "apple,milk") is correct when every comma-separated
    part is found and nothing else is; any other target when found is
    exactly {target}.
    """
    output = preprocess_output(output)
    target = target.lower()
    labels_l = {label.lower() for label in labels}
    in_question = {label for label in labels_l if label in question.lower()}
    found = {label for label in labels_l if label in output} - in_question
    if "," in target and len(target) > 3:
        parts = target.split(",")
        return all(p in found for p in parts) and len(found) == len(parts)
    return target in found and len(found) == 1


def score_prediction(task: str, target: str, output: str, question: str) -> bool:
    return compare_answers(target, output, question, task_labels(task))


# ---------------------------------------------------------------- the runner


def evaluate(
    samples: Mapping[tuple[str, str], Sequence[Mapping]],
    generate_fn: GenerateFn,
    *,
    parts: Sequence[str] = PROMPT_PARTS,
    wrap: Callable[[str], str] | None = None,
    token_count: Callable[[str], int] | None = None,
    max_context: int | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 1,
    progress: bool = True,
) -> list[dict]:
    """Generates and scores every sample.

    samples: {(task, length): [records with input, question, target]}.
    generate_fn: prompts (already wrapped) -> continuations.
    wrap: the chat template (prompt -> model input string); None: plain.
    token_count: model-input string -> tokens; used to sort batches and, with
        max_context, to refuse samples whose prompt + max_new_tokens does not
        fit (they are not generated: output None, correct None, `refused`
        says why; their cell gets no accuracy).
    Returns prediction rows: task, length, index, prompt (before the chat
    template), question, target, output, correct (+ prompt_tokens).
    """
    rows: list[dict] = []
    model_inputs: list[str] = []
    for (task, length), records in samples.items():
        for i, r in enumerate(records):
            prompt = format_prompt(task, r["input"], r["question"], parts)
            rows.append(
                {
                    "task": task,
                    "length": length,
                    "index": i,
                    "prompt": prompt,
                    "question": r["question"],
                    "target": r["target"],
                }
            )
            model_inputs.append(wrap(prompt) if wrap else prompt)
    lengths = [token_count(m) for m in model_inputs] if token_count else [len(m) for m in model_inputs]
    todo = []
    for k, row in enumerate(rows):
        if token_count:
            row["prompt_tokens"] = lengths[k]
        if max_context is not None and token_count and lengths[k] + max_new_tokens > max_context:
            row["refused"] = f"prompt {lengths[k]} tokens + {max_new_tokens} new > model context {max_context}"
            row["output"] = None
            row["correct"] = None
        else:
            todo.append(k)
    outputs = run_generation(
        [model_inputs[k] for k in todo],
        generate_fn,
        batch_size=batch_size,
        lengths=[lengths[k] for k in todo],
        desc="BABILong",
        progress=progress,
    )
    for k, out in zip(todo, outputs):
        row = rows[k]
        row["output"] = out.strip()
        row["correct"] = score_prediction(row["task"], row["target"], row["output"], row["question"])
    return rows


# ---------------------------------------------------------------- results


def _length_key(length: str) -> tuple:
    """Sort key of a length: by size (512k < 1M < 10M), unknown forms last."""
    try:
        return (data.length_value(length), length)
    except data.DataError:
        return (10**9, length)


def _task_key(task: str) -> tuple:
    m = re.fullmatch(r"qa(\d+)", task)
    return (int(m.group(1)) if m else 10**9, task)


def accuracy_table(predictions: Sequence[Mapping], tasks: Sequence[str], lengths: Sequence[str]):
    """({task: {length: percent | None}}, {task: {length: samples}},
    {task: {length: refused}}). A cell with a refused sample has no accuracy."""
    acc: dict = {t: {} for t in tasks}
    counts: dict = {t: {} for t in tasks}
    refused: dict = {}
    for t in tasks:
        for l in lengths:
            cell = [p for p in predictions if p["task"] == t and p["length"] == l]
            counts[t][l] = len(cell)
            n_ref = sum(1 for p in cell if p.get("correct") is None)
            if n_ref:
                refused.setdefault(t, {})[l] = n_ref
            if not cell or n_ref:
                acc[t][l] = None
            else:
                acc[t][l] = 100.0 * sum(1 for p in cell if p["correct"]) / len(cell)
    return acc, counts, refused


def headline_mean(acc: Mapping, lengths: Sequence[str]) -> tuple[dict, list[str]]:
    """Mean accuracy over qa1..qa5 per length (over those evaluated; a length
    with a missing cell among them gets None), and the tasks it covers."""
    covered = [t for t in HEADLINE_TASKS if t in acc]
    mean = {}
    for l in lengths:
        vals = [acc[t].get(l) for t in covered]
        mean[l] = None if (not vals or any(v is None for v in vals)) else sum(vals) / len(vals)
    return mean, covered


def build_results(predictions: Sequence[Mapping], tasks, lengths, manifest: Mapping, label: str) -> dict:
    acc, counts, refused = accuracy_table(predictions, tasks, lengths)
    mean, covered = headline_mean(acc, lengths)
    res = {
        "benchmark": label,
        "tasks": list(tasks),
        "lengths": list(lengths),
        "accuracy": acc,
        "mean_qa1_qa5": mean,
        "mean_qa1_qa5_tasks": covered,
        "samples": counts,
        "manifest": dict(manifest),
    }
    if refused:
        res["refused"] = refused
    return res


def results_markdown(results: Mapping) -> str:
    tasks, lengths = results["tasks"], results["lengths"]
    rows = [(t, results["accuracy"][t]) for t in tasks]
    covered = results["mean_qa1_qa5_tasks"]
    if covered:
        name = "mean qa1-qa5" if len(covered) == len(HEADLINE_TASKS) else f"mean {'/'.join(covered)} ({len(covered)} of qa1-qa5)"
        rows.append((name, results["mean_qa1_qa5"]))
    src = results["manifest"].get("data_source") or {}
    lines = [
        f"# {results['benchmark']}: accuracy (%)",
        "",
        markdown_table(rows, lengths),
        "",
        f"Data: {src.get('label') or src.get('kind', '?')}"
        + (f", {src['path']}" if src.get("path") else "")
        + (f", revision {src['revision']}" if src.get("revision") else ""),
    ]
    if results.get("refused"):
        lines += ["", f"Refused (prompt + generation does not fit the model): {results['refused']}"]
    for key, heading in (("not_understood", "Files not understood (not scored)"), ("excluded", "Files excluded by --tasks/--lengths")):
        if results.get(key):
            lines += ["", f"## {heading}", ""] + [f"- `{e['file']}`: {e['reason']}" for e in results[key]]
    lines += ["", "## Settings", "", manifest_markdown(results["manifest"])]
    return "\n".join(lines)


def write_report(out: str | Path, predictions: Sequence[Mapping], results: Mapping) -> None:
    out = Path(out)
    write_jsonl(out / "predictions.jsonl", predictions)
    write_results(out, results, results_markdown(results))
    write_heatmap(
        out / "heatmap.png",
        results["accuracy"],
        results["tasks"],
        results["lengths"],
        title=results["benchmark"],
    )


def print_table(results: Mapping, file=None) -> None:
    file = file or sys.stdout
    print(results_markdown(results).split("\n\nData:")[0], file=file)


# ---------------------------------------------------------------- official prediction files

# <task>_<length>_<prompt name>.csv: the task and the length are the first two
# '_'-separated fields of the name, the prompt name is the rest (as the official
# collect_results.py splits it); each field is checked on its own so that a file
# that is not scored can say which part was not understood.
_CSV_NAME = re.compile(r"([^_]+)_([^_]+)_(.+)\.csv")
NOT_A_PREDICTION_FILE = "not a <task>_<length>_<prompt name>.csv prediction file"
_CSV_COLUMNS = ("target", "output", "question")


class OfficialPredictions(NamedTuple):
    """What `read_official_predictions` made of a results folder.

    rows: scored prediction rows (task, length, index, question, target,
        output, correct), by task then length.
    prompt: the prompt name scored.
    not_understood: [{"file": name, "reason": ...}] for every entry of the
        folder that was not scored for another reason than the tasks/lengths
        asked for (not a prediction file, unknown task, bad length, another
        prompt name, unreadable, missing columns, no rows), by name.
    excluded: [{"file": name, "reason": ...}] for prediction files of the
        prompt scored whose task or length was not asked for.
    """

    rows: list
    prompt: str
    not_understood: list
    excluded: list


def _name_fields(f: Path) -> tuple[str, str, str] | str:
    """(task, length, prompt name) of a prediction file, else why it is not one."""
    if f.is_dir():
        return "a directory, not a prediction file"
    if not f.is_file():
        return "not a regular file"
    m = _CSV_NAME.fullmatch(f.name)
    if not m:
        return NOT_A_PREDICTION_FILE
    task, length, prompt = m.groups()
    if task not in BENCH["task_labels"]:
        return f"unknown task {task!r} (BABILong tasks are qa1..qa20)"
    try:
        data.length_value(length)
    except data.DataError:
        return f"length {length!r} is not of the form {data.LENGTH_FORM}"
    return task, length, prompt


def _read_prediction_csv(f: Path, task: str, length: str) -> list[dict] | str:
    """Scored rows of one prediction file, else why it cannot be scored (the
    file then adds no row: a half-read file would skew its cell)."""
    try:
        with f.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            missing = [c for c in _CSV_COLUMNS if c not in fields]
            if missing:
                return f"missing columns {missing} (has {list(fields)})"
            records = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        return f"not readable as a UTF-8 CSV file ({type(e).__name__}: {e})"
    if not records:
        return "no prediction rows (only a header)"
    rows = []
    for i, r in enumerate(records):
        if r["target"] is None or r["question"] is None:
            return f"row {i + 1} has fewer fields than the header"
        # An empty output cell is an empty answer (the official code fills NaN with '').
        out = r["output"] if r["output"] is not None else ""
        rows.append(
            {
                "task": task,
                "length": length,
                "index": i,
                "question": r["question"],
                "target": r["target"],
                "output": out,
                "correct": score_prediction(task, r["target"], out, r["question"]),
            }
        )
    return rows


def _listing(entries: Sequence[Mapping], limit: int = 5) -> str:
    shown = "; ".join(f"{e['file']}: {e['reason']}" for e in entries[:limit])
    more = f"; and {len(entries) - limit} more" if len(entries) > limit else ""
    return shown + more


def read_official_predictions(
    results_dir: str | Path,
    prompt: str | None = None,
    tasks: Sequence[str] | None = None,
    lengths: Sequence[str] | None = None,
) -> OfficialPredictions:
    """Scores the CSV files `<task>_<length>_<prompt name>.csv` (columns
    target, output, question; length <N>k or <N>M) of one model's folder of
    the official repository's results. With several prompt names in the
    folder, `prompt` must pick one. `tasks`/`lengths`, when given, keep only
    those. Every entry of the folder is either scored or listed, with the
    reason, in `not_understood` or `excluded` (see OfficialPredictions)."""
    root = Path(results_dir).expanduser()
    if not root.is_dir():
        raise EvalError(f"{root}: no such results directory")
    found: dict[str, dict[tuple[str, str], Path]] = {}
    not_understood: list[dict] = []
    for f in sorted(root.iterdir()):
        fields = _name_fields(f)
        if isinstance(fields, str):
            not_understood.append({"file": f.name, "reason": fields})
        else:
            task, length, pname = fields
            found.setdefault(pname, {})[(task, length)] = f
    if not found:
        why = f"; not understood: {_listing(not_understood)}" if not_understood else " (the directory is empty)"
        raise EvalError(f"{root}: no <task>_<length>_<prompt name>.csv prediction files{why}")
    if prompt is None:
        if len(found) > 1:
            raise EvalError(f"{root}: several prompt names {sorted(found)}; choose one with --prompt-name")
        prompt = next(iter(found))
    if prompt not in found:
        raise EvalError(f"{root}: no files for prompt name {prompt!r}; found {sorted(found)}")
    for pname, files in found.items():
        if pname != prompt:
            reason = f"prompt name {pname!r}, not the one scored ({prompt!r}; choose with --prompt-name)"
            not_understood += [{"file": f.name, "reason": reason} for f in files.values()]
    rows: list[dict] = []
    excluded: list[dict] = []
    for (task, length), f in sorted(found[prompt].items(), key=lambda kv: (_task_key(kv[0][0]), _length_key(kv[0][1]))):
        if tasks and task not in tasks:
            excluded.append({"file": f.name, "reason": f"task {task} not asked for (--tasks)"})
            continue
        if lengths and length not in lengths:
            excluded.append({"file": f.name, "reason": f"length {length} not asked for (--lengths)"})
            continue
        got = _read_prediction_csv(f, task, length)
        if isinstance(got, str):
            not_understood.append({"file": f.name, "reason": got})
        else:
            rows += got
    not_understood.sort(key=lambda e: e["file"])
    excluded.sort(key=lambda e: e["file"])
    return OfficialPredictions(rows, prompt, not_understood, excluded)


# ---------------------------------------------------------------- data


def load_samples(args) -> tuple[dict, dict, str]:
    """({(task, length): records}, data source record, benchmark label)."""
    cells: dict = {}
    if args.data == "generate":
        counter = data.gpt2_counter(args.budget_tokenizer)
        gen = data.BabilongGenerator(seed=args.seed, corpus_dir=args.corpus, counter=counter)
        n = args.samples if args.samples is not None else 100
        for t in args.tasks:
            for l in args.lengths:
                cells[(t, l)] = gen.samples(t, l, n)
        return cells, gen.source(), data.REGENERATED_LABEL
    if args.corpus:
        raise EvalError("--corpus only applies to --data generate")
    if args.data == "hub":
        root = data.load_hub(args.dataset, args.tasks, args.lengths, args.revision)
        kind = {"kind": "hub", "dataset": args.dataset, "requested_revision": args.revision}
    else:
        root = Path(args.data)
        kind = {"kind": "local files", "dataset": args.dataset}
    files, digests, revision = {}, {}, None
    for t in args.tasks:
        for l in args.lengths:
            recs, src = data.load_local(root, t, l, args.samples)
            cells[(t, l)] = recs
            files[f"{t}/{l}"] = src["files"]
            digests[f"{t}/{l}"] = src["sha256"]
            revision = src.get("revision", revision)
    source = {**kind, "label": "BABILong", "path": str(root), "revision": revision, "files": files, "sha256": digests}
    return cells, source, "BABILong"


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog_name("eval.babilong", "focusft-babilong"), description=__doc__.split("\n\n")[0])
    add_model_options(ap)
    add_run_options(ap)
    ap.add_argument("--tasks", default=None, help="comma-separated, default qa1,...,qa5")
    ap.add_argument("--lengths", default=None, help="comma-separated <N>k or <N>M (e.g. 128k,512k,1M,10M); default "
                    "0k,1k,2k,4k,8k,16k,32k up to the model's context (N x 1000 tokens at most)")
    ap.add_argument("--data", default="hub", help="hub | PATH (local snapshot of the dataset) | generate")
    ap.add_argument("--dataset", default="RMT-team/babilong", help="hub dataset id (with --data hub)")
    ap.add_argument("--revision", default=None, help="hub dataset revision (default: main, the commit is recorded)")
    ap.add_argument("--samples", type=positive_int, default=None, help="samples per task and length (default: all; 100 when generating)")
    ap.add_argument("--corpus", default=None, help="directory of plain-text books for --data generate (default: built-in filler)")
    ap.add_argument("--budget-tokenizer", default=None, help="tokenizer (dir or tokenizer.json) for the generated context budget (default GPT-2 if cached, else an approximation)")
    ap.add_argument("--prompt-parts", default=None, help="any of instruction,examples,post_prompt ('' for none); default: "
                    "the parts the model was trained with (focusft.json), else all three")
    ap.add_argument("--max-context", type=int, default=None, help="model context in tokens (default: config.json max_position_embeddings)")
    ap.add_argument("--seed", type=int, default=0, help="seed of --data generate")
    ap.add_argument("--prompts-only", action="store_true", help="write OUT/prompts.jsonl, no model")
    ap.add_argument("--score", default=None, metavar="DIR", help="re-score official prediction CSVs in DIR")
    ap.add_argument("--prompt-name", default=None, help="with --score: which prompt name's files to score")
    return ap


def _resolve_lists(args, score_mode: bool) -> None:
    if args.tasks is not None:
        args.tasks = parse_list(args.tasks, TASKS, "task")
    elif not score_mode:
        args.tasks = list(DEFAULT_TASKS)
    if args.lengths is not None:
        args.lengths = parse_list(args.lengths, None, "length")
        for l in args.lengths:
            data.length_value(l)
    args.parts = None if args.prompt_parts is None else parse_list(args.prompt_parts, PROMPT_PARTS, "prompt part")


def _resolve_defaults(args) -> Defaults:
    """The options left unset, chosen for the model evaluated (eval.trained_defaults)."""
    defaults = Defaults(args.checkpoint)
    args.prefill_attention = defaults.prefill_attention(args.prefill_attention)
    args.parts = defaults.prompt_parts(args.parts, PROMPT_PARTS)
    defaults.chat_template_mode(args.chat_template)
    if args.lengths is None:
        context = args.max_context or (model_max_context(args.checkpoint) if args.checkpoint else None)
        args.lengths = defaults.lengths(DEFAULT_LENGTHS, lambda l: data.length_value(l) * 1000, context)
    return defaults


def report_unscored(read: OfficialPredictions, file=None) -> None:
    """On stderr: each file not understood with its reason, and how many
    files --tasks/--lengths left out (each is listed in results.json)."""
    file = file or sys.stderr
    for e in read.not_understood:
        print(f"not understood: {e['file']}: {e['reason']}", file=file)
    if read.excluded:
        print(f"excluded by --tasks/--lengths: {len(read.excluded)} files (listed in results.json)", file=file)


def _score_main(args) -> dict:
    read = read_official_predictions(args.score, args.prompt_name, args.tasks, args.lengths)
    report_unscored(read)
    rows, pname = read.rows, read.prompt
    if not rows:
        raise EvalError(f"{args.score}: no rows for the requested tasks/lengths")
    tasks = sorted({r["task"] for r in rows}, key=_task_key)
    lengths = sorted({r["length"] for r in rows}, key=_length_key)
    parts, chat = parse_prompt_name(pname)
    manifest = make_manifest(
        checkpoint=None,
        benchmark="BABILong (re-scored official predictions)",
        tasks=tasks,
        lengths=lengths,
        samples={t: {l: sum(1 for r in rows if r["task"] == t and r["length"] == l) for l in lengths} for t in tasks},
        data_source={"kind": "official prediction files", "path": str(Path(args.score).resolve()), "prompt_name": pname},
        tokenizer=None,
        chat_template=chat,
        prompt_parts=parts,
        decoding="as recorded by the run that wrote the predictions",
        seed=None,
        wordlist_version=None,
        prefill_attention=None,
        scoring="compare_answers (booydar/babilong metrics.py)",
    )
    results = build_results(rows, tasks, lengths, manifest, "BABILong")
    # Always present when scoring files, empty or not: no file goes unmentioned.
    results["not_understood"] = read.not_understood
    results["excluded"] = read.excluded
    write_report(args.out, rows, results)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _run(args))


def _run(args) -> int:
    """One of the three modes (--score, --prompts-only, a checkpoint); the exit status."""
    _resolve_lists(args, score_mode=args.score is not None)
    out = Path(args.out)
    if args.score:
        results = _score_main(args)
        print_table(results)
        return 0
    if not args.prompts_only and not args.checkpoint:
        raise EvalError("give --checkpoint (or --prompts-only, or --score DIR)")
    defaults = _resolve_defaults(args)
    cells, source, label = load_samples(args)
    common = dict(
        benchmark=label,
        tasks=args.tasks,
        lengths=args.lengths,
        samples={t: {l: len(cells[(t, l)]) for l in args.lengths} for t in args.tasks},
        data_source=source,
        prompt_parts=args.parts,
        seed=args.seed if args.data == "generate" else None,
        wordlist_version=None,
        prefill_attention=args.prefill_attention,
        defaults_chosen=defaults.chosen,
        training_record=defaults.record,
    )
    if args.prompts_only:
        rows = []
        for (t, l), recs in cells.items():
            for i, r in enumerate(recs):
                rows.append(
                    {
                        "task": t,
                        "length": l,
                        "index": i,
                        "prompt": format_prompt(t, r["input"], r["question"], args.parts),
                        "question": r["question"],
                        "target": r["target"],
                    }
                )
        write_jsonl(out / "prompts.jsonl", rows)
        write_json(
            out / "manifest.json",
            make_manifest(checkpoint=None, tokenizer=None, chat_template=None, decoding=None, **common),
        )
        print(f"wrote {len(rows)} prompts to {out / 'prompts.jsonl'}")
        return 0
    tok = load_tokenizer(args.checkpoint)
    chat = use_chat_template(tok, args.chat_template)
    max_ctx = args.max_context or model_max_context(args.checkpoint)
    gen_fn = make_generate_fn(
        args.checkpoint, args.batch_size, args.prefill_attention, MAX_NEW_TOKENS,
        add_special_tokens=not chat, attention_impl=args.attention_impl,
    )
    preds = evaluate(
        cells,
        gen_fn,
        parts=args.parts,
        wrap=(lambda p: chat_wrap(tok, p)) if chat else None,
        token_count=lambda s: count_tokens(tok, s, add_special_tokens=not chat),
        max_context=max_ctx,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    manifest = make_manifest(
        checkpoint=str(args.checkpoint),
        tokenizer=tokenizer_name(tok),
        chat_template=chat,
        decoding=DECODING,
        max_context=max_ctx,
        prompt_name=prompt_name(args.parts, chat),
        attention_impl=attention_impl_record(args.attention_impl),
        **common,
    )
    results = build_results(preds, args.tasks, args.lengths, manifest, label)
    write_report(out, preds, results)
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
