"""``grouped_mm``: the differentiable FP8 blockwise grouped GEMM (a ``torch.autograd.Function``).

One call: the backend is resolved (cached), the routing planned once (or the caller's plan taken), the
weight quantized (or taken from the weight cache), x read once into the forward operand and, when the
weight gradient will be needed, into the 128x1 token tiles that are saved for the backward instead of x.
The backward reads dy once into both its operands and runs only the GEMMs whose gradients are needed.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fp8moe import ops, weight_cache
from fp8moe.backends import check_wgrad, load_backend, resolve_backend
from fp8moe.plan import GroupLayout
from fp8moe.validation import check_grouped_mm_args, check_main_grad, check_offsets_values, check_plan


class _GroupedMM(torch.autograd.Function):
    """y = x @ w[e].T per group; saves x's token tiles, the transposed quantized weight and the plan.

    Eager calls run the backend's methods directly on the plan object (no custom-op dispatch, ~20 us of
    CPU each); under ``torch.compile`` the same steps run as the custom ops of :mod:`fp8moe.ops`, which
    the compiler traces whole, with the plan carried as its packed buffer.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        w: Tensor,
        offsets: Tensor,
        plan: GroupLayout | None,
        main_grad: Tensor | None,
        backend: str,
        out_dtype: torch.dtype,
        cache_weight: bool,
    ) -> Tensor:
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.compiler.is_compiling():
            plan_data = ops.plan_op(offsets, x.shape[0]) if plan is None else plan.data
            wq, sw, wq_t, sw_t = ops.quantize_weight_op(w, backend, need_dx)
            y, xt, sxt = ops.forward_op(x, wq, sw, offsets, plan_data, backend, out_dtype, need_dw)
            ctx.plan = None
        else:
            impl = load_backend(backend)
            plan = impl.plan(offsets, x.shape[0]) if plan is None else plan
            # Not in CUDA-graph capture: a replay must quantize the weight the graph is replayed with.
            use_cache = cache_weight and not (w.is_cuda and torch.cuda.is_current_stream_capturing())
            quantized = weight_cache.lookup(w, backend, need_dx) if use_cache else None
            if quantized is None:
                quantized = impl.quantize_weight(w, need_dx)
                if use_cache:
                    weight_cache.store(w, backend, need_dx, quantized)
            wq, sw, wq_t, sw_t = quantized
            y, xt, sxt = impl.forward(x, wq, sw, plan, out_dtype, token_tiles=need_dw)
            plan_data = plan.data
            ctx.plan = plan  # keeps what the plan caches (its host copy of the group sizes)
        # x's token tiles are this op's own tensors; saved without saved-tensor hooks (which may keep or
        # move them), the backward may free them once the wgrad has read them (see _backward)
        ctx.own_tiles = need_dw and not torch.compiler.is_compiling() and _no_saved_tensor_hooks()
        ctx.save_for_backward(xt, sxt, wq_t, sw_t, offsets, plan_data)
        ctx.main_grad = main_grad
        ctx.backend = backend
        ctx.dtypes = (x.dtype, w.dtype)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(
                "fp8moe.grouped_mm is differentiable once: its backward was called with create_graph=True "
                "(second-order gradients through the FP8 GEMMs are not supported)"
            )
        return _GroupedMM._backward(ctx, dy)

    @staticmethod
    @once_differentiable
    def _backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        xt, sxt, wq_t, sw_t, offsets, plan_data = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[:2]
        if not (need_dx or need_dw):
            return (None,) * 8
        dy = dy.contiguous()
        main_grad = ctx.main_grad if need_dw else None
        if torch.compiler.is_compiling():
            dx, dw = ops.backward_op(
                dy, xt, sxt, wq_t, sw_t, offsets, plan_data, main_grad, ctx.backend, need_dx, need_dw, *ctx.dtypes
            )
        else:
            # Free x's tiles between the wgrad and the dgrad unless the graph is retained (a second backward
            # reads them again): the peak of the backward is then dx and dw without the tiles.
            release = ctx.own_tiles and not _graph_retained()
            dx, dw = load_backend(ctx.backend).backward(
                dy,
                xt,
                sxt,
                wq_t,
                sw_t,
                ctx.plan,
                need_dx,
                need_dw,
                *ctx.dtypes,
                main_grad=main_grad,
                release_tiles=release,
            )
        return (dx if need_dx else None), (dw if need_dw and ctx.main_grad is None else None), *(None,) * 6


