"""The training experiment's model in torch: a decoder-only transformer whose feed-forwards are ``fp8moe.moe.MoE``.

Mixed precision: fp32 master weights and residual stream, every dense matmul and attention in bf16 through
``torch.autocast``; the router runs in fp32 and the expert GEMMs in the MoE layer's own precision (bf16
``torch._grouped_mm`` or blockwise FP8), so the two precisions differ only in the expert GEMMs.

``bf16_math="emulated"`` (the default on a CPU, where bf16 GEMMs without native bf16 instructions are 5-60x
slower than fp32 ones) computes every bf16 GEMM (the dense layers and the bf16 expert GEMMs; attention keeps
bf16 operands) as an fp32 matmul of the bf16-rounded operands with a bf16-rounded result, instead of
``torch.autocast``: the same values as a bf16 GEMM with fp32 accumulation, up to the order of the additions.
The FP8 expert GEMMs are the same in both modes.

The MoE layers run op by op or, with ``fused=True``, as the fused expert block (``MoE(fused=True)``), in
either precision. The emulation reaches the bf16 expert GEMMs of both: the op-by-op layer through its
``_expert_mm`` (:class:`EmulatedBf16MoE`), the fused block, whose bf16 GEMMs are ``torch._grouped_mm``
calls inside its own autograd function, through :class:`EmulatedBf16GroupedMm`, a dispatch mode active in
the layer's forward and backward (:class:`_EmulatedBf16Layer`); ``fp8moe`` itself is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from experiments._config import ModelConfig, TrainConfig
from fp8moe.moe import MoE
from fp8moe.moe.parallel import EXPERT_KEYS, expert_data_parallel_groups, shard_expert_state_dict

NORM_EPS = 1e-6
BF16_MATH = ("native", "emulated")
BF16 = torch.bfloat16


def emulated_bf16_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight.T`` as a bf16 GEMM computes it (bf16 operands, fp32 accumulation, bf16 result), run as an
    fp32 matmul of the bf16-rounded operands. In the backward, the casts round dx and dweight to bf16, as the
    bf16 GEMMs of autocast's backward do."""
    return F.linear(x.to(BF16).float(), weight.to(BF16).float()).to(BF16)


