"""Reading chat rows from JSONL, parquet and Hugging Face datasets, and
validating them into `ChatRecord`s.

A row is a mapping with

- `messages` (required): a list of `{"role", "content"}` mappings, roles in
  system / user / assistant / tool, content a string. Extra keys
  (`tool_calls`, `name`, `tool_call_id`, `reasoning_content`, ...) are passed
  to the chat template untouched. An assistant message that carries
  `tool_calls` may have `content` null (rendered as "").
- `tools` (optional): a list of tool definitions (mappings), or a JSON string
  of one (parquet files often store tools as strings because tool schemas
  differ between rows). Passed to the chat template as `tools=...`.
- `enable_thinking` (optional): a bool, passed as `enable_thinking=...`.

Null-valued keys of a message are dropped: parquet stores a list of messages
as a list of structs whose fields are the union over all rows, so a user
message read back from parquet carries `tool_calls: None`; templates test
`message.tool_calls is defined`, and must not see such artefacts. `messages`
and `tools` may also be given as JSON strings of the same structures.

Sources (strings or paths), see `resolve_source`:

- `*.jsonl` / `*.ndjson` / `*.json` files (one JSON object per line; a `.json`
  file whose first non-blank character is `[` is read as one JSON array),
- `*.parquet` files (needs `pyarrow`),
- glob patterns of those, and directories holding such files (read in sorted
  order, recursively),
- a directory written by `datasets.Dataset.save_to_disk` /
  `DatasetDict.save_to_disk`, any other local directory `datasets.load_dataset`
  understands, or a Hugging Face hub dataset name (`org/name`, or
  `hf:org/name` to force the hub): these need the `datasets` package, imported
  only then.

Row numbers in messages are 1-based: the line number for JSONL files, the
row (or array item) number for parquet, JSON arrays and datasets.
"""
from __future__ import annotations

import glob as _glob
import json
import os
import re
from dataclasses import dataclass

import numpy as np
from pathlib import Path
from typing import Any, Iterator

from focusft_jax.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
_GLOB_CHARS = set("*?[")
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that are not UTF-8, as errors="surrogateescape" reads them




@dataclass(frozen=True)
class RawRow:
    """One row as read, before validation. `value` is the decoded row (a
    mapping for well-formed rows) or, for a JSONL line that is not valid JSON,
    the `json.JSONDecodeError`, or for one that is not UTF-8, a `DataError`."""

    where: str  # e.g. "data/train.jsonl line 7" or "data/train.parquet row 7"
    value: Any


@dataclass(frozen=True)
class ChatRecord:
    """A validated conversation.

    messages: list of message dicts (role in ROLES, content a str).
    tools: list of tool definitions or None (column absent or null).
    enable_thinking: bool or None (column absent or null).
    where: the row's file and row number, for error messages.
    """

    messages: list
    tools: list | None
    enable_thinking: bool | None
    where: str


def _import_datasets(what: str):
    try:
        import datasets  # noqa: PLC0415 - optional dependency, imported lazily
    except ImportError:
        raise DataError(
            f"reading {what} needs the Hugging Face `datasets` package, which is not installed: "
            "pip install datasets (JSONL and parquet files are read without it)"
        ) from None
    return datasets


def _import_pyarrow_parquet(path: str):
    try:
        import pyarrow.parquet as pq  # noqa: PLC0415
    except ImportError:
        raise DataError(f"reading the parquet file {path} needs `pyarrow`: pip install pyarrow") from None
    return pq


