"""Memory-efficient blockwise (flash-attention style) attention in plain JAX.

Same contract as `attention.dense_attention`: the mask is one visible key range
per query, key j is visible to query i iff `kv_start[b, i] <= j < kv_end[b, i]`,
softmax statistics are float32, and a query with an empty range outputs zeros.
Nothing of size S x T is ever materialised: queries are processed in blocks of
`block_q` rows and keys in blocks of `block_k` columns, with an online
(running max / running sum) softmax, so memory is linear in the sequence
length. This module deliberately does not import `focusft_jax.attention`
(which imports this one to register the implementation).

Differentiation is layered so that both first- and second-order reverse mode
work without ever reverse-differentiating a loop with a dynamic trip count:

* `_flash(q, k, v, ...) -> (o, lse)` is a `jax.custom_vjp`. Its primal runs
  the fast forward (`_fwd_loops`: a `lax.map` over query blocks and, inside,
  a `fori_loop` over only the key blocks that the block's rows can see, i.e. a
  while loop with a dynamic trip count). It saves only q, k, v, o and the
  per-row log-sum-exp. Its backward is `_flash_grad`.
* `_flash_grad(q, k, v, o, lse, do, dlse, ...) -> (dq, dk, dv)` is itself a
  `jax.custom_vjp`. Its primal is the fast single-pass flash backward
  (`_bwd_loops`, dynamic trip counts again), which recomputes the
  probabilities blockwise from the saved LSE. Its own backward (only needed
  for second-order gradients) is ordinary JAX autodiff of `_bwd_scan`: the same
  function written with fixed-length `lax.scan`s over all key/query blocks and
  a `lax.cond` that skips fully masked blocks, rematerialised with
  `jax.checkpoint` so that memory stays linear there too.

Both fast loops carry a `jax.custom_batching.custom_vmap` rule that folds a
vmapped axis into the batch axis, so that under `jax.vmap` the key-block
bounds stay unbatched and the skipping keeps working (see `_batch_folding`).

The log-sum-exp is an *output* of `_flash` (not only a residual) because in
second-order mode the outer derivative flows into the `lse` argument of the
inner backward and must be propagated back to q and k; `_flash_grad` therefore
takes a `dlse` cotangent (zero in first-order use).

Forward-mode (`jax.jvp`, `jax.jacfwd`, `jax.hessian`) is not supported: that is
a limitation of `jax.custom_vjp`. Use reverse-over-reverse (`grad` of `grad`).

Block sizes: the defaults (256 x 256) were picked on CPU, where blocks of
128-512 perform alike and smaller blocks skip more of a causal triangle. On
an accelerator, where every loop step costs kernel launches, larger blocks
(e.g. 512 x 512 or more) are likely better; they are keyword arguments.
"""
from __future__ import annotations

from functools import cache, partial

import jax
import jax.numpy as jnp
from jax import lax

DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 256


