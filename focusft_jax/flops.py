"""Analytic FLOP counts of the decoder and of one SFT / FocuSFT training step.

XLA's cost analysis counts the body of a loop once, so for scanned layers
(and for the blockwise attention's own loops) its FLOP number is wrong. These
functions count FLOPs the way Levanter and MaxText do, from the shapes alone,
in plain Python integers (no jax computation runs):

* a matmul of an [m, k] by a [k, n] operand is 2 * m * n * k FLOPs;
* attention is two matmuls per attended (query, key) pair and query head:
  scores q.k and the value product p.v, 2 * head_dim FLOPs each;
* the backward of a matmul y = x W costs one matmul of the same size per
  cotangent that is wanted: dW = x^T dy when the weight's gradient is
  wanted, dx = dy W^T when something below x needs a gradient. So a layer
  trained with weight gradients costs 2x its forward in the backward (3x in
  all), and a frozen projection whose input cotangent is needed costs 1x.
  Attention has no weights: both its operands are activations, so its
  backward is dv, dp, dq and dk (2x its forward) whenever the cotangent
  reaches q, k and v, and drops what no wanted gradient reads (a frozen
  layer that passes its input cotangent on costs 1x its projections + 2x
  its attention);
* only matmuls are counted: norms, RoPE, softmax, SiLU, residual adds,
  biases, the cross-entropy and the embedding lookup (and its scatter-add
  gradient) are elementwise or data movement and are NOT counted;
* these are *model* FLOPs: the recomputation that activation checkpointing
  (`ModelConfig.remat`) adds is not counted, nor the work the blockwise
  attention spends on the masked part of partially visible blocks, nor the
  masked pairs the dense reference attention computes and throws away
  (describe the mask as "dense" to count those, as `attention_impl="dense"`
  runs them).

Attention is counted from the number of attended (query, key) pairs, which
`attention_pairs` gets from the per-query key ranges of
`focusft_jax.attention.AttnMeta` (exact) or from a simple description of the
batch (sequence length, response length, mask kind). A `Workload` bundles
what a step's cost depends on; `forward_flops` counts a forward pass (or a
slice of the layers), `step_flops` a whole training step following the
execution structure of `first_order.py` / `bilevel.py`, and
`model_flops_per_token` is the usual 6 N (+ attention) training FLOPs per
token for MFU.

Units: FLOPs (multiply and add counted as two), summed over the whole batch
unless a name says "per token".
"""
from __future__ import annotations

import dataclasses

import numpy as np

from focusft_jax import fast_weights
from focusft_jax.fast_weights import fast_start_layer
from focusft_jax.model import PROJECTIONS, ModelConfig

MASKS = ("causal", "glm_bidir", "dense")


# ---------------------------------------------------------------- attention pairs


def attention_pairs(
    kv_start=None,
    kv_end=None,
    *,
    queries=None,
    real=None,
    seq: int | None = None,
    response: int = 0,
    mask: str = "causal",
    scored: int | None = None,
) -> int:
    """Number of (query, key) pairs attended, summed over the batch (exact
    form) or for one row (simple form).

    Exact form: `kv_start`, `kv_end` [B, S] (or [S]) integer arrays, the
    fields of an `AttnMeta` (numpy or jax): query i sees keys
    kv_start[i] <= j < kv_end[i]. `queries` [B, P] optional integer indices of
    the queries to count (the scored positions `LossTargets.index` at which
    the last layer runs), default every query; `real` [B, S] optional 0/1
    mask of the queries to count (e.g. the attention mask, to leave out
    padding queries, which attend to themselves only). Repeated indices in
    `queries` are counted every time, as the gathered layer computes them.

    Simple form (`seq` given): one row of S tokens whose last R = `response`
    tokens are the response (loss 1) and the first C = S - R one context
    turn (loss 0), with `mask` one of
      "causal":    query i sees 0..i                  -> S (S + 1) / 2 pairs;
      "glm_bidir": context queries see the whole context block, response
                   queries every earlier token and themselves
                                                      -> C^2 + sum_{i=C}^{S-1} (i + 1);
      "dense":     every query sees every key         -> S^2 (what the dense
                   reference attention computes whatever the mask).
    With `scored` = P, only the P queries that `loss.loss_targets` gathers
    are counted: the positions t whose next token is a response token
    (t = S-1-n .. S-2, n = min(R, S-1)), the first P of them, and index 0 for
    each padding entry when P > n (P is clipped to S, as loss_targets does).
    """
    if seq is not None:
        if kv_start is not None or kv_end is not None or queries is not None or real is not None:
            raise ValueError("attention_pairs: give either kv ranges or a simple description (seq=...), not both")
        return _simple_pairs(int(seq), int(response), mask, scored)
    if kv_start is None or kv_end is None:
        raise ValueError("attention_pairs needs kv_start and kv_end, or seq= for the simple form")
    if scored is not None:
        raise ValueError("scored= is for the simple form; pass queries= (the scored indices) with kv ranges")
    start = np.asarray(kv_start, dtype=np.int64)
    end = np.asarray(kv_end, dtype=np.int64)
    width = end - start
    if real is not None:
        width = np.where(np.asarray(real).astype(bool), width, 0)
    if queries is not None:
        idx = np.asarray(queries, dtype=np.int64)
        if width.ndim == 1:
            width = width[None]
            idx = idx.reshape(1, -1) if idx.ndim == 1 else idx
        width = np.take_along_axis(width, idx, axis=-1)
    return int(width.sum())


