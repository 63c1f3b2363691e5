#!/usr/bin/env python3
"""One training epoch of the lin layers on 2AFC data: lpips_fast.Trainer against the official
lpips.Trainer, side by side on the same batches from the same initial state.

Data: a synthetic folder in the BAPPS 2AFC layout (lpips_fast.bapps.write_synthetic_2afc,
judged by LPIPS with the released weights), read once by the BAPPS reader and kept in memory,
so an epoch is set_input + optimize_parameters over every batch (no image decoding). The
official Trainer is built with pnet_rand=True (its pretrained path downloads) and given our
backbone and initial weights. Variants:
- official / ours (dropout): upstream's training (dropout on the lin layers, train mode);
- official (eval, no dropout) / ours --no-dropout: without dropout, where ours trains through
  the fused head (forward and backward); "ours, reference head" is the same without the
  fused kernels (the head's share of the difference).
Each round runs every variant once in a shuffled order (benchmarks/common.interleaved_times);
medians over the rounds.

    python benchmarks/bench_train.py                       # CPU: alex, 64x64, 48 triplets
    python benchmarks/bench_train.py --out benchmarks/results/train-cpu.md
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lpips_fast  # noqa: E402
from lpips_fast.bapps import bapps_loader, write_synthetic_2afc  # noqa: E402
from common import environment, environment_line, interleaved_times, publish  # noqa: E402


NOTE = ("The official Trainer wraps the images in Variables with requires_grad=True, so its "
        "backward runs through the whole backbone down to the input pixels, a gradient nothing "
        "reads; ours stops at the lin layers (the backbone is frozen). On the CPU that is most "
        "of the difference; the head itself is a small share of an alex step at 64x64.")


def backbone_source(net):
    """(pnet_rand, words): the real backbone when its weights are here, else a random one."""
    try:
        lpips_fast.LPIPS(net=net, verbose=False)
        return False, "pretrained backbone"
    except lpips_fast.WeightsNotFound:
        return True, "random backbone (no weights here; timings do not depend on the values)"


def trainers(net, pnet_rand, device, lr=1e-4):
    """{variant: trainer}, all in our first trainer's initial state."""
    import lpips
    use_gpu = device.type == "cuda"
    made = {}
    for name, dropout, impl in (("ours (dropout)", True, "auto"),
                                ("ours --no-dropout (fused head)", False, "auto"),
                                ("ours --no-dropout, reference head", False, "reference")):
        torch.manual_seed(0)
        t = lpips_fast.Trainer()
        t.initialize(net=net, pnet_rand=pnet_rand, use_gpu=use_gpu, is_train=True, lr=lr,
                     dropout=dropout, impl=impl, verbose=False)
        made[name] = t
    first = made["ours (dropout)"]
    for name, dropout in (("official (dropout)", True), ("official (eval, no dropout)", False)):
        t = lpips.Trainer()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t.initialize(net=net, pnet_rand=True, use_gpu=use_gpu, is_train=True, lr=lr)
        t.net.load_state_dict(first.net.state_dict())
        t.rankLoss.net.load_state_dict(first.rankLoss.net.state_dict())
        if not dropout:
            t.net.eval()
        made[name] = t
    return made


def epoch_fn(trainer, batches):
    def run():
        for b in batches:
            trainer.set_input(b)
            trainer.optimize_parameters()
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--net", default="alex", choices=["alex", "vgg", "squeeze"])
    p.add_argument("--triplets", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    pnet_rand, source = backbone_source(args.net)
    with tempfile.TemporaryDirectory() as tmp:
        judge = lpips_fast.LPIPS(net=args.net, pnet_rand=pnet_rand, verbose=False)
        root = write_synthetic_2afc(os.path.join(tmp, "2afc"), args.triplets, judge,
                                    size=args.size)
        batches = [{k: v.to(device) for k, v in b.items() if torch.is_tensor(v)}
                   for b in bapps_loader(root, batch_size=args.batch_size, load_size=args.size)]
    made = trainers(args.net, pnet_rand, device)
    times = interleaved_times({n: epoch_fn(t, batches) for n, t in made.items()}, device,
                              warmup=1, rounds=args.rounds, min_time=0, max_rounds=args.rounds)
    med = {n: statistics.median(s) for n, s in times.items()}
    base = {"ours (dropout)": "official (dropout)",
            "ours --no-dropout (fused head)": "official (eval, no dropout)",
            "ours --no-dropout, reference head": "official (eval, no dropout)"}
    lines = [f"# One training epoch: lpips_fast.Trainer vs lpips.Trainer ({device.type})", "",
             environment_line(environment(device)), "",
             f"{args.net}, {source}, {args.triplets} triplets of {args.size}x{args.size}, batch "
             f"{args.batch_size} ({len(batches)} steps per epoch), images in memory; "
             f"{args.rounds} interleaved rounds after 1 warm-up epoch each, medians.", "",
             "| variant | epoch ms (median) | min - max ms | triplets/s | vs the official "
             "counterpart |", "|---|---:|---:|---:|---:|"]
    for name, s in med.items():
        vs = f"{med[base[name]] / s:.2f}x" if name in base else "-"
        lo, hi = min(times[name]) * 1e3, max(times[name]) * 1e3
        lines.append(f"| {name} | {s * 1e3:.1f} | {lo:.0f} - {hi:.0f} | "
                     f"{args.triplets / s:.1f} | {vs} |")
    publish(lines + ["", NOTE], args.out)


if __name__ == "__main__":
    main()
