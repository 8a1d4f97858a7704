"""The paper's comparison at small scale: SFT (causal), SFT (glm_bidir) and FocuSFT.

Trains the same initial model (one init seed per run seed, the same
tokenizer) on the same data for the same number of steps as three variants
of one config (default: configs/tiny_niah.yaml, the tiny model on built-in RULER niah data):

  sft_causal     method.num_inner_steps=0, method.attention=causal
  sft_glm_bidir  method.num_inner_steps=0, method.attention=glm_bidir
  focusft        the config's method as it is (the inner loop, glm_bidir)

logs the attention diagnostics of the response queries through training
(sink mass and context engagement, per layer and mean: logging.diagnostics_every),
and evaluates each export on RULER (the config's built-in niah task, via
`focusft_jax.evaluation.ruler`, the same code as `python -m eval.ruler`) at
the trained prompt length and at 2x and 4x longer prompts (where dilution
should show): RULER length = m * P + tokens_to_generate for m in
--multipliers, with P = data.max_length - tokens_to_generate, so the longest
trained row is the 1x prompt. Each variant's export is read the way it was
trained (its focusft.json: causal or glm_bidir prefill).

Writes OUT/ablation.json (config, per run: loss and base-loss curves,
diagnostics curves, accuracy by length; per variant: mean and spread over
seeds) and OUT/ablation.png (four panels: loss and base loss, accuracy by
length, sink mass and context engagement over steps); the run directories go
under OUT/runs/. Prints the JSON document and a Markdown table (stderr).

    python bench/ablation.py                              # one seed, about an hour on 2 cores
    python bench/ablation.py --seeds 0 1 --samples 100
    python bench/ablation.py --quick --out /tmp/abl       # seconds: the tests' size
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from focusft_jax.config import load_config  # noqa: E402

VARIANTS = {
    "sft_causal": ["method.num_inner_steps=0", "method.attention=causal"],
    "sft_glm_bidir": ["method.num_inner_steps=0", "method.attention=glm_bidir"],
    "focusft": [],
}
LABELS = {"sft_causal": "SFT (causal)", "sft_glm_bidir": "SFT (glm_bidir)", "focusft": "FocuSFT"}
# --quick: a few steps of a smaller model on a short task; what the tests run.
QUICK = [
    "model.init.hidden_size=32", "model.init.intermediate_size=64", "model.init.num_layers=2",
    "model.init.vocab_size=512", "data.builtin.num_examples=16", "data.builtin.context_tokens=[0,20]",
    "data.max_length=320", "train.batch_size=4", "train.micro_batch_size=4", "train.epochs=1",
    "logging.every_steps=1", "logging.diagnostics_every=2", "logging.progress=false", "logging.tensorboard=false",
    "checkpoint.every_steps=1000",
]


def params_checksum(params) -> int:
    """crc32 of every parameter's bytes in tree order: equal inits, equal sums."""
    import jax

    crc = 0
    for leaf in jax.tree.leaves(params):
        crc = zlib.crc32(np.asarray(leaf).tobytes(), crc)
    return crc


def initial_checksum(cfg) -> int:
    """Checksum of the model `train` starts from for `cfg` (its tokenizer
    already built in the run directory)."""
    from transformers import AutoTokenizer

    from focusft_jax import job

    tok = AutoTokenizer.from_pretrained(Path(cfg.train.output_dir) / "tokenizer")
    return params_checksum(job.build_model(cfg, tok)[1])


def read_curves(metrics: Path) -> dict:
    """{"step", "loss", "base_loss"} and {"diag_step", "sink_mass", "context_engagement"
    (means), "sink_mass_layers", "context_engagement_layers"} lists from metrics.jsonl."""
    c = {k: [] for k in ("step", "loss", "base_loss", "diag_step", "sink_mass", "context_engagement",
                         "sink_mass_layers", "context_engagement_layers")}
    with open(metrics) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                c["step"].append(r["step"])
                c["loss"].append(r["loss"])
                c["base_loss"].append(r.get("base_loss", r["loss"]))
            if "attn_sink_mass_mean" in r:
                c["diag_step"].append(r["step"])
                c["sink_mass"].append(r["attn_sink_mass_mean"])
                c["context_engagement"].append(r["attn_context_engagement_mean"])
                c["sink_mass_layers"].append(r["attn_sink_mass"])
                c["context_engagement_layers"].append(r["attn_context_engagement"])
    return c


