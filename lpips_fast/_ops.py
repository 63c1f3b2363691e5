"""Python side of the fused head ops: loading, fake (meta) kernels, autograd, wrappers.

The ops (schemas in csrc/lpips_fast.cpp) live in ``torch.ops.lpips_fast``:

- ``head_forward(f0, f1, weight?, return_map) -> (value, dmap, r0, r1)``
- ``head_backward(grad_value, grad_map?, f0, f1, weight?, r0, r1, output_mask[3])
  -> (grad_f0, grad_f1, grad_weight)``
- ``head_all_forward(f0s, f1s, weights[], return_map) -> (values L x N, dmaps, r0s, r1s)``
- ``head_all_backward(grad_values, grad_maps?[], f0s, f1s, weights[], r0s, r1s,
  output_mask[3]) -> (grad_f0s, grad_f1s, grad_weights)``

In the multi-layer ops an EMPTY weight tensor means "no weights" for that layer: custom-op
autograd does not see tensors inside a ``Tensor?[]`` argument, so ``None`` cannot be used there.

Outputs are float32 (float64 for float64 inputs). r0/r1 are per-pixel feature norms saved
for the backward (N x h*w). The ops require equal batch sizes; the wrappers below broadcast a
batch of 1 with ``expand`` (batch stride 0, no copy) and autograd sums its gradient.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

load_error: Optional[str] = None
_loaded = False

try:
    from . import _C  # noqa: F401  (loading the library registers the ops)

    _loaded = True
except (ImportError, OSError) as e:  # not built, or built against another torch
    load_error = f"{type(e).__name__}: {e}"


def available() -> bool:
    """True when the compiled extension loaded and its ops are registered."""
    return _loaded


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grad_like(f: torch.Tensor, wanted: bool) -> torch.Tensor:
    # Mirrors csrc/common.h grad_output: empty_like keeps the input's layout.
    return torch.empty_like(f) if wanted else f.new_empty(0)


def _any(flag) -> bool:
    return any(flag) if isinstance(flag, (list, tuple)) else bool(flag)


def _broadcast(f0: torch.Tensor, f1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if f0.dim() == 4 and f1.dim() == 4 and f0.size(0) != f1.size(0):
        if f0.size(0) == 1:
            f0 = f0.expand(f1.size(0), -1, -1, -1)
        elif f1.size(0) == 1:
            f1 = f1.expand(f0.size(0), -1, -1, -1)
    return f0, f1


def _flags(need, n: int) -> List[bool]:
    """Per-layer needs_input_grad flags of a list argument (a bool or a list of bools)."""
    return [bool(x) for x in need] if isinstance(need, (list, tuple)) else [bool(need)] * n


def _graph_grads(f0s, f1s, weights, grad_values, grad_maps, needs):
    """The first-order gradients as differentiable functions of the inputs, from the reference
    math. A backward that records a graph (create_graph=True: gradient penalties,
    meta-learning) needs them: the fused backward op has no derivative of its own. Returns
    lists of gradients for f0s, f1s and weights (None where `needs` says none is wanted)."""
    from . import reference
    # Fresh aliases: the gradient wanted is the partial derivative of this op's outputs with
    # respect to each input, while autograd.grad towards the inputs themselves would also
    # follow the outer graph between them (in a model, layer k + 1's features come from layer
    # k's). The aliases stay differentiable functions of the inputs.
    n = len(f0s)
    tensors = [t.view_as(t) if t is not None and t.requires_grad else t
               for t in (*f0s, *f1s, *weights)]
    f0s, f1s, weights = tensors[:n], tensors[n:2 * n], tensors[2 * n:]
    outs, seeds = [], []
    for f0, f1, w, gv, gm in zip(f0s, f1s, weights, grad_values, grad_maps):
        value, dmap = reference.head(f0, f1, None if w is None or w.numel() == 0 else w,
                                     return_map=gm is not None)
        outs.append(value)
        seeds.append(gv.to(value.dtype))
        if gm is not None:
            outs.append(dmap)
            seeds.append(gm.reshape(dmap.shape).to(dmap.dtype))
    flags = [need and t is not None and t.requires_grad for need, t in zip(needs, tensors)]
    wanted = [t for t, f in zip(tensors, flags) if f]
    got = iter(torch.autograd.grad(outs, wanted, seeds, create_graph=True, allow_unused=True)
               if wanted else ())
    res = [next(got) if f else None for f in flags]
    res = [torch.zeros_like(t) if f and g is None else g for t, f, g in zip(tensors, flags, res)]
    return res[:n], res[n:2 * n], res[2 * n:]


def register(ns: str = "lpips_fast") -> None:
    """Fake kernels and autograd of the ops in torch.ops.<ns>: the extension's own, or the
    tests' CPU emulation of the CUDA kernels (lpips_fast_emu, tests/emu.py)."""
    ops = getattr(torch.ops, ns)

    # ----------------------------------------------------------------- fake kernels
    @torch.library.register_fake(f"{ns}::head_forward")
    def _head_forward_fake(f0, f1, weight, return_map):
        torch._check(f0.dim() == 4 and f1.dim() == 4, lambda: "features must be 4-D")
        n, _, h, w = f0.shape
        acc = _acc_dtype(f0.dtype)
        value = f0.new_empty((n,), dtype=acc)
        dmap = f0.new_empty((n, 1, h, w) if return_map else (0,), dtype=acc)
        return value, dmap, f0.new_empty((n, h * w), dtype=acc), f0.new_empty((n, h * w), dtype=acc)

    @torch.library.register_fake(f"{ns}::head_backward")
    def _head_backward_fake(grad_value, grad_map, f0, f1, weight, r0, r1, output_mask):
        gw_wanted = output_mask[2] and weight is not None
        gw = f0.new_empty((f0.shape[1],) if gw_wanted else (0,), dtype=_acc_dtype(f0.dtype))
        return _grad_like(f0, output_mask[0]), _grad_like(f1, output_mask[1]), gw

    @torch.library.register_fake(f"{ns}::head_all_forward")
    def _head_all_forward_fake(f0s, f1s, weights, return_map):
        acc = _acc_dtype(f0s[0].dtype)
        n = f0s[0].shape[0]
        values = f0s[0].new_empty((len(f0s), n), dtype=acc)
        dmaps, r0s, r1s = [], [], []
        for f in f0s:
            _, _, h, w = f.shape
            dmaps.append(f.new_empty((n, 1, h, w) if return_map else (0,), dtype=acc))
            r0s.append(f.new_empty((n, h * w), dtype=acc))
            r1s.append(f.new_empty((n, h * w), dtype=acc))
        return values, dmaps, r0s, r1s

    @torch.library.register_fake(f"{ns}::head_all_backward")
    def _head_all_backward_fake(grad_values, grad_maps, f0s, f1s, weights, r0s, r1s,
                                output_mask):
        acc = _acc_dtype(f0s[0].dtype)
        g0s = [_grad_like(f, output_mask[0]) for f in f0s]
        g1s = [_grad_like(f, output_mask[1]) for f in f1s]
        gws = [f.new_empty((f.shape[1],) if (output_mask[2] and w.numel() > 0) else (0,),
                           dtype=acc) for f, w in zip(f0s, weights)]
        return g0s, g1s, gws

    # ----------------------------------------------------------------- autograd
    def _setup_single(ctx, inputs, output):
        f0, f1, weight, return_map = inputs
        _, _, r0, r1 = output
        ctx.save_for_backward(f0, f1, weight, r0, r1)
        ctx.return_map = return_map
        ctx.mark_non_differentiable(r0, r1)

    def _backward_single(ctx, grad_value, grad_map, _gr0, _gr1):
        f0, f1, weight, r0, r1 = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [bool(need[0]), bool(need[1]), bool(need[2]) and weight is not None]
        if not any(mask):
            return None, None, None, None
        if grad_value is None:
            grad_value = r0.new_zeros(f0.shape[0])
        if not ctx.return_map or grad_map is None or grad_map.numel() == 0:
            grad_map = None
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            g0s, g1s, gws = _graph_grads([f0], [f1], [weight], [grad_value], [grad_map], mask)
            return g0s[0], g1s[0], gws[0], None
        g0, g1, gw = ops.head_backward(
            grad_value, grad_map, f0, f1, weight, r0, r1, mask)
        return (g0 if mask[0] else None, g1 if mask[1] else None,
                gw.reshape(weight.shape).to(weight.dtype) if mask[2] else None, None)

    torch.library.register_autograd(f"{ns}::head_forward", _backward_single,
                                    setup_context=_setup_single)

    def _setup_all(ctx, inputs, output):
        f0s, f1s, weights, return_map = inputs
        _, _, r0s, r1s = output
        ctx.nl = len(f0s)
        ctx.save_for_backward(*f0s, *f1s, *weights, *r0s, *r1s)
        ctx.return_map = return_map
        ctx.mark_non_differentiable(*r0s, *r1s)

    def _backward_all(ctx, grad_values, grad_maps, _gr0s, _gr1s):
        nl = ctx.nl
        saved = list(ctx.saved_tensors)
        f0s, f1s = saved[:nl], saved[nl:2 * nl]
        weights = saved[2 * nl:3 * nl]
        r0s, r1s = saved[3 * nl:4 * nl], saved[4 * nl:]
        need = [_any(x) for x in ctx.needs_input_grad]  # a list argument gives a list of bools
        mask = [need[0], need[1], need[2] and any(w.numel() > 0 for w in weights)]
        nones = [None] * nl  # the grads must mirror the inputs' structure (lists)
        if not any(mask):
            return nones, nones, nones, None
        if grad_values is None:
            grad_values = r0s[0].new_zeros(nl, f0s[0].shape[0])
        gmaps: List[Optional[torch.Tensor]] = []
        for i in range(nl):
            g = grad_maps[i] if (ctx.return_map and grad_maps is not None) else None
            gmaps.append(g if g is not None and g.numel() > 0 else None)
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            flags = [f for k in range(3) for f in _flags(ctx.needs_input_grad[k], nl)]
            g0s, g1s, gws = _graph_grads(f0s, f1s, weights, list(grad_values), gmaps, flags)
            return g0s, g1s, [g if w.numel() > 0 else None for g, w in zip(gws, weights)], None
        g0s, g1s, gws = ops.head_all_backward(
            grad_values, gmaps, f0s, f1s, weights, r0s, r1s, mask)
        gw_out = nones
        if mask[2]:
            gw_out = [gw.reshape(w.shape).to(w.dtype) if w.numel() > 0 else None
                      for gw, w in zip(gws, weights)]
        return (list(g0s) if mask[0] else nones, list(g1s) if mask[1] else nones, gw_out, None)

    torch.library.register_autograd(f"{ns}::head_all_forward", _backward_all,
                                    setup_context=_setup_all)