def _check_simple(seq: int, response: int, mask: str) -> None:
    if mask not in MASKS:
        raise ValueError(f"mask {mask!r} is not one of {MASKS}")
    if seq < 1 or not 0 <= response <= seq:
        raise ValueError(f"need seq >= 1 and 0 <= response <= seq, got seq={seq}, response={response}")


def _simple_pairs(seq: int, response: int, mask: str, scored: int | None) -> int:
    _check_simple(seq, response, mask)
    S, C = seq, seq - response
    if scored is None:
        if mask == "dense":
            return S * S
        if mask == "causal":
            return S * (S + 1) // 2
        # glm_bidir: C*C for the bidirectional context block, then the response
        # rows i = C..S-1 see i + 1 keys each.
        return C * C + (S * (S + 1) - C * (C + 1)) // 2
    P = min(int(scored), S)  # loss_targets clips P to S
    n = max(0, min(response, S - 1))  # weighted positions (token_weights)
    t0 = S - 1 - n  # the first of them
    m = min(P, n)  # the ones that fit in P (nonzero keeps the first P)
    if mask == "dense":
        return P * S
    # Scored query t sees t + 1 keys under both masks: every scored t >= C
    # is a response query, and t = C - 1 (the last context token) sees the
    # C context keys, which is t + 1 too.
    real_pairs = m * t0 + m * (m + 1) // 2
    # Padding entries point at query 0: it sees only itself, except under
    # glm_bidir when it is in the context turn (then the C context keys).
    pad_width = C if (mask == "glm_bidir" and C >= 1) else 1
    return real_pairs + (P - m) * pad_width


# ---------------------------------------------------------------- workload


@dataclasses.dataclass(frozen=True)
class Workload:
    """What the FLOPs of a forward or a step depend on, besides the model.

    batch: B rows; seq: S tokens per row; scored: P scored positions per row
    (the static `LossTargets` length: the loader's bucketed count, the
    [B, P] shape of the batch's "loss_index", or S without it);
    pairs: attended (query, key) pairs over all B * S queries; scored_pairs:
    the pairs of the B * P scored queries (the gathered last layer).
    """

    batch: int
    seq: int
    scored: int
    pairs: int
    scored_pairs: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def workload(
    seq: int, response: int = 0, mask: str = "causal", *, batch: int = 1, scored: int | None = None
) -> Workload:
    """A batch of `batch` identical rows as `attention_pairs`' simple form
    describes them. scored: P (None: S, as `loss_targets` without
    max_positions); clipped to S as `loss_targets` does."""
    _check_simple(seq, response, mask)
    P = seq if scored is None else min(int(scored), seq)
    return Workload(
        batch=batch,
        seq=seq,
        scored=P,
        pairs=batch * attention_pairs(seq=seq, response=response, mask=mask),
        scored_pairs=batch * attention_pairs(seq=seq, response=response, mask=mask, scored=P),
    )


