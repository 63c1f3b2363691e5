"""What every benchmark here shares: device names and versions, timing (one interleaved
round-robin for one or many functions), and the log-log plot style."""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import random
import statistics
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the checkout (git) when run from one


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


def commit() -> str:
    """The commit under test: $LPIPS_FAST_COMMIT (gpu_check.sh sets it), else git's HEAD
    (with '+dirty' when the work tree has uncommitted changes)."""
    if os.environ.get("LPIPS_FAST_COMMIT"):
        return os.environ["LPIPS_FAST_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True).stdout.strip()
    except OSError:
        return "unknown"
    return (head + ("+dirty" if dirty else "")) if head else "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        try:  # importable without an installed distribution (e.g. PYTHONPATH, --target)
            return getattr(importlib.import_module(package), "__version__", "unknown")
        except ImportError:
            return "not installed"


def environment(device) -> dict:
    """What a result depends on: the device, every package's version, CUDA/cuDNN, the date."""
    device = torch.device(device)
    import lpips_fast
    name = device_name(device)
    if device.type != "cuda":
        name = f"CPU {name} x{torch.get_num_threads()} threads"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"device": name, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": _version("torchvision"), "lpips": _version("lpips"),
            "lpips_fast": getattr(lpips_fast, "__version__", "unknown"), "commit": commit(),
            "cuda": torch.version.cuda or "none", "cudnn": str(cudnn) if cudnn else "none",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def environment_line(env: dict) -> str:
    return (f"{env['device']}; torch {env['torch']}, torchvision {env['torchvision']}, "
            f"lpips {env['lpips']}, lpips_fast {env['lpips_fast']} (commit {env['commit']}), "
            f"CUDA {env['cuda']}, cuDNN {env['cudnn']}, Python {env['python']}; {env['date']}")


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


def _time_once(fn, cuda: bool) -> float:
    """Seconds of one fn() call: CUDA events around it (waiting for the end event, so that
    the next call starts on an idle GPU), or perf_counter on the CPU (no device to wait for)."""
    if cuda:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved_times(fns: dict, device, warmup=2, rounds=None, min_time=0.2, max_rounds=50,
                      seed=0) -> dict:
    """Seconds of each named fn() per round: {name: [seconds, ...]}.

    Every fn is called `warmup` times first; then each round calls every fn once, in an order
    shuffled afresh per round (seeded: reruns use the same orders), so that clock ramps,
    thermal drift, a noisy neighbour or one fn slowing the next spread over all of them alike
    instead of favouring whichever ran first. At least `rounds` rounds (3 when None) and until
    `min_time` seconds per fn have passed, at most max(rounds, max_rounds)."""
    cuda = torch.device(device).type == "cuda"
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    sync(device)
    times = {name: [] for name in names}
    least = 3 if rounds is None else rounds
    most = max(least, max_rounds)
    order, rng = list(names), random.Random(seed)
    start = time.perf_counter()
    done = 0
    while done < least or (done < most and
                           time.perf_counter() - start < min_time * len(names)):
        rng.shuffle(order)
        for name in order:
            times[name].append(_time_once(fns[name], cuda))
        done += 1
    return times


def median_seconds(fn, device, warmup=2, repeats=None, min_time=0.2, max_reps=50) -> float:
    """Median seconds of fn() after `warmup` calls: at least `repeats` runs (3 when None) and
    until `min_time` has passed, at most max(repeats, max_reps). CUDA events on GPU."""
    return statistics.median(interleaved_times({"fn": fn}, device, warmup, repeats, min_time,
                                               max_reps)["fn"])


def spread(seconds) -> dict:
    """Median, quartiles and extremes of a list of seconds, in milliseconds."""
    ms = sorted(s * 1e3 for s in seconds)
    q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else ms * 3
    return {"ms": statistics.median(ms), "q1_ms": q1, "q3_ms": q3, "min_ms": ms[0],
            "max_ms": ms[-1], "rounds": len(ms)}


def publish(lines: list, out=None) -> str:
    """A results table: its lines joined, printed, and written to the file `out` when given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
    return text


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
