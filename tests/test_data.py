"""The chat data pipeline: loss-mask spans for different chat templates,
records from JSONL / parquet / datasets, bad rows, truncation, bucketing,
packing (checked against the attention mask), deterministic shuffling, exact
resume and multi-host sharding."""
from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from focusft_jax.attention import attention_meta, dense_mask
from focusft_jax.data import (
    ChatLoader,
    DataError,
    RawRow,
    bucket_lengths,
    load_chat_dataset,
    max_row_predictions,
    parse_record,
    read_rows,
    render_example,
    render_spans,
    round_loss_positions,
)
from focusft_jax.loss import LOSS_KEYS, loss_targets, token_weights
from tests.data_fixtures import (
    LLAMA3_TEMPLATE,
    THINKING_TEMPLATE,
    build_test_tokenizer,
    load_tokenizer,
    write_jsonl,
    write_parquet,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
TOOL_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}

AGENT_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
    {"role": "tool", "content": '{"temperature": 21}'},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny and 21 degrees."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_test_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def chatml(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def llama3(tok_dir):
    return load_tokenizer(tok_dir, LLAMA3_TEMPLATE)


@pytest.fixture(scope="module")
def thinking(tok_dir):
    return load_tokenizer(tok_dir, THINKING_TEMPLATE)


def record(messages, tools=None, enable_thinking=None, where="test row 1"):
    row = {"messages": messages}
    if tools is not None:
        row["tools"] = tools
    if enable_thinking is not None:
        row["enable_thinking"] = enable_thinking
    return parse_record(RawRow(where, row))


def loss_runs(tok, ids, mask):
    """Decoded text of each maximal run of loss-1 tokens."""
    runs, i = [], 0
    while i < len(mask):
        if mask[i]:
            j = i
            while j < len(mask) and mask[j]:
                j += 1
            runs.append(tok.decode(ids[i:j]))
            i = j
        else:
            i += 1
    return runs


def simple_conv(k: int, words: int = 3):
    """A small conversation whose length grows with `words`."""
    body = " ".join(["fox"] * words)
    return {
        "messages": [
            {"role": "user", "content": f"Question {k}: where is Mary? {body}"},
            {"role": "assistant", "content": f"Answer {k}: the bathroom."},
        ]
    }


def assert_ids_are_full_tokenization(tok, text, ids):
    assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


# --- loss-mask spans ------------------------------------------------------


def test_chatml_spans_are_content_end_of_turn_and_newline(chatml):
    msgs = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Where is Mary?"},
        {"role": "assistant", "content": "The bathroom."},
        {"role": "user", "content": "And John?"},
        {"role": "assistant", "content": "The hallway."},
    ]
    rec = record(msgs)
    r = render_spans(chatml, rec)
    ex = render_example(chatml, rec)
    assert_ids_are_full_tokenization(chatml, r.text, ex.input_ids)
    assert ex.exact and ex.input_ids.dtype == np.int32 and ex.loss_mask.dtype == np.int32
    assert loss_runs(chatml, ex.input_ids, ex.loss_mask) == ["The bathroom.<|im_end|>\n", "The hallway.<|im_end|>\n"]
    # Everything before each run ends with the generation prompt, which has loss 0.
    starts = np.flatnonzero(np.diff(np.concatenate([[0], ex.loss_mask])) == 1)
    for s in starts:
        assert chatml.decode(ex.input_ids[:s]).endswith("<|im_start|>assistant\n")
        assert ex.loss_mask[s - 1] == 0
    assert chatml.decode(ex.input_ids[ex.loss_mask == 0]).count("<|im_start|>assistant\n") == 2


def test_project_chat_tokenizer(tmp_path):
    """The same spans with the project's own tokenizer (focusft_jax.tokenizer)."""
    from focusft_jax.tokenizer import build_chat_tokenizer

    texts = ["Where is Mary? The bathroom. And John? The hallway.\n\n"] * 50
    tok = build_chat_tokenizer(texts, tmp_path / "tok", vocab_size=300)
    tok = load_tokenizer(str(tmp_path / "tok"))
    msgs = [
        {"role": "user", "content": "Where is Mary?"},
        {"role": "assistant", "content": "The bathroom."},
        {"role": "user", "content": "And John? café"},
        {"role": "assistant", "content": "The hallway."},
    ]
    rec = record(msgs)
    ex = render_example(tok, rec)
    assert_ids_are_full_tokenization(tok, render_spans(tok, rec).text, ex.input_ids)
    assert ex.exact
    assert loss_runs(tok, ex.input_ids, ex.loss_mask) == ["The bathroom.<|im_end|>\n", "The hallway.<|im_end|>\n"]


