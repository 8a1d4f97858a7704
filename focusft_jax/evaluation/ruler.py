"""RULER evaluation (NVIDIA/RULER, classic protocol).

    python -m eval.ruler --checkpoint DIR --out OUT [--tasks ...] [--lengths 4096,...]
    python -m eval.ruler --generate-only --tokenizer DIR --out OUT ...   # samples, no model

Samples are generated for the evaluated model's tokenizer and chat template
(`eval.ruler_data`), written to OUT/samples/<task>_<length>.jsonl, then each
prompt (input + answer_prefix) is continued greedily for the family's
tokens_to_generate (niah 128, vt 30, cwe 120, fwe 50, qa 32), no stop
strings. Scoring: the prediction is stripped, control characters
\\x00-\\x1f become newlines, stripped again; `string_match_all` (niah, vt,
cwe, fwe) scores per sample the fraction of references found as
case-insensitive substrings, `string_match_part` (qa) 1 if any is found;
mean over samples x 100, rounded to 2 decimals as the official code does.
The score of a length is the unweighted mean of the task scores present,
reported with how many of the 13 tasks it covers.

--lengths takes any positive token counts: the official lengths are 4096 to
131072; smaller ones (e.g. 1024, as the end-to-end test uses) are for smoke
tests and compare with nothing published. The prompt forward uses blockwise
(memory-efficient) attention for long prompts (--attention-impl, default auto:
see `eval.runner.prefill_attention_impl`).

--lengths and --prefill-attention left unset are chosen for the model
(`eval.trained_defaults`: the official lengths up to its context; glm_bidir
for a model trained from scratch with it). A cell whose smallest sample does
not fit its length is skipped with the reason (`did_not_fit`).

Tasks whose data is missing are skipped and listed: essay-haystack tasks
without --corpus, qa_1 without --squad, qa_2 without --hotpotqa. With
--corpus the essay haystack is the user's text, not the official essays, and
the result says so.

Phase-2 hook: `evaluate(samples, get_generate_fn, ...)` where
`get_generate_fn(tokens_to_generate) -> generate_fn(prompts) -> continuations`.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

from focusft_jax.evaluation import ruler_data as rd
from focusft_jax.evaluation import wordlists
from focusft_jax.evaluation.cli import add_model_options, add_run_options, parse_list, positive_int, prog_name, run_cli
from focusft_jax.evaluation.errors import DoesNotFit, EvalError
from focusft_jax.evaluation.jsonio import read_jsonl, write_json, write_jsonl
from focusft_jax.evaluation.manifest import files_digest, make_manifest
from focusft_jax.evaluation.model_dir import model_max_context
from focusft_jax.evaluation.runner import GenerateFn, attention_impl_record, make_generate_fn, run_generation
from focusft_jax.evaluation.tables import manifest_markdown, markdown_table, write_results
from focusft_jax.evaluation.tokenizing import load_tokenizer, tokenizer_name, use_chat_template
from focusft_jax.evaluation.trained_defaults import Defaults

TASKS = rd.TASKS
DEFAULT_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
DEFAULT_SAMPLES = 500
MATCH_PART_FAMILIES = ("qa",)
_CONTROL = re.compile(r"[\x00-\x1f]")


# ---------------------------------------------------------------- scoring


def postprocess_pred(prediction: str) -> str:
    """Strip, control characters (\\x00-\\x1f) to newlines, strip again."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def match_all(prediction: str, refs: Sequence[str]) -> float:
    """Fraction of references found (case-insensitive substrings)."""
    p = prediction.lower()
    return sum(1.0 if r.lower() in p else 0.0 for r in refs) / len(refs)


def match_part(prediction: str, refs: Sequence[str]) -> float:
    """1 if any reference is found (case-insensitive substring), else 0."""
    p = prediction.lower()
    return max(1.0 if r.lower() in p else 0.0 for r in refs)


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    return round(sum(match_all(p, r) for p, r in zip(preds, refs)) / len(preds) * 100, 2)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    return round(sum(match_part(p, r) for p, r in zip(preds, refs)) / len(preds) * 100, 2)


def metric_of(task: str) -> str:
    return "string_match_part" if rd.family(task) in MATCH_PART_FAMILIES else "string_match_all"


def sample_score(task: str, prediction: str, refs: Sequence[str]) -> float:
    return (match_part if metric_of(task) == "string_match_part" else match_all)(prediction, refs)


