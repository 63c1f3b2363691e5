"""How far precision='bf16' / 'fp16' move LPIPS from fp32, on real pairs and random images.

Real ImageNet weights (alex, vgg) on the real image pairs (../shared/data/real_pairs or
$LPIPS_FAST_REAL_PAIRS) and on random images; the largest relative deviation per net and
precision. Writes benchmarks/results/precision-<device>.md.

    python benchmarks/precision.py --device cuda
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import lpips_fast  # noqa: E402
from lpips_fast.io import load_image  # noqa: E402

PAIRS = Path(os.environ.get("LPIPS_FAST_REAL_PAIRS", ROOT.parent / "shared/data/real_pairs"))


def real_pairs():
    ex = PAIRS / "lpips_examples"
    pairs = [(ex / "ex_ref.png", ex / f"ex_p{i}.png") for i in (0, 1)]
    pairs += [(p, PAIRS / "tid2013/dist" / p.name) for p in sorted((PAIRS / "tid2013/ref").glob("*"))]
    return [(a, b) for a, b in pairs if a.is_file() and b.is_file()]


def random_pairs(n=4, size=256):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, size, size, generator=gen) * 2 - 1
    # mildly and strongly distorted copies: small LPIPS values are where rounding shows most
    return [(x[i:i + 1], (x[i:i + 1] + s * torch.randn(1, 3, size, size, generator=gen))
             .clamp(-1, 1)) for i in range(n) for s in (0.02, 0.3)]


def deviations(net, device, pairs):
    """Per low precision: (largest relative deviation, fp32 value there, largest absolute)."""
    models = {p: lpips_fast.LPIPS(net=net, verbose=False, precision=p).to(device)
              for p in ("fp32", "bf16", "fp16")}
    worst = {"bf16": (0.0, None, 0.0), "fp16": (0.0, None, 0.0)}
    for x0, x1 in pairs:
        x0, x1 = x0.to(device), x1.to(device)
        with torch.no_grad():
            ref = models["fp32"](x0, x1).item()
            for p in ("bf16", "fp16"):
                err = abs(models[p](x0, x1).item() - ref)
                rel, at, absolute = worst[p]
                worst[p] = (err / ref, ref, absolute) if err / ref > rel else worst[p]
                worst[p] = worst[p][:2] + (max(worst[p][2], err),)
    return worst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--nets", nargs="+", default=["alex", "vgg"])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    real = [(load_image(a), load_image(b)) for a, b in real_pairs()]
    lines = [f"# precision='bf16'/'fp16' against fp32 on {name} (autocast backbone, fp32 head)",
             "", f"{len(real)} real pairs from {PAIRS}; 8 random 256x256 pairs. Largest relative "
             "deviation (at which fp32 value), and the largest absolute deviation.", "",
             "| net | images | bf16 | fp16 |", "|---|---|---|---|"]
    for net in args.nets:
        for label, pairs in (("real", real), ("random", random_pairs())):
            if not pairs:
                lines.append(f"| {net} | {label} | absent | absent |")
                continue
            w = deviations(net, device, pairs)
            lines.append(f"| {net} | {label} | " + " | ".join(
                f"{w[p][0]:.2e} (at {w[p][1]:.3f}); abs {w[p][2]:.1e}" for p in ("bf16", "fp16"))
                + " |")
            print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"precision-{name.lower().replace(' ', '-')}.md"
    path.write_text(table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
