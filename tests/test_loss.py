"""focusft_jax.loss: the host-side scored positions (`scored_positions`, what
the loader puts in every batch) are exactly the on-device fallback of
`loss_targets`, and a row that does not fit in P is an error, never a drop."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from focusft_jax.errors import DataError
from focusft_jax.loss import LOSS_KEYS, loss_targets, scored_positions

B, S = 6, 12
_device_targets = jax.jit(loss_targets, static_argnums=1)


def random_batch(seed: int, packed: bool) -> dict:
    """Rows of random length (right padding), random loss masks, row 0 all
    padding, row 1 without loss tokens; with `packed`, up to three segments
    per row (loss tokens at segment starts, which no position predicts)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, S + 1, B)
    lengths[0] = 0
    real = np.arange(S)[None, :] < lengths[:, None]
    arrays = {
        "input_ids": rng.integers(1, 50, (B, S)).astype(np.int32),
        "attention_mask": real.astype(np.int32),
        "loss_mask": (rng.random((B, S)) < 0.5).astype(np.int32) * real,
    }
    arrays["loss_mask"][1] = 0
    if packed:
        cuts = np.sort(rng.integers(1, S, (B, 2)), axis=1)
        seg = 1 + (np.arange(S)[None, :] >= cuts[:, :1]) + (np.arange(S)[None, :] >= cuts[:, 1:])
        arrays["segment_ids"] = (seg * real).astype(np.int32)
        arrays["loss_mask"][:, 0] = real[:, 0]  # a response token with no predecessor
    return arrays


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_scored_positions_equal_the_device_fallback(packed):
    for seed in range(3):
        arrays = random_batch(seed, packed)
        most = int(_device_targets(arrays, None).weight.sum(axis=1).max())
        for P in sorted({max(most, 1), most + 3, S}):
            keys = scored_positions(arrays, P)
            want = _device_targets(arrays, P)
            assert int(want.dropped) == 0
            assert keys["loss_index"].dtype == keys["loss_target"].dtype == np.int32
            assert keys["loss_weight"].dtype == np.float32
            np.testing.assert_array_equal(keys["loss_index"], np.asarray(want.index))
            np.testing.assert_array_equal(keys["loss_target"], np.asarray(want.target))
            np.testing.assert_array_equal(keys["loss_weight"], np.asarray(want.weight))
            # and loss_targets takes a batch with the keys as it is
            got = loss_targets({**arrays, **keys})
            assert got.index.shape == (B, P) and int(got.dropped) == 0
            np.testing.assert_array_equal(np.asarray(got.weight), keys["loss_weight"])


def test_too_many_positions_is_an_error():
    arrays = random_batch(0, packed=False)
    counts = np.asarray(_device_targets(arrays, None).weight.sum(axis=1)).astype(int)
    row = int(np.argmax(counts))
    with pytest.raises(DataError, match=f"row {row}: {counts[row]} scored positions, more than .* P = {counts[row] - 1}"):
        scored_positions(arrays, counts[row] - 1)


def test_loss_keys_must_come_together_with_one_shape():
    arrays = random_batch(1, packed=False)
    keys = scored_positions(arrays, S)
    with pytest.raises(ValueError, match="not all of"):
        loss_targets({**arrays, "loss_index": keys["loss_index"]})
    bad = {**arrays, **keys, "loss_weight": keys["loss_weight"][:, :-1]}
    with pytest.raises(ValueError, match=r"must all be \[B=6, P\]"):
        loss_targets(bad)
    assert set(keys) == set(LOSS_KEYS)
