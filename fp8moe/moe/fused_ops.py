"""The fused expert block as ``torch.library`` custom ops, for ``torch.compile`` (fullgraph).

Eager calls of :func:`fp8moe.moe.fused_experts` run the autograd function of :mod:`fp8moe.moe.fused`
directly (no custom-op dispatch on the CPU path). Under ``torch.compile`` they run these two ops instead,
which the compiler traces whole (as :mod:`fp8moe.ops` does for ``grouped_mm``):

- ``fp8moe::fused_experts(x, w_gate_up, w_down, combine, offsets, plan_data, pos, row_assignment, precision,
  backend, need_dx, need_dw1, need_dw2, need_dc) -> [y, *saved]``: the block's forward
  (``fused._block_forward``); the :class:`~fp8moe.moe.routing.RoutingPlan` crosses as its four tensors
  (the layout's ``offsets`` and packed ``data``, ``pos``, ``row_assignment``), the backend as its key, and
  what the backward needs as the flat list ``saved`` laid out by :func:`saved_layout`;
- ``fp8moe::fused_experts_backward(dy, w_gate_up, w_down, combine, <plan>, saved, precision, backend, <needs>,
  x_dtype) -> (dx, dw1, dw2, dc)``: ``fused._block_backward``; a gradient not needed is an empty tensor.

The forward op's autograd formula (``register_autograd``) calls the backward op. The ``need_*`` flags are
the inputs' ``requires_grad`` at the call (static for the compiler): only what they need is computed and
saved. Under the compiler the weights are quantized in every call (no weight cache: a compiled graph holds
no global state), as ``grouped_mm`` does there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fp8moe.moe.routing import RoutingPlan
from fp8moe.plan import GroupLayout

_Spec = list[tuple[str, list[tuple[tuple[int, ...], torch.dtype]]]]


def saved_layout(precision: str, pos: Tensor, w1: Tensor, needs) -> _Spec:
    """What ``fused._block_forward`` saves besides the combine weights (an input), in order: the layout of
    :func:`fp8moe.moe.fused.saved_spec` for the plan's ``pos`` (T, k) and ``w1`` (E, 2F, D), as name -> the
    (shape, dtype) of each of its tensors (none: not saved; one: a tensor; two: an FP8 (values, scales) pair)."""
    from fp8moe.moe import fused  # imported here: fused imports this module

    (num_tokens, top_k), (num_experts, two_f, d_model) = pos.shape, w1.shape
    spec = fused.saved_spec(precision, num_tokens, top_k, num_experts, d_model, two_f // 2, tuple(needs), torch.float32)

    def parts(value) -> list[tuple[tuple[int, ...], torch.dtype]]:
        if value is None:
            return []
        return [tuple(p) for p in ((value,) if isinstance(value, fused.SavedSpec) else value)]

    return [(name, parts(value)) for name, value in spec.items() if name != "c"]


def _plan(offsets: Tensor, plan_data: Tensor, pos: Tensor, row_assignment: Tensor) -> RoutingPlan:
    return RoutingPlan(GroupLayout.from_data(offsets, plan_data, pos.numel()), pos, row_assignment)


def _gemms(precision: str, backend: str):
    from fp8moe.moe import fused  # imported here: fused imports this module

    return fused._Fp8Gemms(backend, cache_weight=False) if precision == "fp8" else fused._Bf16Gemms()


def _flatten(saved: dict, spec: _Spec, inputs: tuple[Tensor, ...]) -> list[Tensor]:
    """The saved dict as the flat list of ``spec``; a tensor sharing storage with an input or an earlier
    output is copied (a custom op's outputs alias nothing)."""
    if set(saved) != {name for name, _ in spec} | {"c"}:
        raise RuntimeError(
            f"fp8moe.moe.fused_ops: fused._block_forward saved {sorted(saved)}, not the layout of saved_layout(): "
            "update it to the block's saved tensors"
        )
    flat: list[Tensor] = []
    seen = {t.untyped_storage().data_ptr() for t in inputs if t.numel()}
    for name, parts in spec:
        value = saved[name]
        tensors = () if value is None else value if isinstance(value, tuple) else (value,)
        got = [(tuple(t.shape), t.dtype) for t in tensors]
        if got != [(tuple(shape), dtype) for shape, dtype in parts]:
            raise RuntimeError(f"fp8moe.moe.fused_ops: saved {name!r} is {got}, saved_layout() says {parts}")
        for t in tensors:
            if t.numel() and t.untyped_storage().data_ptr() in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            flat.append(t)
    return flat


def _unflatten(flat: list[Tensor], spec: _Spec, c: Tensor) -> dict:
    tensors, saved = iter(flat), {"c": c}
    for name, parts in spec:
        items = tuple(next(tensors) for _ in parts)
        saved[name] = None if not items else items[0] if len(items) == 1 else items
    return saved


@torch.library.custom_op("fp8moe::fused_experts", mutates_args=())
def fused_experts_op(
    x: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    combine: Tensor,
    offsets: Tensor,
    plan_data: Tensor,
    pos: Tensor,
    row_assignment: Tensor,
    precision: str,
    backend: str,
    need_dx: bool,
    need_dw1: bool,
    need_dw2: bool,
    need_dc: bool,
) -> list[Tensor]:
    needs = (need_dx, need_dw1, need_dw2, need_dc)
    plan = _plan(offsets, plan_data, pos, row_assignment)
    from fp8moe.moe import fused

    with torch.autocast(x.device.type, enabled=False):
        y, saved = fused._block_forward(_gemms(precision, backend), x, w_gate_up, w_down, combine, plan, needs)
    if not any(needs):
        return [y]
    spec = saved_layout(precision, pos, w_gate_up, needs)
    inputs = (x, w_gate_up, w_down, combine, offsets, plan_data, pos, row_assignment)
    return [y, *_flatten(saved, spec, inputs)]


@fused_experts_op.register_fake
def _(x, w_gate_up, w_down, combine, offsets, plan_data, pos, row_assignment, precision, backend, *needs):
    y = x.new_empty(x.shape)
    if not any(needs):
        return [y]
    spec = saved_layout(precision, pos, w_gate_up, needs)
    return [y, *(x.new_empty(shape, dtype=dtype) for _, parts in spec for shape, dtype in parts)]


@torch.library.custom_op("fp8moe::fused_experts_backward", mutates_args=())
def fused_experts_backward_op(
    dy: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    combine: Tensor,
    offsets: Tensor,
    plan_data: Tensor,
    pos: Tensor,
    row_assignment: Tensor,
    saved: list[Tensor],
    precision: str,
    backend: str,
    need_dx: bool,
    need_dw1: bool,
    need_dw2: bool,
    need_dc: bool,
    x_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    needs = (need_dx, need_dw1, need_dw2, need_dc)
    plan = _plan(offsets, plan_data, pos, row_assignment)
    spec = saved_layout(precision, pos, w_gate_up, needs)
    dtypes = (x_dtype, w_gate_up.dtype, w_down.dtype, combine.dtype)
    from fp8moe.moe import fused

    with torch.autocast(dy.device.type, enabled=False):
        grads = fused._block_backward(
            _gemms(precision, backend), dy.contiguous(), _unflatten(saved, spec, combine), plan, needs, dtypes
        )
    return tuple(g if g is not None else dy.new_empty(0, dtype=dtype) for g, dtype in zip(grads, dtypes))


@fused_experts_backward_op.register_fake
def _(dy, w_gate_up, w_down, combine, offsets, plan_data, pos, row_assignment, saved, precision, backend, *rest):
    *needs, x_dtype = rest
    shapes = ((pos.shape[0], dy.shape[1]), w_gate_up.shape, w_down.shape, combine.shape)
    dtypes = (x_dtype, w_gate_up.dtype, w_down.dtype, combine.dtype)
    return tuple(dy.new_empty(s if need else (0,), dtype=d) for s, d, need in zip(shapes, dtypes, needs))


def _setup_context(ctx, inputs, output) -> None:
    x, w1, w2, c, offsets, plan_data, pos, row_assignment, precision, backend, *needs = inputs
    ctx.precision, ctx.backend, ctx.needs, ctx.x_dtype = precision, backend, tuple(needs), x.dtype
    ctx.save_for_backward(w1, w2, c, offsets, plan_data, pos, row_assignment, *output[1:])


def _backward(ctx, grads):
    w1, w2, c, *plan_tensors = ctx.saved_tensors[:7]
    dy = grads[0]
    if dy is None:  # y unused
        dy = torch.zeros(plan_tensors[2].shape[0], w1.shape[2], dtype=ctx.x_dtype, device=w1.device)
    options = (ctx.precision, ctx.backend, *ctx.needs, ctx.x_dtype)
    grads = fused_experts_backward_op(dy, w1, w2, c, *plan_tensors, list(ctx.saved_tensors[7:]), *options)
    return (*(g if need else None for g, need in zip(grads, ctx.needs)), *(None,) * 10)


fused_experts_op.register_autograd(_backward, setup_context=_setup_context)


def fused_experts_compiled(
    x: Tensor, w_gate_up: Tensor, w_down: Tensor, combine: Tensor, plan: RoutingPlan, precision: str, backend: str
) -> Tensor:
    """``fused_experts`` through the custom ops (the inputs checked and contiguous, the backend resolved)."""
    grad = torch.is_grad_enabled()
    needs = tuple(grad and t.requires_grad for t in (x, w_gate_up, w_down, combine))
    layout = plan.layout
    plan_tensors = (layout.offsets, layout.data, plan.pos, plan.row_assignment)
    outputs = fused_experts_op(x, w_gate_up, w_down, combine, *plan_tensors, precision, backend, *needs)
    return outputs[0]


__all__ = ["fused_experts_backward_op", "fused_experts_compiled", "fused_experts_op", "saved_layout"]
