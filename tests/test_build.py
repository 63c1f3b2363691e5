"""The extension is built, with CPU kernels and (where setup.py can build them) CUDA kernels.

Outside CI a missing extension only skips the fused tests (the reference path still works);
in CI (CI=true) or with LPIPS_FAST_REQUIRE_EXT=1 it is a failure, so a broken build can never
pass as 'skipped'. The CUDA kernels are checked by their registration, which needs no GPU.
"""
import json
import os
import warnings

import pytest
import torch

from helpers import cli, setup_script

REQUIRED = os.environ.get("CI") == "true" or os.environ.get("LPIPS_FAST_REQUIRE_EXT") == "1"
OPS = ["head_forward", "head_backward", "head_all_forward", "head_all_backward"]


def has_kernel(op, key):
    return getattr(torch.ops.lpips_fast, op).default.has_kernel_for_dispatch_key(key)


def test_extension_loads():
    from lpips_fast import _ops
    if not _ops.available():
        message = f"lpips_fast extension not built: {_ops.load_error}"
        pytest.fail(message) if REQUIRED else pytest.skip(message)
    for op in OPS:
        assert has_kernel(op, "CPU"), op


def test_cuda_kernels_are_there_where_setup_py_builds_them():
    """The CUDA kernels exist exactly where setup.py's decision (tests/test_setup.py) says to
    build them on this machine; where it does not, the build recorded the one line that says
    why and how to get them, which `lpips-fast --version` reports. CI's second venv (torch
    2.6, a CUDA 12.4 build, on a machine whose nvcc is 13.0 or absent) sets
    LPIPS_FAST_EXPECT_NO_CUDA=1: there the build must have left them out, with the line."""
    from torch.utils import cpp_extension
    from lpips_fast import _ops
    if not _ops.available():
        message = f"lpips_fast extension not built: {_ops.load_error}"
        pytest.fail(message) if REQUIRED else pytest.skip(message)
    setup = setup_script()
    home = setup.guess_cuda_home() or cpp_extension.CUDA_HOME  # the build's choice
    build, why = setup.detect_cuda_plan(torch.version.cuda, home)
    cuda = [has_kernel(op, "CUDA") for op in OPS]
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.count("\n") == 1
    assert not (build and os.environ.get("LPIPS_FAST_EXPECT_NO_CUDA") == "1"), \
        "this venv expects a CPU-only build, but setup.py would build CUDA kernels here"
    if build:
        assert all(cuda), "setup.py meant to build the CUDA kernels; they are missing"
        assert _ops.cuda_missing() is None and "kernels: CPU + CUDA" in version.stdout
        return
    assert not any(cuda) and not _ops.has_kernels(torch.device("cuda"))
    line = _ops.cuda_missing()
    assert line.startswith(f"no CUDA kernels: {why}") and "\n" not in line
    assert f"kernels: CPU only ({line})" in version.stdout


def test_cuda_inputs_without_cuda_kernels_run_the_reference_head(monkeypatch):
    """A build without a device's kernels (faked here for the CPU, the device this machine
    has; the same code serves CUDA inputs of a CPU-only build) runs the reference head on
    it: the reference's values exactly (all layers in one call, and layer by layer), and one
    warning for any number of calls."""
    from lpips_fast import _ops
    import lpips_fast
    if not _ops.available():
        pytest.skip("extension not built")
    torch.manual_seed(0)
    x0, x1 = (torch.rand(2, 2, 3, 40, 48) * 2 - 1).unbind(0)
    models = {impl: lpips_fast.LPIPS(pnet_rand=True, verbose=False, impl=impl)
              for impl in ("auto", "reference")}
    models["auto"].load_state_dict(models["reference"].state_dict())
    big0, big1 = (torch.rand(2, 1, 3, 272, 256) * 2 - 1).unbind(0)  # streamed: layer by layer
    ref = models["reference"]
    expected = [ref(x0, x1), ref(x0, x1, retPerLayer=True)[1], ref(big0, big1)]
    monkeypatch.setitem(_ops._kernels, "lpips_fast", {"cuda"})
    monkeypatch.setattr(_ops, "_warned_devices", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = models["auto"]
        got = [auto(x0, x1), auto(x0, x1, retPerLayer=True)[1], auto(big0, big1)]
    for a, b in zip(got, expected):  # the same code on the same inputs: bit for bit
        assert all(torch.equal(x, y) for x, y in zip(a, b)) if isinstance(a, list) else \
            torch.equal(a, b)
    messages = [str(w.message) for w in caught if "compiled" in str(w.message)]
    assert messages == ["lpips_fast: no compiled CPU kernels, running the reference head "
                        "(same values, slower): not built"]


def test_version_reports_a_build_without_cuda_kernels(monkeypatch, tmp_path):
    """What `lpips-fast --version` says of a CPU-only build: the line the build recorded."""
    from lpips_fast import _ops
    if not _ops.available():
        pytest.skip("extension not built")
    recorded = tmp_path / "_build.json"
    recorded.write_text(json.dumps({"cuda_missing": "no CUDA kernels: faked for the test"}))
    monkeypatch.setitem(_ops._kernels, "lpips_fast", {"cpu"})
    monkeypatch.setattr(_ops, "BUILD_INFO", recorded)
    out = cli("--version").stdout
    assert out.endswith(", kernels: CPU only (no CUDA kernels: faked for the test)\n")


def test_model_uses_fused_head_by_default():
    from lpips_fast import _ops
    import lpips_fast
    if not _ops.available():
        pytest.skip("extension not built")
    model = lpips_fast.LPIPS(pnet_rand=True, verbose=False)
    assert model._head is _ops.head and model._head_all is _ops.head_all