def test_llama3_style_template_spans(llama3):
    msgs = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Where is Mary?"},
        {"role": "assistant", "content": "  The bathroom.  "},
        {"role": "user", "content": "And John?"},
        {"role": "assistant", "content": "The hallway."},
    ]
    rec = record(msgs)
    r = render_spans(llama3, rec)
    assert r.text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    ex = render_example(llama3, rec)
    assert_ids_are_full_tokenization(llama3, r.text, ex.input_ids)
    assert ex.exact
    # Content (trimmed by the template) and <|eot_id|>; no separator follows it.
    assert loss_runs(llama3, ex.input_ids, ex.loss_mask) == ["The bathroom.<|eot_id|>", "The hallway.<|eot_id|>"]
    starts = np.flatnonzero(np.diff(np.concatenate([[0], ex.loss_mask])) == 1)
    for s in starts:
        assert llama3.decode(ex.input_ids[:s]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    # The next turn's header right after a run has loss 0.
    first_end = int(np.flatnonzero(np.diff(ex.loss_mask) == -1)[0]) + 1
    assert llama3.convert_ids_to_tokens(int(ex.input_ids[first_end])) == "<|start_header_id|>"


def test_multi_turn_with_tool_calls_and_tool_results(chatml):
    rec = record(AGENT_MESSAGES, tools=TOOLS)
    ex = render_example(chatml, rec)
    runs = loss_runs(chatml, ex.input_ids, ex.loss_mask)
    call = json.dumps(TOOL_CALL["function"], ensure_ascii=False)
    assert runs == [
        f"\n<tool_call>\n{call}\n</tool_call><|im_end|>\n",
        "It is sunny and 21 degrees.<|im_end|>\n",
        "You are welcome.<|im_end|>\n",
    ]
    context = chatml.decode(ex.input_ids[ex.loss_mask == 0])
    # Tool results (grouped into one user turn), the tool list and user turns are context.
    assert "<tool_response>\n{\"temperature\": 21}\n</tool_response>" in context
    assert "<tool_response>\nsunny\n</tool_response>" in context
    assert '"description": "Weather of a city"' in context
    assert "Thanks!" in context and "What is the weather in Paris?" in context


def test_tools_column_is_passed_to_the_template(chatml, tmp_path):
    rows = [
        {"messages": AGENT_MESSAGES[:3] + [{"role": "assistant", "content": "ok"}], "tools": TOOLS},
        {"messages": AGENT_MESSAGES[:2] + [{"role": "assistant", "content": "ok"}], "tools": json.dumps(TOOLS)},
        {"messages": AGENT_MESSAGES[:2] + [{"role": "assistant", "content": "ok"}]},
    ]
    ds = load_chat_dataset(write_jsonl(tmp_path / "t.jsonl", rows), chatml, max_length=512)
    texts = [chatml.decode(ids) for ids in ds.input_ids]
    assert "# Tools\n<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>" in texts[0]
    assert "# Tools" in texts[1]  # tools stored as a JSON string (parquet-friendly)
    assert "# Tools" not in texts[2] and "get_weather" not in texts[2]
    # The tool list is context (loss 0); the first row's tool call is trained.
    trained = [chatml.decode(ids[lm == 1]) for ids, lm in zip(ds.input_ids, ds.loss_mask)]
    assert "<tool_call>" in trained[0] and '"get_weather"' in trained[0]
    assert all("Weather of a city" not in t and "<tools>" not in t for t in trained)


def test_enable_thinking_column_is_passed_to_the_template(thinking):
    msgs = [
        {"role": "user", "content": "What is 6 x 7?"},
        {"role": "assistant", "content": "<think>\n\n</think>\n\nThe answer is 42."},
    ]
    # enable_thinking=false: the empty think block belongs to the generation prompt.
    ex = render_example(thinking, record(msgs, enable_thinking=False))
    assert loss_runs(thinking, ex.input_ids, ex.loss_mask) == ["The answer is 42.<|im_end|>\n"]
    # Otherwise the model generates the think block itself: it is trained.
    for flag in (True, None):
        ex = render_example(thinking, record(msgs, enable_thinking=flag))
        assert loss_runs(thinking, ex.input_ids, ex.loss_mask) == ["<think>\n\n</think>\n\nThe answer is 42.<|im_end|>\n"]


def test_template_rewriting_history_is_detected(thinking, tmp_path):
    msgs = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nr1\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "<think>\nr2\n</think>\n\nA2"},
    ]
    path = write_jsonl(tmp_path / "think.jsonl", [simple_conv(0), {"messages": msgs}])
    with pytest.raises(DataError) as e:
        load_chat_dataset(path, thinking, max_length=256)
    msg = str(e.value)
    assert f"{path} line 2" in msg and "assistant message 1" in msg and "not a prefix" in msg
    assert "inconsistent_turns='context'" in msg
    # "context": the rewritten turn is context, the consistent last turn is trained.
    ds = load_chat_dataset(path, thinking, max_length=256, inconsistent_turns="context")
    assert ds.stats.context_turns == 1 and len(ds) == 2
    ids, lm = ds.input_ids[1], ds.loss_mask[1]
    assert loss_runs(thinking, ids, lm) == ["<think>\nr2\n</think>\n\nA2<|im_end|>\n"]
    assert "r1" not in thinking.decode(ids)  # history as the template shows it
    # A row whose only assistant turn is inconsistent has nothing to train.
    only = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "no think block"}]
    with pytest.raises(DataError, match="no assistant turn could be trained"):
        render_spans(thinking, record(only, enable_thinking=False), inconsistent_turns="context")


