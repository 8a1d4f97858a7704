"""bench/ablation.py --quick: three variants of the default recipe from one
initial model, each trained, diagnosed and evaluated on RULER at 1x and 2x
the trained prompt length, written as JSON and a PNG."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ablation():
    spec = importlib.util.spec_from_file_location("ablation", ROOT / "bench" / "ablation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_ablation_trains_three_variants_from_one_init(tmp_path):
    mod = _ablation()
    out = tmp_path / "abl"
    doc = mod.main(["--quick", "--config", str(ROOT / "configs" / "tiny_niah.yaml"), "--out", str(out),
                    "--multipliers", "1", "2", "--samples", "2", "--batch-size", "2"])
    assert json.loads((out / "ablation.json").read_text())["summary"] == doc["summary"]
    png = (out / "ablation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    runs = {r["variant"]: r for r in doc["runs"]}
    assert list(runs) == ["sft_causal", "sft_glm_bidir", "focusft"]
    assert len({r["initial_params_crc32"] for r in runs.values()}) == 1  # the same initial model
    assert len({r["steps"] for r in runs.values()}) == 1 and runs["focusft"]["steps"] >= 4
    p = doc["trained_prompt_tokens"]
    assert doc["ruler_lengths"] == [p + 128, 2 * p + 128]
    for v, r in runs.items():
        c = r["curves"]
        assert len(c["step"]) == r["steps"] and c["diag_step"] and len(c["sink_mass_layers"][0]) == 2
        assert all(0.0 <= x <= 1.0 for x in c["sink_mass"] + c["context_engagement"])
        assert set(r["accuracy"]) == {"1", "2"} and all(0.0 <= a <= 100.0 for a in r["accuracy"].values())
        # each export was evaluated the way it was trained
        manifest = json.loads((out / "runs" / f"{v}-seed0" / "ruler" / "results.json").read_text())["manifest"]
        assert manifest["prefill_attention"] == ("causal" if v == "sft_causal" else "glm_bidir")
        assert manifest["samples"] == {"niah_single_1": {str(doc["ruler_lengths"][0]): 2,
                                                         str(doc["ruler_lengths"][1]): 2}}
    # SFT has no inner loop (outer loss = base loss); FocuSFT's inner loop changes the loss it trains on
    for v in ("sft_causal", "sft_glm_bidir"):
        assert runs[v]["curves"]["loss"] == runs[v]["curves"]["base_loss"]
    assert runs["focusft"]["curves"]["loss"] != runs["focusft"]["curves"]["base_loss"]
    # the mask changes what the base model sees: different training from the same start
    assert runs["sft_causal"]["curves"]["loss"][1:] != runs["sft_glm_bidir"]["curves"]["loss"][1:]
    assert set(doc["summary"]) == set(runs) and doc["summary"]["focusft"]["accuracy"]["1"]["mean"] == \
        runs["focusft"]["accuracy"]["1"]
