"""Shared pieces of the BABILong and RULER harnesses.

* the official benchmark strings (`load_benchmark`): `eval/benchmarks/*.json`,
  copied byte for byte from the official repositories (their `source` field
  names the commit and the Apache-2.0 license);
* the run manifest every result carries (`make_manifest`, EVAL.md "Every
  result records");
* the generation runner (`run_generation`): prompts sorted by length, batched,
  a progress bar on stderr, outputs back in the caller's order. Generation
  itself is one function `generate_fn(prompts: list[str]) -> list[str]`: it
  gets fully formatted prompt strings (chat template already applied) and
  returns the continuations as text;
* the model hook (`make_generate_fn`), built lazily from `focusft_jax`,
  with the prefill's attention implementation chosen by prompt length
  (`prefill_attention_impl`: blockwise, memory-efficient, for long prompts);
* tokenizer helpers (`load_tokenizer`, which refuses a directory without
  tokenizer files, `use_chat_template`, `chat_wrap`, `count_tokens`);
* results files: `write_results` (results.json + results.md), `markdown_table`,
  `write_heatmap` (PNG, red-yellow-green 0..100).
"""
from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

GenerateFn = Callable[[list[str]], list[str]]

BENCHMARK_DIR = Path(__file__).resolve().parent / "benchmarks"
CHAT_MODES = ("auto", "on", "off")
PREFILL_ATTENTIONS = ("causal", "glm_bidir")
ATTENTION_IMPLS = ("auto", "dense", "blockwise")
# --attention-impl auto: the prompt forward (prefill) uses blockwise
# (memory-efficient) attention from this many padded prompt tokens on, dense
# below. Dense attention builds float32 scores of [heads, P, P + new tokens]
# per layer: 0.5 GB per 28 heads at 2K, 30 GB at 16K, 2 TB at 128K.
BLOCKWISE_FROM_TOKENS = 2048


class EvalError(ValueError):
    """A usage or data problem; the message says what and where."""


# ---------------------------------------------------------------- benchmark strings


@functools.lru_cache(maxsize=None)
def _load_benchmark_text(name: str) -> str:
    path = BENCHMARK_DIR / f"{name}.json"
    if not path.exists():
        raise EvalError(f"{path}: benchmark strings missing (expected eval/benchmarks/{name}.json)")
    return path.read_text(encoding="utf-8")


def load_benchmark(name: str) -> dict:
    """The official strings of `name` ("babilong" or "ruler") as a fresh dict."""
    return json.loads(_load_benchmark_text(name))


# ---------------------------------------------------------------- files


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{lineno}: not valid JSON ({e})") from None
    return rows


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- manifest