def workload_from_meta(kv_start, kv_end, scored_index=None) -> Workload:
    """The exact workload of a batch from its `AttnMeta` ranges [B, S] and
    its scored positions `LossTargets.index` [B, P] (None: every position)."""
    start = np.asarray(kv_start)
    if start.ndim != 2:
        raise ValueError(f"kv_start must be [B, S], got shape {start.shape}")
    B, S = start.shape
    idx = np.broadcast_to(np.arange(S), (B, S)) if scored_index is None else np.asarray(scored_index)
    return Workload(
        batch=B,
        seq=S,
        scored=idx.shape[1],
        pairs=attention_pairs(kv_start, kv_end),
        scored_pairs=attention_pairs(kv_start, kv_end, queries=idx),
    )


# ---------------------------------------------------------------- one layer


def projection_dims(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection of a decoder layer (from the model's parameter layout)."""
    return {name: fast_weights.projection_dims(cfg, name) for name in PROJECTIONS}


def layer_flops(
    cfg: ModelConfig,
    keys: int,
    queries: int,
    pairs: int,
    *,
    rank: int = 0,
    targets: tuple[str, ...] = (),
    backward: bool = False,
    base_grad: bool = True,
    fast_grad: bool = False,
    input_grad: bool = True,
) -> int:
    """FLOPs of one decoder layer over a whole batch: its forward, or with
    `backward` its backward alone.

    keys: rows at which keys and values are computed (B * S); queries: rows
    at which queries, the attention output and the MLP are computed (B * S,
    or B * P for a layer run at the scored positions only); pairs: attended
    (query, key) pairs of those queries. rank, targets: LoRA fast weights
    (A [rank, in], B [out, rank]) on `targets`, rank 0 for none.

    Backward flags: base_grad: the layer's weight gradients are wanted;
    fast_grad: the fast weights' gradients are wanted; input_grad: the
    cotangent of the layer's input is wanted. The backward computes exactly
    the cotangents that some wanted gradient reads (what XLA keeps after
    dead-code elimination): e.g. an inner step's layer `start` with FFN-only
    targets runs no attention backward at all.
    """
    dims = projection_dims(cfg)
    rows = {p: (keys if p in ("k_proj", "v_proj") else queries) for p in PROJECTIONS}
    lora = set(targets) if rank else set()
    attn_unit = 2 * pairs * cfg.head_dim * cfg.num_heads  # one attention matmul

    if not backward:
        total = 2 * attn_unit
        for p, (i, o) in dims.items():
            n = rows[p]
            total += 2 * n * i * o
            if p in lora:
                total += 2 * n * rank * (i + o)  # x A^T, then (x A^T) B^T
        return total

    def g(p):  # is a gradient of p's own weights wanted?
        return base_grad or (fast_grad and p in lora)

    # Which cotangents the backward must form, from the top of the layer down.
    need_x = input_grad
    need_q, need_k, need_v = g("q_proj") or need_x, g("k_proj") or need_x, g("v_proj") or need_x
    need_scores = need_q or need_k
    need_attn = need_scores or need_v  # cotangent of the attention output (o_proj's input)
    need_o = g("o_proj") or need_attn
    need_h2 = need_o or need_x  # the MLP's input cotangent, part of the residual stream's
    need_gate, need_up = g("gate_proj") or need_h2, g("up_proj") or need_h2
    need_act = need_gate or need_up  # down_proj's input cotangent
    need_down = g("down_proj") or need_act

    out_needed = {
        "q_proj": need_q, "k_proj": need_k, "v_proj": need_v, "o_proj": need_o,
        "gate_proj": need_gate, "up_proj": need_up, "down_proj": need_down,
    }
    in_needed = {
        "q_proj": need_x, "k_proj": need_x, "v_proj": need_x, "o_proj": need_attn,
        "gate_proj": need_h2, "up_proj": need_h2, "down_proj": need_act,
    }
    total = 0
    for p, (i, o) in dims.items():
        if not out_needed[p]:
            continue
        n = rows[p]
        if base_grad:
            total += 2 * n * i * o  # dW = x^T dy
        if in_needed[p]:
            total += 2 * n * i * o  # dx = dy W^T
        if p in lora:
            fg = fast_grad
            if fg or in_needed[p]:
                total += 2 * n * o * rank  # d(x A^T) = dy B
            if fg:
                total += 2 * n * o * rank + 2 * n * rank * i  # dB, dA
            if in_needed[p]:
                total += 2 * n * rank * i  # dx += d(x A^T) A
    if need_v:
        total += attn_unit  # dv = p^T d_out
    if need_scores:
        total += attn_unit  # dp = d_out v^T
        total += attn_unit * (int(need_q) + int(need_k))  # dq = ds k, dk = ds^T q
    return total


def _layer_rows(work: Workload, layer: int, num_layers: int, gather: bool) -> tuple[int, int, int]:
    """(keys, queries, pairs) of `layer`: the last one at the scored positions when gathered."""
    if gather and layer == num_layers - 1:
        return work.tokens, work.batch * work.scored, work.scored_pairs
    return work.tokens, work.tokens, work.pairs


def head_flops(cfg: ModelConfig, rows: int) -> int:
    """Forward FLOPs of the LM head (tied or not) at `rows` positions: 2 * rows * D * V."""
    return 2 * rows * cfg.hidden_size * cfg.vocab_size


# ---------------------------------------------------------------- a forward pass


def forward_flops(
    cfg: ModelConfig,
    work: Workload,
    *,
    layers: tuple[int, int] | None = None,
    fast=None,
    head: bool = True,
    gather_last: bool | None = None,
) -> int:
    """Forward FLOPs over the batch of `work`: layers lo..hi-1 (default all)
    and, with `head`, the LM head at the B * P scored positions (P = S is
    `model.forward`'s full-sequence logits).

    fast: a `FocusConfig` (or anything with rank, targets, fraction): LoRA
    fast weights on `targets` of layers fast_start_layer(L, fraction)..L-1,
    as `model.forward(fast=...)` applies them. gather_last: the last layer
    (when in range) runs its queries, attention output and MLP only at the
    scored positions (keys and values at all S), as the fused training step
    does; default: when P < S.
    """
    L = cfg.num_layers
    lo, hi = (0, L) if layers is None else layers
    if not 0 <= lo <= hi <= L:
        raise ValueError(f"layers must satisfy 0 <= lo <= hi <= {L}, got {(lo, hi)}")
    gather = work.scored < work.seq if gather_last is None else gather_last
    fast_start = L if fast is None else fast_start_layer(L, fast.fraction)
    total = 0
    for i in range(lo, hi):
        keys, queries, pairs = _layer_rows(work, i, L, gather)
        lora = dict(rank=fast.rank, targets=tuple(fast.targets)) if i >= fast_start else {}
        total += layer_flops(cfg, keys, queries, pairs, **lora)
    if head:
        total += head_flops(cfg, work.batch * work.scored)
    return total


# ---------------------------------------------------------------- a training step


def step_flops(
    cfg: ModelConfig,
    fcfg,
    work: Workload | int,
    response: int | None = None,
    *,
    mask: str | None = None,
    batch: int = 1,
    scored: int | None = None,
    embed_grad: bool = True,
) -> dict[str, int]:
    """FLOPs of one training step: the loss and its gradient wrt all base
    weights (`jax.grad(focusft_loss)`), for SFT (num_inner_steps K = 0),
    FocuSFT first_order and FocuSFT full.

    work: a `Workload`, or the sequence length S, with `response` R, `mask`
    (default `fcfg.attention`; "dense" counts what dense attention computes),
    `batch` and P = `scored` (None: S), as `workload` takes. P is a shape of
    the batch (its "loss_index" [B, P]), not a method setting.
    embed_grad: the embedding table's gradient is wanted, so layer 0's input
    cotangent is formed (the embedding's own gradient is a scatter, not
    counted).

    The execution structure counted (first_order.py, bilevel.py), with
    start = fast_start_layer(L, fraction) (0 for SFT, where every layer is
    "top"):
      bottom: layers 0..start-1, one forward and one backward with weight
              gradients (3x forward);
      inner:  K passes through the top layers start..L-1 with fast weights:
              forward, then a backward for the fast-weight gradient only (no
              weight gradients; layer start's input cotangent is not formed);
      outer:  the top layers once more: forward and backward with weight
              gradients and the cotangent of the bottom's output;
      head:   the LM head at the B * P scored positions in every pass:
              forward + input cotangent in the inner passes, forward + both
              cotangents in the outer one;
      meta:   `full` only, an approximation: the reverse pass through the K
              unrolled inner steps. Each is counted as 2x an inner pass (top
              layers and head) whose backward also forms layer start's input
              cotangent: every matmul of an inner pass, forward and backward,
              has both operands depending on the base weights, so its
              transpose is two matmuls of its size, and the second-order
              cotangent runs down through layer start (its attention
              included) to the bottom. In full mode the outer backward also
              forms the fast-weight gradient (dL/dphi_K). Measured against
              the matmul FLOPs of XLA's unrolled program on tiny models
              (L = 2-3, K = 1-2, ranks 4 and 32, FFN and q/v targets): the
              total is 0-8% above XLA's (worst at rank 32 = hidden size,
              where phi_0 being a constant halves some transposes); a plain
              2x inner pass (no layer-start cotangent) was 3-15% below.
    In the fused form (first_order.py: SFT and first_order unless
    `fused_first_order` is off, and not when no layer has fast weights) the
    last layer runs at the P scored positions only when P < S; bilevel.py's
    autodiff form (full, or fused_first_order off) runs it at all S. With no
    top layers (fraction 0) an inner pass is the head's forward only (its loss
    is still reported) and `full` adds nothing.

    Returns {"bottom", "inner", "outer", "head", "meta", "total"} in FLOPs
    over the batch (layers only in the first three; "head" is every pass's
    LM head). Elementwise work and remat recomputation are not counted.

    This is the work the method's passes do, not what XLA may save on top:
    its common-subexpression elimination computes the part of layer start
    that does not depend on the fast weights (`shared_start_flops`) once for
    passes that share it. Measured (jax 0.10.2, CPU, unrolled layers): the K
    inner passes share it in the fused first_order form, and so does the
    outer pass when start = 0, so XLA's count is lower by (K - 1) (K with
    start = 0) times `shared_start_flops` there.
    """
    if not isinstance(work, Workload):
        if response is None:
            raise ValueError("step_flops: give a Workload, or the sequence length and response=")
        work = workload(int(work), response, mask or fcfg.attention, batch=batch, scored=scored)
    elif response is not None or mask is not None or scored is not None:
        raise ValueError("step_flops: response=, mask= and scored= describe a batch; a Workload already does")
    L, K = cfg.num_layers, fcfg.num_inner_steps
    start = 0 if K == 0 else fast_start_layer(L, fcfg.fraction)
    full = K > 0 and fcfg.meta_gradient == "full"
    fused = fcfg.fused_first_order and (K == 0 or (not full and start < L))
    gather = fused and work.scored < work.seq
    lora = dict(rank=fcfg.rank, targets=tuple(fcfg.targets)) if K > 0 else {}
    head_rows = work.batch * work.scored
    head_fwd = head_flops(cfg, head_rows)

    def rows(i):
        return _layer_rows(work, i, L, gather)

    bottom = 0
    for i in range(start):
        r = rows(i)
        bottom += layer_flops(cfg, *r)
        bottom += layer_flops(cfg, *r, backward=True, base_grad=True, input_grad=i > 0 or embed_grad)

    inner_pass = 0
    for i in range(start, L):
        r = rows(i)
        inner_pass += layer_flops(cfg, *r, **lora)
        inner_pass += layer_flops(cfg, *r, **lora, backward=True, base_grad=False, fast_grad=True, input_grad=i > start)
    # The inner head: forward, and its input cotangent when there are top layers to reach.
    inner_head = head_fwd * (2 if start < L else 1)

    outer = 0
    for i in range(start, L):
        r = rows(i)
        outer += layer_flops(cfg, *r, **lora)
        outer += layer_flops(
            cfg, *r, **lora, backward=True, base_grad=True, fast_grad=full, input_grad=i > 0 or embed_grad
        )
    outer_head = head_fwd * (3 if (L > 0 or embed_grad) else 2)

    meta = 0
    if full and start < L:
        # The inner pass again, with layer start's input cotangent formed (see the docstring).
        reverse = inner_pass + inner_head
        r = rows(start)
        reverse += layer_flops(cfg, *r, **lora, backward=True, base_grad=False, fast_grad=True, input_grad=True)
        reverse -= layer_flops(cfg, *r, **lora, backward=True, base_grad=False, fast_grad=True, input_grad=False)
        meta = 2 * K * reverse
    out = {
        "bottom": bottom,
        "inner": K * inner_pass,
        "outer": outer,
        "head": K * inner_head + outer_head,
        "meta": meta,
    }
    out["total"] = sum(out.values())
    return out


def shared_start_flops(cfg: ModelConfig, fcfg, work: Workload) -> int:
    """Forward FLOPs of layer `start` that do not depend on the fast weights,
    over the batch: identical in every pass of a step, since that layer's
    input (the bottom's output) is. The base projections of the normed
    input (q, k, v), then, in data-flow order, whatever no fast-weight
    target feeds: the attention scores while q_proj and k_proj are not
    targets, the value product while v_proj is not either, o_proj's base
    matmul, then the MLP's base matmuls likewise. FFN-only targets share
    q, k, v, the attention, o_proj and gate/up's base matmuls. 0 for SFT or
    when no layer has fast weights. See `step_flops` for where XLA's CSE
    uses this."""
    L, K = cfg.num_layers, fcfg.num_inner_steps
    start = fast_start_layer(L, fcfg.fraction)
    if K == 0 or start >= L:
        return 0
    full = fcfg.meta_gradient == "full"
    gather = fcfg.fused_first_order and not full and work.scored < work.seq
    keys, queries, pairs = _layer_rows(work, start, L, gather)
    t = set(fcfg.targets)
    dims = projection_dims(cfg)
    rows = {p: (keys if p in ("k_proj", "v_proj") else queries) for p in PROJECTIONS}

    def mm(p):
        return 2 * rows[p] * dims[p][0] * dims[p][1]

    attn_unit = 2 * pairs * cfg.head_dim * cfg.num_heads
    total = mm("q_proj") + mm("k_proj") + mm("v_proj")
    scores_dep = bool(t & {"q_proj", "k_proj"})
    attn_dep = scores_dep or "v_proj" in t
    total += attn_unit * (int(not scores_dep) + int(not attn_dep))
    if not attn_dep:
        total += mm("o_proj")
    x2_dep = attn_dep or "o_proj" in t
    if not x2_dep:
        total += mm("gate_proj") + mm("up_proj")
        if not t & {"gate_proj", "up_proj"}:
            total += mm("down_proj")
    return total


# ---------------------------------------------------------------- MFU


def matmul_params(cfg: ModelConfig) -> int:
    """N of the 6 N rule: weights that multiply activations (every layer's
    projections and the LM head, counted once when tied); the embedding
    lookup, norms and biases are left out."""
    per_layer = sum(i * o for i, o in projection_dims(cfg).values())
    return cfg.num_layers * per_layer + cfg.hidden_size * cfg.vocab_size


def model_flops_per_token(cfg: ModelConfig, seq: int, mask: str = "causal", response: int = 0) -> float:
    """Standard training FLOPs per token for MFU: 6 N + 12 L Hq hd (pairs / S)
    with N = `matmul_params` (forward 2 N, backward 4 N) and pairs the
    attended pairs of one row of S tokens under `mask` (see
    `attention_pairs`; "causal" gives (S + 1) / 2 keys per query, "dense"
    gives S, the PaLM / Levanter convention). The LM head is counted at
    every token and there is no FocuSFT structure: divide `step_flops`'
    total by the step's tokens for the method's own count. Model FLOPs
    (no remat recomputation, no elementwise work)."""
    pairs = attention_pairs(seq=seq, response=response, mask=mask)
    attn = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * pairs / seq
    return 6.0 * matmul_params(cfg) + attn