def test_token_straddling_a_span_boundary_keeps_full_tokenization(chatml):
    # The generation prompt ends with "\n"; a response starting with "\n\n"
    # makes byte-level BPE merge across the boundary.
    rec = record([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\n\nHello."}])
    r = render_spans(chatml, rec)
    ex = render_example(chatml, rec)
    assert_ids_are_full_tokenization(chatml, r.text, ex.input_ids)
    assert not ex.exact
    # The straddling token starts in the generation prompt: loss 0 (first-character rule).
    assert loss_runs(chatml, ex.input_ids, ex.loss_mask) == ["\nHello.<|im_end|>\n"]


def test_template_errors_name_the_row(chatml, tmp_path):
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "late"},
                        {"role": "assistant", "content": "b"}]}
    path = write_jsonl(tmp_path / "tpl.jsonl", [simple_conv(0), bad])
    with pytest.raises(DataError, match=r"tpl\.jsonl line 2: the chat template failed.*system message must come first"):
        load_chat_dataset(path, chatml, max_length=256)
    ds = load_chat_dataset(path, chatml, max_length=256, on_bad_row="skip")
    assert ds.stats.skipped == {"template_error": 1} and len(ds) == 1


# --- records: files and bad rows ------------------------------------------


BAD_ROWS = [
    ("{not json", "invalid_json", "invalid JSON"),
    ([{"role": "user", "content": "x"}], "not_a_mapping", "expected a JSON object"),
    ({"messages": "hello"}, "not_a_message_list", "expected a non-empty list"),
    ({"text": "no messages"}, "no_messages", "missing 'messages'"),
    ({"messages": [{"role": "user", "content": "x"}, "oops"]}, "not_a_message_list", "message 1 is str"),
    ({"messages": [{"role": "human", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown_role",
     "role 'human'; expected one of ['system', 'user', 'assistant', 'tool']"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "y"}]},
     "non_text_content", "list content; expected text"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}, "non_text_content", "no content"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}]}, "no_assistant",
     "no assistant message"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "tools": 5},
     "bad_tools", "expected a list of tool definitions"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "enable_thinking": "yes"},
     "bad_enable_thinking", "expected true, false or null"),
]


