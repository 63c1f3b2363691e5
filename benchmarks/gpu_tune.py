#!/usr/bin/env python3
"""The GPU tuning measurements of issue 10, side by side in one process (CUDA events, medians).

Each section times variants of one choice on the same inputs and weights:
  A. training loss (fwd+bwd w.r.t. in0): default vs channels_last=False, cudnn.benchmark,
     CUDA-graph replay (lpips_fast.cuda_graphed); the official eager module as the baseline;
  B. scoring (fwd, no grad) at high resolution: channels_last and precision;
  C. ONE_LAUNCH_MAX_PIXELS: the all-layer head (one launch) vs streaming per layer, by size;
  D. the head kernels' knobs (LPIPS_FAST_CUDA_WARPS, LPIPS_FAST_CUDA_CL_PIXELS), head alone;
  E. where the time goes: profiler split of the default step into backbone and head kernels;
  F. what TF32 (PyTorch's default for cuDNN convolutions) does to parity with the official code.

    python benchmarks/gpu_tune.py --out benchmarks/results/h100-tune.md [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import lpips_fast  # noqa: E402
from lpips_fast import _ops  # noqa: E402
from lpips_fast import model as M  # noqa: E402
from bench import official_model  # noqa: E402
from bench_head import alex_shapes, vgg_shapes  # noqa: E402
from common import device_name, median_seconds, warm_gpu  # noqa: E402

DEV = torch.device("cuda")
REPS = dict(warmup=3, repeats=15)


def ours(net, **kw):
    torch.manual_seed(0)
    return lpips_fast.LPIPS(net=net, pnet_rand=True, verbose=False, **kw).to(DEV)


def images(n, size, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(n, 3, size, size, generator=gen) * 2 - 1).to(DEV) for _ in range(2)]


def ms(fn):
    return median_seconds(fn, DEV, **REPS) * 1e3


def train_step(model, x0, x1):
    def step():
        x = x0.detach().requires_grad_(True)
        model(x, x1).sum().backward()
    return step


def graphed_step(model, x0, x1):
    g = lpips_fast.cuda_graphed(model, x0.detach().requires_grad_(True), x1)

    def step():
        x = x0.detach().requires_grad_(True)
        g(x, x1).sum().backward()
    return step


@contextlib.contextmanager
def cudnn_benchmark(on):
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


def section_train(net, n, size):
    x0, x1 = images(n, size)
    default = ours(net)
    rows = {"official eager": ms(train_step(official_model(net, default.state_dict(), DEV), x0, x1)),
            "lpips_fast (default)": ms(train_step(default, x0, x1)),
            "channels_last=False": ms(train_step(ours(net, channels_last=False), x0, x1))}
    with cudnn_benchmark(True):
        rows["cudnn.benchmark=True"] = ms(train_step(default, x0, x1))
    rows["cuda_graphed"] = ms(graphed_step(default, x0, x1))
    with cudnn_benchmark(True):
        rows["cuda_graphed + cudnn.benchmark"] = ms(graphed_step(ours(net), x0, x1))
    rows["bf16"] = ms(train_step(ours(net, precision="bf16"), x0, x1))
    return f"A. {net}, N={n}, {size}x{size}, fwd+bwd", rows, "official eager"


def section_score(net, size):
    x0, x1 = images(1, size)

    def fwd(m):
        def step():
            with torch.no_grad():
                m(x0, x1)
        return step
    rows = {}
    for p in ("fp32", "bf16", "fp16"):
        for cl in (True, False):
            rows[f"{p}, channels_last={cl}"] = ms(fwd(ours(net, precision=p, channels_last=cl)))
    return f"B. {net}, N=1, {size}x{size}, fwd", rows, "fp32, channels_last=True"


def section_one_launch(net, n, sizes):
    rows = {}
    model = ours(net)
    old = M.ONE_LAUNCH_MAX_PIXELS
    try:
        for size in sizes:
            x0, x1 = images(n, size)
            for label, limit in (("one launch", 10**12), ("streaming", 0)):
                M.ONE_LAUNCH_MAX_PIXELS = limit

                def step():
                    with torch.no_grad():
                        model(x0, x1)
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t = ms(step)
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                rows[f"{size}x{size} {label}"] = (t, peak)
    finally:
        M.ONE_LAUNCH_MAX_PIXELS = old
    return f"C. ONE_LAUNCH_MAX_PIXELS ({old}): {net}, N={n}, fwd no grad (ms, peak MiB)", rows, None


def section_knob(label, shapes, n, channels_last, env, settings, backward=True):
    """The head alone (all layers in one op) under each setting of a tuning knob."""
    gen = torch.Generator(device=DEV).manual_seed(0)  # on the GPU: 4 GB of inputs at 2048

    def make(c, h):
        x = torch.randn(n, c, h, h, device=DEV, generator=gen).relu()
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x
    f0s = [make(c, h).requires_grad_() for c, h in shapes]
    f1s = [make(c, h) for c, h in shapes]
    ws = [torch.rand(1, c, 1, 1, device=DEV, generator=gen) for c, _ in shapes]

    def step():
        if backward:
            v, _ = _ops.head_all(f0s, f1s, ws)
            torch.autograd.grad(v.sum(), f0s)
        else:
            with torch.no_grad():
                _ops.head_all(f0s, f1s, ws)
    rows = {}
    try:
        for value in settings:
            os.environ[env] = value
            rows[f"{env}={value or 'default'}"] = ms(step)
    finally:
        os.environ.pop(env, None)
    layout = "channels_last" if channels_last else "NCHW"
    what = "fwd+bwd" if backward else "fwd"
    return f"D. head alone {what}, {label}, N={n}, {layout}", rows, f"{env}=default"


WARPS, WARP_SET = "LPIPS_FAST_CUDA_WARPS", ("", "4", "8", "16")
PIXELS, PIX_SET = "LPIPS_FAST_CUDA_CL_PIXELS", ("", "2", "8")


HEAD_KERNELS = ("fwd_pl_kernel", "fwd_cl_kernel", "bwd_pl_kernel", "bwd_cl_kernel",
                "value_reduce_kernel", "wgrad_kernel", "wgrad_reduce_kernel")


def section_profile(net, n, size, backward):
    x0, x1 = images(n, size)
    model = ours(net)
    if backward:
        step = train_step(model, x0, x1)
    else:
        def step():
            with torch.no_grad():
                model(x0, x1)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    reps = 10
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / reps * 1e3
    head = other = 0.0
    kernels = 0
    for e in prof.events():
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        t = e.time_range.elapsed_us()  # a device event: its own duration
        kernels += 1
        if any(k in e.name for k in HEAD_KERNELS):
            head += t
        else:
            other += t
    rows = {"wall per step (profiled)": wall, "GPU: head kernels": head / 1e3 / reps,
            "GPU: everything else (backbone, copies, cat)": other / 1e3 / reps,
            "GPU kernels + copies per step (count)": kernels / reps}
    what = "fwd+bwd" if backward else "fwd"
    return f"E. profile: {net}, N={n}, {size}x{size}, {what} (ms)", rows, None


def section_tf32():
    x0, x1 = images(4, 256)
    rows = {}
    model = ours("vgg")
    theirs = official_model("vgg", model.state_dict(), DEV)
    for on in (True, False):
        old = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = on
        with torch.no_grad():
            a, b = model(x0, x1), theirs(x0, x1)
        torch.backends.cudnn.allow_tf32 = old
        rows[f"allow_tf32={on}: max rel. diff vs official"] = ((a - b).abs() / b.abs()).max().item()
    return "F. vgg, N=4, 256x256: parity with the official code on this GPU", rows, None


def render(title, rows, base):
    lines = [f"### {title}", "", "| variant | value | vs " + (base or "-") + " |", "|---|---|---|"]
    for k, v in rows.items():
        if isinstance(v, tuple):
            lines.append(f"| {k} | {v[0]:.3f} ms, {v[1]:.0f} MiB | |")
            continue
        ratio = f"{rows[base] / v:.2f}x" if base and v else ""
        val = f"{v:.3e}" if abs(v) < 1e-2 and v != 0 else f"{v:.3f}"
        lines.append(f"| {k} | {val} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path)
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_tune.py needs a CUDA device")
    if not _ops.available():
        sys.exit(f"lpips_fast extension not available: {_ops.load_error}")
    if a.quick:
        REPS.update(warmup=2, repeats=5)
    head = (f"## GPU tuning on {device_name(DEV)}, torch {torch.__version__} (CUDA "
            f"{torch.version.cuda}), {time.strftime('%Y-%m-%d')}\n\nMedians of {REPS['repeats']} "
            f"runs after {REPS['warmup']} warm-up runs; ratios > 1: faster than the base row.\n")
    parts = [head]
    warm_gpu(DEV)
    sections = [
        lambda: section_train("alex", 32, 64),
        lambda: section_train("vgg", 16, 256),
        lambda: section_score("vgg", 2048),
        lambda: section_score("alex", 1024),
        lambda: section_one_launch("alex", 8, [128, 256, 384, 512]),
        lambda: section_one_launch("vgg", 8, [128, 256, 384]),
        lambda: section_knob("alex 64x64 layers", alex_shapes(64), 32, False, WARPS, WARP_SET),
        lambda: section_knob("alex 64x64 layers", alex_shapes(64), 32, True, WARPS, WARP_SET),
        lambda: section_knob("vgg 2048x2048 layers", vgg_shapes(2048), 1, False, WARPS, WARP_SET,
                             backward=False),
        lambda: section_knob("vgg 2048x2048 layers", vgg_shapes(2048), 1, True, WARPS, WARP_SET,
                             backward=False),
        lambda: section_knob("vgg 2048x2048 layers", vgg_shapes(2048), 1, True, PIXELS, PIX_SET,
                             backward=False),
        lambda: section_knob("vgg 512x512 layers", vgg_shapes(512), 2, True, PIXELS, PIX_SET),
        lambda: section_knob("alex 64x64 layers", alex_shapes(64), 32, True, PIXELS, PIX_SET),
        lambda: section_profile("alex", 32, 64, True),
        lambda: section_profile("vgg", 1, 2048, False),
        section_tf32,
    ]
    for make_section in sections:
        try:
            text = render(*make_section())
        except Exception as e:  # one failing section must not cost the others' numbers
            text = f"### section failed: {type(e).__name__}: {e}\n"
        print(text, flush=True)
        parts.append(text)
        torch.cuda.empty_cache()
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text("\n".join(parts))


if __name__ == "__main__":
    main()