def task_score(task: str, predictions: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    preds = [postprocess_pred(p) for p in predictions]
    return (string_match_part if metric_of(task) == "string_match_part" else string_match_all)(preds, refs)


def aggregate(scores: Mapping[str, Mapping[int, float]], lengths: Sequence[int]) -> dict:
    """average {length: mean of the task scores present | None}, the tasks each
    covers, "k of 13" coverage, and the plain average across lengths."""
    avg, covers, tasks_at = {}, {}, {}
    for l in lengths:
        present = [t for t in TASKS if t in scores and scores[t].get(l) is not None]
        tasks_at[l] = present
        avg[l] = round(sum(scores[t][l] for t in present) / len(present), 2) if present else None
        covers[l] = f"{len(present)} of {len(TASKS)} tasks"
    vals = [v for v in avg.values() if v is not None]
    return {
        "average": avg,
        "average_tasks": tasks_at,
        "average_covers": covers,
        "overall_average": round(sum(vals) / len(vals), 2) if vals else None,
    }


# ---------------------------------------------------------------- the runner


def evaluate(
    samples: Mapping[tuple[str, int], Sequence[Mapping]],
    get_generate_fn: Callable[[int], GenerateFn],
    *,
    max_context: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> list[dict]:
    """Generates and scores RULER samples.

    samples: {(task, length): sample rows (index, input, outputs, length,
        answer_prefix)}.
    get_generate_fn(tokens_to_generate) -> generate_fn; asked once per task
        family, since each family has its own generation budget.
    max_context: the model's context; a sample whose prompt + generation
        (its `length`) does not fit is refused, as BABILong does: not
        generated, output / prediction / score None, `refused` says why, and
        its cell gets no score (never a 0 averaged in).
    Returns prediction rows: task, length, index, prompt (input +
    answer_prefix), outputs, output (the raw continuation), prediction
    (post-processed) and score (this sample's match, 0..1).
    """
    by_ttg: dict[int, list[tuple[str, int, Mapping]]] = {}
    for (task, length), rows in samples.items():
        for r in rows:
            by_ttg.setdefault(rd.tokens_to_generate(task), []).append((task, length, r))
    preds: list[dict] = []
    for ttg in sorted(by_ttg):
        items = []
        for task, length, r in by_ttg[ttg]:
            need = r.get("length")
            if max_context is not None and need is not None and int(need) > max_context:
                preds.append(
                    {
                        "task": task,
                        "length": length,
                        "index": r["index"],
                        "prompt": r["input"] + r["answer_prefix"],
                        "outputs": list(r["outputs"]),
                        "output": None,
                        "prediction": None,
                        "score": None,
                        "refused": f"prompt + {ttg} new = {int(need)} tokens > model context {max_context}",
                    }
                )
            else:
                items.append((task, length, r))
        if not items:
            continue
        fn = get_generate_fn(ttg)
        prompts = [r["input"] + r["answer_prefix"] for _, _, r in items]
        outs = run_generation(
            prompts,
            fn,
            batch_size=batch_size,
            lengths=[int(r.get("length", len(p))) for (_, _, r), p in zip(items, prompts)],
            desc=f"RULER ({ttg} new tokens)",
            progress=progress,
        )
        for (task, length, r), prompt, out in zip(items, prompts, outs):
            pred = postprocess_pred(out)
            preds.append(
                {
                    "task": task,
                    "length": length,
                    "index": r["index"],
                    "prompt": prompt,
                    "outputs": list(r["outputs"]),
                    "output": out,
                    "prediction": pred,
                    "score": sample_score(task, pred, r["outputs"]),
                }
            )
    order = {k: i for i, k in enumerate(samples)}
    preds.sort(key=lambda p: (order[(p["task"], p["length"])], p["index"]))
    return preds


def build_results(
    predictions: Sequence[Mapping],
    tasks: Sequence[str],
    lengths: Sequence[int],
    skipped: Mapping[str, str],
    manifest: Mapping,
    label: str,
    did_not_fit: Mapping[str, Mapping[int, str]] | None = None,
) -> dict:
    """The results of `predictions`; `skipped` {task: why} (not run at all),
    `did_not_fit` {task: {length: why}} (cells whose smallest sample does not
    fit the length: no score, not averaged)."""
    scores: dict = {}
    refused: dict = {}  # {task: {length: samples refused}}: such a cell has no score
    for t in tasks:
        for l in lengths:
            cell = [p for p in predictions if p["task"] == t and p["length"] == l]
            n_ref = sum(1 for p in cell if p.get("refused"))
            if n_ref:
                refused.setdefault(t, {})[l] = n_ref
            elif cell:
                scores.setdefault(t, {})[l] = task_score(t, [p["output"] for p in cell], [p["outputs"] for p in cell])
    agg = aggregate(scores, lengths)
    res = {
        "benchmark": "RULER",
        "label": label,
        "tasks": [t for t in tasks if t in scores or t in refused],
        "lengths": list(lengths),
        "scores": scores,
        **agg,
        "skipped": dict(skipped),
        "metrics": {t: metric_of(t) for t in scores},
        "manifest": dict(manifest),
    }
    if refused:
        res["refused"] = refused
    if did_not_fit:
        res["did_not_fit"] = {t: dict(cells) for t, cells in did_not_fit.items()}
    return res


def results_markdown(results: Mapping) -> str:
    lengths = results["lengths"]
    cols = [str(l) for l in lengths]
    rows = [(t, {str(l): v for l, v in results["scores"].get(t, {}).items()}) for t in results["tasks"]]
    rows.append(("average", {str(l): results["average"][l] for l in lengths}))
    covers = ", ".join(f"{l}: {results['average_covers'][l]}" for l in lengths)
    lines = [
        f"# {results['label']}: scores",
        "",
        markdown_table(rows, cols, digits=2),
        "",
        f"Average covers {covers}. Mean over lengths: {results['overall_average']}.",
    ]
    if results.get("beyond_model_context"):
        lines += ["", f"Lengths beyond the model's context ({results['model_max_context']}): {results['beyond_model_context']}"]
    if results.get("refused"):
        lines += ["", f"Refused (prompt + generation does not fit the model; no score, not averaged): {results['refused']}"]
    if results.get("did_not_fit"):
        lines += ["", "Did not fit (no score, not averaged):", ""] + [
            f"- {t} at {l}: {why}" for t, cells in results["did_not_fit"].items() for l, why in cells.items()
        ]
    if results["skipped"]:
        lines += ["", "Skipped tasks:", ""] + [f"- {t}: {why}" for t, why in results["skipped"].items()]
    lines += ["", "## Settings", "", manifest_markdown(results["manifest"])]
    return "\n".join(lines)


def write_report(out: str | Path, predictions: Sequence[Mapping], results: Mapping) -> None:
    out = Path(out)
    write_jsonl(out / "predictions.jsonl", predictions)
    write_results(out, _json_keys(results), results_markdown(results))


def _json_keys(obj):
    """results with int length keys turned into strings (JSON object keys)."""
    if isinstance(obj, dict):
        return {str(k) if isinstance(k, int) else k: _json_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_keys(v) for v in obj]
    return obj


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog_name("eval.ruler", "focusft-ruler"), description=__doc__.split("\n\n")[0])
    add_model_options(ap)
    add_run_options(ap)
    ap.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's)")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated, default all 13")
    ap.add_argument(
        "--lengths",
        default=None,
        help="comma-separated token budgets (default the official 4096..131072 up to the model's context); any "
        "positive count is accepted, e.g. 1024 for smoke tests, but only the official lengths compare with "
        "published numbers",
    )
    ap.add_argument("--samples", type=positive_int, default=DEFAULT_SAMPLES, help="samples per task and length")
    ap.add_argument("--corpus", default=None, help="directory of *.txt for the essay haystack")
    ap.add_argument("--squad", default=None, help="SQuAD v2 dev json (qa_1)")
    ap.add_argument("--hotpotqa", default=None, help="HotpotQA dev-distractor json (qa_2)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--generate-only", action="store_true", help="write the samples, no model")
    ap.add_argument("--samples-from", default=None, metavar="DIR", help="reuse DIR/samples/<task>_<length>.jsonl")
    return ap


def _parse_lengths(text: str) -> list[int]:
    out = []
    for t in parse_list(text, None, "length"):
        if not t.isdigit() or int(t) <= 0:
            raise EvalError(f"RULER lengths are token counts like 4096, got {t!r}")
        out.append(int(t))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _run(args))


