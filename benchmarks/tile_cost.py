"""The time cost of tiling: one forward untiled, with tile_size and with memory_budget, timed
interleaved round by round in one process on the same inputs (memory is benchmarks/memory.py's
job: each of its cells runs in a process of its own).

Tiles overlap by the backbone's halo, so a tiled forward computes more pixels than an untiled
one; the table puts the measured time ratio beside that pixel ratio.

    python benchmarks/tile_cost.py --net alex --sizes 2048 4096 --rounds 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lpips_fast  # noqa: E402
from lpips_fast import tiling  # noqa: E402
from lpips_fast.bench.common import device_name, interleaved_times, spread  # noqa: E402


def configs(tile: int, budget: str) -> dict:
    return {"untiled": {}, f"tile_size={tile}": {"tile_size": tile},
            f'memory_budget="{budget}"': {"memory_budget": budget}}


def configure(model, opts: dict) -> None:
    """Set the model's tiling options to one configuration's (None where it has none)."""
    for key in ("tile_size", "memory_budget"):
        setattr(model, key, opts.get(key))


def grid(model, x0, x1, opts) -> tuple[int, float]:
    """The tile count and the pixel ratio tiled / untiled of one configuration."""
    configure(model, opts)
    tile = tiling.tile_for(model, x0, x1, lambda: False)
    if tile is None:
        return 1, 1.0
    rows, cols = (tiling.spans(n, tile, model.pnet_type) for n in x0.shape[2:])
    crop = sum(r.crop_hi - r.crop_lo for r in rows) * sum(c.crop_hi - c.crop_lo for c in cols)
    return len(rows) * len(cols), crop / (x0.shape[2] * x0.shape[3])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--net", default="alex")
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--budget", default="1GiB")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = lpips_fast.LPIPS(net=args.net, pnet_rand=True, verbose=False).eval().to(args.device)
    lines = [f"# Tiling's time cost, {args.net}, N=1 forward, {device_name(args.device)}, "
             f"{torch.get_num_threads()} threads", "",
             f"Interleaved over {args.rounds} rounds after 1 warm-up call each, one process, "
             "same inputs. Ratios are to untiled; 'pixels' is the backbone's pixels tiled / "
             "untiled (the halo's overlap).", "",
             "| size | configuration | tiles | median s (min-max) | time ratio | pixels |",
             "|---|---|---|---|---|---|"]
    for size in args.sizes:
        x0, x1 = (torch.rand(1, 3, size, size, device=args.device) * 2 - 1 for _ in range(2))
        fns, grids = {}, {}
        for name, opts in configs(args.tile, args.budget).items():
            def run(opts=opts):
                configure(model, opts)
                with torch.no_grad():
                    return model(x0, x1)
            fns[name] = run
        times = interleaved_times(fns, args.device, warmup=1, rounds=args.rounds, min_time=0,
                                  max_rounds=args.rounds)
        base = statistics.median(times["untiled"])
        for name, opts in configs(args.tile, args.budget).items():
            s = spread(times[name])
            tiles, px = grid(model, x0, x1, opts)
            lines.append(f"| {size} | {name} | {tiles} | {s['ms'] / 1e3:.2f} "
                         f"({s['min_ms'] / 1e3:.2f}-{s['max_ms'] / 1e3:.2f}) | "
                         f"{statistics.median(times[name]) / base:.2f}x | {px:.2f}x |")
        print("\n".join(lines[-3:]), flush=True)
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
