"""Side-by-side LPIPS benchmark: lpips_fast vs the official lpips 0.1.4, eager and compiled.

Within each case every implementation (official eager, official + torch.compile, lpips_fast
fp32 / bf16 / fp16 eager, lpips_fast + torch.compile) runs in one process on the same inputs
with the same (random) weights: each is warmed up, its peak memory taken from one more call
(GPU: max_memory_allocated), then all are timed in rounds, each round running every one once in
a freshly shuffled order (common.interleaved_times; CUDA events on GPU, perf_counter on CPU).
Reported per implementation: the median of the rounds with the interquartile range beside it,
ratios against official eager and official + compile, and "% of limit": the time the device's
dense tensor-core peak and HBM bandwidth allow for the case (lpips_fast/bench/limits.py: what is
counted and the table of devices; "n/a" for the CPU and GPUs the table lacks) over the median.

Writes <out>/<device>.json and .md (and a plot of time and peak memory against resolution),
<out> = ./bench-results unless --out says otherwise: the shipped benchmarks/results/ only
changes when asked to.

    lpips-fast bench model                       # the device's default cases
    lpips-fast bench model --device cpu --quick  # a short CPU run
    lpips-fast bench model --cases vgg:1:2048:fwd alex:32:64:train --out /tmp/r
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import warnings
from pathlib import Path

import torch

import lpips_fast

from . import limits
from .common import (environment, environment_line, interleaved_times, spread,
                    style_loglog, two_panels, warm_gpu)

PROG = "lpips-fast bench model"  # the name in --help (benchmarks/ runs the same code)

# (net, N, size, backward): the cases on GPU; smaller ones where only a CPU runs.
GPU_CASES = [("alex", 32, 64, True), ("alex", 1, 1024, False), ("vgg", 16, 256, True),
             ("vgg", 1, 2048, False), ("squeeze", 32, 64, True)]
CPU_CASES = [("alex", 8, 64, True), ("alex", 1, 512, False), ("vgg", 2, 128, True),
             ("vgg", 1, 512, False), ("squeeze", 8, 64, True)]
SWEEP = {"cuda": [256, 512, 1024, 2048], "cpu": [128, 256, 512, 1024]}
OFFICIAL, COMPILED = "official", "official+compile"
ORDER = [OFFICIAL, COMPILED, "lpips_fast", "lpips_fast fused-backbone", "lpips_fast bf16",
         "lpips_fast fp16", "lpips_fast+compile"]


def parse_case(text: str):
    """'vgg:1:2048:fwd' or 'alex:32:64:train' -> (net, N, size, backward)."""
    parts = text.split(":")
    if len(parts) != 4 or parts[3] not in ("fwd", "train") or not all(
            p.isdigit() and int(p) > 0 for p in parts[1:3]):
        raise argparse.ArgumentTypeError(f"a case is NET:N:SIZE:fwd|train, got {text!r}")
    lpips_fast.backbones.canonical(parts[0])  # a ValueError naming the nets
    return parts[0], int(parts[1]), int(parts[2]), parts[3] == "train"


def case_label(net, n, size, backward) -> str:
    return f"{net}, N={n}, {size}x{size}, {'fwd+bwd' if backward else 'fwd'}"


def precision_of(name: str) -> str:
    return name.rsplit(" ", 1)[1] if name.rsplit(" ", 1)[-1] in ("bf16", "fp16") else "fp32"


def official_available() -> bool:
    """Whether the official `lpips` package can be imported: optional at run time (a wheel
    does not require it); without it only lpips_fast's rows are timed."""
    try:
        return importlib.util.find_spec("lpips") is not None
    except (ImportError, ValueError):  # ValueError: a module made unimportable (None) in tests
        return False


def official_model(net: str, state: dict, device):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import lpips
        m = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    m.load_state_dict(state)
    return m.eval().to(device)


def implementations(net: str, device, precisions, compiled: bool) -> dict:
    """Every implementation of one case on the same random weights: {name: module}."""
    torch.manual_seed(0)
    ours = lpips_fast.LPIPS(net=net, pnet_rand=True, verbose=False).to(device)
    state = ours.state_dict()

    def fast(precision=None, backbone="eager"):
        m = lpips_fast.LPIPS(net=net, pnet_rand=True, verbose=False, precision=precision)
        m.load_state_dict(state)
        m.backbone_impl = backbone
        return m.to(device)
    ours.backbone_impl = "eager"  # the rows say which backbone they time, whatever the env says
    official = official_available()
    impls = {OFFICIAL: official_model(net, state, device)} if official else {}
    impls["lpips_fast"] = ours
    # the fused conv + bias + ReLU backbone (issue 19 item 1): the GPU run decides whether it
    # becomes the default
    impls["lpips_fast fused-backbone"] = fast(backbone="fused")
    impls.update({f"lpips_fast {p}": fast(p) for p in precisions})
    if compiled:
        # A fresh compile per case with static shapes: reusing dynamo's cache across cases
        # made it recompile with dynamic shapes, which crashed inductor on squeeze (torch 2.11)
        # and would time a shape-generic kernel instead of the best static one.
        torch._dynamo.reset()
        if official:
            impls[COMPILED] = torch.compile(official_model(net, state, device), dynamic=False)
        impls["lpips_fast+compile"] = torch.compile(fast(), dynamic=False)
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