# --------------------------------------------------------------------- public wrappers
class Ops:
    """The wrappers over one op namespace (the extension's, or the tests' emulation)."""

    def __init__(self, ns: str = "lpips_fast"):
        self.ns = ns

    def head(self, f0: torch.Tensor, f1: torch.Tensor, weight: Optional[torch.Tensor] = None,
             return_map: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Fused head of one layer: same contract as ``lpips_fast.reference.head``.

        Returns (value of shape N, N x 1 x h x w map or None); float32 (float64 for float64
        inputs). f0 and f1 broadcast over a batch of 1. Differentiable w.r.t. f0, f1, weight.
        """
        f0, f1 = _broadcast(f0, f1)
        ops = getattr(torch.ops, self.ns)
        value, dmap, _, _ = ops.head_forward(f0, f1, weight, return_map)
        return value, (dmap if return_map else None)

    def head_all(self, f0s: Sequence[torch.Tensor], f1s: Sequence[torch.Tensor],
                 weights: Sequence[Optional[torch.Tensor]], return_map: bool = False
                 ) -> Tuple[torch.Tensor, Optional[List[torch.Tensor]]]:
        """All layers of one call in one op (one launch on CUDA).

        Returns (values of shape L x N, list of N x 1 x h x w maps or None). All layers must
        share dtype, device and batch size (after broadcasting a batch of 1).
        """
        pairs = [_broadcast(a, b) for a, b in zip(f0s, f1s)]
        f0s = [p[0] for p in pairs]
        f1s = [p[1] for p in pairs]
        ws = [f.new_empty(0, dtype=_acc_dtype(f.dtype)) if w is None else w
              for f, w in zip(f0s, weights)]
        ops = getattr(torch.ops, self.ns)
        values, dmaps, _, _ = ops.head_all_forward(f0s, f1s, ws, return_map)
        return values, (list(dmaps) if return_map else None)


if _loaded:
    register("lpips_fast")

_default = Ops("lpips_fast")
head = _default.head
head_all = _default.head_all