def _cdiv(a, b):
    """Ceiling division (Python ints or integer arrays)."""
    return -(-a // b)


# ---------------------------------------------------------------------------
# Shared block math. Internal layouts are head-major so that every block
# matmul is a plain batched matmul over (B, Hkv) without per-iteration
# transposes (all sequence axes are padded):
#   q, o, do: [B, Hkv, G, Sp, D]     (G = Hq // Hkv query heads per KV head)
#   k, v:     [B, Hkv, Tp, D]
#   start, end: int32 [B, Sp]        (padding rows have start == end == 0)
#   lse, delta: float32 [B, Hkv, G, Sp]
#   a score block: float32 [B, Hkv, G, bq, bk]
# ---------------------------------------------------------------------------


def _scores(qb, kb, scale):
    """[B,Hkv,G,bq,D] x [B,Hkv,bk,D] -> float32 scores [B,Hkv,G,bq,bk]."""
    return jnp.einsum("bhgqd,bhtd->bhgqt", qb, kb, preferred_element_type=jnp.float32) * scale


def _scores_t(qb, ktb, scale):
    """`_scores` from a transposed key block ktb [B,Hkv,D,bk]."""
    return jnp.einsum("bhgqd,bhdt->bhgqt", qb, ktb, preferred_element_type=jnp.float32) * scale


def _block_mask(sb, eb, j, bk):
    """Visibility of key block j for query rows with ranges sb/eb [B,bq]:
    bool [B,1,1,bq,bk] (broadcast over heads)."""
    kidx = j * bk + jnp.arange(bk, dtype=jnp.int32)
    mask = (kidx >= sb[..., None]) & (kidx < eb[..., None])
    return mask[:, None, None]


def _probs(s, lseb, sb, eb, j, bk):
    """Normalised probabilities of one block (scores s [B,Hkv,G,bq,bk])
    recomputed from the row LSE.

    The `where` is inside the `exp` (exp(-inf) = 0) rather than around it so
    that masked entries contribute exact zeros *and* zero derivatives: a
    `where` after the exp would multiply a zero cotangent by a possibly
    overflowing exp(s - lse) of a masked score and produce NaN when this
    function is differentiated (second-order mode).
    """
    mask = _block_mask(sb, eb, j, bk)
    return jnp.exp(jnp.where(mask, s - lseb[..., None], -jnp.inf))


def _key_block_ranges(start, end, nq, bq, nk, bk, skip):
    """For each query block, the half-open range [lo, hi) of key blocks that
    intersect the union of its rows' visible ranges (over the batch too).

    Rows with an empty range are ignored; a query block whose rows are all
    empty gets lo == hi (no key block computed). With `skip` False every query
    block visits all key blocks (used to measure what the skipping saves).
    Returns two int32 [nq] arrays.
    """
    if not skip:
        return jnp.zeros((nq,), jnp.int32), jnp.full((nq,), nk, jnp.int32)
    b = start.shape[0]
    nonempty = start < end
    lo = jnp.where(nonempty, start, nk * bk).reshape(b, nq, bq).min(axis=(0, 2))
    hi = jnp.where(nonempty, end, 0).reshape(b, nq, bq).max(axis=(0, 2))
    lo_blk = jnp.minimum(lo // bk, nk)
    hi_blk = jnp.clip(_cdiv(hi, bk), lo_blk, nk)
    return lo_blk.astype(jnp.int32), hi_blk.astype(jnp.int32)


def _slice(x, i, size, axis):
    return lax.dynamic_slice_in_dim(x, i * size, size, axis=axis)


def _from_blocks(x, axis):
    """[n, ..., blk, ...] stacked block outputs (blk at `axis` of one block)
    -> the block axis merged back into a sequence axis at `axis`."""
    x = jnp.moveaxis(x, 0, axis)  # [..., n, blk, ...]
    shape = x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2 :]
    return x.reshape(shape)


def _delta(o, do, dlse):
    """D_i = rowsum(dO * O) - dlse_i, float32 [B,Hkv,G,Sp]. The -dlse term is
    the LSE output's own cotangent: d lse_i / d s_ij = p_ij, so it enters
    dS = P * (dP - D) exactly like the D term with the opposite sign."""
    return jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1) - dlse


# ---------------------------------------------------------------------------
# Fast forward: dynamic key-block range per query block.
# ---------------------------------------------------------------------------


def _fwd_loops(q, k, v, start, end, scale, bq, bk, skip):
    """Online-softmax forward. Returns (o [B,Hkv,G,Sp,D] in q.dtype,
    lse float32 [B,Hkv,G,Sp]; 0 on empty rows).

    The inner loop is a `fori_loop` with traced bounds, i.e. an XLA while loop
    that simply never visits fully masked key blocks (this is what saves the
    compute). The bounds are one pair per query block, shared by the batch
    (a union), so they are scalars inside the loop; `jax.vmap` is handled by
    folding the mapped axis into B (`_batch_folding`) to keep it that way.
    (A `lax.cond` per block would be turned into a select that computes both
    branches as soon as its predicate is batched.)
    """
    b, hkv, g, sp, d = q.shape
    nq, nk = sp // bq, k.shape[2] // bk
    lo, hi = _key_block_ranges(start, end, nq, bq, nk, bk, skip)
    kt = jnp.swapaxes(k, 2, 3)  # see `_bwd_loops` on operand layouts

    def q_block(i):
        qb = _slice(q, i, bq, 3)
        sb, eb = _slice(start, i, bq, 1), _slice(end, i, bq, 1)

        def body(j, carry):
            m, l, acc = carry
            ktb, vb = _slice(kt, j, bk, 3), _slice(v, j, bk, 2)
            s = jnp.where(_block_mask(sb, eb, j, bk), _scores_t(qb, ktb, scale), -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            # A row with nothing visible yet keeps m = -inf; shift by 0
            # instead so that exp(-inf - (-inf)) = NaN never happens.
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)  # rescales the old partial sums
            l = alpha * l + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bhgqt,bhtd->bhgqd", p.astype(v.dtype), vb, preferred_element_type=jnp.float32)
            return m_new, l, alpha[..., None] * acc + pv

        init = (
            jnp.full((b, hkv, g, bq), -jnp.inf, jnp.float32),
            jnp.zeros((b, hkv, g, bq), jnp.float32),
            jnp.zeros((b, hkv, g, bq, d), jnp.float32),
        )
        m, l, acc = lax.fori_loop(lo[i], hi[i], body, init)
        nonempty = l > 0
        o = acc / jnp.where(nonempty, l, 1.0)[..., None]
        # Empty rows: output 0 and lse 0. Any finite lse works there because
        # every entry of such a row is masked before exp in the backward.
        lse = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)), 0.0)
        return o.astype(q.dtype), lse

    o, lse = lax.map(q_block, jnp.arange(nq))  # [nq,B,Hkv,G,bq,D], [nq,B,Hkv,G,bq]
    return _from_blocks(o, 3), _from_blocks(lse, 3)


