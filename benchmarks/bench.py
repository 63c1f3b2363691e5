"""Side-by-side LPIPS benchmark: lpips_fast vs the official lpips 0.1.4, eager and compiled.

All implementations run in one process on the same inputs with the same (random) weights:
warm-up, then the median of repeated runs (CUDA events on GPU, perf_counter on CPU), peak
memory (GPU: max_memory_allocated), and ratios against the official code. Writes
benchmarks/results/<device>.json and .md, and a plot of time and peak memory against
resolution.

    python benchmarks/bench.py                       # the device's default cases
    python benchmarks/bench.py --device cpu --quick  # a short CPU run
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import lpips_fast  # noqa: E402
from common import device_name, median_seconds, style_loglog, two_panels, warm_gpu  # noqa: E402

# (net, N, size, backward): the cases on GPU; smaller ones where only a CPU runs.
GPU_CASES = [("alex", 32, 64, True), ("alex", 1, 1024, False), ("vgg", 16, 256, True),
             ("vgg", 1, 2048, False), ("squeeze", 32, 64, True)]
CPU_CASES = [("alex", 8, 64, True), ("alex", 1, 512, False), ("vgg", 2, 128, True),
             ("vgg", 1, 512, False), ("squeeze", 8, 64, True)]
SWEEP = {"cuda": [256, 512, 1024, 2048], "cpu": [128, 256, 512, 1024]}


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return device_name(device)
    return f"CPU {device_name(device)} x{torch.get_num_threads()} threads"


def commit() -> str:
    """The commit under test: $LPIPS_FAST_COMMIT (gpu_check.sh sets it), else git's HEAD."""
    if os.environ.get("LPIPS_FAST_COMMIT"):
        return os.environ["LPIPS_FAST_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def official_model(net: str, state: dict, device):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import lpips
        m = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    m.load_state_dict(state)
    return m.eval().to(device)


def implementations(net: str, device, compiled: bool, precisions):
    """The eager implementations, or (compiled=True) torch.compile of the official module."""
    torch.manual_seed(0)
    ours = lpips_fast.LPIPS(net=net, pnet_rand=True, verbose=False).to(device)
    state = ours.state_dict()
    if compiled:
        # A fresh compile per case with static shapes: reusing dynamo's cache across cases
        # made it recompile with dynamic shapes, which crashed inductor on squeeze (torch 2.11)
        # and would time a shape-generic kernel instead of the best static one.
        torch._dynamo.reset()
        return {"official+compile": torch.compile(official_model(net, state, device),
                                                  dynamic=False),
                "lpips_fast+compile": torch.compile(ours, dynamic=False)}
    impls = {"official": official_model(net, state, device), "lpips_fast": ours}
    for p in precisions:
        m = lpips_fast.LPIPS(net=net, pnet_rand=True, verbose=False, precision=p).to(device)
        m.load_state_dict(state)
        impls[f"lpips_fast {p}"] = m
    return impls


def make_step(model, x0, x1, backward: bool):
    if backward:
        def step():
            x = x0.detach().requires_grad_(True)
            model(x, x1).sum().backward()
            return x.grad
    else:
        def step():
            with torch.no_grad():
                return model(x0, x1)
    return step


def measure(step, device, warmup: int, repeats: int):
    """Median seconds of `repeats` runs after `warmup`, and peak memory (GPU) in bytes."""
    if device.type != "cuda":
        return median_seconds(step, device, warmup, repeats), None
    step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    seconds = median_seconds(step, device, max(warmup - 1, 0), repeats, min_time=0.3)
    return seconds, torch.cuda.max_memory_allocated(device) - base


def run_case(net, n, size, backward, device, args, compiled=False):
    gen = torch.Generator().manual_seed(1)
    x0 = (torch.rand(n, 3, size, size, generator=gen) * 2 - 1).to(device)
    x1 = (torch.rand(n, 3, size, size, generator=gen) * 2 - 1).to(device)
    rows = {}
    for name, model in implementations(net, device, compiled, args.precisions).items():
        try:
            sec, peak = measure(make_step(model, x0, x1, backward), device, args.warmup,
                                args.repeats)
            rows[name] = {"ms": sec * 1e3, "peak_bytes": peak}
        except torch.OutOfMemoryError:
            rows[name] = {"ms": None, "peak_bytes": None, "error": "out of memory"}
        except Exception as e:  # a compiler failure costs its row, not the whole benchmark
            if not compiled:
                raise
            rows[name] = {"ms": None, "peak_bytes": None,
                          "error": f"failed: {type(e).__name__}"}
            print(f"  {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"  {net} N={n} {size}x{size} {'fwd+bwd' if backward else 'fwd'} {name:24s} "
              f"{rows[name].get('ms') or float('nan'):9.3f} ms", flush=True)
    return rows


def ratio(rows, a, b):
    if a in rows and b in rows and rows[a].get("ms") and rows[b].get("ms"):
        return rows[a]["ms"] / rows[b]["ms"]
    return None


def markdown(results, meta) -> str:
    lines = [f"# LPIPS benchmark on {meta['device']}", "",
             f"torch {meta['torch']}, commit {meta['commit']}, {meta['date']}, medians of at "
             f"least {meta['repeats']} runs (and 0.3 s) after {meta['warmup']} warm-up runs. "
             "Ratios > 1 mean lpips_fast is faster (fp32 unless the column says otherwise).", ""]
    order = ["official", "official+compile", "lpips_fast", "lpips_fast+compile"]
    names = sorted({k for r in results for k in r["rows"]},
                   key=lambda k: order.index(k) if k in order else 9)
    header = "| case | " + " | ".join(f"{k} ms" for k in names) + \
             " | vs official | vs compile | bf16 vs compile | compiled vs compile |" \
             " peak MiB (official / fast) |"
    lines += [header, "|" + "---|" * (len(names) + 6)]
    for r in results:
        rows = r["rows"]
        cells = [f"{rows[k]['ms']:.3f}" if rows.get(k, {}).get("ms") else
                 rows.get(k, {}).get("error", "-") for k in names]
        peaks = [rows.get(k, {}).get("peak_bytes") for k in ("official", "lpips_fast")]
        peak = " / ".join(f"{p / 2**20:.0f}" if p else "-" for p in peaks)
        fmt = lambda v: f"{v:.2f}x" if v else "-"  # noqa: E731
        lines.append(f"| {r['case']} | " + " | ".join(cells) +
                     f" | {fmt(ratio(rows, 'official', 'lpips_fast'))} | "
                     f"{fmt(ratio(rows, 'official+compile', 'lpips_fast'))} | "
                     f"{fmt(ratio(rows, 'official+compile', 'lpips_fast bf16'))} | "
                     f"{fmt(ratio(rows, 'official+compile', 'lpips_fast+compile'))} | {peak} |")
    return "\n".join(lines) + "\n"


def plot(sweep, path: Path, title: str):
    fig, axes = two_panels()
    if fig is None:
        return
    for name in sweep[0]["rows"]:
        pts = [(s["size"], s["rows"][name]) for s in sweep if s["rows"][name].get("ms")]
        axes[0].plot([p for p, _ in pts], [r["ms"] for _, r in pts], "o-", label=name)
        mem = [(p, r["peak_bytes"]) for p, r in pts if r.get("peak_bytes")]
        if mem:
            axes[1].plot([p for p, _ in mem], [b / 2**20 for _, b in mem], "o-", label=name)
    style_loglog(axes, "image side (pixels), vgg, N=1, forward",
                 ["median time (ms)", "peak memory (MiB)"])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--precisions", nargs="*", default=None,
                   help="extra lpips_fast precisions to time (default: bf16 fp16 on GPU)")
    p.add_argument("--quick", action="store_true", help="fewer repeats, no sweep")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    args.repeats = args.repeats if args.repeats is not None else (5 if args.quick else 20)
    if args.precisions is None:
        args.precisions = ["bf16", "fp16"] if gpu else []
    meta = {"device": describe(device), "torch": torch.__version__, "commit": commit(),
            "date": time.strftime("%Y-%m-%d"), "warmup": args.warmup, "repeats": args.repeats}
    print(f"{meta['device']}, torch {meta['torch']}, commit {meta['commit']}")
    cases = GPU_CASES if gpu else CPU_CASES
    warm_gpu(device)
    results = [{"case": f"{net}, N={n}, {size}x{size}, {'fwd+bwd' if backward else 'fwd'}",
                "rows": run_case(net, n, size, backward, device, args)}
               for net, n, size, backward in cases]
    # the sweep compares memory and eager speed (compiling per size would be slow)
    sweep = [] if args.quick else [{"size": size, "rows": run_case("vgg", 1, size, False, device,
                                                                   args)}
                                   for size in SWEEP[device.type]]
    # Compiled runs last: on a CPU, compiled code's OpenMP threads kept spinning after it
    # returned and slowed whatever was timed next (eager official alex 512: 48 -> 62 ms).
    if args.compile:
        for result, (net, n, size, backward) in zip(results, cases):
            result["rows"].update(run_case(net, n, size, backward, device, args, compiled=True))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("".join(c if c.isalnum() else "-" for c in meta["device"]).strip("-")
                       .lower().replace("--", "-"))
    table = markdown(results, meta)
    if sweep:
        table += "\n## vgg, N=1, forward, by resolution\n\n" + markdown(
            [{"case": f"{s['size']}x{s['size']}", "rows": s["rows"]} for s in sweep], meta
        ).split("\n", 4)[4]
        plot(sweep, stem.with_suffix(".png"), meta["device"])
    stem.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "cases": results, "sweep": sweep}, indent=1))
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
