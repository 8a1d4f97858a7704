"""bench/step.py end to end at toy sizes: every section is produced, and the
PyTorch step it times computes the same loss as our SFT step on the same
weights and batch (so the timing comparison compares like with like)."""
from __future__ import annotations

import importlib.util
from argparse import Namespace
from pathlib import Path

from focusft_jax.flops import step_flops, workload
from focusft_jax.hf import config_from_hf

STEP = Path(__file__).resolve().parents[1] / "bench" / "step.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_step", STEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_step_sections_and_torch_loss_parity(capsys):
    bench = load_bench()
    # dense attention: the same code paths, faster to compile at toy sizes
    args = ["--seq", "32", "--torch-lengths", "40", "--layers", "2", "--hidden", "64", "--vocab", "96"]
    # and without the second-order variant, whose compile alone would double this test's time
    args += ["--attention-impl", "dense", "--variants", "sft_causal,sft_glm_bidir,focusft_first_order"]
    res = bench.main(args + ["--repeats", "1", "--torch-repeats", "1"])
    out = capsys.readouterr().out
    assert out.strip().startswith("{") and '"vs_torch"' in out  # one JSON document on stdout

    assert set(res["variants"]) == {"sft_causal", "sft_glm_bidir", "focusft_first_order"}
    for per_length in res["variants"].values():
        assert set(per_length) == {"32", "64"}
        for m in per_length.values():
            assert m["flops"] > m["forward_flops"] > 0 and m["temp_bytes"] > 0 and m["median_step_s"] > 0
    # FocuSFT runs the top layers three times: more FLOPs than SFT, whatever the size
    assert res["ratios"]["focusft_first_order/sft_causal flops @64"] > 1.0
    # the analytic counts of focusft_jax.flops on the bench's batch (P = the response, 64 // 10)
    bench_cfg = config_from_hf({"model_type": "qwen2", **bench.hf_config_kwargs(Namespace(vocab=96, hidden=64, layers=2), 64)}, "")
    batch = bench.make_batch(1, 64, 96)
    assert batch["loss_index"].shape == (1, 6)
    work = workload(64, response=6, mask="glm_bidir", scored=6)
    fcfg = bench.focus_config("focusft_first_order")
    assert res["variants"]["focusft_first_order"]["64"]["flops"] == step_flops(bench_cfg, fcfg, work)["total"]
    # an SFT step is a forward and a backward twice its size
    assert abs(res["ratios"]["sft_causal step/forward flops @64"] - 3.0) < 1e-9
    assert set(res["vs_torch"]) == {"40"}
    for row in res["vs_torch"].values():
        assert row["torch_s"] > 0 and row["focusft_first_order_s"] > 0
        assert row["loss_abs_diff_torch_vs_sft_causal"] < 1e-4
    assert "sft step <= torch step at every length" in res["targets"]
