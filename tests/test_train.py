"""train.py end to end on a tiny model: sharding equivalence, resume after
SIGKILL and SIGTERM, the export, accumulation, skipped steps, bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from focusft_jax import hf
from focusft_jax.bilevel import FocusConfig
from focusft_jax.config import load_config
from focusft_jax.model import ModelConfig, init_params
from focusft_jax.optim import make_optimizer
from focusft_jax.trainer import init_state, train_step
from focusft_jax.training_record import read_training_record

ROOT = Path(__file__).resolve().parents[1]

TINY = """
model:
  init: {family: qwen2, vocab_size: 320, hidden_size: 32, intermediate_size: 64,
         num_layers: 3, num_heads: 4, num_kv_heads: 2, tie_word_embeddings: true}
data:
  builtin: {num_examples: 96, context_tokens: [0], seed: 0}
  max_length: 256
  bucket_size: 256  # one batch shape: one compilation per run
method: {rank: 4, alpha: 8, fraction: 0.35}
optim: {lr: 1.0e-2, warmup_ratio: 0.1}
train: {batch_size: 8, micro_batch_size: 4, max_steps: 6}
checkpoint: {every_steps: 3, keep: 2, async_save: false}
logging: {every_steps: 1, progress: false, tensorboard: true}
"""


def _config_file(tmp_path: Path, extra: str = "") -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY + extra)
    return p


def _run_train(config: Path, out: Path, *sets: str, env=None, wait=True):
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(config), "--set", f"train.output_dir={out}"]
    for s in sets:
        cmd += ["--set", s]
    full_env = dict(os.environ, **(env or {}))
    if wait:
        return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _metrics(out: Path) -> dict[int, dict]:
    """Logged rows by step; a step logged twice (re-run after a kill) keeps its last row."""
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return rows


def _params(out: Path):
    return hf.load_hf(out / "hf").params


def _assert_params_close(a, b, tol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol, err_msg=str(path))


def _tensorboard_scalars(directory: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the event files in `directory` (TFRecord
    framing: u64 length, u32 crc, the Event proto, u32 crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(directory.glob("events.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                scalars.setdefault(v.tag, {})[event.step] = v.simple_value
    return scalars


def test_train_writes_everything_and_the_export_matches_transformers(tmp_path):
    from focusft_jax.metrics_log import DASHBOARD_TAGS, JSONL_ONLY

    out = tmp_path / "run"
    res = _run_train(_config_file(tmp_path), out, "logging.diagnostics_every=6")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["step"] == 6 and summary["final_loss"] < summary["first_logged_loss"]
    assert (out / "config.yaml").exists() and (out / "checkpoints").is_dir()
    assert any((out / "tensorboard").iterdir())
    rows = _metrics(out)
    assert sorted(rows) == list(range(1, 7))
    assert all(len(r["inner_losses"]) == 2 for r in rows.values())
    assert rows[1]["data_skipped_rows"] == 0 and "data_skipped_rows" not in rows[2]
    # TensorBoard: the curves under train/ attn/ perf/, never a checksum or a data position
    assert set(rows[1]) | set(rows[6]) <= set(DASHBOARD_TAGS) | JSONL_ONLY | {"step"}
    tb = _tensorboard_scalars(out / "tensorboard")
    assert {t.split("/")[0] for t in tb} == {"train", "attn", "perf"}, sorted(tb)
    assert tb["train/loss"] == pytest.approx({s: r["loss"] for s, r in rows.items()})
    assert tb["train/base_loss"][6] == pytest.approx(rows[6]["base_loss"])
    assert tb["train/inner_loss/1"][3] == pytest.approx(rows[3]["inner_losses"][1])
    assert tb["attn/sink_mass/2"][6] == pytest.approx(rows[6]["attn_sink_mass"][2])
    assert sorted(tb["perf/tokens_per_s"]) == list(range(1, 7))
    assert not any("checksum" in t or "epoch" in t or "data" in t for t in tb)
    assert (out / "skipped_rows.jsonl").read_text() == ""
    assert "HF export" in res.stderr  # the final summary says where things are
    assert "batches have 1 shape(s) (tokens x loss positions: 256x" in res.stderr
    assert f"python -m eval.babilong --checkpoint {out / 'hf'} --data generate" in res.stderr
    record = read_training_record(out / "hf")  # how it was trained, for the evaluation tools' defaults
    assert (record["step"], record["objective"], record["initialization"]) == (6, "focusft", "from_scratch")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(out / "hf", output_loading_info=True)
    assert not any(info.values()), info
    tok = AutoTokenizer.from_pretrained(out / "hf")
    assert tok.chat_template
    ids = tok(["Where is Mary?", "<context>\nJohn went to the kitchen."], padding=True, return_tensors="np")
    ours = hf.load_hf(out / "hf")
    from focusft_jax.attention import attention_meta
    from focusft_jax.model import forward, positions_from_mask

    am = jnp.asarray(ids["attention_mask"])
    logits = forward(ours.cfg, ours.params, jnp.asarray(ids["input_ids"]), positions_from_mask(am),
                     attention_meta(am, kind="causal"))
    with torch.no_grad():
        ref = model(torch.as_tensor(ids["input_ids"]), attention_mask=torch.as_tensor(ids["attention_mask"])).logits
    real = ids["attention_mask"].astype(bool)
    assert np.abs(np.asarray(logits)[real] - ref.numpy()[real]).max() < 1e-4


def test_sigkill_then_resume_gives_identical_parameters_and_batches(tmp_path):
    cfg = _config_file(tmp_path)
    sets = ("train.max_steps=40", "checkpoint.every_steps=5")
    straight = tmp_path / "straight"
    assert _run_train(cfg, straight, *sets).returncode == 0

    killed = tmp_path / "killed"
    proc = _run_train(cfg, killed, *sets, wait=False)
    ckpts = killed / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert steps and steps[-1] < 40, f"the run finished before the kill ({steps}); the test proves nothing"
    assert not (killed / "hf").exists()

    res = _run_train(cfg, killed, *sets)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {ckpts} at step {steps[-1]}" in res.stderr
    a, b = _metrics(straight), _metrics(killed)
    assert sorted(a) == sorted(b) == list(range(1, 41))
    for step in a:
        assert (a[step]["epoch"], a[step]["data_step"], a[step]["batch_checksum"]) == (
            b[step]["epoch"], b[step]["data_step"], b[step]["batch_checksum"]), step
    _assert_params_close(_params(straight), _params(killed), 0)


def test_sigterm_saves_a_checkpoint_and_training_resumes(tmp_path):
    cfg = _config_file(tmp_path)
    sets = ("train.max_steps=30", "checkpoint.every_steps=50")
    out = tmp_path / "run"
    proc = _run_train(cfg, out, *sets, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: saved a checkpoint at step" in err
    saved = int(err.split("SIGTERM: saved a checkpoint at step ")[1].split()[0])
    assert 2 <= saved < 30
    assert saved in [int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()]
    res = _run_train(cfg, out, *sets)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"at step {saved}" in res.stderr
    assert sorted(_metrics(out)) == list(range(1, 31))


def test_eight_devices_2x2x2_equal_one_device(tmp_path):
    """Same losses and parameters on a (data, fsdp, tensor) = 2 x 2 x 2 mesh
    of 8 simulated CPU devices as on one device."""
    cfg = _config_file(tmp_path)
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    one, eight = tmp_path / "one", tmp_path / "eight"
    r1 = _run_train(cfg, one, "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", env=env)
    r8 = _run_train(cfg, eight, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", env=env)
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert r8.returncode == 0, r8.stderr[-3000:]
    assert "8 devices" in r8.stderr and "mesh data=2 fsdp=2 tensor=2" in r8.stderr
    a, b = _metrics(one), _metrics(eight)
    for step in a:
        np.testing.assert_allclose(a[step]["loss"], b[step]["loss"], rtol=1e-5)
    _assert_params_close(_params(one), _params(eight), 1e-5)


# ---------------------------------------------------------------- the step itself


def _step_setup(batch_rows=4, seq=32):
    cfg = ModelConfig(family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)
    params = init_params(cfg, jax.random.key(0), std=0.1)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, (batch_rows, seq)).astype(np.int32)
    lm = np.zeros((batch_rows, seq), np.int32)
    lm[:, 20:26] = 1
    lm[1] = 0  # an example without loss tokens: contributes nothing, never NaN
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": lm}
    opt, _ = make_optimizer(params, lr=1e-2, total_steps=10, warmup_ratio=0.0)
    return cfg, params, batch, opt


def test_a_compiling_step_is_shown_and_left_out_of_the_eta():
    import io

    from tqdm import tqdm

    from focusft_jax import job

    bar = tqdm(total=10, file=io.StringIO(), desc="train", mininterval=0)
    compiled: set = set()
    start = bar.last_print_t
    with job.compiling(bar, (256, 64), compiled) as timing:
        assert bar.desc.startswith("train (compiling for 256 tokens")
        time.sleep(0.3)
    assert timing.seconds >= 0.3 and bar.desc == "train" and compiled == {(256, 64)}
    assert bar.last_print_t - start == pytest.approx(timing.seconds)  # the rate's interval leaves it out
    with job.compiling(bar, (256, 64), compiled) as again:  # a known shape: nothing changes
        assert bar.desc == "train"
    assert again.seconds == 0.0 and bar.last_print_t - start == pytest.approx(timing.seconds)
    bar.close()


def test_accumulation_equals_one_big_micro_batch():
    import optax

    cfg, params, batch, _ = _step_setup()
    opt = optax.sgd(0.1)  # parameters then differ exactly by the gradients' difference
    fcfg = FocusConfig(rank=4, alpha=8)
    state = init_state(params, opt)
    one = {k: v[None] for k, v in batch.items()}
    two = {k: v.reshape(2, 2, -1) for k, v in batch.items()}
    # Micro-batch a draws its fast weights from fold_in(rng, a), so the two
    # splits draw differently: compare exactly on the SFT path (no draws) ...
    sft = FocusConfig(num_inner_steps=0)
    s1, m1 = train_step(state, one, jax.random.key(1), cfg, sft, opt)
    s2, m2 = train_step(state, two, jax.random.key(1), cfg, sft, opt)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    _assert_params_close(s1.params, s2.params, 1e-6)
    assert float(m1["examples"]) == 3.0
    # ... and check FocuSFT's accumulated step is finite and counts examples.
    s3, m3 = train_step(state, two, jax.random.key(1), cfg, fcfg, opt)
    assert np.isfinite(float(m3["loss"])) and float(m3["examples"]) == 3.0


def test_non_finite_step_is_skipped_and_counted():
    cfg, params, batch, opt = _step_setup()
    bad = jax.tree.map(lambda x: x, params)
    token = int(batch["input_ids"][0, 3])
    bad["embed_tokens"]["embedding"] = bad["embed_tokens"]["embedding"].at[token].set(jnp.inf)
    state = init_state(bad, opt)
    new, metrics = train_step(state, {k: v[None] for k, v in batch.items()}, jax.random.key(1), cfg,
                              FocusConfig(rank=4, alpha=8), opt)
    assert int(new.skipped) == 1 and int(metrics["step_skipped"]) == 1 and int(new.step) == 1
    # the inner losses are the finite examples' (examples 2, 3), not pulled to 0 or NaN by example 0
    assert np.all(np.isfinite(np.asarray(metrics["inner_losses"]))) and np.all(np.asarray(metrics["inner_losses"]) > 1)
    for x, y in zip(jax.tree.leaves((state.params, state.opt_state)), jax.tree.leaves((new.params, new.opt_state))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------- bad input


def test_bad_data_row_stops_with_file_and_row(tmp_path):
    from focusft_jax.tokenizer import build_chat_tokenizer

    tok = tmp_path / "tok"
    build_chat_tokenizer(["hello there, where is Mary?"] * 20, tok, vocab_size=300)
    data = tmp_path / "train.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    cfg = _config_file(tmp_path)
    sets = (f"data.train=[{data}]", "data.builtin=null", f"model.tokenizer={tok}")
    res = _run_train(cfg, tmp_path / "run", *sets)
    assert res.returncode == 2
    assert f"{data} line 2" in res.stderr and "robot" in res.stderr
    res = _run_train(cfg, tmp_path / "run2", *sets, f"model.tokenizer={tmp_path / 'missing_tok'}")
    assert res.returncode == 2
    assert "model.tokenizer" in res.stderr and "missing_tok" in res.stderr


def test_config_error_stops_before_any_compute(tmp_path):
    res = _run_train(_config_file(tmp_path), tmp_path / "run", "optim.lr=-1")
    assert res.returncode == 2
    assert "optim.lr: must be > 0" in res.stderr
    assert not (tmp_path / "run").exists()


def test_shipped_tiny_config_is_valid():
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    assert cfg.model.init is not None and cfg.data.builtin is not None


def test_missing_inner_loss_is_logged_as_null(tmp_path):
    from focusft_jax import job
    from focusft_jax.metrics_log import MetricsLogger

    logger = MetricsLogger(tmp_path, tensorboard=False)
    row = logger.log(1, {"loss": np.float32(2.5), "inner_losses": np.array([np.nan, 1.5], np.float32)})
    logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["inner_losses"] == [None, 1.5]
    assert job.postfix(row)["inner"] == "-/1.500"  # missing, not a loss of 0


def test_the_progress_bar_names_the_base_loss():
    from focusft_jax import job

    shown = job.postfix({"loss": 0.5, "base_loss": 1.25, "inner_losses": [1.25, 0.75], "tokens_per_s": 1000.4})
    assert shown == {"loss": "0.5000", "base_loss": "1.2500", "inner": "1.250/0.750", "tok/s": "1000"}


def test_skipped_rows_are_written_and_counted(tmp_path):
    from focusft_jax import job
    from focusft_jax.data import DataError, DataStats
    from focusft_jax.data.loader import skipped_row
    from focusft_jax.metrics_log import MetricsLogger

    stats = DataStats(rows=5, examples=3, skipped={"unknown_role": 1, "too_long": 1})
    stats.skipped_rows = [skipped_row(DataError("d/a b.jsonl line 2", "role 'robot'", "unknown_role")),
                          skipped_row(DataError("d/c.parquet row 4", "too long", "too_long"))]
    path = job.write_skipped_rows(tmp_path, stats)
    assert [json.loads(l) for l in path.read_text().splitlines()] == [
        {"file": "d/a b.jsonl", "line": 2, "reason": "unknown_role", "problem": "role 'robot'"},
        {"file": "d/c.parquet", "row": 4, "reason": "too_long", "problem": "too long"}]
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(1, {"loss": 1.0, **job.data_metrics(stats)})
    logger.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["data_skipped_rows"] == 2 and row["data_skipped_by_reason"] == {"unknown_role": 1, "too_long": 1}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_ctrl_c_ask_the_loop_to_save_then_stop(sig):
    """The handlers train() installs (the SIGTERM end-to-end test above shows
    the loop saving, then exiting, once stop["signal"] is set)."""
    from focusft_jax import train

    stop = {"signal": None}
    previous = train.install_stop_handlers(stop)
    try:
        os.kill(os.getpid(), sig)
        assert stop["signal"] == sig
        if sig == signal.SIGINT:  # a second Ctrl-C stops at once, unsaved
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), sig)
    finally:
        train.restore_handlers(previous)
    assert signal.getsignal(sig) is previous[sig]


def test_every_step_skipped_stops_with_exit_3_and_the_last_good_state_saved(tmp_path):
    """lr 1e30: step 1 is finite (and blows the weights up), every later step
    is skipped; max_consecutive_skipped 2 stops the run, saves, exits 3."""
    out = tmp_path / "run"
    res = _run_train(_config_file(tmp_path), out, "optim.lr=1e30", "optim.warmup_ratio=0", "method.num_inner_steps=0",
                     "train.batch_size=4", "train.max_steps=20", "train.max_consecutive_skipped=2",
                     "checkpoint.every_steps=100", "logging.tensorboard=false")
    assert res.returncode == 3, res.stderr[-3000:]
    err = res.stderr
    assert "error: training diverged: 2 optimizer steps in a row (steps 2-3) were skipped" in err
    assert "optim.lr=1e+30" in err and "at step 4" in err and not (out / "hf").exists()
    assert [int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()] == [4]
    rows = _metrics(out)
    assert [rows[s]["step_skipped"] for s in (1, 2, 3)] == [0, 1, 1] and max(rows) == 4


class _FakeWandb:
    """The part of the wandb API the trainer calls, recording the calls."""

    def __init__(self):
        self.inits, self.runs = [], []
        self.util = type("util", (), {"generate_id": staticmethod(lambda: f"run{len(self.inits)}")})

    def init(self, **kw):
        self.inits.append(kw)
        run = type("Run", (), {})()
        run.logged, run.finished = [], False
        run.log = lambda scalars, step: run.logged.append((step, scalars))
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run


def test_wandb_gets_the_dashboard_scalars_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    from focusft_jax.metrics_log import MetricsLogger, start_wandb

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = start_wandb(tmp_path, "proj", "", {"optim": {"lr": 0.1}})
    logger = MetricsLogger(tmp_path, tensorboard=False, wandb_run=run)
    logger.log(3, {"loss": np.float32(2.0), "inner_losses": np.array([3.0, 2.5]), "batch_checksum": "ab12", "epoch": 0})
    logger.close()
    assert run.logged == [(3, {"train/loss": 2.0, "train/inner_loss/0": 3.0, "train/inner_loss/1": 2.5})]
    assert run.finished
    first = fake.inits[0]
    assert (first["project"], first["name"], first["resume"], first["config"]) == (
        "proj", tmp_path.name, "allow", {"optim": {"lr": 0.1}})
    start_wandb(tmp_path, "proj", "named", {})  # the resumed training: the same run id
    assert fake.inits[1]["id"] == first["id"] and fake.inits[1]["name"] == "named"


def test_wandb_asked_for_without_the_package_is_one_error_line_before_anything(tmp_path, monkeypatch, capsys):
    from focusft_jax import train

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    out = tmp_path / "run"
    code = train.main(["--config", str(_config_file(tmp_path)), f"train.output_dir={out}", "logging.wandb=true"])
    err = capsys.readouterr().err
    assert code == 2 and "error: logging.wandb: true needs the wandb package" in err and "pip install wandb" in err
    assert not out.exists()  # stopped before the run directory was made


def test_a_training_logs_its_curves_to_wandb_when_asked(tmp_path, monkeypatch, capsys):
    from focusft_jax import train

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    code = train.main(["--config", str(_config_file(tmp_path)), f"train.output_dir={out}", "logging.wandb=true",
                       "logging.wandb_project=p", "train.max_steps=2", "logging.tensorboard=false",
                       "checkpoint.every_steps=100"])
    assert code == 0, capsys.readouterr().err[-2000:]
    (run,) = fake.runs
    assert fake.inits[0]["config"]["method"]["num_inner_steps"] == 2 and fake.inits[0]["project"] == "p"
    rows = _metrics(out)
    assert [step for step, _ in run.logged] == [1, 2] and run.finished
    assert run.logged[1][1]["train/base_loss"] == pytest.approx(rows[2]["base_loss"])
    assert (out / "wandb_run_id").read_text().strip() == fake.inits[0]["id"]
