"""Model and training configurations of the training experiment, its default sizes, and the LR schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

from experiments.data import VOCAB_SIZE


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer with an MoE feed-forward in every block (pre-RMSNorm, learned positions)."""

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    num_layers: int
    num_heads: int
    seq_len: int
    vocab_size: int = VOCAB_SIZE


@dataclass(frozen=True)
class TrainConfig:
    """AdamW (decoupled weight decay on matrices only), linear warmup then cosine decay to
    ``min_lr_ratio * lr``, global-norm gradient clipping, loss = cross-entropy + ``aux_coef`` * mean aux loss."""

    batch_size: int
    steps: int
    lr: float
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    aux_coef: float = 0.01
    num_evals: int = 10
    eval_batches: int = 4
    jax_batch_size: int | None = None  # the JAX runs' batch when it must be smaller (None: batch_size)

    @property
    def warmup_steps(self) -> int:
        return max(1, round(self.warmup_fraction * self.steps))

    @property
    def eval_every(self) -> int:
        return max(1, self.steps // self.num_evals)


SIZES: dict[str, tuple[ModelConfig, TrainConfig]] = {
    # All four runs (torch/JAX x bf16/fp8) in about 2 minutes on 2 cores of an AMD EPYC without bf16 instructions
    # (`make run`, measured; the CI machine). The cost is proportional to the tokens trained on (steps x batch):
    # about 0.36 s per step of all four runs, plus ~30 s of start-up and JAX compilation.
    "cpu": (
        ModelConfig(d_model=128, d_ff=128, num_experts=4, top_k=2, num_layers=2, num_heads=2, seq_len=64),
        TrainConfig(batch_size=8, steps=200, lr=1e-3, num_evals=10, eval_batches=4),
    ),
    # A few minutes per run on one H100: 32k tokens per step, expert GEMMs of M = 65536 rows. JAX at the same
    # batch: its experts run through the bridge's fused block in both precisions (jax_bridge.fused_experts; the
    # bf16 jax.lax.ragged_dot, which runs densely over all experts and needed ~46 GiB at 32k, is not used).
    "gpu": (
        ModelConfig(d_model=2048, d_ff=2048, num_experts=8, top_k=2, num_layers=4, num_heads=16, seq_len=1024),
        TrainConfig(batch_size=32, steps=600, lr=5e-4, warmup_fraction=0.1, num_evals=12, eval_batches=8),
    ),
}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine decay."""
    warmup = cfg.warmup_steps
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