def peak_memory(step, device):
    """Bytes one call allocates beyond what was allocated before it (GPU only, else None)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def warm_up(name, step, device, warmup: int) -> dict:
    """Warm-up calls (torch.compile compiles in the first), then one call for the peak
    memory: the start of the row, or its error. Running out of memory, or a compiler failure,
    costs that row, not the benchmark."""
    try:
        for _ in range(max(warmup, 1)):
            step()
        return {"peak_bytes": peak_memory(step, device)}
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    except Exception as e:
        if "compile" not in name:
            raise
        print(f"  {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return {"error": f"failed: {type(e).__name__}"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def add_limits(rows, net, n, size, backward, peaks) -> int:
    """Each timed row's limit time and % of it (None without the device's peaks); the
    case's FLOPs."""
    for name, row in rows.items():
        precision = precision_of(name)
        flops, nbytes = limits.case_work(net, n, size, backward, precision)
        limit = limits.limit_seconds(flops, nbytes, peaks, precision)
        row.update(precision=precision, min_bytes=nbytes,
                   limit_ms=limit * 1e3 if limit else None,
                   pct_of_limit=100 * limit * 1e3 / row["ms"] if limit and row.get("ms")
                   else None)
    return flops


def add_ratios(rows) -> None:
    """Ratios > 1: the row is faster than official eager (vs_official) or compiled."""
    for row in rows.values():
        for key, base in (("vs_official", OFFICIAL), ("vs_official_compile", COMPILED)):
            b = rows.get(base, {}).get("ms")
            row[key] = b / row["ms"] if b and row.get("ms") else None


def run_case(net, n, size, backward, device, args, compiled):
    gen = torch.Generator().manual_seed(1)
    x0 = (torch.rand(n, 3, size, size, generator=gen) * 2 - 1).to(device)
    x1 = (torch.rand(n, 3, size, size, generator=gen) * 2 - 1).to(device)
    rows, steps = {}, {}
    for name, model in implementations(net, device, args.precisions, compiled).items():
        steps[name] = make_step(model, x0, x1, backward)
        rows[name] = warm_up(name, steps[name], device, args.warmup)
    times = interleaved_times({k: f for k, f in steps.items() if "error" not in rows[k]},
                              device, warmup=0, rounds=args.repeats, min_time=args.min_time)
    for name, seconds in times.items():
        rows[name].update(spread(seconds))
    rows = {k: rows[k] for k in sorted(rows, key=lambda k: ORDER.index(k) if k in ORDER else 99)}
    flops = add_limits(rows, net, n, size, backward, args.peaks)
    add_ratios(rows)
    label = case_label(net, n, size, backward)
    for name, row in rows.items():
        print(f"  {label} {name:20s} " + (f"{row['ms']:9.3f} ms [{row['q1_ms']:.3f}, "
                                          f"{row['q3_ms']:.3f}]" if "ms" in row else row["error"]),
              flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"case": label, "net": net, "n": n, "size": size, "backward": backward,
            "gflop": flops / 1e9, "rows": rows}


def _cell(v, fmt) -> str:
    return fmt.format(v) if v is not None else "-"


def table(results) -> list:
    """One line per (case, implementation): the long form fits any set of implementations."""
    lines = ["| case | GFLOP | implementation | median ms | IQR ms (q1-q3) | vs official | "
             "vs official+compile | % of limit | peak MiB |", "|" + "---|" * 9]
    for r in results:
        first = True
        for name, row in r["rows"].items():
            case, gflop = (r["case"], f"{r['gflop']:.3g}") if first else ("", "")
            first = False
            if "ms" not in row:
                lines.append(f"| {case} | {gflop} | {name} | {row['error']} | | | | | |")
                continue
            pct = _cell(row["pct_of_limit"], "{:.3g}%") if row["limit_ms"] else "n/a"
            peak = row.get("peak_bytes")
            lines.append(
                f"| {case} | {gflop} | {name} | {row['ms']:.3f} | {row['q1_ms']:.3f}-"
                f"{row['q3_ms']:.3f} | {_cell(row['vs_official'], '{:.2f}x')} | "
                f"{_cell(row['vs_official_compile'], '{:.2f}x')} | {pct} | "
                f"{_cell(peak / 2**20 if peak is not None else None, '{:.0f}')} |")
    return lines


