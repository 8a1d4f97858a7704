"""The mask metadata against a direct implementation of METHOD.md's rule."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from focusft_jax.attention import attention_meta, dense_mask


def rule_mask(loss_mask, attention_mask, segment_ids=None, kind="glm_bidir"):
    """METHOD.md spelled out with loops: turns are maximal runs of equal loss
    values inside one packed example; i sees j iff both are real, same example,
    and j's turn is earlier, or the same loss-0 turn, or the same loss-1 turn
    with j <= i. Padding queries see only themselves (an arbitrary choice that
    the implementation shares, so the comparison covers them)."""
    S = len(loss_mask)
    seg = segment_ids if segment_ids is not None else [0] * S
    turn = [0] * S
    t = 0
    for i in range(S):
        if i > 0 and (loss_mask[i] != loss_mask[i - 1] or seg[i] != seg[i - 1] or attention_mask[i] != attention_mask[i - 1]):
            t += 1
        turn[i] = t
    m = np.zeros((S, S), bool)
    for i in range(S):
        if not attention_mask[i]:
            m[i, i] = True
            continue
        for j in range(S):
            if not attention_mask[j] or seg[j] != seg[i]:
                continue
            if kind == "causal":
                m[i, j] = j <= i
            elif turn[j] < turn[i]:
                m[i, j] = True
            elif turn[j] == turn[i]:
                m[i, j] = (loss_mask[i] == 0) or (j <= i)
    return m


def random_rows(rng, S, packed, left_pad=False):
    """A random row: several examples (when packed), each alternating
    context and answer turns of random lengths, then padding."""
    lm, seg, am = [], [], []
    n_examples = rng.integers(2, 4) if packed else 1
    for e in range(n_examples):
        for _ in range(rng.integers(1, 4)):
            lm += [0] * int(rng.integers(1, 5)) + [1] * int(rng.integers(1, 4))
            if rng.random() < 0.3:
                lm += [0] * int(rng.integers(1, 3))  # a tool result / user turn after an answer
        seg += [e] * (len(lm) - len(seg))
    n = min(len(lm), S - int(rng.integers(0, 4)))
    lm, seg = lm[:n], seg[:n]
    am = [1] * n
    pad = S - n
    if left_pad:
        return [0] * pad + lm, [0] * pad + am, [0] * pad + seg
    return lm + [0] * pad, am + [0] * pad, seg + [seg[-1] + 1] * pad


@pytest.mark.parametrize("kind", ["glm_bidir", "causal"])
@pytest.mark.parametrize("packed", [False, True])
def test_metadata_reproduces_the_rule_on_random_masks(kind, packed):
    rng = np.random.default_rng(0)
    S = 24
    rows = [random_rows(rng, S, packed, left_pad=(b % 3 == 2 and not packed)) for b in range(30)]
    lm = np.array([r[0] for r in rows])
    am = np.array([r[1] for r in rows])
    seg = np.array([r[2] for r in rows]) if packed else None
    meta = attention_meta(jnp.asarray(am), jnp.asarray(lm), None if seg is None else jnp.asarray(seg), kind)
    got = np.asarray(dense_mask(meta, S))
    for b in range(len(rows)):
        want = rule_mask(lm[b], am[b], None if seg is None else seg[b], kind)
        np.testing.assert_array_equal(got[b], want, err_msg=f"row {b}: lm={lm[b]} am={am[b]}")


def test_all_zero_loss_mask_is_bidirectional_and_all_one_is_causal():
    S = 10
    am = jnp.ones((1, S), jnp.int32)
    full = np.asarray(dense_mask(attention_meta(am, jnp.zeros((1, S), jnp.int32)), S))[0]
    assert full.all()
    causal = np.asarray(dense_mask(attention_meta(am, jnp.ones((1, S), jnp.int32)), S))[0]
    np.testing.assert_array_equal(causal, np.tril(np.ones((S, S), bool)))
    plain = np.asarray(dense_mask(attention_meta(am, jnp.zeros((1, S), jnp.int32), kind="causal"), S))[0]
    np.testing.assert_array_equal(plain, causal)


def test_context_token_never_sees_its_target():
    """The next-token target of a context token lies in a later turn."""
    lm = jnp.asarray([[0, 0, 0, 1, 1, 0, 0, 1, 1, 1]])
    meta = attention_meta(jnp.ones_like(lm), lm)
    m = np.asarray(dense_mask(meta, 10))[0]
    for t in range(9):
        if lm[0, t + 1] == 1:
            assert not m[t, t + 1]


def test_glm_bidir_needs_a_loss_mask_and_kinds_are_named():
    am = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="loss_mask"):
        attention_meta(am)
    with pytest.raises(ValueError, match="'sliding'"):
        attention_meta(am, kind="sliding")