def evaluate(hf_dir: Path, out: Path, task: str, lengths: list[int], samples: int, batch_size: int) -> dict:
    """RULER scores {length: percent} of one export (focusft_jax.evaluation.ruler)."""
    from focusft_jax.evaluation import ruler

    argv = ["--checkpoint", str(hf_dir), "--tasks", task, "--lengths", ",".join(map(str, lengths)),
            "--samples", str(samples), "--batch-size", str(batch_size), "--out", str(out), "--no-progress"]
    rc = ruler.main(argv)
    if rc != 0:
        raise RuntimeError(f"RULER evaluation of {hf_dir} failed (exit status {rc}); see the messages above")
    res = json.loads((out / "results.json").read_text())
    scores = res["scores"].get(task, {})
    missing = [l for l in lengths if str(l) not in scores]
    if missing:  # a length whose smallest sample does not fit: no score to compare
        raise RuntimeError(f"{out / 'results.json'}: no {task} score at {missing} tokens "
                           f"({res.get('did_not_fit', {}).get(task, 'see the messages above')})")
    return {l: scores[str(l)] for l in lengths}


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def plot(doc: dict, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no display needed

    fig = Figure(figsize=(12, 8.5))
    (ax_loss, ax_acc), (ax_sink, ax_eng) = fig.subplots(2, 2)
    colors = {"sft_causal": "tab:blue", "sft_glm_bidir": "tab:orange", "focusft": "tab:green"}
    for run in doc["runs"]:
        v, c = run["variant"], run["curves"]
        col = colors[v]
        first = run["seed"] == doc["seeds"][0]
        ax_loss.plot(c["step"], c["loss"], color=col, lw=1, alpha=0.8, label=f"{LABELS[v]} loss" if first else None)
        if v == "focusft":
            ax_loss.plot(c["step"], c["base_loss"], color=col, lw=1, ls="--", alpha=0.8,
                         label="FocuSFT base loss (no fast weights)" if first else None)
        ax_sink.plot(c["diag_step"], c["sink_mass"], color=col, marker=".", label=LABELS[v] if first else None)
        ax_eng.plot(c["diag_step"], c["context_engagement"], color=col, marker=".",
                    label=LABELS[v] if first else None)
    mult = doc["multipliers"]
    width = 0.8 / len(doc["summary"])
    for i, v in enumerate(doc["summary"]):
        acc = doc["summary"][v]["accuracy"]
        means = [acc[str(m)]["mean"] for m in mult]
        lo = [acc[str(m)]["mean"] - acc[str(m)]["min"] for m in mult]
        hi = [acc[str(m)]["max"] - acc[str(m)]["mean"] for m in mult]
        ax_acc.bar(np.arange(len(mult)) + (i - (len(doc["summary"]) - 1) / 2) * width, means, width, yerr=[lo, hi], capsize=3,
                   color=colors[v], label=LABELS[v])
    ax_acc.set_xticks(np.arange(len(mult)), [f"{m}x ({l} tok)" for m, l in zip(mult, doc["ruler_lengths"])])
    ax_acc.set_ylim(0, 100)
    ax_acc.set_ylabel(f"RULER {doc['task']} accuracy (%)")
    ax_acc.set_title(f"accuracy by prompt length ({doc['samples']} samples/cell; bars: min-max over seeds)")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_title("training loss (response tokens)")
    ax_sink.set_title("sink mass of response queries (mean over layers)")
    ax_eng.set_title("context engagement of response queries (mean over layers)")
    for ax in (ax_sink, ax_eng):
        ax.set_xlabel("step")
    for ax in (ax_loss, ax_acc, ax_sink, ax_eng):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def markdown(doc: dict) -> str:
    mult = doc["multipliers"]
    head = "| variant | " + " | ".join(f"{m}x ({l})" for m, l in zip(mult, doc["ruler_lengths"]))
    head += " | final loss | sink mass (last) | context engagement (last) |"
    lines = [head, "|" + " --- |" * (len(mult) + 4)]
    for v in doc["summary"]:
        s = doc["summary"][v]
        cells = []
        for m in mult:
            a = s["accuracy"][str(m)]
            cells.append(f"{a['mean']:.1f}" + (f" [{a['min']:.0f}-{a['max']:.0f}]" if len(doc["seeds"]) > 1 else ""))
        lines.append(f"| {LABELS[v]} | " + " | ".join(cells) + f" | {s['final_loss']['mean']:.3f} | "
                     f"{s['sink_mass']['mean']:.4f} | {s['context_engagement']['mean']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/tiny_niah.yaml", help="the recipe (built-in niah data)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every variant")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed values (init and data order)")
    ap.add_argument("--multipliers", type=int, nargs="+", default=[1, 2, 4], help="prompt lengths / trained")
    ap.add_argument("--samples", type=int, default=50, help="RULER samples per length")
    ap.add_argument("--batch-size", type=int, default=25, help="evaluation batch size")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default="bench/results/ablation")
    ap.add_argument("--quick", action="store_true", help="a tiny model for a few steps (the tests)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    base = (QUICK if args.quick else []) + args.set
    probe = load_config(args.config, base)
    bi = probe.data.builtin
    if bi is None or bi.kind != "niah" or len(bi.tasks) != 1:
        sys.exit(f"error: {args.config}: the ablation needs built-in niah data with one task "
                 f"(data.builtin.kind: niah, tasks: [niah_single_1]); got {bi}")
    from focusft_jax.evaluation.ruler_data import tokens_to_generate
    from focusft_jax.train import train

    task = bi.tasks[0]
    ttg = tokens_to_generate(task)
    trained_prompt = probe.data.max_length - ttg
    if trained_prompt < 64:
        sys.exit(f"error: data.max_length {probe.data.max_length} leaves under 64 prompt tokens "
                 f"after RULER's {ttg} tokens to generate")
    lengths = [m * trained_prompt + ttg for m in args.multipliers]
    runs = []
    for seed in args.seeds:
        for v in args.variants:
            run_dir = out / "runs" / f"{v}-seed{seed}"
            sets = base + VARIANTS[v] + [f"train.seed={seed}", f"train.output_dir={run_dir}", "train.overwrite=true",
                                              "checkpoint.resume=false"]
            cfg = load_config(args.config, sets)
            t0 = time.perf_counter()
            summary = train(cfg, log=lambda m: print(f"[{v} seed {seed}] {m}", file=sys.stderr, flush=True))
            train_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            acc = evaluate(run_dir / "hf", run_dir / "ruler", task, lengths, args.samples, args.batch_size)
            eval_s = time.perf_counter() - t0
            runs.append({
                "variant": v, "seed": seed, "overrides": VARIANTS[v], "steps": summary["step"],
                "initial_params_crc32": initial_checksum(cfg), "train_s": round(train_s, 1),
                "eval_s": round(eval_s, 1), "accuracy": {str(m): acc[l] for m, l in zip(args.multipliers, lengths)},
                "curves": read_curves(run_dir / "metrics.jsonl"),
            })
            print(f"[{v} seed {seed}] {summary['step']} steps in {train_s:.0f} s; accuracy "
                  f"{ {m: acc[l] for m, l in zip(args.multipliers, lengths)} }", file=sys.stderr, flush=True)
    summary = {}
    for v in args.variants:
        rs = [r for r in runs if r["variant"] == v]
        summary[v] = {
            "accuracy": {str(m): spread([r["accuracy"][str(m)] for r in rs]) for m in args.multipliers},
            "final_loss": spread([statistics.fmean(r["curves"]["loss"][-10:]) for r in rs]),
            "sink_mass": spread([r["curves"]["sink_mass"][-1] for r in rs if r["curves"]["sink_mass"]] or [float("nan")]),
            "context_engagement": spread(
                [r["curves"]["context_engagement"][-1] for r in rs if r["curves"]["context_engagement"]]
                or [float("nan")]),
        }
    doc = {
        "command": "python bench/ablation.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": args.config, "overrides": base, "task": task, "seeds": args.seeds,
        "multipliers": args.multipliers, "trained_prompt_tokens": trained_prompt, "ruler_lengths": lengths,
        "samples": args.samples, "runs": runs, "summary": summary,
    }
    out.mkdir(parents=True, exist_ok=True)
    plot(doc, out / "ablation.png")
    (out / "ablation.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps({k: doc[k] for k in ("command", "task", "ruler_lengths", "summary")}, indent=1))
    print(markdown(doc), file=sys.stderr)
    return doc


if __name__ == "__main__":
    main()