@pytest.mark.parametrize("row,reason,expected", BAD_ROWS, ids=[b[1] + str(i) for i, b in enumerate(BAD_ROWS)])
def test_bad_row_error_names_file_and_line(chatml, tmp_path, row, reason, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", [simple_conv(0), simple_conv(1), row, simple_conv(2)])
    with pytest.raises(DataError) as e:
        load_chat_dataset(path, chatml, max_length=256)
    assert str(e.value).startswith(f"{path} line 3: ")
    assert expected in str(e.value)
    assert e.value.reason == reason


def test_bad_rows_skipped_and_counted(chatml, tmp_path):
    long_row = simple_conv(9, words=400)
    good = [simple_conv(k) for k in range(3)]
    rows = good[:1] + [b[0] for b in BAD_ROWS] + good[1:] + ["", long_row]  # "" = a blank line
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError, match=r"mixed\.jsonl line 2: invalid JSON"):  # the first bad row stops
        load_chat_dataset(path, chatml, max_length=64, truncation="error")
    # Blank lines are not rows but count for line numbers.
    only_long = write_jsonl(tmp_path / "long.jsonl", [good[0], "", long_row])
    with pytest.raises(DataError, match=r"long\.jsonl line 3: \d+ tokens after rendering; expected at most max_length=64"):
        load_chat_dataset(only_long, chatml, max_length=64, truncation="error")
    ds = load_chat_dataset(path, chatml, max_length=64, truncation="error", on_bad_row="skip")
    assert len(ds) == 3 and ds.stats.rows == len(rows) - 1
    expected = {}
    for _, reason, _ in BAD_ROWS:
        expected[reason] = expected.get(reason, 0) + 1
    expected["too_long"] = 1
    assert ds.stats.skipped == expected
    assert ds.stats.skipped_total == len(BAD_ROWS) + 1
    assert "skipped 12 bad rows" in ds.stats.summary()
    assert any("line 2:" in w for w in ds.stats.skipped_where)
    # every skipped row, by file and line, for OUTPUT_DIR/skipped_rows.jsonl
    listed = ds.stats.skipped_rows
    assert len(listed) == ds.stats.skipped_total and {r["file"] for r in listed} == {str(path)}
    assert sorted(r["reason"] for r in listed) == sorted(r for r, n in expected.items() for _ in range(n))
    assert all(isinstance(r["line"], int) and r["problem"] for r in listed)


