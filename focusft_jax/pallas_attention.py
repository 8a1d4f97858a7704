"""Flash attention as `jax.experimental.pallas` kernels (Triton on GPU, Mosaic on TPU).

Same contract as `blockwise.blockwise_attention` (and `attention.dense_attention`):
q [B, S, Hq, D], k and v [B, T, Hkv, D] with Hq a multiple of Hkv (GQA); key j
is visible to query i iff `kv_start[b, i] <= j < kv_end[b, i]`; the result is
[B, S, Hq, D] in q's dtype, with the softmax statistics and every accumulation
in float32; a query with an empty range outputs zeros and gets zero gradients.

Two kernel families compute the same three kernels (internal layouts are
blockwise's head-major ones, all sequence axes padded to a multiple of the
block):

* forward: online softmax over the key blocks [lo, hi) that intersect the
  union of the query block's rows' ranges; blocks outside it are never
  loaded nor computed, only the partially visible ones are masked. Writes o
  and the row log-sum-exp.
* dq: the same key-block range, recomputing the probabilities from the
  saved LSE (FlashAttention-2).
* dk/dv: for each key block, over the query heads of its KV head's group
  and, for each, over the query blocks [qlo, qhi) whose key-block range
  contains it, so the GQA sum over a group happens in the kernel's float32
  accumulators.

"triton" (GPU): grids (B, Hq, query blocks) and (B, Hkv, key blocks); each
program keeps the whole key (query) axis of its head in its refs and loops
over the visible blocks with `fori_loop` bounds read from the ranges.

"mosaic" (TPU): Mosaic needs the last two dimensions of every block to be
multiples of (8, 128) (or the whole array's), and VMEM cannot hold a whole
long key axis, so the block being visited is a grid axis instead: grids
(B, Hq, query blocks, key steps) and (B, Hkv, key blocks, G * query steps),
the last axis sequential ("arbitrary") and accumulating into VMEM scratch.
The ranges are scalar-prefetched (SMEM); step n of a range [lo, hi) maps to
block lo + n, and the steps past hi - lo map to block hi - 1 again, so the
pipeline issues no copy for them, and `pl.when` skips their compute (a
skipped block costs one grid step's overhead). Blocks are multiples of 128
and D is zero-padded to one; per-row values (kv_start, kv_end, lse, delta)
travel lane-broadcast as [..., Sp, 128] arrays read as (bq, 128) tiles.

The per-block ranges are computed per batch row (not a union over the batch as
in blockwise, whose loops are shared by the batch) and passed to the kernels as
small int32 [B, nq] / [B, nk] arrays read as scalars (flattened to 1-D for
Mosaic's scalar prefetch: SMEM pads 2-D arrays).

Differentiation is blockwise's own wiring (the kernels register themselves
in `blockwise.KERNEL_OPS`): `_flash` (o, lse) is a `jax.custom_vjp` whose
backward is `_flash_grad`, itself a `custom_vjp` whose primal here runs the
Pallas backward kernels. The kernels are not differentiable,
so `_flash_grad`'s own backward (only used for second-order gradients, as the
"full" meta-gradient takes them) is the reverse-mode derivative of blockwise's
differentiable twin `_bwd_scan` of the same function on the same padded
arrays. Second order is therefore exactly blockwise's; first order runs
entirely in Pallas. Under `jax.vmap` the vmapped axis is folded into B
(blockwise's `_batch_folding`) before the kernels run.

Execution: the family is `pallas_attention(kernels=...)`, by default "mosaic"
on a TPU backend and "triton" elsewhere. On CPU (`jax.default_backend() ==
"cpu"`) the kernels run in Pallas' interpret mode (slow: meant for tests;
either family, the mosaic one also in Pallas' TPU interpreter via
`interpret=pltpu.InterpretParams()`); on GPU the triton family is compiled by
Triton, on TPU the mosaic family by Mosaic. From a CPU host both lower with
`jax.export` (platforms "cuda" / "tpu"; tests do it). The mosaic family has
not yet been compiled or run on a TPU from this repository: export checks
the Pallas-to-Mosaic lowering and its block rules, not Mosaic's own compiler
(layouts, VMEM limits), which runs on the TPU host.

Block sizes: triton, powers of two (Triton needs power-of-two tensor shapes)
of at least 16 (the smallest Triton matmul), and the head dimension is
zero-padded to such a size; mosaic, multiples of 128 (default 512, the size
JAX's splash attention defaults to; not measured here), with the head
dimension zero-padded to a multiple of 128. Zero columns change no score and
give zero output columns, which are sliced off.
"""
from __future__ import annotations

