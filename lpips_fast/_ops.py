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

Autograd is registered as single-level autograd.Functions (not torch.library.register_autograd,
whose wrapper torch.func rejects), and each op has a batching rule, so torch.func's grad,
vjp, jacrev and vmap work through them; forward mode raises.

Outputs are float32 (float64 for float64 inputs). r0/r1 are per-pixel feature norms saved
for the backward (N x h*w). The ops require equal batch sizes; the wrappers below broadcast a
batch of 1 with ``expand`` (batch stride 0, no copy) and autograd sums its gradient.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.autograd.forward_ad as fwAD
from . import _torch_hooks as hooks
from torch.utils._pytree import tree_flatten, tree_unflatten

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


# The device types whose kernels an op namespace has (filled by register). A build without
# the CUDA kernels (setup.py: no nvcc of torch's CUDA version) has "cpu" only.
_KERNEL_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_kernels: dict = {}
_warned_devices: set = set()
BUILD_INFO = Path(__file__).with_name("_build.json")  # written by setup.py


def has_kernels(device: torch.device, ns: str = "lpips_fast") -> bool:
    """Whether the ops of `ns` have compiled kernels for this device."""
    return device.type in _kernels.get(ns, ())


def cuda_missing() -> Optional[str]:
    """Why the CUDA kernels are missing (the build's one line, with how to get them), or
    None where they are there."""
    if not _loaded:
        return f"the lpips_fast extension is not available ({load_error})"
    if "cuda" in _kernels.get("lpips_fast", ()):
        return None
    try:
        info = json.loads(BUILD_INFO.read_text())
    except (OSError, ValueError):
        info = {}
    return info.get("cuda_missing") or "the extension was built without CUDA kernels"


def kernels_summary() -> str:
    """One line for `lpips-fast --version`: which compiled kernels this install has."""
    if not _loaded:
        return f"kernels: none, the pure-PyTorch reference runs ({load_error})"
    missing = cuda_missing()
    return "kernels: CPU + CUDA" if missing is None else f"kernels: CPU only ({missing})"


def _reference_instead(device: torch.device):
    """The reference head for a device whose kernels this build lacks (same values), with a
    warning once per device type."""
    from . import reference
    if device.type not in _warned_devices and not torch.compiler.is_compiling():
        _warned_devices.add(device.type)
        why = cuda_missing() if device.type == "cuda" else "not built"
        warnings.warn(f"lpips_fast: no compiled {device.type.upper()} kernels, running the "
                      f"reference head (same values, slower): {why}", stacklevel=4)
    return reference


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


def _legacy_batched(*grads) -> bool:
    """Whether gradients come batched by torch._vmap_internals (is_grads_batched=True)."""
    return any(g is not None and hooks.is_legacy_batched(g) for g in grads)


def _graph_grads(f0s, f1s, weights, grad_values, grad_maps, needs):
    """The first-order gradients as differentiable functions of the inputs, from the reference
    math. A backward that records a graph (create_graph=True: gradient penalties,
    meta-learning; always under torch.func.grad) needs them: the fused backward op has no
    derivative of its own. Returns lists of gradients for f0s, f1s and weights (None where
    `needs` says none is wanted or a layer has no weights).

    torch.func.vjp gives the partial derivative with respect to each input (autograd.grad
    towards the inputs would also follow the outer graph between them: in a model, layer
    k + 1's features come from layer k's), differentiable for every enclosing autograd graph
    and torch.func level, also where the inputs are a finished torch.func level's tensors
    (jacrev, vjp) that no longer report requires_grad."""
    from . import reference
    n = len(f0s)
    present = [k for k, w in enumerate(weights) if w is not None and w.numel() > 0]

    def heads(f0s, f1s, ws):  # torch.func takes tensors only: the absent weights are None
        wk = dict(zip(present, ws))
        outs = []
        for k, (f0, f1, gm) in enumerate(zip(f0s, f1s, grad_maps)):
            value, dmap = reference.head(f0, f1, wk.get(k), return_map=gm is not None)
            outs += [value] if gm is None else [value, dmap]
        return outs

    outs, vjp_fn = torch.func.vjp(heads, list(f0s), list(f1s), [weights[k] for k in present])
    seeds, it = [], iter(outs)
    for gv, gm in zip(grad_values, grad_maps):
        seeds.append(gv.to(next(it).dtype))
        if gm is not None:
            dmap = next(it)
            seeds.append(gm.reshape(dmap.shape).to(dmap.dtype))
    g0s, g1s, gws = vjp_fn(seeds)
    gw_by_layer = dict(zip(present, gws))
    grads = [*g0s, *g1s, *(gw_by_layer.get(k) for k in range(n))]
    res = [g if need else None for g, need in zip(grads, needs)]
    n = len(f0s)
    return res[:n], res[n:2 * n], res[2 * n:]