def _run(args) -> int:
    """--generate-only, or a checkpoint's evaluation; the exit status."""
    tasks = parse_list(args.tasks, TASKS, "task")
    defaults = Defaults(args.checkpoint)
    if args.lengths is None:
        context = model_max_context(args.checkpoint) if args.checkpoint else None
        lengths = defaults.lengths(DEFAULT_LENGTHS, int, context)
    else:
        lengths = _parse_lengths(args.lengths)
    args.prefill_attention = defaults.prefill_attention(args.prefill_attention)
    defaults.chat_template_mode(args.chat_template)
    if args.samples < 1:
        raise EvalError("--samples must be >= 1")
    if not args.generate_only and not args.checkpoint:
        raise EvalError("give --checkpoint (or --generate-only with --tokenizer)")
    tok_src = args.tokenizer or args.checkpoint
    if not tok_src:
        raise EvalError("--generate-only needs --tokenizer DIR (samples are sized with the model's tokenizer)")
    tok = load_tokenizer(tok_src)
    chat = use_chat_template(tok, args.chat_template)
    fmt = rd.Formatter(tok, chat)
    out = Path(args.out)

    skipped = {}
    for t in tasks:
        why = rd.missing_data(t, args.corpus, args.squad, args.hotpotqa)
        if why:
            skipped[t] = why
    run_tasks = [t for t in tasks if t not in skipped]
    samples: dict = {}
    unfit: dict = {}  # {task: {length: why}}: a cell whose smallest sample does not fit the length
    for t in run_tasks:
        for l in lengths:
            if args.samples_from:
                src = Path(args.samples_from) / "samples" / f"{t}_{l}.jsonl"
                if not src.exists():
                    raise EvalError(f"{src}: missing (from --samples-from)")
                rows = read_jsonl(src)[: args.samples]
                if any(r.get("chat_template", chat) != chat for r in rows):
                    raise EvalError(
                        f"{src}: samples were made with chat template {'off' if chat else 'on'}, "
                        f"this run has it {'on' if chat else 'off'} (see --chat-template)"
                    )
            else:
                try:
                    rows = rd.generate_samples(
                        t, l, args.samples, fmt, seed=args.seed, corpus_dir=args.corpus, squad=args.squad,
                        hotpotqa=args.hotpotqa,
                    )
                except DoesNotFit as e:
                    unfit.setdefault(t, {})[l] = str(e)
                    print(f"skipped {t} at {l}: {e}", file=sys.stderr)
                    continue
            samples[(t, l)] = rows
    # Written once every cell is generated: a run stopped by an error leaves no partial sample files.
    for (t, l), rows in samples.items():
        write_jsonl(out / "samples" / f"{t}_{l}.jsonl", rows)
    run_tasks = [t for t in run_tasks if any((t, l) in samples for l in lengths)]  # tasks with a cell that fits

    essay_used = args.corpus and any(t in rd.ESSAY_TASKS for t in run_tasks)
    label = "RULER" + (f" (essay haystack: user corpus {args.corpus}, not the official essays)" if essay_used else "")
    data_source = {
        "kind": "from --samples-from" if args.samples_from else "generated",
        "samples_from": args.samples_from,
        "essay_corpus": (
            {"path": str(args.corpus), "sha256": rd.corpus_digest(args.corpus)} if args.corpus else None
        ),
        "squad": {"path": args.squad, "sha256": files_digest([args.squad])} if args.squad else None,
        "hotpotqa": {"path": args.hotpotqa, "sha256": files_digest([args.hotpotqa])} if args.hotpotqa else None,
        "label": label,
    }
    manifest = make_manifest(
        checkpoint=str(args.checkpoint) if args.checkpoint else None,
        benchmark=label,
        tasks=run_tasks,
        lengths=lengths,
        samples={t: {str(l): len(samples[(t, l)]) for l in lengths if (t, l) in samples} for t in run_tasks},
        data_source=data_source,
        tokenizer=tokenizer_name(tok),
        chat_template=chat,
        prompt_parts="official task templates + answer_prefix pre-filled",
        decoding={
            "strategy": "greedy",
            "tokens_to_generate": {t: rd.tokens_to_generate(t) for t in run_tasks},
            "stop_strings": None,
        },
        seed=args.seed,
        wordlist_version=wordlists.version_record(),
        prefill_attention=args.prefill_attention,
        attention_impl=attention_impl_record(args.attention_impl) if not args.generate_only else None,
        skipped=skipped,
        did_not_fit=unfit,
        defaults_chosen=defaults.chosen,
        training_record=defaults.record,
    )
    if args.generate_only:
        write_json(out / "manifest.json", _json_keys(manifest))
        n = sum(len(v) for v in samples.values())
        print(f"wrote {n} samples for {len(run_tasks)} tasks to {out / 'samples'}")
        for t, why in skipped.items():
            print(f"skipped {t}: {why}")
        return 0

    def get_fn(ttg: int) -> GenerateFn:
        return make_generate_fn(
            args.checkpoint, args.batch_size, args.prefill_attention, ttg,
            add_special_tokens=not chat, attention_impl=args.attention_impl,
        )

    max_ctx = model_max_context(args.checkpoint)
    preds = evaluate(samples, get_fn, max_context=max_ctx, batch_size=args.batch_size, progress=not args.no_progress)
    results = build_results(preds, run_tasks, lengths, skipped, manifest, label, did_not_fit=unfit)
    # lengths past the model's configured context are flagged; their samples that do not fit are refused
    results["model_max_context"] = max_ctx
    results["beyond_model_context"] = [l for l in lengths if max_ctx is not None and l > max_ctx]
    write_report(out, preds, results)
    print(results_markdown(results).split("\n\n## Settings")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