from functools import cache, partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from focusft_jax import blockwise as _bw

DEFAULT_BLOCK_Q = 64
DEFAULT_BLOCK_K = 64
MIN_BLOCK = 16
# Triton launch parameters of the compiled kernels (ignored in interpret mode).
NUM_WARPS = 4
NUM_STAGES = 2

_cdiv = _bw._cdiv


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _dot(a, b):
    """a [m, k] @ b [k, n] with a float32 result (on GPU, float32 operands
    use IEEE float32 products, not TF32: Triton's default for float32)."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nt(a, b):
    """a [m, k] @ b[n, k]^T, float32 result."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    """a[k, m]^T @ b [k, n], float32 result."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _mask(row_start, row_end, j, bk):
    """bool [bq, bk]: key j * bk + c visible to row r of the block."""
    kidx = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    return (kidx >= row_start[:, None]) & (kidx < row_end[:, None])


# ---------------------------------------------------------------------------
# Block ranges (plain JAX, O(B * S) plus O(B * nq * nk) booleans).
# ---------------------------------------------------------------------------


def _key_block_ranges(start, end, bq, bk, nk):
    """Per batch row and query block, the key blocks [lo, hi) that intersect
    the union of the block's rows' ranges; int32 [B, nq] each. Empty rows
    (including the padding rows) are ignored; an all-empty block gets
    lo == hi."""
    b, sp = start.shape
    nq = sp // bq
    nonempty = start < end
    lo = jnp.where(nonempty, start, nk * bk).reshape(b, nq, bq).min(axis=2)
    hi = jnp.where(nonempty, end, 0).reshape(b, nq, bq).max(axis=2)
    lo_blk = jnp.minimum(lo // bk, nk)
    hi_blk = jnp.clip(_cdiv(hi, bk), lo_blk, nk)
    return lo_blk.astype(jnp.int32), hi_blk.astype(jnp.int32)


def _query_block_ranges(lo, hi, nk):
    """Per batch row and key block j, the hull [qlo, qhi) of the query blocks
    i with lo[i] <= j < hi[i]; int32 [B, nk] each (qlo == qhi when none).
    A hull rather than a set: a query block inside it that does not see j is
    computed with everything masked (correct, only not skipped); with the
    masks `attention_meta` builds, the hull is exact."""
    nq = lo.shape[1]
    j = jnp.arange(nk, dtype=jnp.int32)
    sees = (lo[:, :, None] <= j) & (j < hi[:, :, None])  # [B, nq, nk]
    i = jnp.arange(nq, dtype=jnp.int32)[None, :, None]
    qlo = jnp.min(jnp.where(sees, i, nq), axis=1)
    qhi = jnp.max(jnp.where(sees, i + 1, 0), axis=1)
    return qlo.astype(jnp.int32), jnp.maximum(qhi, qlo).astype(jnp.int32)


def _triton_call(kernel, grid, in_specs, out_specs, out_shape, interpret):
    params = {} if interpret else {"compiler_params": _triton_params()}
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        interpret=interpret, **params
    )


def _triton_params():
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)


# ---------------------------------------------------------------------------
# Kernels. A kernel sees one (batch, head, block) program; `None` block
# dimensions are squeezed away, so refs below are 1-D / 2-D.
# ---------------------------------------------------------------------------