def register(ns: str = "lpips_fast") -> None:
    """Fake kernels and autograd of the ops in torch.ops.<ns>: the extension's own, or the
    tests' CPU emulation of the CUDA kernels (lpips_fast_emu, tests/emu.py)."""
    ops = getattr(torch.ops, ns)
    _kernels[ns] = {dev for dev, key in _KERNEL_KEYS.items()
                    if ops.head_forward.default.has_kernel_for_dispatch_key(key)}

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
        # create_graph=True (and torch.func) want a differentiable backward; PyTorch's older
        # vmap (is_grads_batched=True, autograd.functional.jacobian(vectorize=True)) cannot
        # batch the fused backward ops. Both get the reference math.
        if torch.is_grad_enabled() or _legacy_batched(grad_value, grad_map):
            g0s, g1s, gws = _graph_grads([f0], [f1], [weight], [grad_value], [grad_map], mask)
            return g0s[0], g1s[0], gws[0], None
        g0, g1, gw = ops.head_backward(
            grad_value, grad_map, f0, f1, weight, r0, r1, mask)
        return (g0 if mask[0] else None, g1 if mask[1] else None,
                gw.reshape(weight.shape).to(weight.dtype) if mask[2] else None, None)

    def _setup_all(ctx, inputs, output):
        return_map, nl, *tensors = inputs
        _, *outs = output
        r0s, r1s = outs[nl:2 * nl], outs[2 * nl:]
        ctx.nl = nl
        ctx.save_for_backward(*tensors, *r0s, *r1s)
        ctx.return_map = return_map
        ctx.mark_non_differentiable(*r0s, *r1s)

    def _backward_all(ctx, grad_values, *grad_outs):
        nl = ctx.nl
        saved = list(ctx.saved_tensors)
        f0s, f1s = saved[:nl], saved[nl:2 * nl]
        weights = saved[2 * nl:3 * nl]
        r0s, r1s = saved[3 * nl:4 * nl], saved[4 * nl:]
        flags = [bool(x) for x in ctx.needs_input_grad[2:2 + 3 * ctx.nl]]  # per list tensor
        weights_used = any(w.numel() > 0 for w in weights)
        mask = [any(flags[:nl]), any(flags[nl:2 * nl]), any(flags[2 * nl:]) and weights_used]
        nones = (None,) * (3 * nl)
        if not any(mask):
            return (None, None) + nones
        if grad_values is None:
            grad_values = r0s[0].new_zeros(nl, f0s[0].shape[0])
        gmaps: List[Optional[torch.Tensor]] = []
        for g in grad_outs[:nl]:
            gmaps.append(g if ctx.return_map and g is not None and g.numel() > 0 else None)
        if torch.is_grad_enabled() or _legacy_batched(grad_values, *gmaps):  # (see above)
            g0s, g1s, gws = _graph_grads(f0s, f1s, weights, list(grad_values), gmaps, flags)
            gws = [g if w.numel() > 0 else None for g, w in zip(gws, weights)]
            return (None, None, *g0s, *g1s, *gws)
        g0s, g1s, gws = ops.head_all_backward(
            grad_values, gmaps, f0s, f1s, weights, r0s, r1s, mask)
        none = [None] * nl
        gw_out = none
        if mask[2]:
            gw_out = [gw.reshape(w.shape).to(w.dtype) if w.numel() > 0 else None
                      for gw, w in zip(gws, weights)]
        return (None, None, *(list(g0s) if mask[0] else none),
                *(list(g1s) if mask[1] else none), *gw_out)

    def _backward_all_flat(ctx, *grads):
        return (*_backward_all(ctx, *grads), None)  # none for the caller

    def _forward_all(ctx, return_map, nl, *tensors):
        *tensors, caller = tensors
        values, dmaps, r0s, r1s = _redispatch(
            ops.head_all_forward.default, caller, list(tensors[:nl]),
            list(tensors[nl:2 * nl]), list(tensors[2 * nl:]), return_map)
        out = (values, *dmaps, *r0s, *r1s)
        _setup_all(ctx, (return_map, nl, *tensors), out)
        return out

    def _apply_all(caller, f0s, f1s, weights, return_map):
        # autograd.Function tracks top-level tensors only: the lists go in flattened
        nl = len(f0s)
        values, *outs = _apply(HeadAllForward, return_map, nl, *f0s, *f1s, *weights, caller)
        return values, outs[:nl], outs[nl:2 * nl], outs[2 * nl:]

    def _forward_single(ctx, f0, f1, weight, return_map, caller):
        out = _redispatch(ops.head_forward.default, caller, f0, f1, weight, return_map)
        _setup_single(ctx, (f0, f1, weight, return_map), out)
        return out

    HeadForward = _function("HeadForward", _forward_single,
                            lambda ctx, *g: (*_backward_single(ctx, *g), None))
    HeadAllForward = _function("HeadAllForward", _forward_all, _backward_all_flat)
    _register_autograd(ns, "head_forward",
                       lambda caller, *args: _apply(HeadForward, *args, caller))
    _register_autograd(ns, "head_all_forward", _apply_all)
    _register_vmap(ns)
    from . import _conv_head, _conv_ops  # the backbone's fused conv + bias + ReLU ops
    _conv_ops.register(ns)
    _conv_head.register(ns)  # (its autograd calls head_backward and the conv ops' backward)


