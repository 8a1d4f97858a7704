"""focusft_jax.bilevel's first-order step against a PyTorch implementation of
METHOD.md on the same tiny `transformers` checkpoint.

The PyTorch side: the HF model (eager attention) with a 4-D additive mask
built from the glm_bidir turn rule, transient LoRA on gate/up/down of the top
layers through forward hooks, K inner steps per example with
torch.autograd.grad on that example's fast weights (per-tensor clip, SGD),
then the outer loss with phi_K detached and .backward() into the base weights.
The JAX side imports the saved checkpoint with `load_hf` and runs
`focusft_loss` from the same initial fast weights.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from focusft_jax.bilevel import FocusConfig, focusft_loss
from focusft_jax.hf import load_hf
from tests import reference_impl as R
from tests.loss_positions import with_loss_positions

# tests/tiny_models.py's "qwen2_tied" case (qkv bias, tied embeddings, GQA)
# with 4 layers and hidden 32, so that fraction 0.5 leaves 2 bottom layers.
HF_KW = dict(
    vocab_size=101,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
TARGETS = ("gate_proj", "up_proj", "down_proj")
# clip 0.3: the per-tensor gradient norms straddle it here (both branches asserted)
FCFG = FocusConfig(num_inner_steps=2, inner_lr=1.0, inner_clip=0.3, rank=4, alpha=8.0, fraction=0.5, targets=TARGETS)
# P = 9 loss positions in the JAX batch (>= the 8 scored tokens of a row, < S):
# the trainer's path, logits and the last layer at the scored positions only.
POSITIONS = 9
START = 2  # int(4 * (1 - 0.5))
S = 20
TURNS = ([(0, 6), (1, 4), (0, 4), (1, 4)], [(0, 5), (1, 3), (0, 3), (1, 4)])
TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved 4-layer tiny Qwen2 (float32 safetensors) with non-trivial biases
    and norm weights."""
    out = tmp_path_factory.mktemp("qwen2_4layer")
    config = transformers.Qwen2Config(**HF_KW)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for turns in TURNS:
        ids, lm = [], []
        for value, n in turns:
            ids += list(rng.integers(3, HF_KW["vocab_size"], n))
            lm += [value] * n
        pad = S - len(ids)
        rows.append((ids + [0] * pad, lm + [0] * pad, [1] * len(ids) + [0] * pad))
    return {
        "input_ids": np.asarray([r[0] for r in rows], np.int32),
        "loss_mask": np.asarray([r[1] for r in rows], np.int32),
        "attention_mask": np.asarray([r[2] for r in rows], np.int32),
    }


def make_fast0(cfg, num_examples, b_std, seed=1):
    """{proj: {"A": [n_top, E, r, in], "B": [n_top, E, out, r]}} (numpy, float32)."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    dims = {"gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}
    rng = np.random.default_rng(seed)
    n_top = cfg.num_layers - START
    fast = {}
    for name in TARGETS:
        fin, fout = dims[name]
        bound = 1.0 / np.sqrt(fin)
        fast[name] = {
            "A": rng.uniform(-bound, bound, (n_top, num_examples, FCFG.rank, fin)).astype(np.float32),
            "B": (b_std * rng.standard_normal((n_top, num_examples, fout, FCFG.rank))).astype(np.float32),
        }
    return fast


# ---------------------------------------------------------------- PyTorch side


class FastLoRA:
    """Forward hooks adding (alpha/rank) * (x A^T) B^T to the targeted Linear
    outputs of layers START..L-1. `phi[proj][key][l - START]` holds the fast
    weight of layer l with a leading batch axis: A [b, r, in], B [b, out, r]."""

    def __init__(self, model, scale):
        self.phi = None
        self.scale = scale
        self.handles = []
        layers = model.model.layers
        for l in range(START, len(layers)):
            for proj in TARGETS:
                module = getattr(layers[l].mlp, proj)
                self.handles.append(module.register_forward_hook(self._hook(l - START, proj)))

    def _hook(self, i, proj):
        def fn(module, inputs, output):
            if self.phi is None:
                return output
            a, b = self.phi[proj]["A"][i], self.phi[proj]["B"][i]
            low = torch.einsum("bsi,bri->bsr", inputs[0], a)
            return output + self.scale * torch.einsum("bsr,bor->bso", low, b)

        return fn


def additive_mask(batch):
    """[B, 1, S, S] float: 0 where METHOD.md's glm_bidir rule lets query i see
    key j, the most negative float elsewhere."""
    masks = [R.glm_bidir_mask(batch["attention_mask"][e], batch["loss_mask"][e]) for e in range(len(batch["input_ids"]))]
    m = torch.tensor(np.stack(masks))[:, None]
    return torch.where(m, 0.0, torch.finfo(torch.float32).min)


def masked_ce(logits, ids, w):
    """Mean over the weighted positions t of -log p(ids[t+1]) (one example)."""
    logp = torch.log_softmax(logits[:-1], dim=-1)
    nll = -logp.gather(-1, ids[1:, None])[:, 0]
    return (nll * w[:-1]).sum() / w.sum()


def torch_step(model_dir, batch, fast0, stats):
    """METHOD.md's first-order step in PyTorch. Returns (outer loss, inner
    losses [K] (mean over examples), {param name: grad})."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="eager", dtype=torch.float32
    ).eval()
    lora = FastLoRA(model, FCFG.alpha / FCFG.rank)
    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    mask = additive_mask(batch)
    pos = torch.arange(S)[None].expand(len(ids), S)
    weights = [torch.tensor(R.ce_weights(batch["attention_mask"][e], batch["loss_mask"][e])) for e in range(len(ids))]
    n_top = model.config.num_hidden_layers - START

    def forward(e_slice, phi):
        lora.phi = phi
        out = model(input_ids=ids[e_slice], attention_mask=mask[e_slice], position_ids=pos[e_slice])
        return out.logits

    phis, inner = [], []
    for e in range(len(ids)):
        # this example's fast weights: (proj, key, layer) -> tensor
        keys = [(p, k, i) for p in TARGETS for k in ("A", "B") for i in range(n_top)]
        phi = {key: torch.tensor(fast0[key[0]][key[1]][key[2], e]).requires_grad_() for key in keys}
        losses = []
        for step in range(FCFG.num_inner_steps):
            batched = {p: {k: [phi[(p, k, i)][None] for i in range(n_top)] for k in ("A", "B")} for p in TARGETS}
            loss = masked_ce(forward(slice(e, e + 1), batched)[0], ids[e], weights[e])
            grads = torch.autograd.grad(loss, [phi[key] for key in keys])
            losses.append(float(loss.detach()))
            if step == 0:
                stats["step1_grad_norms"].append({key: float(g.norm()) for key, g in zip(keys, grads)})
            if not torch.isfinite(loss):
                continue
            new = {}
            for key, g in zip(keys, grads):
                norm = g.norm()
                if norm > FCFG.inner_clip:
                    g = g * FCFG.inner_clip / (norm + 1e-12)
                    stats["clipped"] += 1
                else:
                    stats["unclipped"] += 1
                new[key] = (phi[key] - FCFG.inner_lr * g).detach().requires_grad_()
            phi = new
        phis.append({key: t.detach() for key, t in phi.items()})
        inner.append(losses)

    # outer: phi_K constant, gradient into the base weights
    stacked = {p: {k: [torch.stack([ph[(p, k, i)] for ph in phis]) for i in range(n_top)] for k in ("A", "B")} for p in TARGETS}
    logits = forward(slice(None), stacked)
    per_example = [masked_ce(logits[e], ids[e], weights[e]) for e in range(len(ids))]
    outer = sum(per_example) / len(per_example)
    model.zero_grad()
    outer.backward()
    grads = {name: p.grad.detach().numpy().copy() for name, p in model.named_parameters()}
    inner_means = np.mean(np.asarray(inner), axis=0)
    return float(outer.detach()), inner_means, grads


