"""The `lpips-fast` command line (also `python -m lpips_fast`).

Exit codes: 0 everything scored; 1 some items of a folder or list failed (listed at the end, the
rest was scored); 2 a usage or input error (nothing, or not everything, could be attempted);
130 interrupted (rows written so far are kept; rerun with --resume); 141 the reader of the
output went away (`| head`).
"""
from __future__ import annotations

import contextlib
import json
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
from lpips_fast.cli_args import NETS, build_bench_all_parser, build_parser
from lpips_fast.heatmap import map_format, save_image, save_map
from lpips_fast.io import load_pair, resize, to_tensor
from lpips_fast.model import read_lins
from lpips_fast.tiling import tile_for_budget
from lpips_fast.video import _av

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
                             memory_budget=getattr(args, "memory_budget", None),
                             model_path=getattr(args, "model_path", None))
    return jobs.make_model(settings, device, spatial)


def _check_model_path(args) -> None:
    """A --model-path that is no lin weight file of --net is said in one line naming it,
    before any work (the model would only meet it once the inputs are listed and read)."""
    path = getattr(args, "model_path", None)
    if path is None:
        return
    try:
        read_lins(path, args.net)
    except ValueError as e:
        raise UsageError(f"--model-path {e}") from None
    except OSError as e:
        raise UsageError(f"--model-path {path}: {e.strerror or e}") from None


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


def _head_name(model, dev) -> str:
    """What scores on `dev`: the fused kernels, or the reference head (also where this build
    lacks the device's kernels: a CPU-only build on a GPU, see _ops.cuda_missing)."""
    from . import _ops
    if model._head.__module__.endswith("_ops") and _ops.has_kernels(torch.device(dev)):
        return "fused kernels"
    return "reference head"


# --- weights ----------------------------------------------------------------------------------

def cmd_weights(args) -> int:
    """Show where each net's backbone weights come from, importing them into the cache."""
    nets = [args.net] if args.net else NETS
    failed = 0
    from . import _ops
    _say(_ops.kernels_summary())
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
    _check_model_path(args)
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
              "precision": args.precision, "model_path": args.model_path,
              "size": [size[1], size[0]], "lpips": d}
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
    # video --tlp: a batch also runs the frame before it
    # --batch-size auto: its smallest batch, one pair (it takes no more pairs than the budget
    # holds, once the image sizes are known: folders.auto_pairs)
    pairs = 1 if args.batch_size == "auto" else args.batch_size
    _check_budget(args, 2 * (pairs + bool(getattr(args, "tlp", False))))
    _check_model_path(args)
    return jobs.Settings(
        output=args.output, summary="auto" if args.summary is None else args.summary,
        resume=getattr(args, "resume", False), net=args.net, version=args.version,
        precision=args.precision, impl=args.impl, resize=args.resize, resample=args.resample,
        device=args.device, batch_size=args.batch_size, workers=getattr(args, "workers", 0),
        prefetch=getattr(args, "prefetch", "auto"), decoder=getattr(args, "decoder", "auto"),
        progress=False if args.quiet else None, tile_size=args.tile_size,
        memory_budget=args.memory_budget, model_path=args.model_path,
        spatial_map=getattr(args, "spatial_map", None),
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
        lines.append(_stats_line("LPIPS", info))
    t = info.get("tlp")
    if t and t["count"]:  # as stored, with the x100 figure papers print
        lines.append(_stats_line("tLP", t, f" (x100: {100 * t['mean']:.4f})"))
    if o.summary_path:
        lines.append(f"summary -> {o.summary_path}")
    print("\n".join(lines), file=_OUT if args.output else sys.stderr)


def _stats_line(label: str, st: dict, after_mean: str = "") -> str:
    return (f"{label} mean {st['mean']:.6f}{after_mean}  std {st['std']:.6f}  "
            f"min {st['min']:.6f}  max {st['max']:.6f}  count {st['count']}")


def cmd_dirs(args) -> int:
    return _run_job(args, jobs.DirsJob(args.dir0, args.dir1, args.recursive, args.match))


def cmd_allpairs(args) -> int:
    return _run_job(args, jobs.AllPairsJob(args.dir, args.recursive))


def cmd_video(args) -> int:
    _av()  # a missing PyAV is said before any other work
    return _run_job(args, jobs.VideoJob(args.ref, args.dist, tlp=args.tlp))


# --- bench ------------------------------------------------------------------------------------

def cmd_bench(args) -> int:
    """The packaged benchmarks (lpips_fast.bench): `model`, `kernels`, `dirs`, or the first two
    (the default) with the options both take (--device, --quick, --out DIR)."""
    from lpips_fast import _ops
    from lpips_fast.bench import dirs, kernels, model
    rest = list(args.args)
    with contextlib.redirect_stdout(_OUT):  # the benchmarks' tables are this command's results
        if args.which == "model":
            model.main(rest)
        elif args.which == "dirs":
            dirs.main(rest)
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
    head = _head_name(model, dev)
    _say(f"LPIPS v{args.version}, net={args.net}, real ImageNet backbone, {head}, "
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
    _check_model_path(args)
    score, n = calibrate.eval_2afc(args.data, args.net, args.version, args.model_path,
                                   _device_name(args), args.batch_size, args.load_size,
                                   args.impl, progress=False if args.quiet else None)
    if args.json:
        _say(json.dumps({"data": str(args.data), "net": args.net, "version": args.version,
                        "model_path": args.model_path, "triplets": n, "2afc": score}))
    else:
        _say(f"2AFC score {score:.4f} on {n} triplets")
    return 0


COMMANDS = {"weights": cmd_weights, "pair": cmd_pair, "dirs": cmd_dirs, "allpairs": cmd_allpairs,
            "video": cmd_video, "bench": cmd_bench, "demo": cmd_demo, "train": cmd_train,
            "eval2afc": cmd_eval2afc}
_REAL_STDERR = sys.stderr


def main(argv=None) -> int:
    global _REAL_STDERR
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] and (argv[1:2] + ["-"])[0].startswith("-") and not {
            "-h", "--help"} & set(argv[1:]):
        argv.insert(1, "all")  # `lpips-fast bench --quick`: both benchmarks (the kind is optional)
    args = build_parser(COMMANDS, __doc__).parse_args(argv)
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
    real = sys.stdout
    with _fd1_to_stderr(real) as _OUT:
        sys.stdout = sys.stderr
        try:
            return _main(args)
        finally:
            sys.stdout = real


@contextlib.contextmanager
def _fd1_to_stderr(stdout):
    """Yield the handle results go to. When `stdout` is the process's file descriptor 1, fd 1
    itself points at stderr meanwhile and results go to a copy of the original: what a C
    library or a worker process writes to fd 1 (not through sys.stdout) is then a diagnostic
    too, never mixed into a CSV or JSON on stdout. Elsewhere (stdout replaced in-process, or
    closed) `stdout` is the handle, and only Python's prints are redirected."""
    try:
        direct = stdout is sys.__stdout__ and stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        direct = False
    if not direct:
        yield stdout
        return
    stdout.flush()
    saved = os.dup(1)
    os.dup2(sys.stderr.fileno(), 1)
    out = open(saved, "w", buffering=1 if stdout.line_buffering else -1,
               encoding=stdout.encoding, errors=stdout.errors)
    try:
        yield out
    finally:
        with contextlib.suppress(OSError):  # a closed pipe: nothing more can reach it
            out.flush()
        os.dup2(out.fileno(), 1)
        with contextlib.suppress(OSError):
            out.close()


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