def _function(name, forward, backward):
    """A single-level autograd.Function: under torch.func each transform level runs the
    op's Autograd kernel, so it records one node per level, as the built-in ops do (the
    wrapper torch.library.register_autograd generates is rejected under torch.func:
    pytorch/pytorch#168393; its fix, #184974, builds the same kind of function)."""
    return type(name, (hooks.SingleLevelFunction,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward),
                 "jvp": staticmethod(_no_jvp)})


def _apply(function, *args):
    with hooks.enable_single_level_function():
        return function.apply(*args)


class _Caller(NamedTuple):
    """Where an op call came from: its dispatch keys and the caller's grad modes."""
    keyset: hooks.DispatchKeySet
    grad: bool
    fwd_grad: bool


def _redispatch(op, caller: _Caller, *args):
    """The op's kernels below autograd (under torch.func: the next level down), in the
    caller's grad modes: autograd.Function.forward turns them off, but a torch.func level
    below records its own graph (grad of grad) and must see them as the caller left them."""
    with hooks.below_autograd(), torch.set_grad_enabled(caller.grad), \
            hooks.set_fwd_grad_enabled(caller.fwd_grad):
        return op.redispatch(caller.keyset & hooks.AFTER_AUTOGRAD_KEYSET, *args)


def _no_jvp(ctx, *tangents):
    raise NotImplementedError(
        "lpips_fast: the fused head has no forward-mode derivative (torch.func.jvp, jacfwd, "
        "torch.autograd.forward_ad); use reverse mode (torch.func.grad, vjp, jacrev) or "
        "impl='reference'")


def _differentiating(args) -> bool:
    """Whether an op call must go through its autograd.Function: reverse mode records a
    graph, or a torch.func transform (grad, jvp) or forward-mode AD wraps the inputs.
    The common cases cost two C++ checks (this runs on every call)."""
    if torch.is_grad_enabled() and hooks.any_requires_grad(*args):
        return True
    functorch = hooks.functorch_active()
    if not functorch and hooks.forward_ad_level() < 0:
        return False
    tensors = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a])
               if isinstance(t, torch.Tensor)]
    return any(hooks.is_gradtracking(t) or
               fwAD.unpack_dual(t).tangent is not None for t in tensors)


_libs: dict = {}  # the registrations last as long as their Library objects


def _register_autograd(ns: str, name: str, apply) -> None:
    """The op's Autograd kernel: `apply(caller, *args)` (through its autograd.Function)
    when differentiating, else straight to the kernels below autograd."""
    op = getattr(getattr(torch.ops, ns), name).default

    def kernel(keyset, *args):
        if _differentiating(args):
            return apply(_Caller(keyset, torch.is_grad_enabled(),
                                 hooks.fwd_grad_enabled()), *args)
        with hooks.below_autograd():
            return op.redispatch(keyset & hooks.AFTER_AUTOGRAD_KEYSET, *args)

    lib = _libs.setdefault(ns, torch.library.Library(ns, "IMPL"))
    lib.impl(name, kernel, "Autograd", with_keyset=True)


# ------------------------------------------------------------------- vmap (batching rules)
# Each op's per-sample dimension of every argument and output (`values` of the all-layer ops
# is L x N: dimension 1); None marks the per-layer channel weights, which are shared by all
# samples. A vmapped call folds the vmap dimension into the sample dimension and runs the
# kernels once on the larger batch, where weights are shared and no weight gradient (a sum
# over the samples) is asked for; otherwise it loops over the vmapped dimension.
_SAMPLE_DIMS = {
    "head_forward": ((0, 0, None, None), (0, 0, 0, 0)),
    "head_backward": ((0, 0, 0, 0, None, 0, 0, None), (0, 0, None)),
    "head_all_forward": ((0, 0, None, None), (1, 0, 0, 0)),
    "head_all_backward": ((1, 0, 0, 0, None, 0, 0, None), (0, 0, None)),
}


