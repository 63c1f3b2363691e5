"""The private torch hooks lpips_fast uses (lpips_fast._torch_hooks) exist and mean what the
code assumes, on this torch: CI runs this file on the newest torch (`make test`) and on the
oldest supported one (`make test-oldest`), so a torch release that renames or changes one
fails here, by name, rather than somewhere deep in autograd."""
import torch
import torch.autograd.forward_ad as fwAD

from lpips_fast import _torch_hooks as hooks


def test_any_requires_grad_sees_tensors_in_lists():
    torch.manual_seed(0)
    a, b = torch.rand(3), torch.rand(3, requires_grad=True)
    cases = [((a, [a, b], True), True), ((a, [a], False), False), ((b,), True), ((), False),
             ((1.0, None, [a]), False)]
    for args, expected in cases:
        assert hooks.any_requires_grad(*args) is expected, args
        assert hooks._any_requires_grad_py(*args) is expected, args  # torch < 2.7's path


def test_functorch_state_and_wrappers():
    seen = {}

    def f(x):
        seen["active"] = hooks.functorch_active()
        seen["tracking"] = hooks.is_gradtracking(x)
        return (x ** 2).sum()

    assert not hooks.functorch_active()
    torch.func.grad(f)(torch.rand(4))
    assert seen == {"active": True, "tracking": True}
    torch.func.vmap(lambda x: hooks.functorch_active() and x)(torch.rand(2, 3))
    assert not hooks.is_gradtracking(torch.rand(2))
    assert not hooks.is_legacy_batched(torch.rand(2))


def test_forward_ad_state():
    assert hooks.forward_ad_level() == -1 and hooks.fwd_grad_enabled()
    with fwAD.dual_level():
        assert hooks.forward_ad_level() >= 0
    with hooks.set_fwd_grad_enabled(False):
        assert not hooks.fwd_grad_enabled()
    assert hooks.fwd_grad_enabled()


def test_dispatch_hooks():
    """Redispatch below autograd: what lpips_fast._ops's Autograd kernels do with them."""
    keyset = torch._C._dispatch_keys(torch.rand(2))
    assert isinstance(keyset, hooks.DispatchKeySet)
    below = keyset & hooks.AFTER_AUTOGRAD_KEYSET
    assert not below.has(torch._C.DispatchKey.AutogradCPU) and below.has(torch._C.DispatchKey.CPU)
    x = torch.rand(3, requires_grad=True)
    with hooks.below_autograd():
        y = torch.ops.aten.mul.Tensor(x, 2)
    assert y.grad_fn is None


def test_single_level_function_and_export_flag():
    assert callable(hooks.SingleLevelFunction.apply)  # lpips_fast._ops._function subclasses it
    with hooks.enable_single_level_function():
        pass
    assert hooks.is_exporting() is False
    # under torch.export the model records the reference head: tests/test_export.py