def _no_saved_tensor_hooks() -> bool:
    """Whether no ``torch.autograd.graph.saved_tensors_hooks`` are active (checkpointing, offloading)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(True) is None


def _graph_retained() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``); True when torch cannot say."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep is None else bool(keep())


def grouped_mm(
    x: Tensor,
    w: Tensor,
    offsets: Tensor,
    *,
    backend: str = "auto",
    out_dtype: torch.dtype = torch.bfloat16,
    wgrad: str | None = None,
    cache_weight: bool = True,
    main_grad: Tensor | None = None,
    plan: GroupLayout | None = None,
    validate: bool = False,
) -> Tensor:
    """Blockwise-FP8 grouped GEMM: ``y[rows of e] = x[rows of e] @ w[e].T``.

    Args:
        x: (M, K) bf16 or fp32, row-major; tokens sorted by expert. Quantized from its own dtype: an
            active ``torch.autocast`` does not cast it (nor change the recipe's arithmetic).
        w: (E, N, K) bf16 or fp32, row-major; a stack of per-expert ``nn.Linear`` weights (out x in).
        offsets: (E,) int32 on ``x.device``: cumulative end row of each expert's group, non-decreasing,
            ``offsets[-1] <= M``. Empty groups are allowed; rows at or past ``offsets[-1]`` get zero
            output and zero gradient.
        backend: "auto" | "reference" | "triton" | "deepgemm". ``FP8MOE_BACKEND`` overrides "auto".
        out_dtype: dtype of ``y`` (bf16, fp16 or fp32; the DeepGEMM backend computes y and dx in bf16
            and converts).
        wgrad: the K-grouped GEMM that computes the weight gradient: None (the backend's own),
            "deepgemm", "triton" or "reference".
        cache_weight: reuse the quantized weight while ``w`` is unchanged (same tensor, storage and
            version; see :mod:`fp8moe.weight_cache`). Eager calls only.
        main_grad: an fp32 (E, N, K) contiguous buffer on ``x.device``: the weight gradient is *added*
            into it (gradient-accumulation fusion: no zero-fill, no cast, no autograd accumulation) and
            ``w.grad`` is left untouched.
        plan: the routing's plan, ``fp8moe.plan_groups(offsets, M)``, to share between calls (the two
            GEMMs of an MoE layer); built here when None. Its ``offsets`` must be ``offsets`` itself.
        validate: also check the *values* of ``offsets`` (one host read; for tests and debugging). Under
            ``torch.compile`` the check is skipped (a host read cannot be part of a graph): validate in an
            eager call.

    Returns:
        y: (M, N) ``out_dtype``. Differentiable in ``x`` and ``w`` (gradients in their dtypes), once:
        differentiating the gradients again raises.

    K and N must be multiples of 128. The recipe is in :mod:`fp8moe.recipe`.
    """
    check_grouped_mm_args(x, w, offsets, out_dtype)
    if not isinstance(cache_weight, bool):
        raise TypeError(f"cache_weight: expected a bool, got {type(cache_weight).__name__}")
    if main_grad is not None:
        check_main_grad(main_grad, w)
    if plan is not None:
        check_plan(plan, offsets, x.shape[0])
    if validate:
        if not torch.compiler.is_compiling():  # a host read has no place in a compiled graph: skipped there
            check_offsets_values(offsets, x.shape[0])
    key = resolve_backend(backend, x.device, check_wgrad(wgrad))
    return _GroupedMM.apply(x, w, offsets, plan, main_grad, key, out_dtype, cache_weight)
