"""The private torch hooks lpips_fast needs, in one place, each with a public fallback where
torch lacks it (tests/test_torch_hooks.py checks them on the oldest supported torch and the
newest, in CI). Private because torch has no public form of them:

- functorch_active(): whether a torch.func transform (vmap, grad, jacrev) is running;
- any_requires_grad(*args): any tensor (also inside lists) requiring grad; C++ in
  torch >= 2.7, a Python loop before;
- is_gradtracking / is_legacy_batched: torch.func's and torch's older vmap's tensor wrappers;
- below_autograd(), AFTER_AUTOGRAD_KEYSET: redispatch past an op's Autograd kernel;
- fwd_grad_enabled(), set_fwd_grad_enabled(), forward_ad_level(): forward-mode AD's state;
- SingleLevelFunction, enable_single_level_function(): autograd.Functions that torch.func
  runs once per level (see lpips_fast._ops._function);
- is_exporting(): public from torch 2.7, approximated on 2.6 (see there).
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from torch._functorch.utils import enable_single_level_autograd_function


def _any_requires_grad_py(*args) -> bool:
    return any(t.requires_grad for a in args for t in (a if isinstance(a, (list, tuple)) else [a])
               if isinstance(t, torch.Tensor))


any_requires_grad = getattr(torch._C, "_any_requires_grad", _any_requires_grad_py)
functorch_active = torch._C._are_functorch_transforms_active
is_gradtracking = torch._C._functorch.is_gradtrackingtensor
is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor
below_autograd = torch._C._AutoDispatchBelowAutograd
AFTER_AUTOGRAD_KEYSET = torch._C._after_autograd_keyset
DispatchKeySet = torch._C.DispatchKeySet
fwd_grad_enabled = torch._C._is_fwd_grad_enabled
set_fwd_grad_enabled = fwAD._set_fwd_grad_enabled
SingleLevelFunction = torch.autograd.function._SingleLevelFunction
enable_single_level_function = enable_single_level_autograd_function


def forward_ad_level() -> int:
    """The innermost forward-mode AD level (fwAD.dual_level), -1 outside any."""
    return fwAD._current_level


def is_exporting() -> bool:
    """torch.export recording a graph: torch.compiler.is_exporting (public from torch 2.7).
    torch 2.6 has no such flag; its torch.export traces with dynamo by default (strict), so
    there any dynamo trace counts: torch.compile records the reference head too (same values;
    the fused head under torch.compile needs torch >= 2.7), and a non-strict export
    (strict=False) records the fused ops, which then need lpips_fast to run."""
    if _HAS_IS_EXPORTING:
        return torch.compiler.is_exporting()
    return torch.compiler.is_compiling()


_HAS_IS_EXPORTING = hasattr(torch.compiler, "is_exporting")
