"""All-pairs LPIPS: lpips_fast.pairwise against the official one-forward-per-pair approach.

The official repository's all-pairs script (lpips_1dir_allpairs.py) calls
`loss_fn.forward(img0, img1)` once per unordered pair i < j, N (N - 1) / 2 calls of batch 1.
Here the official `lpips` 0.1.4 module (the same weights as ours) does exactly that on images
already in memory (the script also reads both files for every pair: we leave that cost out,
which favours the official side). For large N the official side is timed on a random subset of
the pairs and extrapolated linearly to all pairs (each call is the same work); the table says
how many pairs were timed. Ours computes the full N x N matrix (N backbone passes + Gram
products), and the largest difference to the official values on the timed pairs is reported.

    python benchmarks/bench_allpairs.py --threads 1                      # CPU, N = 64 128 256
    python benchmarks/bench_allpairs.py --device cuda --official-pairs 2000
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lpips_fast  # noqa: E402
from lpips_fast.pairwise import pairwise  # noqa: E402


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def slug(name: str) -> str:
    words = re.sub(r"[^a-z0-9]+", " ", name.lower()).split()
    words = [w for w in words if w not in ("processor", "core", "cpu", "nvidia", "with")]
    return "-".join(words[:3]) or "device"


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def official_like(ours, net):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import lpips
        theirs = lpips.LPIPS(pnet_rand=True, verbose=False, net=net)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return theirs.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--net", default="alex")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--n", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--official-pairs", type=int, default=400,
                    help="time at most this many pairs on the official side, extrapolate")
    ap.add_argument("--official-rows", type=int, default=16,
                    help="rows timed for the batched official variant, extrapolated")
    ap.add_argument("--repeats", type=int, default=3, help="runs of ours (median)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for both sides (torch.set_num_threads); on a shared, "
                         "loaded machine 1 avoids spinning thread pools")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dev = args.device
    try:
        ours = lpips_fast.LPIPS(net=args.net, verbose=False).to(dev).eval()
        weights = "real ImageNet weights"
    except lpips_fast.WeightsNotFound:
        torch.manual_seed(0)
        ours = lpips_fast.LPIPS(net=args.net, verbose=False, pnet_rand=True).to(dev).eval()
        weights = "random backbone weights"
    head = "fused kernels" if ours._head.__module__.endswith("_ops") else "reference head"
    theirs = official_like(ours, args.net).to(dev)
    gen = torch.Generator().manual_seed(0)
    x_all = (torch.rand(max(args.n), 3, args.size, args.size, generator=gen) * 2 - 1).to(dev)

    # warm-up both sides
    pairwise(x_all[:8], model=ours)
    with torch.no_grad():
        theirs(x_all[:1], x_all[1:2])

    name = device_name(dev)
    threads = ""
    if not dev.startswith("cuda"):
        nt = torch.get_num_threads()
        threads = f", {nt} thread{'s' if nt != 1 else ''}"
        if hasattr(os, "getloadavg"):
            threads += f", load average {os.getloadavg()[0]:.1f} at start"
    rows = []
    for n in args.n:
        x = x_all[:n]
        times = []
        for _ in range(args.repeats):
            sync(dev)
            t0 = time.perf_counter()
            D = pairwise(x, model=ours)
            sync(dev)
            times.append(time.perf_counter() - t0)
        t_ours = sorted(times)[len(times) // 2]

        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        g = torch.Generator().manual_seed(n)
        pick = torch.randperm(len(pairs), generator=g)[:args.official_pairs].tolist()
        sub = [pairs[k] for k in sorted(pick)]
        err = 0.0
        with torch.no_grad():
            sync(dev)
            t0 = time.perf_counter()
            vals = [theirs(x[i:i + 1], x[j:j + 1]) for i, j in sub]
            sync(dev)
            t_sub = time.perf_counter() - t0
        for (i, j), v in zip(sub, vals):
            err = max(err, abs(float(v) - float(D[i, j])))
        t_official = t_sub * len(pairs) / len(sub)
        # The official module used as well as it can be: row i against all j > i in one batch.
        some = sorted(torch.randperm(n - 1, generator=g)[:args.official_rows].tolist())
        with torch.no_grad():
            sync(dev)
            t0 = time.perf_counter()
            for i in some:
                theirs(x[i:i + 1].expand(n - 1 - i, -1, -1, -1), x[i + 1:])
            sync(dev)
            t_rows = (time.perf_counter() - t0) * len(pairs) / sum(n - 1 - i for i in some)
        rows.append((n, len(pairs), len(sub), t_official, t_ours, t_official / t_ours, err,
                     len(some), t_rows))
        print(f"N={n}: official {t_official:.2f} s ({len(sub)} of {len(pairs)} pairs timed"
              f"{', extrapolated' if len(sub) < len(pairs) else ''}), ours {t_ours:.3f} s, "
              f"speed-up {t_official / t_ours:.1f}x, max |diff| {err:.2e}; official batched "
              f"by rows {rows[-1][-1]:.2f} s", flush=True)

    lines = [
        f"### All-pairs LPIPS, {args.net} {args.size}x{args.size}: lpips_fast.pairwise vs one "
        f"official forward per pair",
        "",
        f"Device: {name} ({dev}{threads}); torch {torch.__version__}; official lpips 0.1.4; "
        f"{weights}; our head: {head}; float32 (our Gram products in float64).",
        "",
        "| N | pairs i<j | official pairs timed | official s (one forward per pair) | "
        "lpips_fast.pairwise s | speed-up | max abs diff | official batched by rows s "
        "(rows timed) | speed-up vs batched |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, p, timed, t_off, t_ours, speed, err, nrows, t_rows in rows:
        star = "" if timed == p else " (extrapolated)"
        star_r = "" if nrows == n - 1 else ", extrapolated"
        lines.append(f"| {n} | {p} | {timed} | {t_off:.2f}{star} | {t_ours:.3f} | {speed:.1f}x "
                     f"| {err:.1e} | {t_rows:.2f} ({nrows}{star_r}) | {t_rows / t_ours:.1f}x |")
    lines += ["",
              "Official: `loss_fn(img_i, img_j)` for each unordered pair, batch 1, images already "
              "in memory (its script also reads both files per pair, left out here). Where fewer "
              "pairs were timed than exist, the time is the timed subset's scaled by "
              "pairs / timed. Ours: `lpips_fast.pairwise(x, model=...)`, the full N x N matrix, "
              f"median of {args.repeats} runs. max abs diff: over the timed pairs. "
              "Official batched by rows (not what its script does, shown for fairness): "
              "`loss_fn(img_i, x[i+1:])` per row, a random subset of rows timed and scaled by "
              "the number of pairs."]
    text = "\n".join(lines) + "\n"
    out = Path(args.out) if args.out else (Path(__file__).parent / "results" /
                                           f"allpairs-{slug(name)}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
