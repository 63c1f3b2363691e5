"""Helpers shared by the test files (one module, so that no test file imports another).

- the command line, run in this process (`cli`, `cli_many`) or as a real process (`spawn`);
- image and video files, CSV reading;
- the official package as an oracle with our exact weights (`official_like`), random models
  and inputs, the comparison of the parity tests;
- the kernels' devices ("cpu", "emu": the CUDA kernels run on the CPU by tests/emu.py, "cuda").
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Real image pairs live outside the project; point LPIPS_FAST_REAL_PAIRS elsewhere to override.
REAL_PAIRS = Path(os.environ.get(
    "LPIPS_FAST_REAL_PAIRS", Path(__file__).resolve().parents[2] / "shared/data/real_pairs"))


# --- the command line --------------------------------------------------------------------------

@dataclass
class Ran:
    """What a run of the command line left: like subprocess.CompletedProcess (text=True)."""
    args: list
    returncode: int
    stdout: str
    stderr: str
    stdout_bytes: bytes


@contextlib.contextmanager
def environment(extra: dict | None):
    """os.environ with `extra` set (a value of None unsets), restored afterwards."""
    saved = {k: os.environ.get(k) for k in extra or {}}
    try:
        for k, v in (extra or {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _show_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def _fresh_warnings():
    """Warnings printed to (the captured) stderr as a fresh interpreter prints them, not
    recorded by pytest; Python's default filters, and no memory of earlier runs' warnings."""
    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                         ResourceWarning):
            warnings.simplefilter("ignore", category)
        warnings.showwarning = _show_warning
        yield


def cli(*args, env: dict | None = None) -> Ran:
    """`lpips-fast ARGS` in this process (lpips_fast.cli.main): its exit status, stdout and
    stderr, with `env` set for this run only. Per-process state is reset first, so that each
    run prints what a fresh process prints (the once-per-process notes: alpha channels,
    animations, frame rates). A real process costs ~3 s of imports; this costs the work."""
    from lpips_fast import cli as command
    from lpips_fast import io as lpips_io
    argv = [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args]
    raw = io.BytesIO()
    # a real stdout: UTF-8 text over bytes (the CSV on stdout switches it to surrogateescape)
    out = io.TextIOWrapper(raw, encoding="utf-8", errors="strict")
    err = io.StringIO()
    lpips_io._noted.clear()
    with environment(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            _fresh_warnings():
        try:
            code = command.main(argv)
        except SystemExit as e:  # argparse's usage errors (status 2), --help (0)
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out.flush()
    data = raw.getvalue()
    return Ran(argv, code, data.decode("utf-8", "surrogateescape"), err.getvalue(), data)


def cli_many(*calls, env: dict | None = None) -> list[Ran]:
    """`cli` for each call, one after the other; a call ending in a dict gets those extra
    environment variables."""
    outs = []
    for c in calls:
        extra = c[-1] if c and isinstance(c[-1], dict) else {}
        outs.append(cli(*(c[:-1] if extra else c), env={**(env or {}), **extra}))
    return outs


def spawn(*args, env: dict | None = None) -> subprocess.Popen:
    """`python -m lpips_fast ARGS` as a real process (for what only a process shows: exit on
    a closed pipe, locks held by another process, the interpreter's own exit)."""
    return subprocess.Popen([sys.executable, "-m", "lpips_fast", *map(str, args)],
                            env=dict(os.environ, **(env or {})), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(p: subprocess.Popen, timeout=300) -> Ran:
    stdout, stderr = p.communicate(timeout=timeout)
    return Ran(p.args, p.returncode, stdout, stderr, stdout.encode("utf-8", "surrogateescape"))


def free_port() -> int:
    """A TCP port free on the loopback now, for a rendezvous (a launch binds it moments later;
    another process could take it in between, which would fail a test loudly, not wrongly)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line_error(out, code, *needles):
    """Exit status `code` and exactly one 'error: ' line on stderr, holding every needle."""
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out.stderr
    for n in needles:
        assert n in errors[0], (n, errors[0])


# --- files ------------------------------------------------------------------------------------

def image(path, seed, size=(64, 64)):
    """A random RGB image of size (W, H), saved (PNG, or JPEG by the suffix); its pixels."""
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).save(path)
    return a


def noisy(a, seed, amount=40):
    rng = np.random.default_rng(seed)
    return np.clip(a.astype(int) + rng.integers(-amount, amount + 1, a.shape), 0, 255
                   ).astype(np.uint8)


def load(path):
    from lpips_fast.io import load_image
    return load_image(path)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def write_video(path, frames, codec="mpeg4", rate=10):
    import av
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate)
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt = "yuv420p"
        for a in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        c.mux(s.encode())


def real_pairs():
    """The real (reference, distorted) image pairs that are there."""
    examples = REAL_PAIRS / "lpips_examples"
    found = [(examples / "ex_ref.png", examples / f"ex_p{i}.png") for i in (0, 1)]
    found += [(p, REAL_PAIRS / "tid2013" / "dist" / p.name)
              for p in sorted((REAL_PAIRS / "tid2013" / "ref").glob("*.bmp"))]
    return [(a, b) for a, b in found if a.is_file() and b.is_file()]


# --- models: ours against the official package -------------------------------------------------

def fused_available() -> bool:
    try:
        from lpips_fast import _ops
    except ImportError:
        return False
    return _ops.available()


# Every model test runs on both heads; the fused one is skipped (loudly, with -ra) only where the
# extension is not built, and tests/test_build.py fails in CI if that happens there.
IMPLS = ["reference", pytest.param("fused", marks=pytest.mark.skipif(
    not fused_available(), reason="lpips_fast extension not built"))]

def official_like(ours, **kwargs):
    """The official lpips.LPIPS with `ours`'s exact state (backbone and lin weights), on the
    CPU in its own dtypes and layout.

    Built with pnet_rand=True (its pretrained path downloads) on the meta device (no memory,
    no initialization: torchvision's vgg16 alone spent 1-2 s initializing a classifier that
    LPIPS drops), then given our state_dict (strict: every tensor it has is replaced, so one
    left uninitialized fails; this also proves that the two modules' keys are the same).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation notices
        import lpips
        with torch.device("meta"):
            theirs = lpips.LPIPS(pnet_rand=True, verbose=False, **kwargs)
    own = theirs.state_dict()
    # contiguous, as a constructed module's tensors are: ours may hold channels_last weights,
    # with which the convolutions' outputs (and so dropout's masks) would be laid out otherwise
    state = {k: v.detach().to(device="cpu", dtype=own[k].dtype if k in own else v.dtype,
                              memory_format=torch.contiguous_format, copy=True)
             for k, v in ours.state_dict().items()}
    theirs.load_state_dict(state, strict=True, assign=True)
    return theirs.eval()


def randomize_lins(model, seed=0):
    """Random non-negative lin weights, like every released set (used with random backbones)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in getattr(model, "lins", []):
            lin.weight.copy_(torch.rand(lin.weight.shape, generator=gen))
    return model


def real_weights_available(net: str) -> bool:
    from lpips_fast import weights
    try:
        weights.resolve_backbone(net)
    except weights.WeightsNotFound:
        return False
    return True


def make_pair(n0, n1, h, w, seed):
    """Two batches of random images in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n0, 3, h, w, generator=gen) * 2 - 1
    x1 = torch.rand(n1, 3, h, w, generator=gen) * 2 - 1
    return x0, x1


def assert_close(ours, theirs, rtol=1e-5):
    """At most rtol of the oracle's largest magnitude apart (and not a degenerate oracle)."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    scale = theirs.abs().max().item()
    assert scale > 0, "degenerate test: the oracle's result is all zero"
    err = (ours - theirs).abs().max().item()
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol} * {scale:.3g}"


# --- the head kernels' devices -----------------------------------------------------------------

HAS_CUDA = torch.cuda.is_available()
# "emu": the CUDA kernels and their host code, executed on the CPU by csrc/emu (tests/emu.py),
# on CPU tensors; it runs everywhere, CI included.
DEVICES = ["cpu", "emu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not HAS_CUDA, reason="no CUDA device")])]


def tdev(device):
    """Where a test's tensors live: the emulation runs on CPU tensors."""
    return "cpu" if device == "emu" else device


def ops(device):
    """The op wrappers under test on `device` (the emulation is built on first use)."""
    from lpips_fast import _ops
    if device != "emu":
        return _ops
    from emu import emu_error, emu_ops
    assert emu_ops is not None, f"the CUDA emulation did not build: {emu_error}"
    return emu_ops


def conv_ops(device):
    """The torch.ops namespace of the fused backbone ops under test on `device`."""
    if device != "emu":
        return torch.ops.lpips_fast
    from emu import emu_error, emu_ops
    assert emu_ops is not None, f"the CUDA emulation did not build: {emu_error}"
    return torch.ops.lpips_fast_emu


def conv_ns(device):
    """The namespace name for lpips_fast._conv_ops' wrappers (ns=...), built if need be."""
    conv_ops(device)
    return "lpips_fast_emu" if device == "emu" else "lpips_fast"


def make_conv(case, dtype, device, layout, seed=0, requires_grad=False):
    """(x, weight, bias, stride, padding) of a conv case (N, Cin, H, W, Cout, kernel, stride,
    padding, ...): randn input, weights scaled to unit output variance, a bias that puts
    about half the outputs above 0, made in float64 then cast."""
    n, cin, h, w, cout, k, stride, padding = case[:8]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g, dtype=torch.float64)
    wt = torch.randn(cout, cin, k, k, generator=g, dtype=torch.float64) / (cin * k * k) ** 0.5
    b = torch.randn(cout, generator=g, dtype=torch.float64) * 0.5
    x, wt, b = (t.to(dtype=dtype, device=tdev(device)) for t in (x, wt, b))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        wt = wt.contiguous(memory_format=torch.channels_last)
    for t in (x, wt, b):
        t.requires_grad_(requires_grad)
    return x, wt, b, list(stride), list(padding)


def same_layout(a, b):
    """Equal strides where they matter (a dimension of size 1 has any stride)."""
    return all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


FUSED_OPS = ("conv_bias_relu", "conv_bias_relu_pool")  # (a pair, a pair with its pool)


def fused_op_calls(fn):
    """{name: calls} of the fused backbone ops (lpips_fast._conv_ops) while fn() runs
    without autograd."""
    from lpips_fast import _conv_ops
    calls = dict.fromkeys(FUSED_OPS, 0)
    real = {name: getattr(_conv_ops, name) for name in FUSED_OPS}

    def counting(name):
        def wrapper(*a, **k):
            calls[name] += 1
            return real[name](*a, **k)
        return wrapper

    try:
        for name in FUSED_OPS:
            setattr(_conv_ops, name, counting(name))
        with torch.no_grad():
            fn()
    finally:
        for name in FUSED_OPS:
            setattr(_conv_ops, name, real[name])
    return calls


def assert_second_order_equal(ours, eager, x, wt, b):
    """Second-order gradients through the scalar loss ours(x, wt, b) equal those through
    eager(x, wt, b) (float64; the fused ops' create_graph backward runs eager's formulas)."""
    g1 = torch.autograd.grad(ours(x, wt, b), (x, wt), create_graph=True)
    e1 = torch.autograd.grad(eager(x, wt, b), (x, wt), create_graph=True)
    g2 = torch.autograd.grad(g1[0].square().sum() + g1[1].sum(), (x, wt, b))
    e2 = torch.autograd.grad(e1[0].square().sum() + e1[1].sum(), (x, wt, b))
    for a, e in zip(g2, e2):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def feats(shape, dtype=torch.float32, device="cpu", layout="nchw", seed=0, gen_shape=None):
    """ReLU'ed randn (some exact zeros, like real features), made in float64 then cast."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(gen_shape or shape, generator=g, dtype=torch.float64).relu()
    x = x.to(dtype=dtype, device=tdev(device))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":  # spatial dims not mergeable: exercises the copy fallback
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    if gen_shape is not None:
        x = x.expand(shape)
    return x


def make_weight(c, device, dtype=torch.float32, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, c, 1, 1, generator=g, dtype=torch.float64).to(dtype=dtype,
                                                                         device=tdev(device))


def make_dirs(root, n=6, size=(64, 64)):
    """ref/ and dist/ (each with an empty sub/): n images im<i>.png and noisy copies."""
    from PIL import Image
    d0, d1 = root / "ref", root / "dist"
    for d in (d0 / "sub", d1 / "sub"):
        d.mkdir(parents=True)
    for i in range(n):
        a = image(d0 / f"im{i}.png", i, size)
        Image.fromarray(noisy(a, 100 + i)).save(d1 / f"im{i}.png")
    return d0, d1


def setup_script():
    """setup.py as a module: its decision functions, without building (main() runs only as
    a script)."""
    import importlib.util
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("lpips_fast_setup", root / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