def test_parquet_and_jsonl_read_the_same(chatml, tmp_path):
    rows = [
        {"messages": AGENT_MESSAGES, "tools": json.dumps(TOOLS), "enable_thinking": None},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
         "tools": None, "enable_thinking": True},
    ] + [dict(simple_conv(k), tools=None, enable_thinking=False) for k in range(3)]
    pq = write_parquet(tmp_path / "d.parquet", rows)
    js = write_jsonl(tmp_path / "d.jsonl", rows)
    a = load_chat_dataset(pq, chatml, max_length=512)
    b = load_chat_dataset(js, chatml, max_length=512)
    assert len(a) == len(b) == 5
    for x, y, u, v in zip(a.input_ids, b.input_ids, a.loss_mask, b.loss_mask):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(u, v)
    assert a.fingerprint == b.fingerprint
    # Both files at once, from a directory, in sorted order (d.jsonl, d.parquet).
    both = load_chat_dataset(str(tmp_path), chatml, max_length=512)
    assert len(both) == 10
    # Parquet rows are numbered from 1.
    bad = write_parquet(tmp_path / "bad.parquet", [simple_conv(0), {"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match=r"bad\.parquet row 2: no assistant message"):
        load_chat_dataset(bad, chatml, max_length=512)


def test_missing_files_and_unsupported_types(chatml, tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_chat_dataset(str(tmp_path / "nope.jsonl"), chatml, max_length=64)
    with pytest.raises(DataError, match="matches no file"):
        load_chat_dataset(str(tmp_path / "*.parquet"), chatml, max_length=64)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_chat_dataset(str(tmp_path / "x.csv"), chatml, max_length=64)


def test_hugging_face_datasets(chatml, tmp_path):
    """The real `datasets` path (requirements-test.txt installs it): a
    save_to_disk directory and a local JSON file loaded through
    datasets.load_dataset read the same rows as JSONL, render the same
    chats, and a bad row is named by split and row number."""
    import datasets

    rows = [simple_conv(k) for k in range(4)]
    ref = load_chat_dataset(write_jsonl(tmp_path / "r.jsonl", rows), chatml, max_length=256)
    local = tmp_path / "hf_saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(local))
    ds = load_chat_dataset(str(local), chatml, max_length=256)
    assert len(ds) == 4 and ds.fingerprint == ref.fingerprint
    assert [r.where for r in read_rows(str(local))] == [f"{local} [train] row {i}" for i in range(1, 5)]
    with pytest.raises(DataError, match="no split 'test'"):
        load_chat_dataset(str(local), chatml, max_length=256, split="test")
    # A single Dataset (no DatasetDict) saved to disk.
    flat = tmp_path / "flat"
    datasets.Dataset.from_list(rows).save_to_disk(str(flat))
    assert load_chat_dataset(str(flat), chatml, max_length=256).fingerprint == ref.fingerprint
    bad = rows[:2] + [{"messages": [{"role": "user", "content": "only a question"}]}] + rows[2:]
    bad_dir = tmp_path / "hf_bad"
    datasets.Dataset.from_list(bad).save_to_disk(str(bad_dir))
    with pytest.raises(DataError, match=rf"{re.escape(str(bad_dir))} \[train\] row 3: no assistant message"):
        load_chat_dataset(str(bad_dir), chatml, max_length=256)


def test_hugging_face_datasets_not_installed(chatml, tmp_path, monkeypatch):
    """Without the `datasets` package, a source that needs it is an error
    naming the source and saying what to install."""
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    local = tmp_path / "hf_saved"
    local.mkdir()
    (local / "dataset_dict.json").write_text('{"splits": ["train"]}')
    for source in (str(local), "some-org/some-chat-dataset", "hf:some-org/other"):
        with pytest.raises(DataError) as e:
            load_chat_dataset(source, chatml, max_length=256)
        assert "pip install datasets" in str(e.value)
        assert source.removeprefix("hf:") in str(e.value)


# --- truncation -------------------------------------------------------------


def test_truncation_modes(chatml, tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [simple_conv(0, words=60), simple_conv(1)])
    full = load_chat_dataset(path, chatml, max_length=4096)
    n = len(full.input_ids[0])
    answer_len = int(full.loss_mask[0].sum())
    assert len(full.input_ids[1]) < n - 20 and answer_len < 20
    m = n - 20
    left = load_chat_dataset(path, chatml, max_length=m, truncation="left")
    np.testing.assert_array_equal(left.input_ids[0], full.input_ids[0][-m:])
    np.testing.assert_array_equal(left.loss_mask[0], full.loss_mask[0][-m:])
    np.testing.assert_array_equal(left.input_ids[1], full.input_ids[1])
    assert left.stats.truncated == 1 and len(left.input_ids[0]) == m
    with pytest.raises(DataError, match=rf"long\.jsonl line 1: {n} tokens after rendering; expected at most max_length={m}"):
        load_chat_dataset(path, chatml, max_length=m, truncation="error")
    # Right truncation keeps the beginning: here the whole answer is cut away,
    # so the row is dropped and counted (never an example without loss tokens).
    right = load_chat_dataset(path, chatml, max_length=m, truncation="right")
    assert len(right) == 1 and right.stats.no_loss_tokens == 1 and right.stats.truncated == 0
    np.testing.assert_array_equal(right.input_ids[0], full.input_ids[1])
    # A cut inside the answer keeps the example, a prefix of the full one.
    keep = n - answer_len // 2
    right2 = load_chat_dataset(path, chatml, max_length=keep, truncation="right")
    np.testing.assert_array_equal(right2.input_ids[0], full.input_ids[0][:keep])
    np.testing.assert_array_equal(right2.loss_mask[0], full.loss_mask[0][:keep])
    assert 0 < right2.loss_mask[0].sum() < answer_len and right2.stats.truncated == 1


def test_rows_without_loss_tokens_after_truncation_are_dropped(chatml, tmp_path):
    rows = [simple_conv(0, words=200), simple_conv(1)]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    ds = load_chat_dataset(path, chatml, max_length=64, truncation="right")
    assert len(ds) == 1 and ds.stats.no_loss_tokens == 1
    assert all(lm[1:].sum() > 0 for lm in ds.loss_mask)
    with pytest.raises(ValueError, match="no usable example"):
        load_chat_dataset(write_jsonl(tmp_path / "y.jsonl", rows[:1]), chatml, max_length=64)


# --- batching ---------------------------------------------------------------


@pytest.fixture(scope="module")
def varied(chatml, tmp_path_factory):
    rng = np.random.default_rng(0)
    rows = [simple_conv(k, words=int(rng.integers(1, 60))) for k in range(37)]
    rows[5] = {"messages": AGENT_MESSAGES, "tools": TOOLS}
    path = write_jsonl(tmp_path_factory.mktemp("varied") / "v.jsonl", rows)
    return load_chat_dataset(path, chatml, max_length=256)


def test_bucket_lengths():
    assert bucket_lengths(256) == (16, 32, 64, 128, 256)
    assert bucket_lengths(300, min_bucket=64) == (64, 128, 256, 300)
    assert bucket_lengths(256, bucket_size=96) == (96, 192, 256)
    assert round_loss_positions(0, 128) == 16
    assert round_loss_positions(17, 128) == 32
    assert round_loss_positions(100, 64) == 64


def check_rows_match_examples(ds, arrays, rows):
    for r, row in enumerate(rows):
        off = 0
        for s, i in enumerate(row, start=1):
            n = len(ds.input_ids[i])
            np.testing.assert_array_equal(arrays["input_ids"][r, off : off + n], ds.input_ids[i])
            np.testing.assert_array_equal(arrays["loss_mask"][r, off : off + n], ds.loss_mask[i])
            np.testing.assert_array_equal(arrays["positions"][r, off : off + n], np.arange(n))
            assert (arrays["segment_ids"][r, off : off + n] == s).all()
            off += n
        assert arrays["attention_mask"][r, :off].all() and not arrays["attention_mask"][r, off:].any()
        assert not arrays["loss_mask"][r, off:].any() and not arrays["segment_ids"][r, off:].any()
        assert (arrays["input_ids"][r, off:] == ds.pad_id).all()


def test_padded_batches_use_buckets(varied):
    loader = ChatLoader(varied, batch_size=4, shuffle=True, seed=3, drop_remainder=False, num_epochs=1)
    seen = []
    for b in loader:
        rows = loader._plan(b.epoch)[b.step]
        longest = max(sum(varied.lengths[i] for i in r) for r in rows)
        assert b.seq_len in loader.buckets and b.seq_len >= longest
        assert b.seq_len == min(x for x in loader.buckets if x >= longest)
        for k, v in b.arrays.items():
            if k in LOSS_KEYS:  # the scored positions, [B, P]
                assert v.dtype == (np.float32 if k == "loss_weight" else np.int32)
                assert v.shape == (4, b.loss_positions), k
            else:
                assert v.dtype == np.int32 and v.shape == (4, b.seq_len), k
        check_rows_match_examples(varied, b.arrays, rows)
        seen += [i for r in rows for i in r]
    assert sorted(seen) == list(range(len(varied)))  # drop_remainder=False: every example once


def test_length_grouping_reduces_padding(varied):
    def padding(loader):
        total = 0
        seen = []
        for b in loader:
            total += int((1 - b.arrays["attention_mask"]).sum())
            seen += [i for r in loader._plan(b.epoch)[b.step] for i in r]
        return total, sorted(seen)

    plain, seen_plain = padding(ChatLoader(varied, batch_size=4, seed=2, num_epochs=1))
    grouped, seen_grouped = padding(ChatLoader(varied, batch_size=4, seed=2, length_grouping=4, num_epochs=1))
    assert grouped < plain
    assert len(seen_grouped) == len(seen_plain) == len(varied) // 4 * 4
    assert len(set(seen_grouped)) == len(seen_grouped)


def test_loss_positions_cover_every_row(varied):
    for packing in (False, True):
        loader = ChatLoader(varied, batch_size=3, packing=packing, seed=1, num_epochs=1)
        for b in list(loader)[:4]:
            batch = {k: jnp.asarray(v) for k, v in b.arrays.items()}
            per_row = np.asarray(jax.jit(token_weights)(batch).sum(axis=1))
            assert isinstance(b.loss_positions, int)
            assert per_row.max() <= b.loss_positions <= b.seq_len
            assert b.loss_positions == round_loss_positions(int(per_row.max()), b.seq_len)
            tg = jax.jit(loss_targets)(batch)  # from the batch's keys
            assert int(tg.dropped) == 0 and float(tg.weight.sum()) == per_row.sum()
            # the keys are what the on-device fallback finds with the same P
            raw = {k: v for k, v in batch.items() if k not in LOSS_KEYS}
            ref = jax.jit(loss_targets, static_argnums=1)(raw, b.loss_positions)
            for got, want in ((tg.index, ref.index), (tg.target, ref.target), (tg.weight, ref.weight)):
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_pad_to_max_gives_one_shape_that_holds_every_row(varied):
    for packing in (False, True):
        fixed = ChatLoader(varied, batch_size=3, packing=packing, pad_to="max", seed=1, num_epochs=3)
        bucketed = ChatLoader(varied, batch_size=3, packing=packing, seed=1, num_epochs=3)
        assert len(bucketed.batch_shapes(0)) > 1 or packing  # packed rows are all nearly full here
        assert fixed.batch_shapes(0) == fixed.batch_shapes(2) == [(varied.max_length, fixed._shape([])[1])]
        assert fixed.fingerprint != bucketed.fingerprint  # a resume cannot mix the two
        for a, b in zip(fixed, bucketed, strict=True):  # the same rows, only more padding
            assert (a.seq_len, a.loss_positions) == fixed.batch_shapes(0)[0]
            n = b.seq_len
            for k in ("input_ids", "loss_mask", "segment_ids", "attention_mask"):
                np.testing.assert_array_equal(a.arrays[k][:, :n], b.arrays[k])
            assert not a.arrays["attention_mask"][:, n:].any()
            batch = {k: jnp.asarray(v) for k, v in a.arrays.items()}
            tg = jax.jit(loss_targets)(batch)  # nothing scored is left out of the fixed P
            assert int(tg.dropped) == 0 and float(tg.weight.sum()) == float(b.arrays["loss_weight"].sum())
    with pytest.raises(ValueError, match="pad_to"):
        ChatLoader(varied, batch_size=3, pad_to="longest")


def test_max_row_predictions_bounds_every_pack():
    rng = np.random.default_rng(4)
    for _ in range(30):
        n = int(rng.integers(1, 8))
        lengths = rng.integers(1, 20, size=n)
        preds = np.array([int(rng.integers(0, x + 1)) for x in lengths])
        row = int(rng.integers(lengths.max(), 40))
        best = max(  # every set of examples that fits one row, by brute force
            int(preds[[i for i in range(n) if m >> i & 1]].sum())
            for m in range(1 << n) if lengths[[i for i in range(n) if m >> i & 1]].sum() <= row
        )
        bound = max_row_predictions(lengths, preds, row, packing=True)
        assert best <= bound <= row
        assert max_row_predictions(lengths, preds, row, packing=False) == preds.max()


def glm_mask_alone(loss_mask):
    """METHOD.md's glm_bidir mask of one unpacked example, written directly."""
    turn = np.concatenate([[0], np.cumsum(loss_mask[1:] != loss_mask[:-1])])
    i, j = np.meshgrid(np.arange(len(loss_mask)), np.arange(len(loss_mask)), indexing="ij")
    same = turn[i] == turn[j]
    return (turn[j] < turn[i]) | (same & (loss_mask[i] == 0)) | (same & (loss_mask[i] == 1) & (j <= i))


def test_packing_segments_positions_and_attention(varied):
    loader = ChatLoader(varied, batch_size=2, packing=True, seed=0, drop_remainder=False, num_epochs=1)
    seen, multi = [], 0
    for b in loader:
        rows = loader._plan(b.epoch)[b.step]
        check_rows_match_examples(varied, b.arrays, rows)
        seen += [i for r in rows for i in r]
        multi += sum(len(r) > 1 for r in rows)
        a = b.arrays
        assert (a["attention_mask"].sum(axis=1) <= varied.max_length).all()
        meta = attention_meta(jnp.asarray(a["attention_mask"]), jnp.asarray(a["loss_mask"]),
                              jnp.asarray(a["segment_ids"]), "glm_bidir")
        mask = np.asarray(dense_mask(meta, b.seq_len))
        for r, row in enumerate(rows):
            seg = a["segment_ids"][r]
            real = a["attention_mask"][r].astype(bool)
            cross = (seg[:, None] != seg[None, :]) & real[:, None] & real[None, :]
            assert not (mask[r] & cross).any()  # packed examples never see each other
            # Each packed example gets exactly the mask it would get alone.
            off = 0
            for i in row:
                n = len(varied.input_ids[i])
                np.testing.assert_array_equal(mask[r, off : off + n, off : off + n], glm_mask_alone(varied.loss_mask[i]))
                off += n
    assert sorted(seen) == list(range(len(varied)))
    assert multi > 0  # packing actually packed


def test_packing_fills_rows(varied):
    loader = ChatLoader(varied, batch_size=1, packing=True, seed=0, drop_remainder=False)
    padded = ChatLoader(varied, batch_size=1, packing=False, seed=0, drop_remainder=False)
    assert loader.steps_in_epoch(0) < padded.steps_in_epoch(0) / 2
    assert loader.total_steps(3) == sum(loader.steps_in_epoch(e) for e in range(3))


# --- order, resume, hosts -----------------------------------------------------


def batches(loader, n):
    out = []
    for _ in range(n):
        b = next(loader)
        out.append((b.epoch, b.step, b.loss_positions, {k: v.copy() for k, v in b.arrays.items()}))
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x[:3] == y[:3]
        assert x[3].keys() == y[3].keys()
        for k in x[3]:
            np.testing.assert_array_equal(x[3][k], y[3][k])


def test_deterministic_shuffle(varied):
    a = ChatLoader(varied, batch_size=4, seed=7)
    b = ChatLoader(varied, batch_size=4, seed=7)
    c = ChatLoader(varied, batch_size=4, seed=8)
    assert_same(batches(a, 12), batches(b, 12))
    np.testing.assert_array_equal(a.epoch_order(1), b.epoch_order(1))
    assert not np.array_equal(a.epoch_order(0), c.epoch_order(0))
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))  # reshuffled every epoch
    assert sorted(a.epoch_order(2)) == list(range(len(varied)))
    plain = ChatLoader(varied, batch_size=4, shuffle=False)
    np.testing.assert_array_equal(plain.epoch_order(5), np.arange(len(varied)))


@pytest.mark.parametrize("packing,grouping", [(False, 0), (False, 2), (True, 0)])
def test_exact_resume(varied, packing, grouping):
    kw = dict(batch_size=3, packing=packing, length_grouping=grouping, seed=11)
    cont = ChatLoader(varied, **kw)
    per_epoch = cont.steps_in_epoch(0)
    n = per_epoch + 2  # resume point inside the second epoch
    batches(cont, n)
    state = json.loads(json.dumps(cont.state_dict()))
    assert state["epoch"] == 1 and state["step"] == 2
    expected = batches(cont, per_epoch + 3)  # continues across the next epoch boundary
    resumed = ChatLoader(varied, **kw, state=state)
    assert_same(batches(resumed, per_epoch + 3), expected)
    # Resuming at an epoch boundary.
    fresh = ChatLoader(varied, **kw)
    batches(fresh, per_epoch)
    assert fresh.state_dict()["epoch"] == 1 and fresh.state_dict()["step"] == 0
    assert_same(batches(ChatLoader(varied, **kw, state=fresh.state_dict()), 2),
                batches(ChatLoader(varied, **kw, state={**state, "step": 0}), 2))
    # A state from other settings is refused, not silently misapplied.
    with pytest.raises(ValueError, match="different dataset or loader settings"):
        ChatLoader(varied, **{**kw, "seed": 12}, state=state)
    with pytest.raises(ValueError, match="outside the epoch"):
        ChatLoader(varied, **kw, state={**state, "step": 10_000})


def test_multi_host_shares(varied):
    for packing in (False, True):
        whole = ChatLoader(varied, batch_size=4, packing=packing, seed=5)
        hosts = [ChatLoader(varied, batch_size=2, packing=packing, seed=5, process_index=p, process_count=2)
                 for p in range(2)]
        assert hosts[0].state_dict() == hosts[1].state_dict()
        assert hosts[0].steps_in_epoch(0) == whole.steps_in_epoch(0)
        for _ in range(whole.steps_in_epoch(0) + 2):
            w = next(whole)
            h = [next(x) for x in hosts]
            assert h[0].seq_len == h[1].seq_len == w.seq_len
            # P is decided on the global batch: the same loss-key shape on every host
            assert h[0].loss_positions == h[1].loss_positions == w.loss_positions
            assert set(LOSS_KEYS) <= set(h[0].arrays) == set(h[1].arrays) == set(w.arrays)
            for k in w.arrays:
                np.testing.assert_array_equal(np.concatenate([h[0].arrays[k], h[1].arrays[k]]), w.arrays[k])
            ids0 = {tuple(r) for r in h[0].arrays["input_ids"].tolist()}
            assert ids0.isdisjoint({tuple(r) for r in h[1].arrays["input_ids"].tolist()})


def test_micro_batches_hold_the_same_rows_whatever_the_host_count(varied):
    """With gradient accumulation, global micro-batch a is rows [a*m, (a+1)*m)
    of the global batch on one host and on two: each host holds its part of
    every micro-batch, and the trainer's reshape (micro_batches, -1, S) then
    concatenation over hosts gives the one-host micro-batches."""
    whole = ChatLoader(varied, batch_size=8, seed=5, micro_batches=2)
    hosts = [ChatLoader(varied, batch_size=4, seed=5, process_index=p, process_count=2, micro_batches=2) for p in range(2)]
    for _ in range(3):
        w = next(whole)
        h = [next(x) for x in hosts]
        assert w.checksum == h[0].checksum == h[1].checksum  # the global batch's, on every host
        for k in w.arrays:
            one = w.arrays[k].reshape(2, 4, -1)
            two = np.concatenate([x.arrays[k].reshape(2, 2, -1) for x in h], axis=1)
            np.testing.assert_array_equal(one, two)
    assert next(whole).checksum != w.checksum
    with pytest.raises(ValueError, match="micro_batches"):
        ChatLoader(varied, batch_size=4, micro_batches=3)


def test_too_few_examples_for_a_batch(varied):
    with pytest.raises(ValueError, match="no complete global batch"):
        ChatLoader(varied, batch_size=32, process_count=2)
    loader = ChatLoader(varied, batch_size=32, process_count=2, drop_remainder=False)
    b = next(loader)
    assert b.arrays["input_ids"].shape[0] == 32 and b.num_examples == 32