def markdown(results, sweep, meta) -> str:
    peaks = meta["peaks"]
    limit_note = ("no peak numbers for this device (lpips_fast/bench/limits.py), so no % of limit"
                  if peaks is None else
                  f"peaks used ({meta['peaks_source']}): TF32 {peaks['tf32']:g}, BF16 "
                  f"{peaks['bf16']:g}, FP16 {peaks['fp16']:g}, FP32 {peaks['fp32']:g} TFLOP/s, "
                  f"HBM {peaks['hbm']:g} TB/s")
    lines = [f"# LPIPS benchmark on {meta['device']}", "", environment_line(meta), "",
             f"Per case, every implementation is warmed up ({meta['warmup']} calls), its peak "
             "memory taken from one more call, then all are timed in rounds (at least "
             f"{meta['repeats']}, and {meta['min_time']} s per implementation), each round "
             "running every implementation once in a shuffled order. Median and interquartile "
             "range of the rounds; ratios > 1 mean the row is faster. % of limit: the time the "
             "backbone's convolution FLOPs take at the dense tensor-core peak (TF32 for fp32 "
             "rows) or the minimum bytes (inputs, features once) at the HBM bandwidth, the "
             f"larger of the two, over the median; {limit_note}.", ""]
    lines += table(results)
    if sweep:
        lines += ["", "## vgg, N=1, forward, by resolution", ""] + table(sweep)
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


def _case_arg(text: str):
    try:
        return parse_case(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per implementation")
    p.add_argument("--repeats", type=int, default=None, help="least number of timed rounds")
    p.add_argument("--min-time", type=float, default=None,
                   help="time rounds until this many seconds per implementation have passed "
                        "(default 0.3 on GPU, 0.2 on CPU), at most 50 rounds")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="leave out the torch.compile rows")
    p.add_argument("--precisions", nargs="*", default=None,
                   help="extra lpips_fast precisions to time (default: bf16 fp16 on GPU)")
    p.add_argument("--cases", nargs="+", type=_case_arg, default=None,
                   help="NET:N:SIZE:fwd|train instead of the device's default cases")
    p.add_argument("--limits", dest="peaks", type=limits.limits_arg, default=None,
                   help=limits.LIMITS_HELP)
    p.add_argument("--quick", action="store_true", help="fewer repeats, no sweep")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="folder for the .json/.md/.png (default ./bench-results)")
    args = p.parse_args(argv)
    gpu = torch.device(args.device).type == "cuda"
    for name in ("warmup", "repeats", "min_time"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    args.repeats = args.repeats if args.repeats is not None else (5 if args.quick else 20)
    args.min_time = args.min_time if args.min_time is not None else (0.3 if gpu else 0.2)
    if args.precisions is None:
        args.precisions = ["bf16", "fp16"] if gpu else []
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    meta = environment(device)
    meta["peaks_source"] = "--limits" if args.peaks else "lpips_fast/bench/limits.py"
    if args.peaks is None and device.type == "cuda":
        args.peaks = limits.device_limits(meta["device"])
    meta.update(warmup=args.warmup, repeats=args.repeats, min_time=args.min_time,
                peaks=args.peaks, cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
    meta["official"] = official_available()
    print(environment_line(meta), flush=True)
    if not meta["official"]:
        print("the official lpips package is not installed: timing lpips_fast only, no "
              "ratios (pip install lpips to compare)", flush=True)
    cases = args.cases or (GPU_CASES if device.type == "cuda" else CPU_CASES)
    warm_gpu(device)
    results = [run_case(*case, device, args, args.compile) for case in cases]
    # The sweep compares memory and eager speed by resolution (compiling per size would be
    # slow). Note for CPU runs: compiled code's OpenMP threads keep spinning after it returns
    # and slow whatever runs next (eager official alex 512: 48 -> 62 ms measured when the
    # compiled rows ran before it); interleaved, that lands on every row alike, so for CPU
    # eager numbers run with --no-compile.
    sweep = [] if args.quick else [dict(run_case("vgg", 1, size, False, device, args, False),
                                        case=f"{size}x{size}")
                                   for size in SWEEP[device.type]]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("".join(c if c.isalnum() else "-" for c in meta["device"]).strip("-")
                       .lower().replace("--", "-"))
    text = markdown(results, sweep, meta)
    if sweep:
        plot(sweep, stem.with_suffix(".png"), meta["device"])
    stem.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "cases": results, "sweep": sweep}, indent=1))
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {stem}.md and .json")
    return stem


if __name__ == "__main__":
    main()