# ---------------------------------------------------------------- JAX side

_LAYER = {
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def torch_layout(params, num_layers):
    """Our params pytree -> {HF name: numpy array in torch's layout}
    (kernels (in, out) transposed to Linear's (out, in))."""
    out = {
        "model.embed_tokens.weight": np.asarray(params["embed_tokens"]["embedding"]),
        "model.norm.weight": np.asarray(params["norm"]["scale"]),
    }
    for mod, leaves in params["layers"].items():
        for leaf, stacked in leaves.items():
            for l in range(num_layers):
                t = np.asarray(stacked[l])
                out[f"model.layers.{l}.{_LAYER[mod]}.{_LEAF[leaf]}"] = t.T if leaf == "kernel" else t
    return out


# LLVM -O0 only to keep the test fast (compile time dominates); no semantic change.
@functools.partial(jax.jit, static_argnums=(3,), compiler_options={"xla_backend_optimization_level": 0})
def jax_step(params, batch, fast0, cfg):
    return jax.value_and_grad(focusft_loss, has_aux=True)(params, batch, jax.random.key(0), cfg, FCFG, fast0)


def close(actual, expected, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    atol = TOL * max(float(np.max(np.abs(expected))), 1e-6)
    np.testing.assert_allclose(actual, expected, rtol=TOL, atol=atol, err_msg=what)


@pytest.mark.parametrize("b_std", [0.0, 0.05], ids=["B0=0", "B0=random"])
def test_first_order_step_matches_pytorch(checkpoint, b_std):
    torch.manual_seed(0)
    model = load_hf(checkpoint)
    cfg = model.cfg
    assert cfg.num_layers == 4 and cfg.tie_word_embeddings and cfg.qkv_bias
    batch = make_batch()
    fast0 = make_fast0(cfg, 2, b_std)

    stats = {"clipped": 0, "unclipped": 0, "step1_grad_norms": []}
    t_loss, t_inner, t_grads = torch_step(checkpoint, batch, fast0, stats)
    assert stats["clipped"] > 0 and stats["unclipped"] > 0, stats
    for norms in stats["step1_grad_norms"]:  # A's step-1 gradient is zero iff B0 = 0
        a_norm = max(v for (p, k, i), v in norms.items() if k == "A")
        assert (a_norm == 0.0) if b_std == 0.0 else (a_norm > 1e-4)
        assert min(v for (p, k, i), v in norms.items() if k == "B") > 0.0

    jbatch = with_loss_positions({k: jnp.asarray(v) for k, v in batch.items()}, POSITIONS)
    jfast0 = jax.tree.map(jnp.asarray, fast0)
    (loss, aux), grads = jax_step(model.params, jbatch, jfast0, cfg)

    close(loss, t_loss, "outer loss")
    close(aux["inner_losses"], t_inner, "inner losses")
    assert float(aux["inner_losses"][1]) < float(aux["inner_losses"][0])  # the inner loop learns
    ours = torch_layout(grads, cfg.num_layers)
    assert set(ours) == set(t_grads), set(ours) ^ set(t_grads)
    for name, g in t_grads.items():
        close(ours[name], g, name)
    # not vacuous: the top layers' FFN gradients are non-zero
    assert np.abs(t_grads["model.layers.3.mlp.down_proj.weight"]).max() > 1e-4