def _looks_like_hf_saved_dir(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or (p / "state.json").is_file()


def _data_files_under(p: Path) -> list[Path]:
    files = [
        f
        for f in p.rglob("*")
        if f.is_file() and f.suffix.lower() in JSONL_SUFFIXES + PARQUET_SUFFIXES and not f.name.startswith(".")
        and f.name not in ("dataset_info.json", "dataset_dict.json", "state.json")
    ]
    return sorted(files)


def resolve_source(spec: str | os.PathLike) -> list[tuple[str, str]]:
    """Maps one source spec to a list of (kind, location) with kind in
    {"jsonl", "parquet", "hf_disk", "hf_load", "tfds_name", "tfds_dir"}. Raises DataError for a path
    that looks like a file but does not exist, a glob matching nothing, a file
    of another type and an empty directory."""
    s = os.fspath(spec)
    if s.startswith("hf:"):
        return [("hf_load", s[3:])]
    if s.startswith("tfds:"):
        return [("tfds_name", s[5:])]
    p = Path(os.path.expanduser(s))
    if any(c in s for c in _GLOB_CHARS):
        matches = sorted(_glob.glob(os.path.expanduser(s), recursive=True))
        if not matches:
            raise DataError(f"data source {s!r}: the pattern matches no file")
        out = []
        for m in matches:
            out.extend(resolve_source(m))
        return out
    if p.is_file():
        suf = p.suffix.lower()
        if suf in JSONL_SUFFIXES:
            return [("jsonl", str(p))]
        if suf in PARQUET_SUFFIXES:
            return [("parquet", str(p))]
        raise DataError(
            f"data source {s!r}: unsupported file type {suf!r}; expected .jsonl/.ndjson/.json (JSON lines) or .parquet"
        )
    if p.is_dir():
        if (p / "dataset_info.json").is_file() and (p / "features.json").is_file():
            return [("tfds_dir", str(p))]
        if _looks_like_hf_saved_dir(p):
            return [("hf_disk", str(p))]
        files = _data_files_under(p)
        if files:
            return [("parquet" if f.suffix.lower() in PARQUET_SUFFIXES else "jsonl", str(f)) for f in files]
        if not any(f.is_file() and not f.name.startswith(".") for f in p.rglob("*")):
            raise DataError(
                f"data source {s!r}: the directory is empty; expected .jsonl/.ndjson/.json or .parquet files "
                "in it, or a directory written by datasets' save_to_disk"
            )
        return [("hf_load", str(p))]
    looks_like_path = (
        p.suffix.lower() in JSONL_SUFFIXES + PARQUET_SUFFIXES
        or s.startswith(("/", "./", "../", "~"))
        or s.count("/") > 1
    )
    if looks_like_path:
        raise DataError(f"data source {s!r}: no such file or directory")
    return [("hf_load", s)]


def _invalid_utf8(where: str, text: str) -> DataError | None:
    """A DataError for the first byte of `text` that is not UTF-8, or None.
    The file is read with errors="surrogateescape", which turns each such byte
    into one lone surrogate (U+DC80..U+DCFF, never produced by valid UTF-8), so
    one bad byte costs its line only and line numbers stay those of the file."""
    m = None if text.isascii() else _NOT_UTF8.search(text)
    if m is None:
        return None
    byte, col = ord(m.group()) - 0xDC00, m.start() + 1
    return DataError(where, f"byte 0x{byte:02x} at column {col} is not valid UTF-8; expected UTF-8 text", "invalid_utf8")


def _read_jsonl(path: str) -> Iterator[RawRow]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        head = ""
        if path.lower().endswith(".json"):
            pos = f.tell()
            head = f.read(4096).lstrip()[:1]
            f.seek(pos)
        if head == "[":
            text = f.read()
            bad = _invalid_utf8(f"{path} (JSON array)", text)
            if bad is not None:
                yield RawRow(bad.where, bad)
                return
            try:
                items = json.loads(text)
            except json.JSONDecodeError as e:
                yield RawRow(f"{path} (JSON array)", e)
                return
            for i, item in enumerate(items, start=1):
                yield RawRow(f"{path} item {i}", item)
            return
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            bad = _invalid_utf8(where, line)
            if bad is not None:
                yield RawRow(where, bad)
                continue
            try:
                yield RawRow(where, json.loads(line))
            except json.JSONDecodeError as e:
                yield RawRow(where, e)


def _read_parquet(path: str, columns: tuple[str, ...]) -> Iterator[RawRow]:
    pq = _import_pyarrow_parquet(path)
    pf = pq.ParquetFile(path)
    present = [c for c in columns if c in pf.schema_arrow.names]
    row = 0
    for rb in pf.iter_batches(batch_size=1024, columns=present or None):
        for item in rb.to_pylist():
            row += 1
            yield RawRow(f"{path} row {row}", item)


def _read_hf(kind: str, loc: str, split: str) -> Iterator[RawRow]:
    datasets = _import_datasets(
        f"the Hugging Face dataset directory {loc!r}" if kind == "hf_disk" else f"the Hugging Face dataset {loc!r}"
    )
    if kind == "hf_disk":
        ds = datasets.load_from_disk(loc)
    else:
        ds = datasets.load_dataset(loc, split=split)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"data source {loc!r}: no split {split!r}; it has {sorted(ds)}")
        ds = ds[split]
    for i, item in enumerate(ds, start=1):
        yield RawRow(f"{loc} [{split}] row {i}", item)


