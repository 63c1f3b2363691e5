"""Rank agreement under a torch.distributed launch: the run's `context`, `share` (rank 0 decides,
every rank gets it), `agree` (a failure on any rank stops all), `same_command` (every rank was
started with the same arguments) and `sharded` (the chunks scored across the ranks)."""
from __future__ import annotations

import dataclasses
import os

import torch.distributed as dist

from ..devices import resolve_device
from ..distributed import Context, launched, run_sharded, setup
from ..errors import NotJoined, Quiet, UsageError
from .protocol import Job, Settings

# Hidden, for tests: the rank with this number raises on its second chunk.
FAIL_RANK_ENV = "LPIPS_FAST_FAIL_RANK"


def context(device: str) -> Context:
    """The run's ranks: a launch's process group, else one process on `device`."""
    if not launched():
        return Context(device=resolve_device(device))
    try:
        if device not in ("auto", "cuda", "cpu"):
            raise UsageError(f"--device {device}: under a distributed launch each rank uses "
                             "cuda:LOCAL_RANK (--device auto or cuda) or the CPU (--device cpu)")
        if device == "cuda":
            resolve_device("cuda")
    except UsageError as e:
        raise NotJoined(f"rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}: "
                        f"{e}") from None
    return setup(device="cpu" if device == "cpu" else None)


def share(ctx: Context, fn):
    """Rank 0 runs fn() and every rank gets its value; if it raised, rank 0 raises it and the
    other ranks raise Quiet."""
    if not ctx.distributed:
        return fn()
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
        raise Quiet(box[0][1])
    return box[0][1]


def agree(ctx: Context, fn):
    """Every rank runs fn(); if it raised on any rank, every rank raises (rank 0: its own error,
    else a UsageError naming the first rank that failed)."""
    try:
        value, err = fn(), None
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
        value, err = None, e
    if ctx.distributed:
        seen = [None] * ctx.world_size
        dist.all_gather_object(seen, None if err is None else str(err), group=ctx.group)
        failed = [(r, m) for r, m in enumerate(seen) if m is not None]
        if failed and err is None:
            if not ctx.is_main:
                raise Quiet(failed[0][1])
            raise UsageError(f"rank {failed[0][0]} of {ctx.world_size}: {failed[0][1]}")
    if err is not None:
        raise err
    return value


def _command_options(job: Job, s: Settings) -> dict:
    """What every rank must share: the job and its inputs (as given), and the settings that
    change the values or the chunks (not -o, --resume, --workers, --device: rank 0's or
    per-rank)."""
    fields = {f.name: getattr(job, f.name) for f in dataclasses.fields(job)}
    return {"command": job.command,
            **{k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in fields.items()},
            **s.options(), "impl": s.impl, "batch-size": s.batch_size}


def same_command(ctx: Context, job: Job, s: Settings) -> None:
    """Refuse a launch whose ranks were started with other arguments (a typo on one machine):
    rank 0 plans the work, but each rank scores it with its own net, version, resize, videos,
    so the CSV mixed values of other options under rank 0's summary, silently."""
    if not ctx.distributed:
        return
    mine = _command_options(job, s)
    seen = [None] * ctx.world_size
    dist.all_gather_object(seen, mine, group=ctx.group)
    for r, theirs in enumerate(seen):
        keys = [k for k in {**seen[0], **theirs} if seen[0].get(k) != theirs.get(k)]
        if keys:
            k = keys[0]
            msg = (f"rank {r} of {ctx.world_size} was started with other arguments than rank 0 "
                   f"({k} {theirs.get(k)!r}, rank 0: {seen[0].get(k)!r}): every rank must run "
                   "the same command")
            raise UsageError(msg) if ctx.is_main else Quiet(msg)


def sharded(ctx: Context, chunks: list, compute, write) -> None:
    """compute(c) for each chunk index c on c's rank, write(c, result) on rank 0 in order."""
    fail_rank = os.environ.get(FAIL_RANK_ENV)
    calls = [0]

    def compute_fn(chunk):
        calls[0] += 1
        if fail_rank == str(ctx.rank) and calls[0] == 2:
            raise RuntimeError(f"injected failure ({FAIL_RANK_ENV}={fail_rank})")
        return compute(chunk[0])

    run_sharded(chunks, compute_fn, lambda c, chunk, res: write(chunk[0], res), chunk=1, ctx=ctx)
