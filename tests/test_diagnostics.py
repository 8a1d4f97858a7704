"""Attention diagnostics against the attention probabilities that
`transformers` returns (eager attention, output_attentions=True)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from focusft_jax import hf
from focusft_jax.attention import attention_meta, dense_mask
from focusft_jax.diagnostics import attention_diagnostics


def _batch(vocab):
    rng = np.random.default_rng(0)
    S = 20
    ids = rng.integers(0, vocab, (2, S))
    am = np.ones((2, S), np.int64)
    am[1, 16:] = 0
    lm = np.zeros((2, S), np.int64)
    lm[0, 8:12] = 1
    lm[0, 15:19] = 1
    lm[1, 10:16] = 1
    return ids, am, lm


@pytest.mark.parametrize("kind", ["glm_bidir", "causal"])
def test_diagnostics_match_transformers_attention_probabilities(kind, tiny_model_dir):
    src = tiny_model_dir("llama")
    model = hf.load_hf(src)
    ref = AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager").eval()
    ids, am, lm = _batch(model.cfg.vocab_size)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(am), "loss_mask": jnp.asarray(lm)}
    got = attention_diagnostics(model.params, batch, model.cfg, attention=kind, num_sink=1)

    allowed = np.array(dense_mask(attention_meta(batch["attention_mask"], batch["loss_mask"], kind=kind), ids.shape[1]))
    mask4d = torch.where(torch.as_tensor(allowed)[:, None], 0.0, torch.finfo(torch.float32).min)
    with torch.no_grad():
        out = ref(torch.as_tensor(ids), attention_mask=mask4d, output_attentions=True)
    for layer, probs in enumerate(out.attentions):
        p = probs.numpy()  # [B, H, S, S]
        sinks, ctxs = [], []
        for b in range(2):
            for i in np.nonzero(lm[b] & am[b])[0]:
                row = p[b, :, i]  # [H, S]
                sink = np.zeros(ids.shape[1], bool)
                sink[0] = True
                ctx = (am[b] == 1) & (lm[b] == 0) & ~sink
                sinks.append(row[:, sink].sum(-1).mean())
                ctxs.append(row[:, ctx].sum(-1).mean())
        np.testing.assert_allclose(got["sink_mass"][layer], np.mean(sinks), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got["context_engagement"][layer], np.mean(ctxs), rtol=1e-4, atol=1e-6)
    assert 0 < float(got["sink_mass_mean"]) < 1 and 0 < float(got["context_engagement_mean"]) < 1
