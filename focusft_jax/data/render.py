"""Rendering conversations with the tokenizer's chat template, and the loss
mask (METHOD.md, "Data of one example").

Loss spans, found on the rendered text (works for any template, with or
without `{% generation %}` tags). For assistant message i:

    start_i = len(render(messages[:i],   add_generation_prompt=True))
    end_i   = len(render(messages[:i+1], add_generation_prompt=False))

and the characters [start_i, end_i) of the full rendering
`render(messages, add_generation_prompt=False)` get loss 1: the assistant's
content, tool calls, end-of-turn token and whatever separator the template
writes after the turn (ChatML: `...<|im_end|>\\n`), but not the generation
prompt that opens the turn (ChatML: `<|im_start|>assistant\\n`). All other
characters (system, user, tool turns, generation prompts) get loss 0.

This is only valid when both prefix renderings are literal prefixes of the full
rendering, which is checked for every assistant turn. Templates that rewrite
history break it: Qwen3's template strips the reasoning of assistant turns
before the last user message and renders an empty think block only for the
last turn. `inconsistent_turns` chooses what happens then:

- "error" (default): the row is bad (`DataError` naming the row and the turn;
  skipped and counted with `on_bad_row="skip"`);
- "context": such a turn is kept as context with loss 0 (it is rendered the
  way the template shows history, which is not what the model generates), and
  the consistent turns (for Qwen3, those after the last user message) are
  trained. A row left with no trainable turn is bad.

From characters to tokens. The token ids are always exactly
`tokenizer(full_text, add_special_tokens=False)` (the template writes any BOS
itself; this is also what `apply_chat_template(tokenize=True)` produces), and
the mask is computed on those tokens from the fast tokenizer's offset mapping:
when the offsets tile the text (token k covers exactly the characters
[start_k, end_k), the normal case for byte-level BPE) a token gets loss 1 iff
its characters lie in a loss span, and the mask is exact as long as no token
straddles a span boundary. Boundaries are almost always special tokens
(`<|im_start|>`, `<|im_end|>`, `<|eot_id|>`), so straddling is rare; it can
happen when BPE merges the generation prompt's last newline with a response
that starts with newlines. Then the token takes the loss of its first
character (the generation prompt is never trained), and the example is
counted (`exact=False`, `DataStats.boundary_merges`) so a systematic problem
is visible. Tokenizing the pieces separately instead would be exact only by
changing the ids (a piece boundary forces a token boundary the full text does
not have; e.g. a lone "\n\n" piece merges where the full text does not), which
would train on sequences the model never sees at inference. When offsets do not
tile the text (trimmed offsets, a character split across byte tokens), the
pieces are tokenized separately only as a check: if they concatenate to the
full tokenization each token takes its piece's loss (exact), else the
first-character rule applies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from focusft_jax.data.records import ChatRecord, DataError

INCONSISTENT_TURNS = ("error", "context")


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation: `text` and its loss spans, sorted, disjoint
    [start, end) character ranges. `context_turns` counts assistant turns kept
    as context because the template renders them inconsistently."""

    text: str
    spans: tuple[tuple[int, int], ...]
    context_turns: int
    where: str


@dataclass(frozen=True)
class TokenizedExample:
    """One conversation as tokens, before truncation and batching.

    input_ids: int32 [n]; loss_mask: int32 [n] (1 = trained token);
    exact: False when a token straddled a loss-span boundary (see module doc).
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    exact: bool


def template_kwargs(record: ChatRecord, extra: dict | None = None) -> dict[str, Any]:
    """Keyword arguments for `apply_chat_template`: `extra` (global settings),
    then the row's `tools` and `enable_thinking` when not None (as the reference
    implementation does)."""
    kw: dict[str, Any] = dict(extra or {})
    if record.tools is not None:
        kw["tools"] = record.tools
    if record.enable_thinking is not None:
        kw["enable_thinking"] = record.enable_thinking
    return kw


def _render(tokenizer, messages: list, gen: bool, kw: dict, where: str) -> str:
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **kw)
    except Exception as e:  # jinja errors, raise_exception() in templates, ...
        raise DataError(where, f"the chat template failed on messages[:{len(messages)}]: {type(e).__name__}: {e}", "template_error") from e
    if not isinstance(out, str):
        raise DataError(where, f"apply_chat_template(tokenize=False) returned {type(out).__name__}, expected a string", "template_error")
    return out


def render_spans(
    tokenizer,
    record: ChatRecord,
    *,
    extra_template_kwargs: dict | None = None,
    inconsistent_turns: str = "error",
) -> Rendered:
    """Renders `record` and finds the loss spans (module doc). Raises
    `DataError` when the tokenizer has no chat template, the template fails,
    or (inconsistent_turns="error") a prefix rendering is not a prefix of the
    full rendering."""
    if inconsistent_turns not in INCONSISTENT_TURNS:
        raise ValueError(f"inconsistent_turns must be one of {INCONSISTENT_TURNS}, got {inconsistent_turns!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template: load a chat/instruct tokenizer or set tokenizer.chat_template")
    where = record.where
    kw = template_kwargs(record, extra_template_kwargs)
    msgs = record.messages
    full = _render(tokenizer, msgs, False, kw, where)
    spans: list[tuple[int, int]] = []
    context = 0
    prev_end = 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start_text = _render(tokenizer, msgs[:i], True, kw, where)
        end_text = _render(tokenizer, msgs[: i + 1], False, kw, where)
        s, e = len(start_text), len(end_text)
        problem = None
        if not full.startswith(start_text):
            problem = (
                f"the rendering of messages[:{i}] with the generation prompt is not a prefix of the full rendering "
                f"(they differ from character {_diverge(start_text, full)})"
            )
        elif not full.startswith(end_text):
            problem = (
                f"the rendering of messages[:{i + 1}] (up to assistant message {i}) is not a prefix of the full "
                f"rendering (they differ from character {_diverge(end_text, full)})"
            )
        elif e < s or s < prev_end:
            problem = f"assistant message {i} renders to an empty or overlapping range [{s}, {e})"
        if problem is not None:
            if inconsistent_turns == "error":
                raise DataError(
                    where,
                    problem + ": the chat template renders earlier turns differently once later turns follow "
                    "(e.g. it strips the reasoning of earlier assistant turns), so the loss span of assistant "
                    f"message {i} is not well defined; expected every prefix rendering to be a prefix of the full "
                    "rendering. Set inconsistent_turns='context' to train only the consistent turns.",
                    "inconsistent_template",
                )
            context += 1
            continue
        if e > s:
            spans.append((s, e))
        prev_end = e
    if not spans:
        raise DataError(
            where,
            "no assistant turn could be trained (every assistant turn was rendered inconsistently or empty); "
            "expected at least one assistant turn whose rendering is a prefix of the full rendering",
            "no_trainable_turn",
        )
    return Rendered(text=full, spans=tuple(spans), context_turns=context, where=where)


def _diverge(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


def _cut(text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[str], list[int]]:
    """Pieces of `text` cut at every span boundary, and each piece's loss."""
    pieces, loss = [], []
    pos = 0
    for s, e in spans:
        if s > pos:
            pieces.append(text[pos:s])
            loss.append(0)
        pieces.append(text[s:e])
        loss.append(1)
        pos = e
    if pos < len(text):
        pieces.append(text[pos:])
        loss.append(0)
    return pieces, loss


