"""Peak memory against resolution: the official code vs lpips_fast plain, streaming and tiled.

Each (implementation, size) runs one vgg forward in a fresh subprocess, so one run's
allocations never count toward another's. Measured:
- GPU: torch.cuda.max_memory_allocated during the forward, above what was allocated before
  (model and inputs);
- CPU: the process's peak resident set (VmHWM) during the forward, after resetting it once the
  model and inputs exist (so it includes them, and the Python/torch baseline).
Modes: official = lpips 0.1.4 under no_grad; plain = lpips_fast with autograd recording (in0
requires grad: every layer's features are kept); streaming = lpips_fast under no_grad (each
layer's head runs as soon as its slice finishes); tiled = streaming plus memory_budget.

    python benchmarks/memory.py --device cpu --sizes 512 1024 2048 4096 --budget 2GiB
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ["official", "plain", "streaming", "tiled"]


def child(mode: str, net: str, size: int, device: str, budget: str) -> dict:
    """Runs in the subprocess: one forward, returns time and peak memory."""
    import warnings

    import torch
    sys.path.insert(0, str(ROOT))
    import lpips_fast

    dev = torch.device(device)
    torch.manual_seed(0)
    model = lpips_fast.LPIPS(net=net, pnet_rand=True, verbose=False,
                             memory_budget=budget if mode == "tiled" else None)
    if mode == "official":  # the same weights, so every mode prints the same value
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import lpips
            state, model = model.state_dict(), lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
        model.load_state_dict(state)
    model = model.eval().to(dev)
    x0 = torch.rand(1, 3, size, size, device=dev) * 2 - 1
    x1 = torch.rand(1, 3, size, size, device=dev) * 2 - 1
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    if mode == "plain":
        value = model(x0.requires_grad_(True), x1)
    else:
        with torch.no_grad():
            value = model(x0, x1)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        status = Path("/proc/self/status").read_text().split("\n")
        peak = next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmHWM"))
    return {"seconds": time.perf_counter() - start, "peak_bytes": peak,
            "value": float(value.flatten()[0])}


def run(mode, net, size, device, budget, timeout):
    cmd = [sys.executable, __file__, "--child", mode, net, str(size), device, budget]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["killed"])[-1]
        return {"error": "out of memory" if "memory" in tail.lower() or out.returncode < 0
                else tail[:80]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5],
                               sys.argv[6])))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--net", default="vgg")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--budget", default="2GiB", help="memory_budget of the tiled mode")
    p.add_argument("--skip", nargs="*",
                   default=["official@4096", "plain@4096", "streaming@4096"],
                   help="mode@size pairs not to run: by default those that would need more than "
                        "a 24 GiB machine at 4096 (official ~39 GiB; streaming ~17 GiB untiled)")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    results = {}
    for size in args.sizes:
        for mode in MODES:
            if f"{mode}@{size}" in args.skip:
                results[(mode, size)] = {"error": "not run (--skip)"}
                continue
            r = run(mode, args.net, size, args.device, args.budget, args.timeout)
            results[(mode, size)] = r
            shown = f"{r['peak_bytes'] / 2**30:7.2f} GiB {r['seconds']:7.1f} s  value " \
                    f"{r['value']:.6f}" if "peak_bytes" in r else r["error"]
            print(f"{args.net} {size:5d} {mode:10s} {shown}", flush=True)
    what = "GPU memory allocated" if args.device.startswith("cuda") else "peak RSS"
    lines = [f"# Peak memory, {args.net}, N=1, forward, {args.device}", "",
             f"{what} during one forward (GiB) and its time (s); tiled uses "
             f"memory_budget={args.budget}. Each cell ran in its own process.", "",
             "| size | " + " | ".join(MODES) + " |", "|---|" + "---|" * len(MODES)]
    for size in args.sizes:
        cells = []
        for mode in MODES:
            r = results[(mode, size)]
            cells.append(f"{r['peak_bytes'] / 2**30:.2f} GiB, {r['seconds']:.1f} s"
                         if "peak_bytes" in r else r["error"])
        lines.append(f"| {size}x{size} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)
        json.dump({f"{m}@{s}": r for (m, s), r in results.items()},
                  open(args.out.with_suffix(".json"), "w"), indent=1)
        plot(results, args, args.out.with_suffix(".png"))


def plot(results, args, path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import style_loglog, two_panels
    fig, axes = two_panels()
    if fig is None:
        return
    for mode in MODES:
        pts = [(s, results[(mode, s)]) for s in args.sizes if "peak_bytes" in results[(mode, s)]]
        axes[0].plot([s for s, _ in pts], [r["peak_bytes"] / 2**30 for _, r in pts], "o-",
                     label=mode)
        axes[1].plot([s for s, _ in pts], [r["seconds"] for _, r in pts], "o-", label=mode)
    style_loglog(axes, f"image side (pixels), {args.net}, N=1, forward",
                 ["peak memory (GiB)", "time (s)"])
    fig.suptitle(f"lpips_fast vs official: memory by resolution ({args.device})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