def package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """Commit of the focusft-jax checkout running the evaluation (None outside git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


MANIFEST_KEYS = (
    "checkpoint",
    "benchmark",
    "tasks",
    "lengths",
    "samples",
    "data_source",
    "tokenizer",
    "chat_template",
    "prompt_parts",
    "decoding",
    "seed",
    "wordlist_version",
    "prefill_attention",
)


def make_manifest(**fields: Any) -> dict:
    """The record EVAL.md asks of every result. Every key of MANIFEST_KEYS
    must be given (None where it does not apply, e.g. no word list for
    BABILong); extra keys are kept. Adds the benchmark strings' source,
    software versions and a UTC timestamp."""
    missing = [k for k in MANIFEST_KEYS if k not in fields]
    if missing:
        raise EvalError(f"manifest is missing {missing}")
    m = {k: fields.pop(k) for k in MANIFEST_KEYS}
    m.update(fields)
    m["created_utc"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    m["software"] = {
        "python": platform.python_version(),
        "focusft_jax_commit": git_commit(),
        **{p: package_version(p) for p in ("transformers", "tokenizers", "jax", "numpy", "wonderwords")},
    }
    return m


# ---------------------------------------------------------------- generation runner


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of at most `batch_size`, longest first
    (similar lengths share a batch, so little padding; the longest batch runs
    first, so an out-of-memory error shows at once). Ties keep input order."""
    if batch_size < 1:
        raise EvalError(f"batch size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def run_generation(
    prompts: Sequence[str],
    generate_fn: GenerateFn,
    *,
    batch_size: int = 1,
    lengths: Sequence[int] | None = None,
    desc: str = "generating",
    progress: bool = True,
) -> list[str]:
    """Runs `generate_fn` over `prompts` in length-sorted batches (lengths:
    e.g. token counts; default the character counts) with a tqdm bar on
    stderr. Returns one continuation per prompt, in the order of `prompts`."""
    prompts = list(prompts)
    if lengths is None:
        lengths = [len(p) for p in prompts]
    if len(lengths) != len(prompts):
        raise EvalError(f"{len(lengths)} lengths for {len(prompts)} prompts")
    outputs: list[str | None] = [None] * len(prompts)
    bar = None
    if progress and prompts:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc=desc, unit="sample", file=sys.stderr, dynamic_ncols=True)
    try:
        for batch in length_sorted_batches(lengths, batch_size):
            got = generate_fn([prompts[i] for i in batch])
            got = list(got)
            if len(got) != len(batch):
                raise EvalError(f"generate_fn returned {len(got)} outputs for {len(batch)} prompts")
            for i, text in zip(batch, got):
                if not isinstance(text, str):
                    raise EvalError(f"generate_fn must return strings, got {type(text).__name__}")
                outputs[i] = text
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return outputs  # type: ignore[return-value]


# ---------------------------------------------------------------- tokenizers and chat templates


# Files that hold a tokenizer's vocabulary (fast tokenizer.json, sentencepiece
# models, BPE / WordPiece vocabularies). A directory with none of them has no
# tokenizer: `transformers` (5.x) would then silently build an EMPTY tokenizer
# from config.json, which encodes every text to no ids.
TOKENIZER_VOCAB_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
)
TOKENIZER_HINT = (
    "A model directory needs its tokenizer files: tokenizer.json (or a vocabulary file: "
    + ", ".join(TOKENIZER_VOCAB_FILES[1:])
    + ") and tokenizer_config.json, e.g. written by focusft_jax.tokenizer.build_chat_tokenizer, "
    "by focusft_jax.hf.save_hf(..., tokenizer_dir=...) or copied from the base model."
)


