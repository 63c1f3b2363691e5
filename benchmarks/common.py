"""What every benchmark here shares: device names, timing, and the log-log plot style."""
from __future__ import annotations

import platform
import statistics
import time

import torch


def device_name(device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), name)
    except OSError:
        pass
    return name


def warm_gpu(device, seconds=1.0) -> None:
    """Keep the GPU busy for a while, so that clocks have ramped up before the first timing
    (an idle H100 here read 345 MHz against 1980 MHz under load)."""
    if torch.device(device).type != "cuda":
        return
    a = torch.randn(4096, 4096, device=device)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize(device)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device, warmup=2, repeats=None, min_time=0.2, max_reps=50) -> float:
    """Median seconds of fn() after `warmup` calls: at least `repeats` runs (3 when None) and
    until `min_time` has passed, at most max(repeats, max_reps). CUDA events on GPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times, start = [], time.perf_counter()

    least = 3 if repeats is None else repeats
    most = max(least, max_reps)

    def more():
        return len(times) < least or (len(times) < most and time.perf_counter() - start < min_time)

    while more():
        if torch.device(device).type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def two_panels():
    """A figure with two side-by-side axes, or (None, None) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None, None
    return plt.subplots(1, 2, figsize=(11, 4))


def style_loglog(axes, xlabel: str, ylabels) -> None:
    """Log-log axes (base-2 sizes), a grid and a legend on each panel."""
    for ax, label in zip(axes, ylabels):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        else:  # e.g. peak memory, which only the GPU run measures
            ax.text(0.5, 0.5, "not measured on this device", ha="center",
                    transform=ax.transAxes)
