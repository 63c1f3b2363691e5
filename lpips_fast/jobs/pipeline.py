"""The pipeline: `run(job, settings)` takes the same steps for every job kind (see the package's
docstring): plan on rank 0, build the model on every rank, write the CSV and the summary."""
from __future__ import annotations

import os
import sys
import time
from typing import Callable

from tqdm import tqdm

from ..distributed import Context, ShardError, teardown
from ..errors import UsageError
from ..io import alpha_note, note_once
from ..model import LPIPS
from .maps import MapScorer, check_maps
from .outputs import CsvOutput, check_outputs, format_value, refuse_foreign_files
from .protocol import Job, Outcome, Settings
from .ranks import agree, context, same_command, share, sharded
from .records import SummaryFile, check_first_run, summary

# Hidden, for tests: a one-process run stops as if interrupted once this many rows are written.
STOP_AFTER_ENV = "LPIPS_FAST_STOP_AFTER"


def make_model(s: Settings, device, spatial: bool = False):
    return LPIPS(net=s.net, version=s.version, verbose=False, impl=s.impl,
                 spatial=spatial, precision=s.precision, tile_size=s.tile_size,
                 memory_budget=s.memory_budget, model_path=s.model_path).to(device)


def stderr_note(message: str) -> None:
    print(message, file=sys.stderr)


class _Stop(Exception):
    """Raised in rank 0's writer to stop every rank (the reason is kept by the caller)."""


def run(job: Job, s: Settings,
        note: Callable[[str], None] = stderr_note) -> Outcome | None:
    """Run `job` with settings `s`: see the package's docstring. Returns the Outcome on rank 0
    (None on the other ranks). Raises UsageError for a mistake found before anything is written
    (then nothing is), KeyboardInterrupt is turned into status 'interrupted'."""
    ctx = context(s.device)  # a bad --device fails before any file is written
    try:
        return _run(job, s, ctx, note)
    finally:
        teardown(ctx)


def _plan(job: Job, s: Settings, note) -> tuple:
    """Rank 0: list, check the outputs, read a resumed CSV, plan (nothing written yet)."""
    listing = job.listing(s, note)
    summary_path = s.summary_path()
    check_outputs({"-o": s.output, "--summary": summary_path}, listing.inputs)
    refuse_foreign_files([("-o", None if s.resume else s.output, "csv"),
                          ("--summary", summary_path, "summary")])
    out = CsvOutput(s.output, job.header, job.key_columns, getattr(job, "check_row", None),
                    stream=s.stdout, columns=getattr(job, "summary_columns", None))
    if s.resume and s.output is None:
        raise UsageError("--resume needs an output file (-o FILE)")
    record = SummaryFile(summary_path)
    try:  # existing files: locked before they are read (released by close, also below)
        out.lock()
        record.lock()
        return _plan_rest(job, s, note, listing, record, out)
    except BaseException:
        out.close()
        record.close()
        raise


def _plan_rest(job: Job, s: Settings, note, listing, record, out) -> tuple:
    if s.resume:
        out.read()
        check_first_run(job.command, s, listing.options, out, record.path)
        # a row that is none of this run's items would be counted in its summary
        expected = set(listing.keys)
        foreign = sorted(out.row_of[k] for k in out.done if k not in expected)
        if foreign:
            raise UsageError(f"{s.output}: cannot resume: row {foreign[0]} is not a {job.unit} "
                             f"of this run ({len(foreign)} such rows: files gone from the "
                             "input, or another run's rows); the file is unchanged")
    done = out.done
    todo = sum(1 for k in listing.keys if k not in done)
    failures, work, chunks = job.plan(listing, done, s)
    maps = check_maps(job, [k for k in listing.keys if k not in done], s)
    if s.resume and done:
        note(f"resuming: {len(done)} of {len(listing.keys)} {job.unit}s already in {s.output}, "
             f"{todo} to go")
    return listing, record, out, todo, failures, (work, chunks, maps)