def _flat(tree):
    """Leaves of an argument tree, None and non-tensors included (in_dims has one per leaf)."""
    return tree_flatten(tree, is_leaf=lambda x: x is None)


def _fold(x, bdim, size: int, dim: int):
    """(per-sample shape with the vmap dim at bdim) -> the vmap dim merged into `dim`."""
    x = x.movedim(bdim, 0) if bdim is not None else x.expand(size, *x.shape)
    return x.movedim(0, dim).flatten(dim, dim + 1)


def _unfold(y, size: int, dim: int):
    """The inverse of _fold on an output; a placeholder (an empty 1-D output for a map or
    gradient that was not asked for) is not batched."""
    if y.dim() == 1 and y.numel() == 0:
        return y, None
    return y.unflatten(dim, (size, -1)), dim


def _vmap_loop(op, size, in_dims, args):
    """The general rule: one call per vmapped index, outputs stacked along dim 0."""
    leaves, spec = _flat(args)
    dims = _flat(in_dims)[0]
    outs = []
    for i in range(size):
        sliced = [x if d is None else x.select(d, i) for x, d in zip(leaves, dims)]
        outs.append(op(*tree_unflatten(sliced, spec)))
    flat_outs, out_spec = tree_flatten(outs[0])
    per_index = [tree_flatten(o)[0] for o in outs]
    stacked = [torch.stack([o[k] for o in per_index]) for k in range(len(flat_outs))]
    return tree_unflatten(stacked, out_spec), tree_unflatten([0] * len(stacked), out_spec)


def _vmap_rule(op, arg_dims, out_dims):
    """The batching rule of `op` (torch.library.register_vmap's form), see _SAMPLE_DIMS."""
    backward = op.name().endswith("backward")

    def rule(info, in_dims, *args):
        size = info.batch_size
        shared_batched = any(e is not None for a, d in zip(arg_dims, in_dims) if a is None
                             for e in _flat(d)[0])
        if shared_batched or (backward and args[-1][2]):  # args[-1]: output_mask
            return _vmap_loop(op, size, in_dims, args)
        folded = []
        for a, x, d in zip(arg_dims, args, in_dims):
            if a is None or x is None:
                folded.append(x)
            elif isinstance(x, (list, tuple)):
                folded.append([t if t is None else _fold(t, e, size, a) for t, e in zip(x, d)])
            else:
                folded.append(_fold(x, d, size, a))
        result, dims = [], []
        for y, a in zip(op(*folded), out_dims):
            if isinstance(y, (list, tuple)):
                pairs = [_unfold(t, size, a) for t in y]
                result.append([p[0] for p in pairs])
                dims.append([p[1] for p in pairs])
            else:
                t, dim = _unfold(y, size, a)
                result.append(t)
                dims.append(dim)
        return tuple(result), tuple(dims)
    return rule


def _register_vmap(ns: str) -> None:
    if not hasattr(torch.library, "register_vmap"):  # older torch: functorch's fallback
        return  # (a loop; it cannot batch the all-layer ops, whose outputs are lists)
    lib = _libs.setdefault(ns, torch.library.Library(ns, "IMPL"))
    for name, (arg_dims, out_dims) in _SAMPLE_DIMS.items():
        op = getattr(getattr(torch.ops, ns), name).default
        torch.library.register_vmap(op, _vmap_rule(op, arg_dims, out_dims), lib=lib)


# --------------------------------------------------------------------- public wrappers
class Ops:
    """The wrappers over one op namespace (the extension's, or the tests' emulation)."""

    def __init__(self, ns: str = "lpips_fast"):
        self.ns = ns

    def _lacks_kernels(self, device: torch.device) -> bool:
        """A CPU or CUDA device this build has no kernels for (other devices: the op's own
        error, or its fake kernel on meta)."""
        return device.type in _KERNEL_KEYS and not has_kernels(device, self.ns)

    def head(self, f0: torch.Tensor, f1: torch.Tensor, weight: Optional[torch.Tensor] = None,
             return_map: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Fused head of one layer: same contract as ``lpips_fast.reference.head``.

        Returns (value of shape N, N x 1 x h x w map or None); float32 (float64 for float64
        inputs). f0 and f1 broadcast over a batch of 1. Differentiable w.r.t. f0, f1, weight.
        """
        if self._lacks_kernels(f0.device):
            return _reference_instead(f0.device).head(f0, f1, weight, return_map=return_map)
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
        if self._lacks_kernels(f0s[0].device):
            return _reference_instead(f0s[0].device).head_all(f0s, f1s, weights,
                                                              return_map=return_map)
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