def _import_tfds(what: str):
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415
    except ImportError:
        raise DataError(
            f"reading {what} needs `tensorflow-datasets` and `array-record` (TensorFlow is not needed): "
            "pip install 'focusft-jax[tfds]'"
        ) from None
    return tfds


def _tfds_value(v: Any) -> Any:
    """TFDS Text features come back as bytes (numpy or Python); rows use str."""
    if isinstance(v, np.ndarray):
        v = v.item() if v.ndim == 0 else v.tolist()
    if isinstance(v, bytes):
        return v.decode("utf-8")  # UnicodeDecodeError is named by the caller
    if isinstance(v, dict):
        return {k: _tfds_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_tfds_value(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def _read_tfds(kind: str, loc: str, split: str) -> Iterator[RawRow]:
    """Rows of a TFDS dataset stored as array_record, read through
    `tfds.data_source` (random access, no TensorFlow). `loc` is either
    `NAME[/CONFIG][:VERSION][:SPLIT]` (kind "tfds_name", looked up in
    $TFDS_DATA_DIR, default ~/tensorflow_datasets) or a prepared dataset
    directory (kind "tfds_dir", the folder holding dataset_info.json)."""
    tfds = _import_tfds(f"the TFDS dataset {('tfds:' + loc) if kind == 'tfds_name' else loc!r}")
    if kind == "tfds_name":
        name, _, sp = loc.partition(":")
        # NAME:VERSION:SPLIT or NAME:SPLIT; a version is dotted digits
        if sp and ":" in sp:
            ver, _, sp = sp.rpartition(":")
            name = f"{name}:{ver}"
        elif sp and all(part.isdigit() for part in sp.split(".")):
            name, sp = f"{name}:{sp}", ""
        split = sp or split
        try:
            builder = tfds.builder(name, data_dir=os.environ.get("TFDS_DATA_DIR"))
        except Exception as e:  # tfds raises DatasetNotFoundError and friends
            raise DataError(f"data source 'tfds:{loc}': no such TFDS dataset ({type(e).__name__}: {e})") from None
        if not builder.is_prepared():
            raise DataError(
                f"data source 'tfds:{loc}': the TFDS dataset is not prepared under {builder.data_dir_root!r}; "
                "prepare it with file_format='array_record' or set TFDS_DATA_DIR"
            )
    else:
        try:
            builder = tfds.builder_from_directory(loc)
        except Exception as e:
            raise DataError(f"data source {loc!r}: not a readable TFDS dataset directory ({type(e).__name__}: {e})") from None
    label = f"tfds:{loc}" if kind == "tfds_name" else loc
    if split not in builder.info.splits:
        raise DataError(f"data source {label!r}: no split {split!r}; it has {sorted(builder.info.splits)}")
    try:
        src = builder.as_data_source(split=split)
    except Exception as e:  # e.g. a tfrecord-only dataset, which needs TensorFlow
        raise DataError(
            f"data source {label!r}: cannot open split {split!r} without TensorFlow ({type(e).__name__}: {e}); "
            "expected a dataset prepared with file_format='array_record'"
        ) from None
    for i in range(len(src)):
        where = f"{label} [{split}] index {i}"
        try:
            value = _tfds_value(src[i])
        except UnicodeDecodeError as e:
            value = DataError(where, f"a text field is not valid UTF-8 (byte {e.start})", "invalid_utf8")
        yield RawRow(where, value)


def check_sources(sources: list[str | os.PathLike]) -> None:
    """What can be known of the training sources before any work: each
    resolves (a missing file or pattern, an empty directory is a DataError
    naming it) and the optional package its kind needs is installed
    (`datasets` for hub names and save_to_disk directories,
    `tensorflow-datasets` for TFDS). Rows are not read."""
    for spec in sources:
        for kind, loc in resolve_source(spec):
            if kind in ("hf_load", "hf_disk"):
                _import_datasets(f"the Hugging Face dataset {loc!r} (data.train entry {os.fspath(spec)!r})")
            elif kind in ("tfds_name", "tfds_dir"):
                _import_tfds(f"the TFDS dataset {os.fspath(spec)!r} (data.train entry)")


def read_rows(
    sources: list[str | os.PathLike] | str | os.PathLike,
    *,
    split: str = "train",
    columns: tuple[str, ...] = ("messages", "tools", "enable_thinking"),
) -> Iterator[RawRow]:
    """Yields every row of every source, in order (sources in the given
    order, rows in file order). `columns` limits what parquet reads."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    for spec in sources:
        for kind, loc in resolve_source(spec):
            if kind == "jsonl":
                yield from _read_jsonl(loc)
            elif kind == "parquet":
                yield from _read_parquet(loc, columns)
            elif kind in ("tfds_name", "tfds_dir"):
                yield from _read_tfds(kind, loc, split)
            else:
                yield from _read_hf(kind, loc, split)


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _type_name(x: Any) -> str:
    return "null" if x is None else type(x).__name__


def parse_record(
    row: RawRow,
    *,
    messages_key: str = "messages",
    tools_key: str = "tools",
    enable_thinking_key: str = "enable_thinking",
) -> ChatRecord:
    """Validates one raw row. Raises `DataError` (naming `row.where`, the
    problem and what was expected) for: invalid JSON, a row that is not a
    mapping, a missing or non-list `messages`, a message that is not a mapping,
    an unknown role, non-text content, no assistant message, and malformed
    `tools` / `enable_thinking`."""
    where, value = row.where, row.value
    if isinstance(value, DataError):  # the reader's own finding (e.g. a byte that is not UTF-8)
        raise value
    if isinstance(value, json.JSONDecodeError):
        raise DataError(where, f"invalid JSON ({value.msg} at column {value.colno}); expected one JSON object per line", "invalid_json")
    if not isinstance(value, dict):
        raise DataError(where, f"expected a JSON object with a {messages_key!r} list, got {_type_name(value)}", "not_a_mapping")
    if messages_key not in value or value[messages_key] is None:
        raise DataError(where, f"missing {messages_key!r}; expected a list of {{role, content}} messages", "no_messages")
    msgs = _maybe_json(value[messages_key])
    if not isinstance(msgs, (list, tuple)) or len(msgs) == 0:
        what = "an empty list" if isinstance(msgs, (list, tuple)) else _type_name(msgs)
        raise DataError(where, f"{messages_key!r} is {what}; expected a non-empty list of {{role, content}} messages", "not_a_message_list")
    messages = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(where, f"message {k} is {_type_name(m)}; expected a mapping with 'role' and 'content'", "not_a_message_list")
        m = {key: val for key, val in m.items() if val is not None}
        role = m.get("role")
        if role not in ROLES:
            raise DataError(where, f"message {k} has role {role!r}; expected one of {list(ROLES)}", "unknown_role")
        if "tool_calls" in m:
            m["tool_calls"] = _maybe_json(m["tool_calls"])
        content = m.get("content")
        if content is None:
            if role == "assistant" and m.get("tool_calls"):
                m["content"] = ""
            else:
                raise DataError(where, f"message {k} ({role}) has no content; expected a string", "non_text_content")
        elif not isinstance(content, str):
            raise DataError(
                where,
                f"message {k} ({role}) has {_type_name(content)} content; expected text (a string): "
                "multimodal or structured content is not supported",
                "non_text_content",
            )
        messages.append(m)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(where, "no assistant message; expected at least one assistant turn to train on", "no_assistant")
    tools = value.get(tools_key)
    if tools is not None:
        tools = _maybe_json(tools)
        if not isinstance(tools, (list, tuple)) or not all(isinstance(t, dict) for t in tools):
            raise DataError(where, f"{tools_key!r} is {_type_name(tools)}; expected a list of tool definitions (mappings) or a JSON string of one", "bad_tools")
        tools = list(tools)
    thinking = value.get(enable_thinking_key)
    if thinking is not None:
        if isinstance(thinking, int) and thinking in (0, 1):
            thinking = bool(thinking)
        if not isinstance(thinking, bool):
            raise DataError(where, f"{enable_thinking_key!r} is {thinking!r}; expected true, false or null", "bad_enable_thinking")
    return ChatRecord(messages=messages, tools=tools, enable_thinking=thinking, where=where)