def missing_tokenizer(path: str | os.PathLike) -> str | None:
    """Why the local directory `path` holds no tokenizer (a message naming the
    directory and the expected files), or None when it has a vocabulary file.
    Only local directories are checked (a hub id is checked after loading)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return None
    if any((p / f).is_file() for f in TOKENIZER_VOCAB_FILES):
        return None
    present = sorted(f.name for f in p.iterdir() if f.is_file())
    shown = ", ".join(present[:8]) + (", ..." if len(present) > 8 else "") if present else "nothing"
    return (
        f"{p}: no tokenizer (none of {', '.join(TOKENIZER_VOCAB_FILES)} found; the directory has {shown}). "
        + TOKENIZER_HINT
    )


def load_tokenizer(path_or_id: str | os.PathLike, error: type[Exception] | None = None):
    """A `transformers` tokenizer from a local directory, or from a hub id
    (only the tokenizer files are fetched).

    Raises `error` (default EvalError) with a message naming the directory and
    the expected files when the directory has no tokenizer files, when
    loading fails, or when the loaded tokenizer is empty (transformers builds
    one from config.json alone instead of failing)."""
    from transformers import AutoTokenizer

    error = error or EvalError
    why = missing_tokenizer(path_or_id)
    if why:
        raise error(why)
    p = Path(path_or_id).expanduser()
    where = str(p) if p.is_dir() else str(path_or_id)
    try:
        tok = AutoTokenizer.from_pretrained(where)
    except Exception as e:
        raise error(f"{where}: cannot load a tokenizer ({type(e).__name__}: {e}). {TOKENIZER_HINT}") from None
    if len(tok) <= 1:
        raise error(f"{where}: no tokenizer (the loaded tokenizer has an empty vocabulary). {TOKENIZER_HINT}")
    return tok


def use_chat_template(tokenizer, mode: str) -> bool:
    """auto: on when the tokenizer has a chat template (instruct models)."""
    if mode not in CHAT_MODES:
        raise EvalError(f"--chat-template must be one of {CHAT_MODES}, got {mode!r}")
    has = bool(getattr(tokenizer, "chat_template", None)) if tokenizer is not None else False
    if mode == "auto":
        return has
    if mode == "on" and not has:
        raise EvalError("--chat-template on, but the tokenizer has no chat template")
    return mode == "on"


def chat_wrap(tokenizer, text: str) -> str:
    """`text` as one user message with the generation prompt added, as a string."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def count_tokens(tokenizer, text: str, *, add_special_tokens: bool) -> int:
    return len(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def tokenizer_name(tokenizer) -> str | None:
    if tokenizer is None:
        return None
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def model_max_context(checkpoint: str | os.PathLike) -> int | None:
    """max_position_embeddings of a model directory's config.json (None when absent)."""
    p = Path(checkpoint).expanduser()
    if not p.is_dir():
        try:
            from focusft_jax.hf import resolve_model_dir

            p = resolve_model_dir(checkpoint)
        except Exception:
            return None
    cfg = p / "config.json"
    if not cfg.exists():
        return None
    hf = json.loads(cfg.read_text())
    text_cfg = hf.get("text_config", hf)
    n = text_cfg.get("max_position_embeddings")
    return int(n) if n else None


# ---------------------------------------------------------------- the model hook

_MODEL_CACHE: dict[str, Any] = {}


def prefill_attention_impl(padded_prompt_tokens: int, attention_impl: str = "auto") -> str:
    """The attention implementation (ModelConfig.attention_impl) for a prefill
    of `padded_prompt_tokens` tokens: "auto" is blockwise from
    BLOCKWISE_FROM_TOKENS on and dense below; "dense" / "blockwise" as named.
    Both compute exact attention; blockwise never builds the P x P scores."""
    if attention_impl not in ATTENTION_IMPLS:
        raise EvalError(f"--attention-impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
    if attention_impl != "auto":
        return attention_impl
    return "blockwise" if padded_prompt_tokens >= BLOCKWISE_FROM_TOKENS else "dense"


def attention_impl_record(attention_impl: str = "auto") -> dict:
    """What the manifest records about the attention implementation."""
    if attention_impl not in ATTENTION_IMPLS:
        raise EvalError(f"--attention-impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
    return {
        "setting": attention_impl,
        "prefill": (
            f"blockwise from {BLOCKWISE_FROM_TOKENS} padded prompt tokens, dense below"
            if attention_impl == "auto"
            else attention_impl
        ),
        "decode": "dense (one query row per step)",
        "note": "both implementations compute exact attention",
    }


def load_model(checkpoint: str | os.PathLike):
    """(focusft_jax HFModel, tokenizer) of a checkpoint, cached per checkpoint."""
    key = str(checkpoint)
    if key not in _MODEL_CACHE:
        from focusft_jax.hf import CheckpointError, load_hf

        tok = load_tokenizer(checkpoint)
        try:
            model = load_hf(checkpoint)
        except CheckpointError as e:
            raise EvalError(str(e)) from None
        _MODEL_CACHE[key] = (model, tok)
    return _MODEL_CACHE[key]


def make_generate_fn(
    checkpoint: str | os.PathLike,
    batch_size: int,
    prefill_attention: str = "causal",
    max_new_tokens: int = 20,
    *,
    add_special_tokens: bool = True,
    attention_impl: str = "auto",
) -> GenerateFn:
    """Greedy `generate_fn(prompts) -> continuations` for a checkpoint.

    Prompts are strings as the model must see them (chat template already
    applied); they are tokenized with `add_special_tokens` (True for plain
    prompts of base models, so a BOS is added as `transformers` does; False
    when a chat template already wrote the special tokens). Continuations are
    decoded with special tokens skipped.

    attention_impl: the attention implementation of the prompt forward
    (`prefill_attention_impl`): "auto" (default) is dense for short prompts
    and blockwise (memory-efficient, never builds P x P scores) from
    BLOCKWISE_FROM_TOKENS padded prompt tokens on; decode steps are dense
    (`focusft_jax.generate`). The checkpoint's own config is overridden per
    batch, so the choice follows the batch's padded prompt length.

    Uses `focusft_jax.generate.make_generate_fn` when that module offers one
    (same positional arguments, plus add_special_tokens / attention_impl
    when it takes them); otherwise builds the function from
    `focusft_jax.hf.load_hf` and the host-level `focusft_jax.generate.generate`
    (token-id lists in, completion ids out). The imported model is cached per
    checkpoint, so asking again for another `max_new_tokens` is cheap.
    """
    if prefill_attention not in PREFILL_ATTENTIONS:
        raise EvalError(f"--prefill-attention must be one of {PREFILL_ATTENTIONS}, got {prefill_attention!r}")
    prefill_attention_impl(1, attention_impl)  # checks the name
    try:
        import focusft_jax.generate as gen
    except ImportError as e:
        raise EvalError(f"cannot import focusft_jax.generate ({e}); generation needs the focusft_jax package") from None

    hook = getattr(gen, "make_generate_fn", None)
    if hook is not None:
        import inspect

        params = inspect.signature(hook).parameters
        var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
        kw = {}
        if "add_special_tokens" in params or var_kw:
            kw["add_special_tokens"] = add_special_tokens
        if "attention_impl" in params or var_kw:
            kw["attention_impl"] = attention_impl
        return hook(checkpoint, batch_size, prefill_attention, max_new_tokens, **kw)
    if not hasattr(gen, "generate"):
        raise EvalError("focusft_jax.generate offers neither make_generate_fn nor generate(); cannot run a model")

    model, tok = load_model(checkpoint)
    eos = _eos_ids(model, tok)
    pad = _pad_id(model, tok, eos)
    bucket = getattr(gen, "bucket_length", None)

    def generate_fn(prompts: list[str]) -> list[str]:
        outs: list[str] = []
        for i in range(0, len(prompts), batch_size):
            ids = [tok(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts[i : i + batch_size]]
            if not all(ids):
                raise EvalError("a prompt encodes to no tokens; the tokenizer is empty or broken")
            top = max(max(x) for x in ids)
            if top >= model.cfg.vocab_size:
                raise EvalError(
                    f"the tokenizer produced id {top}, outside the model's vocabulary ({model.cfg.vocab_size}); "
                    "the tokenizer does not belong to this model"
                )
            longest = max(len(x) for x in ids)
            padded = bucket(longest) if bucket else longest
            cfg = model.cfg.replace(attention_impl=prefill_attention_impl(padded, attention_impl))
            new = gen.generate(
                cfg,
                model.params,
                ids,
                max_new_tokens,
                eos_ids=eos,
                pad_id=pad,
                temperature=0.0,
                prefill_attention=prefill_attention,
            )
            outs.extend(tok.decode(n, skip_special_tokens=True) for n in new)
        return outs

    return generate_fn


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value]) if v is not None]


def _generation_config(model) -> dict:
    src = getattr(model, "source_dir", None)
    gc = Path(src) / "generation_config.json" if src else None
    if gc is None or not gc.exists():
        return {}
    try:
        return json.loads(gc.read_text())
    except json.JSONDecodeError:
        return {}


def _eos_ids(model, tok) -> list[int]:
    """EOS ids as `eval.generate` takes them: generation_config.json, else
    config.json, else the tokenizer."""
    for raw in (_generation_config(model).get("eos_token_id"), getattr(model, "hf_config", {}).get("eos_token_id")):
        if _ids(raw):
            return _ids(raw)
    return _ids(tok.eos_token_id)


def _pad_id(model, tok, eos: list[int]) -> int:
    for raw in (tok.pad_token_id, _generation_config(model).get("pad_token_id"), getattr(model, "hf_config", {}).get("pad_token_id")):
        if _ids(raw):
            return _ids(raw)[0]
    return eos[0] if eos else 0


# ---------------------------------------------------------------- tables and reports


def fmt_cell(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def markdown_table(
    rows: Sequence[tuple[str, Mapping[str, float | None]]],
    columns: Sequence[str],
    *,
    corner: str = "task",
    digits: int = 1,
) -> str:
    """A GitHub markdown table: one row per (name, {column: value})."""
    head = "| " + " | ".join([corner, *columns]) + " |"
    sep = "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"
    body = ["| " + " | ".join([name, *(fmt_cell(vals.get(c), digits) for c in columns)]) + " |" for name, vals in rows]
    return "\n".join([head, sep, *body])


def manifest_markdown(manifest: Mapping[str, Any]) -> str:
    lines = ["| setting | value |", "|---|---|"]
    for k, v in manifest.items():
        if isinstance(v, (dict, list)):
            v = json.dumps(v, ensure_ascii=False)
        lines.append(f"| {k} | {str(v).replace('|', '/')} |")
    return "\n".join(lines)


def write_results(out_dir: str | os.PathLike, results: Mapping[str, Any], markdown: str) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    j = write_json(out / "results.json", results)
    m = out / "results.md"
    m.write_text(markdown.rstrip() + "\n", encoding="utf-8")
    return j, m


def heatmap_figure(
    table: Mapping[str, Mapping[str, float | None]],
    rows: Sequence[str],
    columns: Sequence[str],
    *,
    title: str | None = None,
):
    """Matplotlib figure of table[row][column] (percent): red-yellow-green
    scale fixed to 0..100, integer labels in the cells (none where missing),
    x axis "Context size", y axis "Tasks"."""
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    data = np.full((len(rows), len(columns)), np.nan)
    for i, r in enumerate(rows):
        for j, c in enumerate(columns):
            v = table.get(r, {}).get(c)
            if v is not None:
                data[i, j] = float(v)
    fig = Figure(figsize=(2.0 + 0.9 * max(len(columns), 1), 1.4 + 0.45 * max(len(rows), 1)))
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(data), cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(columns)):
            if not np.isnan(data[i, j]):
                ax.text(j, i, f"{int(round(data[i, j]))}", ha="center", va="center", color="black", fontsize=9)
    ax.set_xticks(range(len(columns)), labels=list(columns))
    ax.set_yticks(range(len(rows)), labels=list(rows))
    ax.set_xlabel("Context size")
    ax.set_ylabel("Tasks")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def write_heatmap(
    path: str | os.PathLike,
    table: Mapping[str, Mapping[str, float | None]],
    rows: Sequence[str],
    columns: Sequence[str],
    *,
    title: str | None = None,
) -> Path:
    """`heatmap_figure` saved as a PNG."""
    fig = heatmap_figure(table, rows, columns, title=title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def parse_list(text: str | None, allowed: Sequence[str] | None = None, what: str = "value") -> list[str]:
    """Comma-separated list; checks membership when `allowed` is given."""
    if text is None:
        return []
    items = [t.strip() for t in text.split(",") if t.strip()]
    if allowed is not None:
        bad = [t for t in items if t not in allowed]
        if bad:
            raise EvalError(f"unknown {what} {bad}; choose from {list(allowed)}")
    if len(set(items)) != len(items):
        raise EvalError(f"duplicate {what} in {text!r}")
    return items