def tokenize_rendered(tokenizer, rendered: Sequence[Rendered], chunk: int = 256) -> list[TokenizedExample]:
    """Tokenizes rendered conversations in batches. Ids always equal the
    full-text tokenization; the mask is exact unless a token straddles a
    span boundary (then the first-character rule, `exact=False`); see the
    module doc."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("the data pipeline needs a fast (Rust `tokenizers`) tokenizer for exact offsets")
    out: list[TokenizedExample] = []
    for c in range(0, len(rendered), chunk):
        part = rendered[c : c + chunk]
        full = tokenizer([r.text for r in part], add_special_tokens=False, return_offsets_mapping=True)
        for j, r in enumerate(part):
            ids = list(full["input_ids"][j])
            offsets = np.asarray(full["offset_mapping"][j], dtype=np.int64).reshape(-1, 2)
            if _contiguous(offsets, len(r.text)):
                mask, exact = _mask_from_contiguous(offsets, r.spans)
            else:
                mask, exact = _mask_from_pieces(tokenizer, r, ids, offsets)
            out.append(
                TokenizedExample(
                    input_ids=np.asarray(ids, dtype=np.int32),
                    loss_mask=np.asarray(mask, dtype=np.int32),
                    exact=exact,
                )
            )
    return out


def _contiguous(offsets: np.ndarray, n_chars: int) -> bool:
    """Token k covers exactly the characters [offsets[k, 0], offsets[k, 1]) and
    the tokens tile the text (no trimmed offsets, no shared characters)."""
    if len(offsets) == 0:
        return n_chars == 0
    return bool(
        offsets[0, 0] == 0
        and offsets[-1, 1] == n_chars
        and np.all(offsets[:, 1] > offsets[:, 0])
        and np.all(offsets[1:, 0] == offsets[:-1, 1])
    )


def _in_spans(pos: np.ndarray, spans) -> np.ndarray:
    m = np.zeros(pos.shape, dtype=bool)
    for s, e in spans:
        m |= (pos >= s) & (pos < e)
    return m


def _mask_from_contiguous(offsets: np.ndarray, spans) -> tuple[np.ndarray, bool]:
    first = _in_spans(offsets[:, 0], spans)
    last = _in_spans(offsets[:, 1] - 1, spans)
    straddle = first != last
    for s, e in spans:  # a token strictly containing a whole span, or a boundary
        straddle |= (offsets[:, 0] < s) & (offsets[:, 1] > s)
        straddle |= (offsets[:, 0] < e) & (offsets[:, 1] > e)
    return first.astype(np.int32), not bool(straddle.any())


def _mask_from_pieces(tokenizer, r: Rendered, ids: list, offsets: np.ndarray) -> tuple[np.ndarray, bool]:
    """Offsets that do not tile the text (trimmed offsets, characters split
    over several byte tokens): tokenize the pieces between span boundaries;
    if they concatenate to the full tokenization each token takes its piece's
    loss, else the first-character rule."""
    pieces, piece_loss = _cut(r.text, r.spans)
    piece_ids = tokenizer(pieces, add_special_tokens=False)["input_ids"]
    cat: list[int] = []
    mask: list[int] = []
    for pid, lo in zip(piece_ids, piece_loss):
        cat.extend(pid)
        mask.extend([lo] * len(pid))
    if cat == ids:
        return np.asarray(mask, dtype=np.int32), True
    return _in_spans(offsets[:, 0], r.spans).astype(np.int32), False


def render_example(
    tokenizer,
    record: ChatRecord,
    *,
    extra_template_kwargs: dict | None = None,
    inconsistent_turns: str = "error",
) -> TokenizedExample:
    """One conversation -> `TokenizedExample` (untruncated). Convenience for
    `tokenize_rendered([render_spans(...)])[0]`."""
    r = render_spans(tokenizer, record, extra_template_kwargs=extra_template_kwargs, inconsistent_turns=inconsistent_turns)
    return tokenize_rendered(tokenizer, [r])[0]