def emulated_bf16_grouped_mm(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """``torch._grouped_mm(x, w.to(bf16).transpose(1, 2), offs=offsets)`` (what ``MoE(precision="bf16")``
    runs) as an fp32 grouped GEMM of the bf16-rounded operands with a bf16 result: x (M, K) bf16, w (E, N, K)."""
    return torch._grouped_mm(x.float(), w.to(BF16).float().transpose(1, 2), offs=offsets).to(BF16)


class EmulatedBf16GroupedMm(TorchDispatchMode):
    """While active (``with EmulatedBf16GroupedMm():``), every ``aten._grouped_mm`` of bf16 operands runs as
    :func:`emulated_bf16_grouped_mm` does: an fp32 grouped GEMM of the (already bf16) operands with the result
    rounded to bf16 (or ``out_dtype``). Other ops, and grouped GEMMs of other dtypes, run unchanged.

    A dispatch mode sits below autograd, so it reaches the GEMMs of a custom autograd function's backward
    too (the fused block's dgrad and wgrad) when the backward runs under it. ``calls`` counts the GEMMs it
    emulated."""

    _GROUPED_MM = torch.ops.aten._grouped_mm.default

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is self._GROUPED_MM and args[0].dtype == BF16 and args[1].dtype == BF16:
            self.calls += 1
            out_dtype = kwargs.pop("out_dtype", None) or BF16
            args = tuple(a.float() if isinstance(a, Tensor) and a.dtype == BF16 else a for a in args)
            kwargs = {k: v.float() if isinstance(v, Tensor) and v.dtype == BF16 else v for k, v in kwargs.items()}
            return func(*args, **kwargs).to(out_dtype)
        return func(*args, **kwargs)


class _EmulatedBf16Layer(torch.autograd.Function):
    """``run(x)`` (a layer's forward using ``params``) with its forward *and* backward under ``mode``: the
    forward builds the layer's own graph inside this node (on detached x), the backward runs
    ``torch.autograd.grad`` through it under the mode. Outputs: the tensors ``run`` returns, detached."""

    @staticmethod
    def forward(ctx, run: Callable, mode: EmulatedBf16GroupedMm, x: Tensor, *params: Tensor):
        inner_x = x.detach().requires_grad_(x.requires_grad)
        with torch.enable_grad(), mode:
            outs = run(inner_x)
        ctx.mode, ctx.inner = mode, (inner_x, params, outs)
        return tuple(o.detach() for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        inner_x, params, outs = ctx.inner
        inputs = [(i, t) for i, t in enumerate((inner_x, *params)) if ctx.needs_input_grad[2 + i]]
        pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
        result = [None] * (1 + len(params))
        if inputs and pairs:
            with ctx.mode:
                found = torch.autograd.grad(
                    [o for o, _ in pairs], [t for _, t in inputs], [g for _, g in pairs], allow_unused=True
                )
            for (i, _), g in zip(inputs, found):
                result[i] = g
        del ctx.inner
        return None, None, *result


class EmulatedBf16MoE(MoE):
    """:class:`fp8moe.moe.MoE` whose bf16 expert GEMMs run as :func:`emulated_bf16_grouped_mm` (the FP8 ones
    are unchanged): op by op through ``_expert_mm``; with ``fused=True`` the whole bf16 layer (routing and
    fused block, forward and backward) runs under :class:`EmulatedBf16GroupedMm` (``self.emulation``, whose
    ``calls`` count the emulated GEMMs)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.emulation = EmulatedBf16GroupedMm()

    def _expert_mm(self, x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
        if self.precision == "bf16":
            return emulated_bf16_grouped_mm(x, w, offsets)
        return super()._expert_mm(x, w, offsets)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not (self.fused and self.precision == "bf16"):
            return super().forward(x)
        params = tuple(self.parameters())
        if not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))):
            with self.emulation:
                return super().forward(x)
        y, aux = _EmulatedBf16Layer.apply(super().forward, self.emulation, x, *params)
        return y, aux


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + moe(norm(x))``."""

    def __init__(
        self,
        cfg: ModelConfig,
        precision: str,
        backend: str,
        bf16_math: str = "native",
        fused: bool = False,
        ep_group: object = None,
    ) -> None:
        super().__init__()
        self.num_heads, self.emulate_bf16 = cfg.num_heads, bf16_math == "emulated"
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=NORM_EPS)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.moe_norm = nn.RMSNorm(cfg.d_model, eps=NORM_EPS)
        moe = EmulatedBf16MoE if self.emulate_bf16 else MoE
        self.moe = moe(
            cfg.d_model,
            cfg.d_ff,
            cfg.num_experts,
            cfg.top_k,
            precision=precision,
            backend=backend,
            fused=fused,
            ep_group=ep_group,
        )

    def dense(self, layer: nn.Linear, x: Tensor) -> Tensor:
        return emulated_bf16_linear(x, layer.weight) if self.emulate_bf16 else layer(x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, S, D) fp32 -> (x (B, S, D) fp32, aux_loss () fp32)."""
        b, s, d = x.shape
        qkv = self.dense(self.qkv, self.attn_norm(x))
        q, k, v = qkv.view(b, s, 3, self.num_heads, d // self.num_heads).unbind(2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.dense(self.proj, attn.transpose(1, 2).reshape(b, s, d))
        y, aux = self.moe(self.moe_norm(x))
        return x + y, aux


class MoETransformer(nn.Module):
    """Byte-level decoder-only MoE transformer. ``forward(tokens (B, S) int) -> (logits (B, S, V), aux ())``.
    ``fused``: the MoE layers run their experts as the fused block (``MoE(fused=True)``)."""

    def __init__(
        self,
        cfg: ModelConfig,
        precision: str,
        backend: str = "auto",
        bf16_math: str = "native",
        fused: bool = False,
        ep_group: object = None,
    ) -> None:
        super().__init__()
        if bf16_math not in BF16_MATH:
            raise ValueError(f"bf16_math: expected one of {BF16_MATH}, got {bf16_math!r}")
        self.emulate_bf16 = bf16_math == "emulated"
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Parameter(torch.empty(cfg.seq_len, cfg.d_model))
        self.blocks = nn.ModuleList(
            Block(cfg, precision, backend, bf16_math, fused, ep_group) for _ in range(cfg.num_layers)
        )
        self.norm = nn.RMSNorm(cfg.d_model, eps=NORM_EPS)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        for name, p in self.named_parameters():  # the MoE layers keep their own initialisation
            if p.dim() == 2 and ".moe." not in name:
                std = 0.02 / math.sqrt(2 * cfg.num_layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        x = self.tok_emb(tokens) + self.pos_emb[: tokens.shape[1]]
        aux = []
        for block in self.blocks:
            x, block_aux = block(x)
            aux.append(block_aux)
        x = self.norm(x)
        logits = emulated_bf16_linear(x, self.head.weight) if self.emulate_bf16 else self.head(x)
        return logits, torch.stack(aux).mean()


def build_model(
    cfg: ModelConfig, precision: str, backend: str, seed: int, bf16_math: str = "native", fused: bool = False
) -> MoETransformer:
    """The model with its initial weights drawn on the CPU from ``seed`` (the same for every precision,
    ``bf16_math`` and ``fused``)."""
    torch.manual_seed(seed)
    return MoETransformer(cfg, precision, backend, bf16_math, fused)


def initial_weights(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """The initial weights of :func:`build_model` as fp32 numpy arrays keyed by parameter name."""
    return {n: p.detach().numpy() for n, p in build_model(cfg, "bf16", "auto", seed).named_parameters()}


class ExpertParallel:
    """EP x DP for the torch runs (``train_moe.py --ep N`` under ``torchrun``): the world's ranks form EP groups
    of ``ep_size`` consecutive ranks (each MoE layer's experts spread over one) and expert-DP groups (the
    ranks holding the same experts); every rank trains on its own rows of the global batch.

    Gradients of the mean loss over the world's ranks: a replicated parameter's (router, attention,
    embeddings, norms) is the mean over the world; an expert weight's local gradient already sums the
    losses of its EP group (the gradients came back through the all-to-alls), so it is summed over the
    expert-DP group and divided by the world size. The clipping norm adds each EP rank's expert part once.
    """

    def __init__(self, ep_size: int) -> None:
        import torch.distributed as dist

        self.dist, self.ep_size = dist, ep_size
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.ep_group, self.dp_group = expert_data_parallel_groups(ep_size)
        self.ep_rank = dist.get_rank(self.ep_group)

    @staticmethod
    def is_expert(name: str) -> bool:
        return name.rsplit(".", 1)[-1] in EXPERT_KEYS

    def mean(self, value: Tensor) -> float:
        total = value.detach().float().reshape(1).clone()
        self.dist.all_reduce(total)
        return total.item() / self.world

    @torch.no_grad()
    def reduce_gradients(self, model: nn.Module, max_norm: float) -> None:
        dist = self.dist
        grads = [(self.is_expert(n), p.grad) for n, p in model.named_parameters() if p.grad is not None]
        for expert, g in grads:
            dist.all_reduce(g, group=self.dp_group if expert else None)
            g.div_(self.world)
        dense = sum((g.float().square().sum() for expert, g in grads if not expert), torch.zeros(()))
        experts = sum((g.float().square().sum() for expert, g in grads if expert), torch.zeros(()))
        dist.all_reduce(experts, group=self.ep_group)
        norm = (dense + experts).sqrt()
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for _, g in grads:
            g.mul_(scale.to(g.device))


class TorchTrainer:
    """One training run of :class:`MoETransformer` in torch: AdamW steps and held-out evaluation.

    Args:
        cfg, train_cfg: model and optimisation settings.
        precision: "bf16" or "fp8" expert GEMMs; backend: fp8moe backend.
        device: where to train; compile: wrap the model in ``torch.compile``.
        seed: seeds the initial weights (the same for every precision and framework).
        bf16_math: "native" (``torch.autocast`` to bf16) or "emulated" (bf16 GEMMs as fp32 matmuls of
            bf16-rounded operands, see the module's docstring).
        fused: the MoE layers run the fused expert block (``MoE(fused=True)``) instead of op by op.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        train_cfg: TrainConfig,
        precision: str,
        backend: str,
        device: torch.device,
        compile: bool,
        seed: int,
        bf16_math: str = "native",
        fused: bool = False,
        ep: ExpertParallel | None = None,
    ) -> None:
        self.model = build_model(cfg, precision, backend, seed, bf16_math, fused).to(device)
        if ep is not None:  # the same initial weights, each rank its experts (the single-process model resharded)
            full = self.model.state_dict()
            torch.manual_seed(seed)
            self.model = MoETransformer(cfg, precision, backend, bf16_math, fused, ep.ep_group).to(device)
            self.model.load_state_dict(shard_expert_state_dict(full, ep.ep_size, ep.ep_rank))
        self.ep = ep
        self.train_cfg, self.device, self.autocast = train_cfg, device, bf16_math == "native"
        params = list(self.model.parameters())
        groups = [  # weight decay on matrices and expert stacks, not on norm gains
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": train_cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(
            groups,
            lr=train_cfg.lr,
            betas=(train_cfg.beta1, train_cfg.beta2),
            eps=train_cfg.eps,
            fused=device.type == "cuda",
        )
        self.forward = torch.compile(self.model) if compile else self.model

    def _losses(self, batch: np.ndarray) -> tuple[Tensor, Tensor]:
        if self.ep is not None:  # this rank's rows of the global batch
            batch = np.array_split(batch, self.ep.world)[self.ep.rank]
        tokens = torch.from_numpy(batch).to(self.device, non_blocking=True).long()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits, aux = self.forward(tokens[:, :-1])
        ce = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        return ce, aux

    def step(self, batch: np.ndarray, lr: float) -> float:
        """One optimizer step on batch (B, S+1) int32 at learning rate ``lr``; returns the cross-entropy."""
        ce, aux = self._losses(batch)
        (ce + self.train_cfg.aux_coef * aux).backward()
        if self.ep is not None:  # reduced over the EP x DP groups, clipped by the global norm
            self.ep.reduce_gradients(self.model, self.train_cfg.grad_clip)
        else:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train_cfg.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return ce.item() if self.ep is None else self.ep.mean(ce)

    @torch.no_grad()
    def evaluate(self, batches: list[np.ndarray]) -> float:
        """Mean cross-entropy over ``batches``."""
        if self.ep is not None:
            return float(np.mean([self.ep.mean(self._losses(b)[0]) for b in batches]))
        return float(np.mean([self._losses(b)[0].item() for b in batches]))
