"""The extension is built, with CPU kernels and (where nvcc exists) CUDA kernels.

Outside CI a missing extension only skips the fused tests (the reference path still works);
in CI (CI=true) or with LPIPS_FAST_REQUIRE_EXT=1 it is a failure, so a broken build can never
pass as 'skipped'. The CUDA kernels are checked by their registration, which needs no GPU.
"""
import os
import shutil

import pytest
import torch

REQUIRED = os.environ.get("CI") == "true" or os.environ.get("LPIPS_FAST_REQUIRE_EXT") == "1"
OPS = ["head_forward", "head_backward", "head_all_forward", "head_all_backward"]


def has_kernel(op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"lpips_fast::{op}", key)


def test_extension_loads():
    from lpips_fast import _ops
    if not _ops.available():
        message = f"lpips_fast extension not built: {_ops.load_error}"
        pytest.fail(message) if REQUIRED else pytest.skip(message)
    for op in OPS:
        assert has_kernel(op, "CPU"), op


def test_cuda_kernels_compiled_where_nvcc_exists():
    from lpips_fast import _ops
    nvcc = shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")
    if not (_ops.available() and nvcc and torch.version.cuda):
        message = "no extension, nvcc or CUDA torch here"
        pytest.fail(message) if REQUIRED and nvcc else pytest.skip(message)
    if os.environ.get("LPIPS_FAST_NO_CUDA") == "1":
        pytest.skip("built with LPIPS_FAST_NO_CUDA=1")
    for op in OPS:
        assert has_kernel(op, "CUDA"), f"{op} has no CUDA kernel: the .cu sources were not built"


def test_model_uses_fused_head_by_default():
    from lpips_fast import _ops
    import lpips_fast
    if not _ops.available():
        pytest.skip("extension not built")
    model = lpips_fast.LPIPS(pnet_rand=True, verbose=False)
    assert model._head is _ops.head and model._head_all is _ops.head_all