# ---------------------------------------------------------------------------
# Fast first-order backward: single pass, dynamic key-block range.
# ---------------------------------------------------------------------------


def _bwd_loops(q, k, v, o, lse, do, dlse, start, end, scale, bq, bk, skip):
    """Flash-attention backward from the saved LSE. Returns (dq, dk, dv) in the
    dtypes of q, k, v.

    One pass: a scan over query blocks, and inside it a dynamic-range loop
    over the visible key blocks. dQ of the query block is a small loop carry;
    dK and dV are float32 accumulators carried through both loops and updated
    in place with dynamic_update_slice (linear memory, and each probability
    block is recomputed only once).

    Operand layouts: a CPU matmul wants its left operand's contracted axis
    minor and its right operand's major. dK = dS^T Q and dV = P^T dO contract
    the block's query rows, which would need a transposed copy of every
    [G*bq, bk] dS and P block (measured: the costliest non-matmul op of a
    training step). So they are accumulated transposed, dK^T = Q^T dS and
    dV^T = dO^T P, from Q^T and dO^T made once per query block, into
    [B,Hkv,D,Tp] accumulators transposed back once at the end; and the
    scores read key blocks of K^T and V^T (made once).
    """
    b, hkv, g, sp, d = q.shape
    tp = k.shape[2]
    nq, nk = sp // bq, tp // bk
    lo, hi = _key_block_ranges(start, end, nq, bq, nk, bk, skip)
    delta = _delta(o, do, dlse)
    kt, vt = jnp.swapaxes(k, 2, 3), jnp.swapaxes(v, 2, 3)  # [B,Hkv,D,Tp]

    def q_block(carry, i):
        dkt_acc, dvt_acc = carry
        qb, dob = _slice(q, i, bq, 3), _slice(do, i, bq, 3)
        qbt, dobt = jnp.moveaxis(qb, -1, 2), jnp.moveaxis(dob, -1, 2)  # [B,Hkv,D,G,bq]
        lseb, deltab = _slice(lse, i, bq, 3), _slice(delta, i, bq, 3)
        sb, eb = _slice(start, i, bq, 1), _slice(end, i, bq, 1)

        def body(j, c):
            dq, dkt_acc, dvt_acc = c
            kb, ktb, vtb = _slice(k, j, bk, 2), _slice(kt, j, bk, 3), _slice(vt, j, bk, 3)
            p = _probs(_scores_t(qb, ktb, scale), lseb, sb, eb, j, bk)
            dp = jnp.einsum("bhgqd,bhdt->bhgqt", dob, vtb, preferred_element_type=jnp.float32)
            ds = p * (dp - deltab[..., None])
            dq = dq + jnp.einsum("bhgqt,bhtd->bhgqd", ds.astype(k.dtype), kb, preferred_element_type=jnp.float32)
            dkt_blk = jnp.einsum("bhdgq,bhgqt->bhdt", qbt, ds.astype(q.dtype), preferred_element_type=jnp.float32)
            dvt_blk = jnp.einsum("bhdgq,bhgqt->bhdt", dobt, p.astype(do.dtype), preferred_element_type=jnp.float32)
            dkt_acc = lax.dynamic_update_slice_in_dim(dkt_acc, _slice(dkt_acc, j, bk, 3) + dkt_blk, j * bk, axis=3)
            dvt_acc = lax.dynamic_update_slice_in_dim(dvt_acc, _slice(dvt_acc, j, bk, 3) + dvt_blk, j * bk, axis=3)
            return dq, dkt_acc, dvt_acc

        dq0 = jnp.zeros((b, hkv, g, bq, d), jnp.float32)
        dq, dkt_acc, dvt_acc = lax.fori_loop(lo[i], hi[i], body, (dq0, dkt_acc, dvt_acc))
        return (dkt_acc, dvt_acc), (dq * scale).astype(q.dtype)

    acc0 = jnp.zeros((b, hkv, d, tp), jnp.float32)
    (dkt, dvt), dq = lax.scan(q_block, (acc0, acc0), jnp.arange(nq))
    dk, dv = jnp.swapaxes(dkt, 2, 3), jnp.swapaxes(dvt, 2, 3)
    return _from_blocks(dq, 3), (dk * scale).astype(k.dtype), dv.astype(v.dtype)


