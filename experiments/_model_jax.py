"""The training experiment's model in plain JAX: the same transformer as :mod:`_model_torch`.

Its feed-forwards are ``jax_bridge.moe.moe_layer`` (``fused=True``: the bridge's fused expert block,
:func:`jax_bridge.fused_experts`, in both precisions; ``fused=False``: the op-by-op layer); AdamW, clipping
and the mixed precision are written out by hand to match the torch run: fp32 master weights and residual
stream, dense matmuls in bf16 with fp32 accumulation and bf16 results (what ``torch.autocast`` gives),
attention in bf16, norms and losses in fp32. The parameters are a pytree built from the torch model's
initial weights, so both frameworks start from the same point.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments._config import ModelConfig, TrainConfig
from experiments._model_torch import NORM_EPS
from jax_bridge.moe import moe_layer

Params = dict[str, Any]


def params_from_torch(weights: dict[str, np.ndarray], cfg: ModelConfig) -> Params:
    """Pytree of the JAX model from the torch model's fp32 weights keyed by parameter name."""
    blocks = [
        {
            "attn_norm": weights[f"blocks.{i}.attn_norm.weight"],
            "qkv": weights[f"blocks.{i}.qkv.weight"],
            "proj": weights[f"blocks.{i}.proj.weight"],
            "moe_norm": weights[f"blocks.{i}.moe_norm.weight"],
            "moe": {
                "router": weights[f"blocks.{i}.moe.router.weight"],
                "w_gate_up": weights[f"blocks.{i}.moe.w_gate_up"],
                "w_down": weights[f"blocks.{i}.moe.w_down"],
            },
        }
        for i in range(cfg.num_layers)
    ]
    tree = {
        "tok_emb": weights["tok_emb.weight"],
        "pos_emb": weights["pos_emb"],
        "blocks": blocks,
        "norm": weights["norm.weight"],
        "head": weights["head.weight"],
    }
    return jax.tree.map(jnp.asarray, tree)


def rms_norm(x: jax.Array, gain: jax.Array) -> jax.Array:
    """x (..., D) -> fp32 (..., D)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + NORM_EPS) * gain


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w.T`` for an (out, in) weight: bf16 operands, fp32 accumulation, bf16 result."""
    y = jnp.matmul(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16).T, preferred_element_type=jnp.float32)
    return y.astype(jnp.bfloat16)


def forward(
    params: Params, tokens: jax.Array, cfg: ModelConfig, precision: str, backend: str, fused: bool = False
) -> tuple[jax.Array, jax.Array]:
    """tokens (B, S) int32 -> (logits (B, S, V) bf16, mean aux loss () fp32); ``fused``: the MoE layers' experts
    as the bridge's fused block (``moe_layer(fused=...)``)."""
    b, s = tokens.shape
    d, h = cfg.d_model, cfg.num_heads
    x = params["tok_emb"][tokens] + params["pos_emb"][:s]
    aux = []
    for blk in params["blocks"]:
        q, k, v = jnp.moveaxis(dense(rms_norm(x, blk["attn_norm"]), blk["qkv"]).reshape(b, s, 3, h, d // h), 2, 0)
        attn = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        x = x + dense(attn.reshape(b, s, d), blk["proj"])
        y, layer_aux = moe_layer(
            blk["moe"],
            rms_norm(x, blk["moe_norm"]).reshape(b * s, d),
            top_k=cfg.top_k,
            precision=precision,
            backend=backend,
            fused=fused,
        )
        x = x + y.reshape(b, s, d)
        aux.append(layer_aux)
    return dense(rms_norm(x, params["norm"]), params["head"]), jnp.mean(jnp.stack(aux))


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-byte cross-entropy in fp32; logits (B, S, V), targets (B, S) int32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


class JaxTrainer:
    """One training run of the JAX model: jitted AdamW steps and held-out evaluation (same API as
    ``_model_torch.TorchTrainer``)."""

    def __init__(
        self,
        cfg: ModelConfig,
        train_cfg: TrainConfig,
        precision: str,
        backend: str,
        initial_weights: dict[str, np.ndarray],
        fused: bool = False,
    ) -> None:
        self.params = params_from_torch(initial_weights, cfg)
        # m and v get buffers of their own: the train step donates them, and XLA rejects donating one buffer twice.
        self.opt_state = {
            "m": jax.tree.map(jnp.zeros_like, self.params),
            "v": jax.tree.map(jnp.zeros_like, self.params),
            "t": jnp.zeros((), jnp.int32),
        }

        def losses(params: Params, batch: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
            logits, aux = forward(params, batch[:, :-1], cfg, precision, backend, fused)
            ce = cross_entropy(logits, batch[:, 1:])
            return ce + train_cfg.aux_coef * aux, (ce, aux)

        def train_step(params: Params, opt_state: Params, batch: jax.Array, lr: jax.Array):
            (_, (ce, _)), grads = jax.value_and_grad(losses, has_aux=True)(params, batch)
            norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
            clip = jnp.minimum(1.0, train_cfg.grad_clip / (norm + 1e-6))
            t = opt_state["t"] + 1
            b1, b2 = train_cfg.beta1, train_cfg.beta2
            m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * clip * g, opt_state["m"], grads)
            v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(clip * g), opt_state["v"], grads)
            step_size = lr / (1 - b1**t)
            root_bc2 = jnp.sqrt(1 - b2**t)

            def update(p: jax.Array, m: jax.Array, v: jax.Array) -> jax.Array:
                decay = train_cfg.weight_decay if p.ndim >= 2 else 0.0  # matrices only, as in torch
                return p * (1 - lr * decay) - step_size * m / (jnp.sqrt(v) / root_bc2 + train_cfg.eps)

            return jax.tree.map(update, params, m, v), {"m": m, "v": v, "t": t}, ce

        donate = () if jax.default_backend() == "cpu" else (0, 1)  # CPU buffers cannot be donated
        self._train_step = jax.jit(train_step, donate_argnums=donate)
        self._eval = jax.jit(lambda params, batch: losses(params, batch)[1][0])

    def step(self, batch: np.ndarray, lr: float) -> float:
        """One optimizer step on batch (B, S+1) int32 at learning rate ``lr``; returns the cross-entropy."""
        self.params, self.opt_state, ce = self._train_step(
            self.params, self.opt_state, jnp.asarray(batch), jnp.float32(lr)
        )
        return float(ce)

    def evaluate(self, batches: list[np.ndarray]) -> float:
        """Mean cross-entropy over ``batches``."""
        return float(np.mean([float(self._eval(self.params, jnp.asarray(b))) for b in batches]))