def _fwd_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, start_ref, end_ref, o_ref, lse_ref, *, scale, bk):
    """q_ref, o_ref [bq, D]; k_ref, v_ref [Tp, D] (the whole key axis of the
    KV head, sliced per key block); start/end/lse refs [bq]."""
    b, i = pl.program_id(0), pl.program_id(2)
    q = q_ref[...]
    rs, re = start_ref[...], end_ref[...]
    bq, d = q.shape

    def body(j, carry):
        m, l, acc = carry
        kb = k_ref[pl.ds(j * bk, bk), :]
        vb = v_ref[pl.ds(j * bk, bk), :]
        s = jnp.where(_mask(rs, re, j, bk), _dot_nt(q, kb) * scale, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # A row with nothing visible yet keeps m = -inf: shift it by 0 so
        # that exp(-inf - (-inf)) = NaN never happens.
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe[:, None])
        alpha = jnp.exp(m - m_safe)
        l = alpha * l + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + _dot(p.astype(vb.dtype), vb)
        return m_new, l, acc

    init = (
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
        jnp.zeros((bq, d), jnp.float32),
    )
    m, l, acc = lax.fori_loop(lo_ref[b, i], hi_ref[b, i], body, init)
    nonempty = l > 0
    l_safe = jnp.where(nonempty, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    # Empty rows: output 0 and lse 0 (as blockwise; any finite value works,
    # every entry of such a row is masked before the exp in the backward).
    lse_ref[...] = jnp.where(nonempty, m + jnp.log(l_safe), 0.0)


def _dq_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, start_ref, end_ref, dq_ref, *,
               scale, bk):
    """q_ref, do_ref, dq_ref [bq, D]; k_ref, v_ref [Tp, D]; start/end/lse/
    delta refs [bq]. dS = P * (dP - delta), dQ = scale * dS K."""
    b, i = pl.program_id(0), pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    rs, re = start_ref[...], end_ref[...]

    def body(j, dq):
        kb = k_ref[pl.ds(j * bk, bk), :]
        vb = v_ref[pl.ds(j * bk, bk), :]
        # The mask is applied inside the exp (exp(-inf) = 0), so masked
        # entries are exact zeros whatever the score.
        p = jnp.exp(jnp.where(_mask(rs, re, j, bk), _dot_nt(q, kb) * scale - lse[:, None], -jnp.inf))
        ds = p * (_dot_nt(do, vb) - delta[:, None])
        return dq + _dot(ds.astype(kb.dtype), kb)

    dq = lax.fori_loop(lo_ref[b, i], hi_ref[b, i], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(qlo_ref, qhi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, start_ref, end_ref,
                dk_ref, dv_ref, *, scale, bq, groups):
    """q_ref, do_ref [G, Sp, D] and lse/delta refs [G, Sp] (the KV head's
    query-head group, sliced per query block); start/end refs [Sp];
    k_ref, v_ref, dk_ref, dv_ref [bk, D]. dV = sum P^T dO and
    dK = scale * sum dS^T Q over the group's heads and visible query blocks."""
    b, j = pl.program_id(0), pl.program_id(2)
    kb, vb = k_ref[...], v_ref[...]
    bk = kb.shape[0]
    qlo, qhi = qlo_ref[b, j], qhi_ref[b, j]

    def head(g, carry):
        def body(i, carry):
            dk, dv = carry
            rows = pl.ds(i * bq, bq)
            q = q_ref[g, rows, :]
            do = do_ref[g, rows, :]
            lse, delta = lse_ref[g, rows], delta_ref[g, rows]
            rs, re = start_ref[rows], end_ref[rows]
            p = jnp.exp(jnp.where(_mask(rs, re, j, bk), _dot_nt(q, kb) * scale - lse[:, None], -jnp.inf))
            ds = p * (_dot_nt(do, vb) - delta[:, None])
            dv = dv + _dot_tn(p.astype(do.dtype), do)
            dk = dk + _dot_tn(ds.astype(q.dtype), q)
            return dk, dv

        return lax.fori_loop(qlo, qhi, body, carry)

    zero = jnp.zeros(kb.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, groups, head, (zero, zero))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ---------------------------------------------------------------------------
# pallas_call wrappers on the padded head-major arrays:
#   q, o, do: [B, Hkv, G, Sp, D]; k, v: [B, Hkv, Tp, D];
#   start, end: int32 [B, Sp] (padding rows empty); lse, delta: f32 [B, Hkv, G, Sp].
# ---------------------------------------------------------------------------


def _fwd_triton(q, k, v, start, end, scale, bq, bk, interpret):
    """(o in q.dtype, lse float32) of the padded arrays."""
    b, hkv, g, sp, d = q.shape
    tp = k.shape[2]
    nq, nk = sp // bq, tp // bk
    lo, hi = _key_block_ranges(start, end, bq, bk, nk)
    whole = pl.BlockSpec((b, nq), lambda bi, h, i: (0, 0))
    q_spec = pl.BlockSpec((None, None, None, bq, d), lambda bi, h, i: (bi, h // g, h % g, i, 0))
    kv_spec = pl.BlockSpec((None, None, tp, d), lambda bi, h, i: (bi, h // g, 0, 0))
    row_spec = pl.BlockSpec((None, bq), lambda bi, h, i: (bi, i))
    lse_spec = pl.BlockSpec((None, None, None, bq), lambda bi, h, i: (bi, h // g, h % g, i))
    return _triton_call(
        partial(_fwd_kernel, scale=scale, bk=bk),
        grid=(b, hkv * g, nq),
        in_specs=[whole, whole, q_spec, kv_spec, kv_spec, row_spec, row_spec],
        out_specs=[q_spec, lse_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32)],
        interpret=interpret,
    )(lo, hi, q, k, v, start, end)


def _bwd_triton(q, k, v, o, lse, do, dlse, start, end, scale, bq, bk, interpret):
    """(dq, dk, dv) in the dtypes of q, k, v for output cotangents (do, dlse)."""
    b, hkv, g, sp, d = q.shape
    tp = k.shape[2]
    nq, nk = sp // bq, tp // bk
    lo, hi = _key_block_ranges(start, end, bq, bk, nk)
    qlo, qhi = _query_block_ranges(lo, hi, nk)
    delta = _bw._delta(o, do, dlse)

    # dq: programs over (batch, query head, query block).
    whole_q = pl.BlockSpec((b, nq), lambda bi, h, i: (0, 0))
    q_spec = pl.BlockSpec((None, None, None, bq, d), lambda bi, h, i: (bi, h // g, h % g, i, 0))
    kv_spec = pl.BlockSpec((None, None, tp, d), lambda bi, h, i: (bi, h // g, 0, 0))
    stat_spec = pl.BlockSpec((None, None, None, bq), lambda bi, h, i: (bi, h // g, h % g, i))
    row_spec = pl.BlockSpec((None, bq), lambda bi, h, i: (bi, i))
    dq = _triton_call(
        partial(_dq_kernel, scale=scale, bk=bk),
        grid=(b, hkv * g, nq),
        in_specs=[whole_q, whole_q, q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec, row_spec, row_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret,
    )(lo, hi, q, k, v, do, lse, delta, start, end)

    # dk, dv: programs over (batch, KV head, key block).
    whole_k = pl.BlockSpec((b, nk), lambda bi, h, j: (0, 0))
    group_spec = pl.BlockSpec((None, None, g, sp, d), lambda bi, h, j: (bi, h, 0, 0, 0))
    group_stat = pl.BlockSpec((None, None, g, sp), lambda bi, h, j: (bi, h, 0, 0))
    rows_all = pl.BlockSpec((None, sp), lambda bi, h, j: (bi, 0))
    kblk = pl.BlockSpec((None, None, bk, d), lambda bi, h, j: (bi, h, j, 0))
    dk, dv = _triton_call(
        partial(_dkv_kernel, scale=scale, bq=bq, groups=g),
        grid=(b, hkv, nk),
        in_specs=[whole_k, whole_k, group_spec, kblk, kblk, group_spec, group_stat, group_stat, rows_all, rows_all],
        out_specs=[kblk, kblk],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=interpret,
    )(qlo, qhi, q, k, v, do, lse, delta, start, end)
    return dq, dk, dv


# ---------------------------------------------------------------------------
# Mosaic (TPU) kernels. Same math as the Triton ones, laid out for Mosaic:
# every block's last two dimensions are multiples of (8, 128), so
#   * block sizes are multiples of LANES and D is zero-padded to one;
#   * per-row values (kv_start, kv_end, lse, delta) travel lane-broadcast,
#     [.., Sp, LANES], as (bq, LANES) tiles that are widened to (bq, bk) or
#     (bq, D) by tiling (no 1-D blocks, no lane broadcasts of a column);
#   * the key (or, for dk/dv, query) blocks are a grid axis, not a loop over
#     a whole resident key axis, so VMEM holds one block of each operand
#     whatever T is. The per-block ranges are scalar-prefetched (SMEM) and
#     the index maps read block lo + step, clamped to the last visible one:
#     a step past the range keeps the previous block index, so Pallas issues
#     no copy for it, and `pl.when` skips its compute. Skipped blocks cost a
#     grid step's overhead, never a load or a matmul.
# ---------------------------------------------------------------------------

LANES = 128
# Unmeasured on a TPU: the size JAX's splash attention uses by default.
TPU_BLOCK_Q = 512
TPU_BLOCK_K = 512


def _div(a, n):
    """a // n of a non-negative grid index. Truncating `lax.div` (equal to
    floor division here) because jnp's `//` lowers through `sign`, whose
    Mosaic rule asks for the TPU generation: lowering then fails on a host
    without a TPU (e.g. `jax.export` from CPU)."""
    return lax.div(a, n)


def _rem(a, n):
    """a % n of a non-negative grid index (see `_div`)."""
    return lax.rem(a, n)


def _lanes(x, n):
    """A lane-broadcast (rows, LANES) tile widened to (rows, n), n a
    multiple of LANES."""
    return jnp.tile(x, (1, n // LANES))


def _visited(lo_ref, hi_ref, idx, step, n):
    """(block index for this grid step, whether the step computes): steps
    0 .. hi - lo - 1 visit blocks lo .. hi - 1; later ones (and all steps of
    an empty range) stay on a valid block already resident and compute
    nothing."""
    lo, hi = lo_ref[idx], hi_ref[idx]
    blk = jnp.clip(jnp.minimum(lo + step, hi - 1), 0, n - 1)
    return blk, step < hi - lo


def _tpu_mask(rs, re, j, bq, bk):
    """bool [bq, bk] from lane-broadcast row ranges rs, re (bq, LANES)."""
    kidx = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    return (kidx >= _lanes(rs, bk)) & (kidx < _lanes(re, bk))


def _tpu_fwd_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, start_ref, end_ref, o_ref, lse_ref,
                    m_ref, l_ref, acc_ref, *, scale, nq, nk):
    """Grid (B, Hq, nq, nk). q_ref, o_ref [bq, D]; k_ref, v_ref [bk, D];
    start/end/lse refs and the m/l scratch [bq, LANES] (lane-broadcast);
    acc scratch [bq, D] float32."""
    b, i, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    j, run = _visited(lo_ref, hi_ref, b * nq + i, step, nk)
    bq, d = q_ref.shape
    bk = k_ref.shape[0]

    @pl.when(step == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(run)
    def _block():
        kb, vb = k_ref[...], v_ref[...]
        mask = _tpu_mask(start_ref[...], end_ref[...], j, bq, bk)
        s = jnp.where(mask, _dot_nt(q_ref[...], kb) * scale, -jnp.inf)
        m = m_ref[...]
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        # As in `_fwd_kernel`: rows with nothing visible yet shift by 0.
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - _lanes(m_safe, bk))
        alpha = jnp.exp(m - m_safe)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_ref[...] = _lanes(alpha, d) * acc_ref[...] + _dot(p.astype(vb.dtype), vb)
        m_ref[...] = m_new

    @pl.when(step == nk - 1)
    def _finish():
        m, l = m_ref[...], l_ref[...]
        nonempty = l > 0
        l_safe = jnp.where(nonempty, l, 1.0)
        o_ref[...] = (acc_ref[...] / _lanes(l_safe, d)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(nonempty, m + jnp.log(l_safe), 0.0)


def _tpu_probs(q, kb, lse, rs, re, j, scale):
    """P of one [bq, bk] block from the saved (lane-broadcast) LSE, the mask
    inside the exp (exact zeros, as in `_dq_kernel`)."""
    bq, bk = q.shape[0], kb.shape[0]
    s = _dot_nt(q, kb) * scale - _lanes(lse, bk)
    return jnp.exp(jnp.where(_tpu_mask(rs, re, j, bq, bk), s, -jnp.inf))


def _tpu_dq_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, start_ref, end_ref,
                   dq_ref, acc_ref, *, scale, nq, nk):
    """Grid (B, Hq, nq, nk). q/do/dq refs [bq, D], k/v refs [bk, D],
    lse/delta/start/end refs [bq, LANES]; acc scratch [bq, D] float32."""
    b, i, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    j, run = _visited(lo_ref, hi_ref, b * nq + i, step, nk)

    @pl.when(step == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(run)
    def _block():
        kb, vb = k_ref[...], v_ref[...]
        p = _tpu_probs(q_ref[...], kb, lse_ref[...], start_ref[...], end_ref[...], j, scale)
        ds = p * (_dot_nt(do_ref[...], vb) - _lanes(delta_ref[...], kb.shape[0]))
        acc_ref[...] += _dot(ds.astype(kb.dtype), kb)

    @pl.when(step == nk - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _tpu_dkv_kernel(qlo_ref, qhi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, start_ref, end_ref,
                    dk_ref, dv_ref, dk_acc, dv_acc, *, scale, nq, nk, groups):
    """Grid (B, Hkv, nk, G * nq): for key block j, the query heads of the
    group one after the other, each over the query blocks [qlo, qhi) of j.
    q/do refs [bq, D], k/v/dk/dv refs [bk, D], lse/delta/start/end refs
    [bq, LANES]; dk/dv scratch [bk, D] float32 (the GQA sum happens there)."""
    b, j, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    i, run = _visited(qlo_ref, qhi_ref, b * nk + j, _rem(t, nq), nq)

    @pl.when(t == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    @pl.when(run)
    def _block():
        q, do, kb = q_ref[...], do_ref[...], k_ref[...]
        p = _tpu_probs(q, kb, lse_ref[...], start_ref[...], end_ref[...], j, scale)
        ds = p * (_dot_nt(do, v_ref[...]) - _lanes(delta_ref[...], kb.shape[0]))
        # Explicit float32 transposes of the [bq, bk] blocks, cast after, then
        # plain matmuls (the form JAX's own TPU flash attention uses: no
        # transposed-operand matmul, no packed bf16 transpose).
        dv_acc[...] += _dot(p.T.astype(do.dtype), do)
        dk_acc[...] += _dot(ds.T.astype(q.dtype), q)

    @pl.when(t == groups * nq - 1)
    def _finish():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _mosaic_call(kernel, grid, in_specs, out_specs, out_shape, scratch, interpret):
    from jax.experimental.pallas import tpu as pltpu

    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=grid, in_specs=in_specs, out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM(shape, jnp.float32) for shape in scratch],
        ),
        out_shape=out_shape,
        # The last grid axis carries the accumulators: sequential.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )


def _lane_rows(x):
    """[..., Sp] -> lane-broadcast [..., Sp, LANES]."""
    return jnp.broadcast_to(x[..., None], x.shape + (LANES,))


def _query_major_specs(g, nq, nk, bq, bk, d):
    """BlockSpecs of the forward and dq grids (batch, query head h, query
    block i, key step st; lo, hi are the prefetched ranges): a query-head
    block [bq, D], the visited KV block [bk, D], a lane-broadcast per-head
    row block [bq, LANES] (lse, delta) and a per-batch-row one (start, end)."""

    def head_rows(bi, h, i, st, lo, hi):
        return (bi, _div(h, g), _rem(h, g), i, 0)

    def kv(bi, h, i, st, lo, hi):
        return (bi, _div(h, g), _visited(lo, hi, bi * nq + i, st, nk)[0], 0)

    return (
        pl.BlockSpec((None, None, None, bq, d), head_rows),
        pl.BlockSpec((None, None, bk, d), kv),
        pl.BlockSpec((None, None, None, bq, LANES), head_rows),
        pl.BlockSpec((None, bq, LANES), lambda bi, h, i, st, lo, hi: (bi, i, 0)),
    )


def _fwd_mosaic(q, k, v, start, end, scale, bq, bk, interpret):
    """(o in q.dtype, lse float32 [B, Hkv, G, Sp]) of the padded arrays."""
    b, hkv, g, sp, d = q.shape
    tp = k.shape[2]
    nq, nk = sp // bq, tp // bk
    lo, hi = _key_block_ranges(start, end, bq, bk, nk)
    q_spec, kv_spec, lse_spec, row_spec = _query_major_specs(g, nq, nk, bq, bk, d)
    o, lse = _mosaic_call(
        partial(_tpu_fwd_kernel, scale=scale, nq=nq, nk=nk),
        grid=(b, hkv * g, nq, nk),
        in_specs=[q_spec, kv_spec, kv_spec, row_spec, row_spec],
        out_specs=[q_spec, lse_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(q.shape[:-1] + (LANES,), jnp.float32)],
        scratch=[(bq, LANES), (bq, LANES), (bq, d)],
        interpret=interpret,
    )(lo.reshape(-1), hi.reshape(-1), q, k, v, _lane_rows(start), _lane_rows(end))
    return o, lse[..., 0]


def _bwd_mosaic(q, k, v, o, lse, do, dlse, start, end, scale, bq, bk, interpret):
    """(dq, dk, dv) in the dtypes of q, k, v for output cotangents (do, dlse)."""
    b, hkv, g, sp, d = q.shape
    tp = k.shape[2]
    nq, nk = sp // bq, tp // bk
    lo, hi = _key_block_ranges(start, end, bq, bk, nk)
    qlo, qhi = _query_block_ranges(lo, hi, nk)
    lse_l, delta_l = _lane_rows(lse), _lane_rows(_bw._delta(o, do, dlse))
    start_l, end_l = _lane_rows(start), _lane_rows(end)

    # dq: grid (batch, query head, query block, key step).
    q_spec, kv_spec, stat_spec, row_spec = _query_major_specs(g, nq, nk, bq, bk, d)
    dq = _mosaic_call(
        partial(_tpu_dq_kernel, scale=scale, nq=nq, nk=nk),
        grid=(b, hkv * g, nq, nk),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec, row_spec, row_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch=[(bq, d)],
        interpret=interpret,
    )(lo.reshape(-1), hi.reshape(-1), q, k, v, do, lse_l, delta_l, start_l, end_l)

    # dk, dv: grid (batch, KV head, key block, (group head, query step)).
    def qi(bi, j, t, qlo, qhi):
        return _visited(qlo, qhi, bi * nk + j, _rem(t, nq), nq)[0]

    gq_spec = pl.BlockSpec(
        (None, None, None, bq, d), lambda bi, h, j, t, qlo, qhi: (bi, h, _div(t, nq), qi(bi, j, t, qlo, qhi), 0)
    )
    gstat_spec = pl.BlockSpec(
        (None, None, None, bq, LANES), lambda bi, h, j, t, qlo, qhi: (bi, h, _div(t, nq), qi(bi, j, t, qlo, qhi), 0)
    )
    grow_spec = pl.BlockSpec((None, bq, LANES), lambda bi, h, j, t, qlo, qhi: (bi, qi(bi, j, t, qlo, qhi), 0))
    kblk = pl.BlockSpec((None, None, bk, d), lambda bi, h, j, t, qlo, qhi: (bi, h, j, 0))
    dk, dv = _mosaic_call(
        partial(_tpu_dkv_kernel, scale=scale, nq=nq, nk=nk, groups=g),
        grid=(b, hkv, nk, g * nq),
        in_specs=[gq_spec, kblk, kblk, gq_spec, gstat_spec, gstat_spec, grow_spec, grow_spec],
        out_specs=[kblk, kblk],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch=[(bk, d), (bk, d)],
        interpret=interpret,
    )(qlo.reshape(-1), qhi.reshape(-1), q, k, v, do, lse_l, delta_l, start_l, end_l)
    return dq, dk, dv


# Kernel families: (forward, backward) on the padded head-major arrays.
_KERNELS = {"triton": (_fwd_triton, _bwd_triton), "mosaic": (_fwd_mosaic, _bwd_mosaic)}


@cache
def _fwd_op(scale, bq, bk, impl):
    # impl = ("pallas", kernel family, interpret): static, hashable.
    fwd = _KERNELS[impl[1]][0]
    return _bw._batch_folding(lambda q, k, v, start, end: fwd(q, k, v, start, end, scale, bq, bk, impl[2]))


@cache
def _bwd_op(scale, bq, bk, impl):
    bwd = _KERNELS[impl[1]][1]
    return _bw._batch_folding(
        lambda q, k, v, o, lse, do, dlse, start, end: bwd(q, k, v, o, lse, do, dlse, start, end, scale, bq, bk, impl[2])
    )


# The custom_vjp wiring is blockwise's (see the module docstring): its
# `_flash` runs these ops for impl = ("pallas", family, interpret).
_bw.KERNEL_OPS["pallas"] = (_fwd_op, _bwd_op)


def _block(requested: int, length: int, name: str, kernels: str) -> int:
    if kernels == "mosaic":
        if requested <= 0 or requested % LANES:
            raise ValueError(f"{name} must be a positive multiple of {LANES} for the mosaic kernels, got {requested}")
        # A short axis gets one block: its length rounded up to LANES.
        return min(requested, _cdiv(length, LANES) * LANES)
    if not _is_pow2(requested) or requested < MIN_BLOCK:
        raise ValueError(f"{name} must be a power of two >= {MIN_BLOCK}, got {requested}")
    # A short axis gets one block of the next power of two (>= MIN_BLOCK).
    return min(requested, max(MIN_BLOCK, _next_pow2(length)))


def _head_dim(d: int, kernels: str) -> int:
    """The zero-padded head dimension of the kernels (see the module
    docstring): a multiple of LANES for Mosaic, a power of two for Triton."""
    if kernels == "mosaic":
        return _cdiv(d, LANES) * LANES
    return max(MIN_BLOCK, _next_pow2(d))


KERNEL_FAMILIES = ("triton", "mosaic")


def pallas_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_start: jax.Array,
    kv_end: jax.Array,
    scale: float,
    *,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
    kernels: str | None = None,
) -> jax.Array:
    """Flash attention with per-query key ranges, as Pallas kernels.

    q: [B, S, Hq, D]; k, v: [B, T, Hkv, D] with Hq a multiple of Hkv (GQA).
    kv_start, kv_end: int [B, S]; key j is visible to query i iff
        kv_start[b, i] <= j < kv_end[b, i] (values are clipped to [0, T]).
    scale: Python float multiplying q.k.
    kernels: "triton" (GPU kernels) or "mosaic" (TPU kernels); None
        (default) = "mosaic" when JAX's default backend is a TPU, else
        "triton" (on CPU: the GPU kernels, interpreted).
    block_q, block_k: block sizes; None = the family's defaults
        (DEFAULT_BLOCK_Q/K for triton, TPU_BLOCK_Q/K for mosaic). Triton:
        powers of two >= 16, shrunk to the next power of two of S / T when
        those are shorter; Mosaic: multiples of 128, shrunk to S / T rounded
        up to 128. S and T need not be multiples, the tails are padded and
        masked inside.
    interpret: run the kernels in Pallas' interpret mode; None (default) =
        on CPU only. Otherwise the triton family compiles for GPU and the
        mosaic family for TPU. The mosaic family also takes a
        `pltpu.InterpretParams()` (Pallas' TPU interpreter, which simulates
        the pipeline's copies and fills uninitialised memory with NaN).

    Returns [B, S, Hq, D] in q's dtype: softmax(q k^T * scale) v with float32
    softmax statistics and accumulations; an empty range gives zeros and zero
    gradients. Key blocks outside a query block's rows' ranges are skipped.
    Differentiable to second order in reverse mode (the second derivative is
    blockwise's, see the module docstring); works under `jax.jit` and
    `jax.vmap`. Forward mode (`jax.jvp`) is not supported (`custom_vjp`).
    """
    b, s, hq, d = q.shape
    bk_, t, hkv, dk_ = k.shape
    if v.shape != k.shape or bk_ != b or dk_ != d:
        raise ValueError(f"incompatible shapes q {q.shape}, k {k.shape}, v {v.shape}")
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of key/value heads {hkv}")
    if kv_start.shape != (b, s) or kv_end.shape != (b, s):
        raise ValueError(f"kv_start/kv_end must be [B, S] = {(b, s)}, got {kv_start.shape}, {kv_end.shape}")
    if kernels is None:
        kernels = "mosaic" if jax.default_backend() == "tpu" else "triton"
    if kernels not in KERNEL_FAMILIES:
        raise ValueError(f"kernels must be one of {KERNEL_FAMILIES}, got {kernels!r}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    tpu = kernels == "mosaic"
    if block_q is None:
        block_q = TPU_BLOCK_Q if tpu else DEFAULT_BLOCK_Q
    if block_k is None:
        block_k = TPU_BLOCK_K if tpu else DEFAULT_BLOCK_K
    bq, bk = _block(block_q, s, "block_q", kernels), _block(block_k, t, "block_k", kernels)
    sp, tp = _cdiv(s, bq) * bq, _cdiv(t, bk) * bk
    dp = _head_dim(d, kernels)
    qg = jnp.transpose(q.reshape(b, s, hkv, hq // hkv, d), (0, 2, 3, 1, 4))
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, 0), (0, sp - s), (0, dp - d)))
    kp = jnp.pad(jnp.transpose(k, (0, 2, 1, 3)), ((0, 0), (0, 0), (0, tp - t), (0, dp - d)))
    vp = jnp.pad(jnp.transpose(v, (0, 2, 1, 3)), ((0, 0), (0, 0), (0, tp - t), (0, dp - d)))
    # Clipping to [0, T] keeps the padded keys invisible; padded query rows
    # get the empty range [0, 0).
    start = jnp.pad(jnp.clip(kv_start.astype(jnp.int32), 0, t), ((0, 0), (0, sp - s)))
    end = jnp.pad(jnp.clip(kv_end.astype(jnp.int32), 0, t), ((0, 0), (0, sp - s)))
    # A bool or a (frozen, hashable) `pltpu.InterpretParams`: static either way.
    interpret = bool(interpret) if isinstance(interpret, (bool, int)) else interpret
    o, _ = _bw._flash(qg, kp, vp, start, end, float(scale), bq, bk, ("pallas", kernels, interpret))
    return jnp.transpose(o[:, :, :, :s, :d], (0, 3, 1, 2, 4)).reshape(b, s, hq, d)