# ---------------------------------------------------------------------------
# Differentiable twin of the backward (used only to differentiate it).
# ---------------------------------------------------------------------------


def _bwd_scan(q, k, v, o, lse, do, dlse, start, end, scale, bq, bk, skip):
    """The same function as `_bwd_loops`, written only with reverse-
    differentiable primitives: fixed-length scans over *all* blocks, with a
    `lax.cond` that leaves fully masked (query block, key block) pairs out.

    Two passes (dQ: query blocks outer; dK/dV: key blocks outer) so that every
    loop carry is one block, never a whole [T] accumulator: scan autodiff
    saves the carry at each step, and a carried dK/dV would make that
    quadratic. Both loop bodies are `jax.checkpoint`ed, so differentiating
    this function stores only per-step block-sized carries and recomputes the
    probability blocks: memory stays linear in the sequence length.

    Under `jax.vmap` (with batched masks) the conds become selects: still
    correct, but the second-order path then computes every block.
    """
    b, hkv, g, sp, d = q.shape
    tp = k.shape[2]
    nq, nk = sp // bq, tp // bk
    lo, hi = _key_block_ranges(start, end, nq, bq, nk, bk, skip)
    delta = _delta(o, do, dlse)
    f32 = jnp.float32

    def q_rows(i):
        return (
            _slice(q, i, bq, 3),
            _slice(do, i, bq, 3),
            _slice(lse, i, bq, 3),
            _slice(delta, i, bq, 3),
            _slice(start, i, bq, 1),
            _slice(end, i, bq, 1),
        )

    def ds_block(i, j):
        qb, dob, lseb, deltab, sb, eb = q_rows(i)
        kb, vb = _slice(k, j, bk, 2), _slice(v, j, bk, 2)
        p = _probs(_scores(qb, kb, scale), lseb, sb, eb, j, bk)
        dp = jnp.einsum("bhgqd,bhtd->bhgqt", dob, vb, preferred_element_type=f32)
        return p, p * (dp - deltab[..., None]), qb, dob, kb

    @partial(jax.checkpoint, prevent_cse=False)
    def dq_of_block(i):
        def step(dq, j):
            def visit(dq):
                _, ds, _, _, kb = ds_block(i, j)
                return dq + jnp.einsum("bhgqt,bhtd->bhgqd", ds.astype(k.dtype), kb, preferred_element_type=f32)

            return lax.cond((j >= lo[i]) & (j < hi[i]), visit, lambda dq: dq, dq), None

        dq, _ = lax.scan(jax.checkpoint(step, prevent_cse=False), jnp.zeros((b, hkv, g, bq, d), f32), jnp.arange(nk))
        return (dq * scale).astype(q.dtype)

    @partial(jax.checkpoint, prevent_cse=False)
    def dkv_of_block(j):
        def step(c, i):
            def visit(c):
                dk, dv = c
                p, ds, qb, dob, _ = ds_block(i, j)
                dk = dk + jnp.einsum("bhgqt,bhgqd->bhtd", ds.astype(q.dtype), qb, preferred_element_type=f32)
                dv = dv + jnp.einsum("bhgqt,bhgqd->bhtd", p.astype(do.dtype), dob, preferred_element_type=f32)
                return dk, dv

            return lax.cond((j >= lo[i]) & (j < hi[i]), visit, lambda c: c, c), None

        zero = jnp.zeros((b, hkv, bk, d), f32)
        (dk, dv), _ = lax.scan(jax.checkpoint(step, prevent_cse=False), (zero, zero), jnp.arange(nq))
        return (dk * scale).astype(k.dtype), dv.astype(v.dtype)

    dq = lax.map(dq_of_block, jnp.arange(nq))
    dk, dv = lax.map(dkv_of_block, jnp.arange(nk))
    return _from_blocks(dq, 3), _from_blocks(dk, 2), _from_blocks(dv, 2)


