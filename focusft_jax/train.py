"""Fine-tune a Llama/Qwen-family model with FocuSFT (or an SFT baseline).

    focusft-train --config tiny [optim.lr=2e-5 ...]                        (installed)
    python train.py --config configs/tiny.yaml [--set optim.lr=2e-5 ...]   (a clone)
    python train.py --help-config                                           (every config key)

Both run `main` of this module (train.py at the top of a clone only calls it).

Reads the config, builds the tokenizer, model, data, mesh and optimizer,
resumes from the newest checkpoint in the output directory if there is one,
trains, and leaves:

    OUTPUT_DIR/config.yaml      the resolved config (written after the directory is checked)
    OUTPUT_DIR/config_history.jsonl  config changes accepted on resuming (train.allow_config_change)
    OUTPUT_DIR/checkpoints/     orbax training checkpoints (params, optimizer, data position),
                                each step with focusft_checksums.json (verified on resuming)
    OUTPUT_DIR/hf/              the Hugging Face export (base model + tokenizer, no fast weights),
                                with focusft.json: how it was trained (focusft_jax/training_record.py)
    OUTPUT_DIR/metrics.jsonl    one line per logged step (a run's first also has the data counts:
                                data_rows, data_examples, data_skipped_rows, data_skipped_by_reason)
    OUTPUT_DIR/skipped_rows.jsonl  the training rows skipped (data.on_bad_row: skip): file, line | row, reason
    OUTPUT_DIR/tensorboard/     TensorBoard event files
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np

from focusft_jax import job, run_dir
from focusft_jax.checkpoint import Checkpointer, abstract_like
from focusft_jax.config import (ConfigError, config_reference_markdown, config_reference_text, dump_config,
                                load_config, to_dict)
from focusft_jax.data import ChatLoader, DataError, check_sources
from focusft_jax.diagnostics import attention_diagnostics
from focusft_jax.errors import TrainingDiverged
from focusft_jax.hf import CheckpointError, recover_export, save_hf
from focusft_jax.metrics_log import MetricsLogger, require_wandb, start_wandb
from focusft_jax.model import logical_axes
from focusft_jax.optim import make_optimizer
from focusft_jax.sharding import (
    make_mesh,
    maybe_initialize_distributed,
    param_shardings,
    place,
    shard_batch,
    sync_processes,
)
from focusft_jax.trainer import init_state_sharded, train_step
from focusft_jax.training_record import training_record


def diverged_message(cfg, skipped_run: int, step: int, ckpt_dir) -> str:
    """The error of a run stopped by train.max_consecutive_skipped: `skipped_run`
    steps in a row, up to step - 1, were skipped; the checkpoint of `step`
    holds the last good parameters (a skipped step leaves them unchanged)."""
    first, last = step - skipped_run, step - 1
    return (
        f"training diverged: {skipped_run} optimizer steps in a row (steps {first}-{last}) were skipped for a "
        f"non-finite loss or gradient (train.max_consecutive_skipped: {cfg.train.max_consecutive_skipped}). "
        f"Likely cause: the learning rate (optim.lr={cfg.optim.lr}) is too high, or the data or model gives NaN/inf. "
        f"Saved the last good state (skipped steps leave the parameters unchanged) at step {step} in {ckpt_dir}; "
        f"lower optim.lr and train again in a new train.output_dir, or resume here with "
        f"--set 'train.allow_config_change=[optim.lr]'; train.max_consecutive_skipped: 0 never stops"
    )


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def install_stop_handlers(stop: dict) -> dict:
    """SIGTERM and SIGINT (Ctrl-C) set stop["signal"]; the loop then saves a
    checkpoint after the current step and exits. A second Ctrl-C stops at
    once, without saving (KeyboardInterrupt). Returns the previous handlers,
    for `restore_handlers`."""

    def handler(signum, frame):
        if signum == signal.SIGINT and stop.get("signal") == signal.SIGINT:
            raise KeyboardInterrupt
        stop["signal"] = signum
        if signum == signal.SIGINT:
            print("\nCtrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again: stop without saving)",
                  file=sys.stderr, flush=True)

    return {s: signal.signal(s, handler) for s in STOP_SIGNALS}


def restore_handlers(previous: dict) -> None:
    for s, h in previous.items():
        signal.signal(s, h)


def train(cfg, log=print) -> dict:
    """Runs the training job of `cfg` (a config.Config). Returns a summary."""
    out = Path(cfg.train.output_dir)
    maybe_initialize_distributed(cfg.mesh.distributed)
    # The mesh and the output directory are checked before anything is
    # written or computed: a mesh the devices cannot hold, or an output_dir
    # that is a file or not writable, is one error line, not a traceback.
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    main_process = jax.process_index() == 0
    if cfg.logging.wandb and main_process:  # only process 0 logs
        require_wandb()
    check_sources(cfg.data.train)  # a missing file or package: one error line before any work
    run_dir.create(out)
    if main_process:  # an export killed mid-swap: put the previous good one back under hf/
        recover_export(out / "hf")
    # Before anything is written: a resume must match the directory's config,
    # a fresh start must not land on a previous run (focusft_jax/run_dir.py).
    run_dir.prepare(cfg, out, log, main_process=main_process)
    sync_processes("focusft_run_dir")  # the other hosts wait for train.overwrite's cleaning
    # Only process 0 writes the shared files (the config, the generated data,
    # a built tokenizer); the others read them after it has.
    if main_process:
        dump_config(cfg, out / "config.yaml")
        job.build_tokenizer(cfg, out, log, job.builtin_data(cfg, out))
    sync_processes("focusft_shared_inputs")
    builtin = job.builtin_data_path(cfg, out)  # one file, for the tokenizer and the dataset
    tokenizer, tokenizer_dir = job.build_tokenizer(cfg, out, log, builtin)
    dataset = job.build_dataset(cfg, tokenizer, log, builtin)
    if main_process:
        skipped_file = job.write_skipped_rows(out, dataset.stats)
        if dataset.stats.skipped_total:
            log(f"data: the {dataset.stats.skipped_total} skipped rows are listed in {skipped_file}")
    model_cfg, params, hf_config = job.build_model(cfg, tokenizer, mesh)
    fcfg = cfg.method

    log(f"{jax.device_count()} devices ({jax.default_backend()}), {jax.process_count()} process(es); "
        f"mesh data={mesh.shape['data']} fsdp={mesh.shape['fsdp']} tensor={mesh.shape['tensor']}")
    accum = cfg.train.batch_size // cfg.train.micro_batch_size
    host_rows = cfg.train.batch_size // jax.process_count()
    if cfg.train.micro_batch_size % jax.process_count():  # each micro-batch is split over the hosts
        raise ConfigError(
            f"train.micro_batch_size ({cfg.train.micro_batch_size}) must divide over {jax.process_count()} hosts"
        )
    loader_kw = dict(
        batch_size=host_rows,
        packing=cfg.data.packing,
        bucket_size=cfg.data.bucket_size,
        pad_to=cfg.data.pad_to,
        seed=cfg.data.shuffle_seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        micro_batches=accum,  # each micro-batch holds the same rows whatever the host count
    )
    first_epoch = ChatLoader(dataset, **loader_kw)
    steps_per_epoch = first_epoch.steps_in_epoch(0)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"train.batch_size ({cfg.train.batch_size}) is larger than the dataset ({len(dataset)} examples): "
            "lower it or add data"
        )
    total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    shapes = first_epoch.batch_shapes(0)
    listed = ", ".join(f"{n}x{p}" for n, p in shapes[:8]) + (", ..." if len(shapes) > 8 else "")
    log(f"data: the first epoch's batches have {len(shapes)} shape(s) (tokens x loss positions: {listed}); "
        "the step compiles once for each" + ("" if len(shapes) == 1 else " (data.pad_to=max: one)"))
    optimizer, schedule = make_optimizer(
        params,
        lr=cfg.optim.lr,
        total_steps=total_steps,
        warmup_ratio=cfg.optim.warmup_ratio,
        min_lr_ratio=cfg.optim.min_lr_ratio,
        weight_decay=cfg.optim.weight_decay,
        b1=cfg.optim.b1,
        b2=cfg.optim.b2,
        eps=cfg.optim.eps,
        grad_clip=cfg.optim.grad_clip,
    )
    params = place(params, param_shardings(params, logical_axes(model_cfg), mesh))
    state = init_state_sharded(params, optimizer)  # AdamW's moments sharded as their params

    ckpt = Checkpointer(out / "checkpoints", keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    loader_state = None
    # The newest step whose checksums verify; a damaged one is skipped with a
    # warning, none verifying is a CheckpointError (focusft_jax/checkpoint.py).
    restored = ckpt.restore_latest(abstract_like(state), log) if cfg.checkpoint.resume else None
    if restored is not None:
        latest, state, loader_state = restored
        log(f"resumed from {out / 'checkpoints'} at step {latest}")
    loader = ChatLoader(dataset, state=loader_state, **loader_kw)

    # The state leaves the step with the shardings it came in with: left to
    # XLA, equivalent but unequal specs (P('tensor', 'fsdp') in, P(None,
    # 'fsdp') out on a size-1 tensor axis) would compile the step twice.
    state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
    step_fn = jax.jit(
        train_step, static_argnums=(3, 4, 5), donate_argnums=(0,), out_shardings=(state_shardings, None)
    )
    wandb_run = None
    if cfg.logging.wandb and main_process:
        wandb_run = start_wandb(out, cfg.logging.wandb_project, cfg.logging.wandb_name, to_dict(cfg))
    logger = MetricsLogger(out, tensorboard=cfg.logging.tensorboard, enabled=main_process, wandb_run=wandb_run)
    stop = {"signal": None}
    previous = install_stop_handlers(stop)
    key = jax.random.key(cfg.train.seed)
    # The host keeps the step counter: reading state.step would wait for the
    # device, and the next batch is collated while the device computes.
    step = start_step = int(state.step)
    first_loss = last_loss = None
    data_counts = job.data_metrics(dataset.stats)  # in the first row this run logs
    progress = job.progress_bar(total_steps, start_step, enabled=cfg.logging.progress and main_process)
    # Steps skipped in a row (train.max_consecutive_skipped), read one step
    # late: the flag of the step before, while this one computes.
    skip_limit, skipped_run, previous_flag, diverged = cfg.train.max_consecutive_skipped, 0, None, False
    t_last, tokens_since = time.perf_counter(), 0
    compiled: set = set()  # the batch shapes the step has been compiled for
    upcoming = next(loader) if step < total_steps else None
    try:
        while step < total_steps:
            batch = upcoming
            # Every array, the [B, S] ones and the loss keys [B, P], is split
            # into `accum` micro-batches along its rows, then sharded over them;
            # P is a shape, so step_fn retraces per (S, P) by itself.
            arrays = {k: v.reshape(accum, -1, v.shape[-1]) for k, v in batch.arrays.items()}
            arrays = shard_batch(arrays, mesh, batch_axis=1)
            # A new batch shape compiles the step inside this call: the bar
            # says so, and neither its ETA nor tokens_per_s counts that time.
            with job.compiling(progress, (batch.seq_len, batch.loss_positions), compiled) as compile_timing:
                state, metrics = step_fn(state, arrays, jax.random.fold_in(key, step), model_cfg, fcfg, optimizer)
            t_last += compile_timing.seconds
            if skip_limit:
                if previous_flag is not None:
                    skipped_run = skipped_run + 1 if int(previous_flag) else 0
                previous_flag = metrics["step_skipped"]
                diverged = skipped_run >= skip_limit
            # The position a checkpoint after this step resumes from: the
            # batch after `batch`, taken before that batch is prefetched.
            data_state = loader.state_dict()
            upcoming = next(loader) if step + 1 < total_steps else None
            tokens_since += int(np.sum(batch.arrays["attention_mask"])) * jax.process_count()
            if (step + 1) % cfg.logging.every_steps == 0 or step + 1 == total_steps:
                metrics = {k: np.asarray(v) for k, v in metrics.items()}  # waits for this step
                now = time.perf_counter()
                metrics.update(lr=float(schedule(step)), tokens_per_s=tokens_since / (now - t_last),
                               skipped_steps=int(state.skipped), epoch=batch.epoch, data_step=batch.step,
                               batch_checksum=batch.checksum)
                t_last, tokens_since = now, 0
                if cfg.logging.diagnostics_every and (step + 1) % cfg.logging.diagnostics_every == 0:
                    first = {k: v[0] for k, v in arrays.items()}
                    diag = jax.jit(attention_diagnostics, static_argnums=(2, 3))(
                        state.params, first, model_cfg, fcfg.attention
                    )
                    metrics.update({f"attn_{k}": v for k, v in diag.items()})
                # The base model's own loss on the batch: the inner loop's first
                # loss (phi_0 has B = 0), or the loss itself without an inner loop.
                metrics["base_loss"] = metrics["inner_losses"][0] if fcfg.num_inner_steps else metrics["loss"]
                if data_counts:
                    metrics.update(data_counts)
                    data_counts = None
                row = logger.log(step + 1, metrics)
                last_loss = (row["loss"], row["base_loss"])
                first_loss = last_loss if first_loss is None else first_loss
                progress.set_postfix(job.postfix(row), refresh=False)
            progress.update(1)
            step += 1
            ckpt.poll()  # checksums of an async save as soon as it is finalized
            if step % cfg.checkpoint.every_steps == 0 or step == total_steps or stop["signal"] or diverged:
                ckpt.save(step, state, data_state, force=True)
                if cfg.checkpoint.export_hf_at_save:  # every process: the export gathers each tensor
                    ckpt.wait()
                    save_hf(out / "hf", model_cfg, state.params, hf_config, tokenizer_dir,
                            training_record=training_record(cfg, step, model_cfg.max_position_embeddings))
            if stop["signal"] or diverged:
                break
    finally:
        restore_handlers(previous)
    ckpt.close()
    progress.close()
    logger.close()
    if stop["signal"]:
        log(f"{signal.Signals(stop['signal']).name}: saved a checkpoint at step {int(state.step)} in "
            f"{out / 'checkpoints'}; run the same command again to resume")
        return {"preempted": True, "step": int(state.step), "output_dir": str(out)}
    if diverged:
        raise TrainingDiverged(diverged_message(cfg, skipped_run, step, out / "checkpoints"))
    # Every process: the export gathers each tensor over them; process 0 writes.
    save_hf(out / "hf", model_cfg, state.params, hf_config, tokenizer_dir,
            training_record=training_record(cfg, step, model_cfg.max_position_embeddings))
    summary = {
        "step": int(state.step),
        "first_logged_loss": first_loss and first_loss[0],
        "final_loss": last_loss and last_loss[0],
        "first_base_loss": first_loss and first_loss[1],
        "final_base_loss": last_loss and last_loss[1],
        "skipped_steps": int(state.skipped),
        "data": dataset.stats.summary(),
        "output_dir": str(out),
        "config": str(out / "config.yaml"),
        "checkpoints": str(out / "checkpoints"),
        "hf_export": str(out / "hf"),
        "metrics": str(out / "metrics.jsonl"),
        "tensorboard": str(out / "tensorboard"),
        "evaluate": job.evaluation_of(cfg, out / "hf", out),
    }
    return summary


# Options of main that take a value: a KEY=VALUE after one is that value.
_VALUE_OPTIONS = ("--config", "--set")


def overrides_as_options(argv: list[str]) -> list[str]:
    """argv with each bare KEY=VALUE (MaxText / tunix style) as `--set
    KEY=VALUE`, so that both spellings apply in the order given."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in _VALUE_OPTIONS and i + 1 < len(argv):
            out += [arg, argv[i + 1]]
            i += 2
            continue
        out += ["--set", arg] if "=" in arg and not arg.startswith("-") else [arg]
        i += 1
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="FocuSFT fine-tuning (see README.md).",
        epilog="Overrides apply in the order given; `--help-config` lists every key.")
    ap.add_argument("--config", help="YAML config: a path, or a shipped config's name (e.g. tiny)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set optim.lr=2e-5 (repeatable)")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="the same as --set KEY=VALUE")
    ap.add_argument("--help-config", nargs="?", const="text", choices=("text", "markdown"),
                    help="list every config key with its type, default and meaning, and exit "
                         "(markdown: README.md's table)")
    args = ap.parse_args(overrides_as_options(list(sys.argv[1:] if argv is None else argv)))
    if args.help_config:
        print(config_reference_markdown() if args.help_config == "markdown" else config_reference_text(), end="")
        return 0
    if args.overrides:  # every KEY=VALUE became --set: these have no '='
        ap.error(f"argument {args.overrides[0]!r}: expected a config override KEY=VALUE, e.g. optim.lr=2e-5")
    if args.config is None:
        ap.error("the following arguments are required: --config")
    try:
        cfg = load_config(args.config, args.set)
        summary = train(cfg, log=lambda m: print(m, file=sys.stderr))
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:  # the run started, then could not go on
        print(f"error: {e}", file=sys.stderr)
        return 3
    if jax.process_index() == 0:
        if not summary.get("preempted"):
            print(job.final_summary(summary), file=sys.stderr)
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