def _run(job: Job, s: Settings, ctx: Context, note) -> Outcome | None:
    main: dict = {}
    same_command(ctx, job, s)  # before anything is planned or written

    def prepare():
        listing, record, out, todo, failures, shared = _plan(job, s, note)
        main.update(listing=listing, record=record, out=out, todo=todo, failures=failures)
        return shared

    work, chunks, maps = share(ctx, prepare)
    out: CsvOutput | None = main.get("out")
    record: SummaryFile | None = main.get("record")
    failures: list = main.get("failures", [])
    info = None
    built: list = []  # this rank's scorer, kept even when another rank's failure is raised
    try:  # out holds the output's lock from here: released on any failure
        model = agree(ctx, lambda: make_model(s, ctx.device)) if chunks else None
        if chunks:
            # Built before anything is written, and agreed: a rank that could not open its
            # inputs (a video not visible on its machine) exited in silence, and rank 0 said
            # only that a rank died without reporting.
            mine = chunks[ctx.rank::ctx.world_size]  # run_sharded's share of this rank
            agree(ctx, lambda: built.append(_scorer(job, work, model, s, ctx, mine, maps)))
        if ctx.is_main:
            listing = main["listing"]
            info = {"command": job.command, **listing.info,
                    "options": {**s.options(), **listing.options},
                    "output": None if s.output is None else str(s.output)}
            out.open()
            record.write({**info, "complete": False})
    except BaseException:
        for scorer in built:
            scorer.close()
        if out is not None:
            out.close()
            record.close()
        raise
    status, message, t0 = "complete", None, time.perf_counter()
    state: dict = {}
    try:
        if chunks:
            scorer = built[0]
            write = _writer(job, s, ctx, main, out, failures, state) if ctx.is_main else None
            try:
                sharded(ctx, chunks, lambda c: _guarded(scorer.compute, c), write)
            finally:
                scorer.close()
                if "bar" in main:
                    main["bar"].close()
    except KeyboardInterrupt:
        status = "interrupted"
    except ShardError as e:
        if not ctx.is_main:
            raise
        raised = state.get("raised")
        if raised is not None and not _write_refused(raised):
            raise raised from None  # rank 0's own writing failed (e.g. a broken pipe)
        if raised is not None:  # a full disk: the rows written are kept, as after a failure
            status, message = "failed", f"writing {s.output or 'stdout'} failed: " \
                                        f"{raised.strerror or raised}"
        elif "stop" in state:
            status, message = "stopped", state["stop"]
        else:
            status, message = "failed", _rank_failure(e, ctx, job, work)
    finally:
        if out is not None:
            out.close()
    if not ctx.is_main:
        return None
    stats = summary(out.values)
    stats.update({name: summary(v) for name, v in out.column_values.items()})
    unit = job.unit
    info.update(stats, scored_now=out.written, resumed=len(out.done),
                failed=[{unit: list(k), "error": e} for k, e in failures],
                seconds=round(time.perf_counter() - t0, 3), complete=status == "complete")
    if ctx.distributed:
        info["ranks"] = ctx.world_size
    try:
        record.write(info)
    except OSError as e:  # a full disk again: the CSV is kept, the summary is its old self
        status = "failed" if status == "complete" else status
        message = "; ".join(filter(None, [message, f"writing the summary {record.path} "
                                                   f"failed: {e.strerror or e}"]))
    finally:
        record.close()
    return Outcome(status, out.written, len(out.done), len(main["listing"].keys), failures, info,
                   message, record.path, ctx.world_size)


def _write_refused(e: BaseException) -> bool:
    """A write the file system refused (no space, a quota, a size limit, an I/O error), not a
    reader gone away (a broken pipe: exit 141, said by the command line)."""
    return isinstance(e, OSError) and not isinstance(e, BrokenPipeError)


def _scorer(job, work, model, s, ctx, mine, maps):
    scorer = job.scorer(work, model, s, ctx, mine)
    if not maps:
        return scorer
    return MapScorer(scorer, job, make_model(s, ctx.device, spatial=True), s, ctx.device, maps)


def _guarded(compute, c):
    """A UsageError while scoring (a video frame that changes size) stops the run in order:
    rank 0 writes the chunks before it, then stops every rank."""
    try:
        return "ok", compute(c)
    except UsageError as e:
        return "stop", str(e)


def _writer(job: Job, s: Settings, ctx: Context, main: dict, out: CsvOutput, failures: list,
            state):
    """Rank 0's write(c, result): new rows to the CSV (flushed), failures kept, the bar."""
    stop_after = int(os.environ.get(STOP_AFTER_ENV, "0") or 0) if not ctx.distributed else 0
    main["bar"] = bar = tqdm(total=main["todo"], unit=job.unit, file=sys.stderr,
                             dynamic_ncols=True, smoothing=0.05,
                             disable=None if s.progress is None else not s.progress)
    bar.update(len(failures))
    done = out.done

    def write(c, res):
        try:
            status, got = res
            if status == "stop":
                state["stop"] = got
                raise _Stop(got)
            results, alphas = got
            for path in alphas[:1]:
                note_once("alpha", alpha_note(path))
            new = [(cells, v, e) for cells, v, e in results
                   if tuple(cells[:job.key_columns]) not in done]
            out.write([[*cells, format_value(v)] for cells, v, e in new if e is None])
            bad = [(tuple(cells[:job.key_columns]), e) for cells, v, e in new if e is not None]
            failures.extend(bad)
            bar.update(len(new))
            if bad:
                bar.set_postfix(failed=len(failures), refresh=False)
        except _Stop:
            raise
        except BaseException as e:  # kept, and raised as itself once every rank has stopped
            state["raised"] = e
            raise
        if stop_after and out.written >= stop_after:
            raise KeyboardInterrupt
    return write


def _rank_failure(e: ShardError, ctx: Context, job: Job, work) -> str:
    """One line for a failed chunk: on what, its error, and which rank when there are several."""
    if e.rank is None or e.chunk is None:
        return str(e).splitlines()[0]
    keys = job.chunk_keys(work, e.items[0])
    first, last = keys[0], keys[-1]
    what = (f"{job.unit} {_key_text(first)}" if first == last
            else f"{job.unit}s {_key_text(first)} .. {_key_text(last)}")
    writing = str(e).startswith("rank 0 failed writing")
    if not ctx.distributed:
        return f"{'writing' if writing else 'scoring'} {what} failed: {e.error}"
    verb = "failed writing" if writing else "failed on"
    return f"rank {e.rank} of {ctx.world_size} {verb} {what}: {e.error}"


def _key_text(key: tuple) -> str:
    return f"({', '.join(key)})" if len(key) > 1 else key[0]