# ---------------------------------------------------------------------------
# vmap: fold the mapped axis into the batch axis.
# ---------------------------------------------------------------------------
#
# Under `jax.vmap` the key-block bounds of the fast loops would become batched:
# a while loop with a batched trip count runs to the largest bound, reads
# blocks with gathers and writes the dK/dV accumulators with scatters, and
# selects every carry (including the full [T] accumulators) on every step,
# which eats most of the saving. The fast forward and backward are never
# differentiated by JAX (they only run as primals of custom_vjp functions),
# so they can carry a `custom_vmap` rule that simply merges the mapped axis
# into B: the block bounds then stay unbatched (union over the merged batch).
# (`jax.custom_vjp` on the outside of `custom_vmap` is the documented way to
# combine the two.)


def _fold(x, batched, axis_size):
    """[V, B, ...] (or unbatched [B, ...], broadcast) -> [V * B, ...]."""
    if not batched:
        x = jnp.broadcast_to(x, (axis_size,) + x.shape)
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _unfold(x, axis_size):
    return x.reshape((axis_size, x.shape[0] // axis_size) + x.shape[1:])


def _batch_folding(impl):
    """`custom_vmap` version of impl(*arrays) -> tuple of arrays, all with a
    leading batch axis B, whose vmap rule runs impl once on the folded batch."""

    @jax.custom_batching.custom_vmap
    def op(*args):
        return impl(*args)

    @op.def_vmap
    def rule(axis_size, in_batched, *args):
        outs = op(*(_fold(x, bt, axis_size) for x, bt in zip(args, in_batched)))
        outs = tuple(_unfold(o, axis_size) for o in outs)
        return outs, tuple(True for _ in outs)

    return op


@cache
def _loops_fwd_op(scale, bq, bk, skip):
    return _batch_folding(lambda q, k, v, start, end: _fwd_loops(q, k, v, start, end, scale, bq, bk, skip))


@cache
def _loops_bwd_op(scale, bq, bk, skip):
    return _batch_folding(
        lambda q, k, v, o, lse, do, dlse, start, end: _bwd_loops(
            q, k, v, o, lse, do, dlse, start, end, scale, bq, bk, skip
        )
    )


# Other kernels with this contract on the same padded layout (the Pallas ones,
# `focusft_jax.pallas_attention`) reuse the custom_vjp wiring below: they
# register name -> (fwd_op, bwd_op) builders of (scale, bq, bk, impl) and pass
# impl = (name, ...) where blockwise passes its bool skip_masked_blocks. Their
# second order is `_bwd_scan`'s, skipping masked blocks.
KERNEL_OPS: dict[str, tuple] = {}


def _fwd_op(scale, bq, bk, impl):
    return _loops_fwd_op(scale, bq, bk, impl) if isinstance(impl, bool) else KERNEL_OPS[impl[0]][0](scale, bq, bk, impl)


def _bwd_op(scale, bq, bk, impl):
    return _loops_bwd_op(scale, bq, bk, impl) if isinstance(impl, bool) else KERNEL_OPS[impl[0]][1](scale, bq, bk, impl)


# ---------------------------------------------------------------------------
# custom_vjp wiring.
# ---------------------------------------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11, 12))
def _flash_grad(q, k, v, o, lse, do, dlse, start, end, scale, bq, bk, impl):
    """(dq, dk, dv) of `_flash` for output cotangents (do, dlse)."""
    return _bwd_op(scale, bq, bk, impl)(q, k, v, o, lse, do, dlse, start, end)


def _flash_grad_fwd(q, k, v, o, lse, do, dlse, start, end, scale, bq, bk, impl):
    # Calls the custom_vjp function itself (not `_bwd_loops`) so that a further
    # enclosing differentiation also sees a custom_vjp here.
    out = _flash_grad(q, k, v, o, lse, do, dlse, start, end, scale, bq, bk, impl)
    return out, (q, k, v, o, lse, do, dlse, start, end)


def _flash_grad_bwd(scale, bq, bk, impl, res, cts):
    q, k, v, o, lse, do, dlse, start, end = res

    def f(q, k, v, o, lse, do, dlse):
        return _bwd_scan(q, k, v, o, lse, do, dlse, start, end, scale, bq, bk, impl if isinstance(impl, bool) else True)

    _, vjp = jax.vjp(f, q, k, v, o, lse, do, dlse)
    return (*vjp(cts), None, None)


_flash_grad.defvjp(_flash_grad_fwd, _flash_grad_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, start, end, scale, bq, bk, impl):
    """(o, lse) on prepared (padded, GQA-grouped) arrays; see `_fwd_loops`."""
    return _fwd_op(scale, bq, bk, impl)(q, k, v, start, end)


def _flash_fwd(q, k, v, start, end, scale, bq, bk, impl):
    # Same reasoning as `_flash_grad_fwd`: o and lse are residuals of the
    # inner derivative and the outer one must differentiate them via `_flash`.
    o, lse = _flash(q, k, v, start, end, scale, bq, bk, impl)
    return (o, lse), (q, k, v, o, lse, start, end)


def _flash_bwd(scale, bq, bk, impl, res, cts):
    q, k, v, o, lse, start, end = res
    do, dlse = cts
    dq, dk, dv = _flash_grad(q, k, v, o, lse, do, dlse, start, end, scale, bq, bk, impl)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_start: jax.Array,
    kv_end: jax.Array,
    scale: float,
    *,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    skip_masked_blocks: bool = True,
) -> jax.Array:
    """Blockwise attention with per-query key ranges.

    q: [B, S, Hq, D]; k, v: [B, T, Hkv, D] with Hq a multiple of Hkv (GQA).
    kv_start, kv_end: int [B, S]; key j is visible to query i iff
        kv_start[b, i] <= j < kv_end[b, i] (values are clipped to [0, T]).
    scale: Python float multiplying q.k.
    block_q, block_k: block sizes (shrunk to S / T when those are smaller);
        S and T need not be multiples, the tails are padded and masked.
    skip_masked_blocks: only compute, per query block, the key blocks that
        intersect [min kv_start, max kv_end) of its rows (over the batch).
        False computes every block; the result is the same.

    Returns [B, S, Hq, D] in q's dtype: softmax(q k^T * scale) v with the
    softmax statistics and all accumulations in float32; a query with an
    empty range gets zeros (and zero gradients). Memory is O(S + T) per
    head, never O(S * T). Differentiable to second order in reverse mode
    (`jax.grad` of a function of `jax.grad`); works under `jax.vmap` and
    `jax.jit`.
    """
    b, s, hq, d = q.shape
    bk_, t, hkv, dk_ = k.shape
    if v.shape != k.shape or bk_ != b or dk_ != d:
        raise ValueError(f"incompatible shapes q {q.shape}, k {k.shape}, v {v.shape}")
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of key/value heads {hkv}")
    if kv_start.shape != (b, s) or kv_end.shape != (b, s):
        raise ValueError(f"kv_start/kv_end must be [B, S] = {(b, s)}, got {kv_start.shape}, {kv_end.shape}")
    bq, bk = max(1, min(block_q, s)), max(1, min(block_k, t))
    sp, tp = _cdiv(s, bq) * bq, _cdiv(t, bk) * bk
    # Head-major internal layout (one O(S) transpose here instead of one per
    # block inside the loops); query heads grouped by their KV head for GQA.
    qg = jnp.transpose(q.reshape(b, s, hkv, hq // hkv, d), (0, 2, 3, 1, 4))
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, 0), (0, sp - s), (0, 0)))
    kp = jnp.pad(jnp.transpose(k, (0, 2, 1, 3)), ((0, 0), (0, 0), (0, tp - t), (0, 0)))
    vp = jnp.pad(jnp.transpose(v, (0, 2, 1, 3)), ((0, 0), (0, 0), (0, tp - t), (0, 0)))
    # Clipping to [0, T] keeps the padded keys invisible; padded query rows
    # get the empty range [0, 0).
    start = jnp.pad(jnp.clip(kv_start.astype(jnp.int32), 0, t), ((0, 0), (0, sp - s)))
    end = jnp.pad(jnp.clip(kv_end.astype(jnp.int32), 0, t), ((0, 0), (0, sp - s)))
    o, _ = _flash(qg, kp, vp, start, end, float(scale), bq, bk, bool(skip_masked_blocks))
    return jnp.transpose(o[:, :, :, :s], (0, 3, 1, 2, 4)).reshape(b, s, hq, d)
