#!/usr/bin/env python3
"""Temporal LPIPS of a video: lpips_fast.tlp (each frame through the backbone once, its
features serving LPIPS(ref_t, dist_t) and both temporal terms) against the direct formula
(three forward calls: LPIPS(ref_t, dist_t), LPIPS(ref_{t-1}, ref_t), LPIPS(dist_{t-1},
dist_t), batched the same way), with lpips_fast's model and with the official package's.

Each round runs every variant once in a shuffled order (benchmarks/common.interleaved_times);
medians over the rounds. The table also counts the images that entered the backbone.

    python benchmarks/bench_tlp.py                          # CPU: alex, 32 frames of 128x128
    python benchmarks/bench_tlp.py --out benchmarks/results/tlp-cpu.md
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lpips_fast  # noqa: E402
from common import environment, environment_line, interleaved_times, publish, spread  # noqa: E402,E501


def video(t, size, device):
    """A pattern moving 2 pixels a frame and a noisy copy, in [-1, 1]."""
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(3, size, size + 2 * t, generator=gen) * 2 - 1
    ref = torch.stack([base[:, :, 2 * k:2 * k + size] for k in range(t)])
    dist = (ref + 0.2 * torch.randn(ref.shape, generator=gen)).clamp(-1, 1)
    return ref.to(device), dist.to(device)


def direct(model, ref, dist, batch):
    """The formula with one forward call per LPIPS value, `batch` frame pairs per call."""
    def run():
        with torch.inference_mode():
            t = ref.shape[0]
            for lo in range(0, t, batch):
                hi = min(lo + batch, t)
                model(ref[lo:hi], dist[lo:hi])
                a = max(lo, 1)
                if a < hi:  # the pairs (t-1, t) of frames a..hi-1
                    model(ref[a - 1:hi - 1], ref[a:hi])
                    model(dist[a - 1:hi - 1], dist[a:hi])
    return run


def counted(model, fn):
    """Images that enter model's backbone during fn() (a hook on its first layer)."""
    seen = [0]
    first = model.net.slice1 if hasattr(model.net, "slice1") else model.net
    handle = first.register_forward_pre_hook(lambda m, a: seen.__setitem__(0, seen[0]
                                                                           + a[0].shape[0]))
    try:
        fn()
    finally:
        handle.remove()
    return seen[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--net", default="alex", choices=["alex", "vgg", "squeeze"])
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch CPU threads (default torch's); 1 is "
                   "steadier on a shared machine, where every parallel region waits for "
                   "descheduled threads")
    p.add_argument("--no-official", action="store_true", help="skip the official package")
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ref, dist = video(args.frames, args.size, device)
    ours = lpips_fast.LPIPS(net=args.net, verbose=False).to(device)
    fns = {"lpips_fast.tlp (features once)":
           lambda: lpips_fast.tlp(ref, dist, model=ours, batch_size=args.batch),
           "lpips_fast, 3 forwards": direct(ours, ref, dist, args.batch)}
    models = {n: ours for n in fns}
    if not args.no_official:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                        "tests"))
        from helpers import official_like
        theirs = official_like(ours, net=args.net).to(device)
        fns["official lpips, 3 forwards"] = direct(theirs, ref, dist, args.batch)
        models["official lpips, 3 forwards"] = theirs
    images = {n: counted(models[n], fn) for n, fn in fns.items()}
    times = interleaved_times(fns, device, warmup=1, rounds=args.rounds, min_time=0,
                              max_rounds=args.rounds)
    med = {n: statistics.median(s) for n, s in times.items()}
    base = med["lpips_fast.tlp (features once)"]
    lines = [f"# Temporal LPIPS: features once vs three forwards ({device.type})", "",
             environment_line(environment(device)), "",
             f"{args.net}, {args.frames} frames of {args.size}x{args.size} (T - 1 = "
             f"{args.frames - 1} temporal pairs), {args.batch} frames per call; "
             f"{args.rounds} interleaved rounds after 1 warm-up each, medians.", "",
             "| variant | backbone images | ms (median) | min - max ms | frames/s | time vs "
             "tlp |", "|---|---:|---:|---:|---:|---:|"]
    for name, s in med.items():
        ms = spread(times[name])
        lines.append(f"| {name} | {images[name]} | {ms['ms']:.1f} | {ms['min_ms']:.0f} - "
                     f"{ms['max_ms']:.0f} | {args.frames / s:.1f} | {s / base:.2f}x |")
    publish(lines, args.out)

if __name__ == "__main__":
    main()
