"""Batch jobs (`dirs`, `allpairs`, `video`): one pipeline from the listing to the summary.

`run(job, settings)` takes the same steps for every kind of job, in one process or on every rank
of a torch.distributed launch:

1. plan, on rank 0, before a byte is written: the job lists what it reads and the rows it will
   write; the output paths are checked (none is an input or another output, each has a folder);
   a resumed CSV is read and validated, and the options of its first run are compared;
2. every rank gets the plan and builds the model (a failure on any rank stops all);
3. rank 0 creates the CSV with its header (or, resuming, cuts a half-written last row) and
   marks the summary incomplete;
4. the chunks are scored across the ranks (`distributed.run_sharded`); rank 0 writes their rows
   in order, flushed chunk by chunk, skipping rows the resumed file already has;
5. rank 0 writes the summary and returns an `Outcome`, which the caller reports.

A job kind (`DirsJob`, `AllPairsJob`, `VideoJob`) says only what is its own: what it reads, its
CSV columns, how its work is cut into chunks and how a chunk is scored. Chunks are cut from the
whole listing, never from what remains, so a resumed run computes every value exactly as an
uninterrupted one and writes the same bytes.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .atomic import write_atomically
from .distributed import Context, ShardError, launched, run_sharded, setup, teardown
from .folders import (AllPairsScorer, Pair, UsageError, all_pairs, list_images, match_by_name,
                      pair_loader, plan_allpairs, plan_pairs, score_batch)
from .io import alpha_note, note_once

# Hidden, for tests: the rank with this number raises on its second chunk (FAIL_RANK_ENV), or a
# one-process run stops as if interrupted once this many rows are written (STOP_AFTER_ENV).
FAIL_RANK_ENV = "LPIPS_FAST_FAIL_RANK"
STOP_AFTER_ENV = "LPIPS_FAST_STOP_AFTER"
MAX_LISTED = 20
# The keys of a job's options that are its inputs (resolved paths), not command line flags.
INPUT_KEYS = ("dir0", "dir1", "dir", "ref", "dist")
# Text files are written and read with this error handler, so that a file name that is not
# valid UTF-8 (possible on Linux) goes out as its own bytes and comes back as the same path.
NAME_ERRORS = "surrogateescape"


@dataclass
class Settings:
    """How a job runs. `summary`: a path, "auto" (next to the CSV: out.csv -> out.summary.json)
    or None (none; then `resume` cannot check the first run's options and refuses)."""
    output: str | os.PathLike | None = None   # the CSV; None: stdout
    summary: str | os.PathLike | None = "auto"
    resume: bool = False
    net: str = "alex"
    version: str = "0.1"
    precision: str = "fp32"
    impl: str = "auto"
    resize: str = "none"
    resample: str = "bicubic"
    device: str = "auto"
    batch_size: int = 32
    workers: int = 0
    progress: bool | None = False             # a tqdm bar on stderr; None: when it is a terminal

    def options(self) -> dict:
        """The options that change the values: a resumed file must have been made with them."""
        return {"net": self.net, "version": self.version, "precision": self.precision,
                "resize": self.resize, "resample": self.resample}

    def summary_path(self) -> Path | None:
        if self.summary is None or self.summary == "-":
            return None
        if self.summary != "auto":
            return Path(self.summary)
        return None if self.output is None else Path(self.output).with_name(
            Path(self.output).stem + ".summary.json")


@dataclass
class Listing:
    """What a job found on rank 0: the keys of every row of a complete CSV, in order."""
    keys: list
    inputs: list          # the files the job reads (no output may be one of them)
    info: dict            # the job's own summary fields
    options: dict         # the job's own options a resumed file must share (e.g. match)
    state: Any = None     # the job's own, for its plan (rank 0 only)


@dataclass
class Outcome:
    """What rank 0 returns. status: complete | interrupted | failed (a rank or a write failed:
    `message`) | stopped (an input problem found mid-run, e.g. a frame that changes size)."""
    status: str
    written: int
    resumed: int
    total: int
    failures: list        # [(key, error)]: items that could not be scored
    info: dict            # the summary (also in the summary file)
    message: str | None = None
    summary_path: Path | None = None
    ranks: int = 1


def resolve_device(name) -> torch.device:
    """--device: auto (CUDA, else MPS, else CPU) or a device that exists here, else UsageError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"--device {name}: not a device ({e})") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "meta":
        raise UsageError(f"--device {name}: the meta device holds no values; use cpu or cuda")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        ok, count = mps is not None and mps.is_available(), 1
    else:
        module = getattr(torch, dev.type, None)
        ok = bool(module is not None and getattr(module, "is_available", lambda: False)())
        count = module.device_count() if ok else 0
    if not ok:
        raise UsageError(f"--device {name}: {dev.type.upper()} is not available here "
                         "(use --device cpu)")
    if dev.index is not None and dev.index >= count:
        raise UsageError(f"--device {name}: there {'is' if count == 1 else 'are'} only {count} "
                         f"{dev.type} device{'' if count == 1 else 's'} here "
                         f"({dev.type}:0{f' .. {dev.type}:{count - 1}' if count > 1 else ''})")
    return dev


def make_model(s: Settings, device, spatial: bool = False):
    import lpips_fast
    return lpips_fast.LPIPS(net=s.net, version=s.version, verbose=False, impl=s.impl,
                            spatial=spatial, precision=s.precision).to(device)


def listing_text(names: list, limit: int = MAX_LISTED) -> str:
    names = [str(n) for n in names]
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


def stderr_note(message: str) -> None:
    print(message, file=sys.stderr)


# --- output paths -----------------------------------------------------------------------------

def _identity(path: Path):
    """What makes two paths the same file: the inode where it exists, else the resolved path."""
    try:
        st = path.stat()
        return ("file", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.realpath(path))


def _probe_writable(p: Path, label: str) -> None:
    """Fail now, not after other files were written, where `p` cannot be written (a read-only
    folder or file); the probe leaves no file behind and changes no byte."""
    try:
        if p.exists():
            open(p, "r+b").close()
        else:
            open(p, "xb").close()
            p.unlink()
    except OSError as e:
        raise UsageError(f"{p}: cannot write {label} here ({e.strerror})") from None


def check_outputs(outputs: dict, inputs=()) -> None:
    """Refuse, before anything is written, an output (label -> path, None: unused) that is a
    folder, has no folder, is an input (also through a link) or is another output."""
    named = {label: Path(p) for label, p in outputs.items() if p is not None}
    seen: dict = {}
    for label, p in named.items():
        if p.is_dir():
            raise UsageError(f"{p}: is a directory (give {label} a file name)")
        parent = p.parent if str(p.parent) else Path(".")
        if not parent.is_dir():
            raise UsageError(f"{parent}: no such directory for {label} {p}")
        _probe_writable(p, label)
        key = _identity(p)
        if key in seen:
            raise UsageError(f"{label} {p} is the same file as {seen[key][0]} {seen[key][1]}; "
                             "give them different names")
        seen[key] = (label, p)
    existing = {k: v for k, v in seen.items() if k[0] == "file"}
    for q in inputs if existing else ():
        hit = existing.get(_identity(Path(q)))
        if hit:
            raise UsageError(f"{hit[0]} {hit[1]} is an input of this run ({q}); refusing to "
                             "overwrite it: choose another output name")


# The first line of every CSV a job writes: an existing -o that starts otherwise is not ours.
HEADERS = ("name,lpips\n", "name0,name1,lpips\n", "a,b,lpips\n", "frame,time,lpips\n")


def _refuse_foreign_files(output, summary_path: Path | None, resume: bool) -> None:
    """An existing, non-empty -o or --summary that lpips-fast did not write (a user's notes,
    a config file, a typo for another file) is refused, not overwritten: only the files of an
    earlier run are replaced. (With --resume, CsvOutput.read checks the CSV itself.)"""
    if output is not None and not resume and Path(output).is_file():
        with open(output, "rb") as f:
            head = f.readline(100).decode("utf-8", "replace")
        if head and head not in HEADERS:
            raise UsageError(f"{output}: exists and is not an lpips-fast CSV (its first line is "
                             f"{head.rstrip()[:60]!r}); refusing to overwrite it: remove it or "
                             "choose another -o")
    if summary_path is not None and summary_path.is_file() and summary_path.stat().st_size:
        try:
            record = json.loads(summary_path.read_text(encoding="utf-8", errors=NAME_ERRORS))
            ours = isinstance(record, dict) and {"command", "options"} <= record.keys()
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise UsageError(f"{summary_path}: exists and is not an lpips-fast summary; "
                             "refusing to overwrite it: remove it or choose another --summary "
                             "('-' for none)")


# --- the CSV ----------------------------------------------------------------------------------

def format_value(v: float) -> str:
    return f"{v:.8g}"


def _csv_text(rows: list) -> str:
    """Rows as CSV text, lines ending in \n. The csv module quotes a field with a comma, a quote
    or a \n, but not one with a lone \r, which every reader takes for a line end: such rows
    are written with every field quoted."""
    buf = io.StringIO(newline="")
    plain = csv.writer(buf, lineterminator="\n")
    quoted = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
    for row in rows:
        (quoted if any("\r" in str(cell) for cell in row) else plain).writerow(row)
    return buf.getvalue()


def _first_foreign_row(text: str, rows: list) -> int:
    """The number (1 = the header) of the first row whose text is not what this writer writes."""
    at = 0
    for i, row in enumerate(rows, start=1):
        mine = _csv_text([row])
        if not text.startswith(mine, at):
            return i
        at += len(mine)
    return len(rows)


class CsvOutput:
    """The job's CSV: `read()` validates a file to resume (nothing is changed), `open()` creates
    or continues it, `write()` appends rows and flushes. `path=None` writes to stdout."""

    def __init__(self, path, header: list[str], key_columns: int, check_row=None):
        self.path = Path(path) if path is not None else None
        self.header, self.nkey, self.check_row = header, key_columns, check_row
        self.done: set = set()
        self.row_of: dict = {}  # a resumed row's key -> its row number (1 = the header)
        self.values: list[float] = []
        self.written = 0
        self.file = None
        self.existing, self._cut = False, None  # read() found a file to continue
        self._lock_fd = None

    def lock(self, create: bool = False) -> None:
        """Hold an exclusive lock on the file (flock, released by `close`), so that a second
        run writing the same file at once (two --resume runs appended the same rows twice, two
        new runs mixed their bytes) stops with one line instead. An existing regular file is
        locked before it is read; a new one (create=True) when it is created."""
        if self.path is None or self._lock_fd is not None:
            return
        try:
            import fcntl
        except ImportError:  # Windows: no flock; the file is not protected
            return
        if self.path.exists() and not self.path.is_file():  # /dev/null, a pipe: not locked
            return
        if not create and not self.path.exists():
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT if create else os.O_RDONLY, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"{self.path}: another lpips-fast run is writing this file; wait "
                             "for it to finish (then --resume) or choose another -o") from None
        except OSError:  # a file system without locks: go on unprotected
            pass
        self._lock_fd = fd

    def read(self) -> None:
        """Read an existing file to resume: its header must be this command's, every complete
        row must parse as one of its rows and the text must be exactly what this writer writes
        for them (else UsageError, the file untouched). A half-written last row is noted, to be
        cut by `open`."""
        if self.path is None or not self.path.is_file() or self.path.stat().st_size == 0:
            return
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise UsageError(f"{self.path}: cannot read the file to resume ({e.strerror})") \
                from None
        text = data.decode("utf-8", NAME_ERRORS)
        where = f"{self.path}: cannot resume: "
        try:
            rows = list(csv.reader(io.StringIO(text, newline="")))
        except csv.Error as e:
            raise UsageError(f"{where}not a CSV ({e}); the file is unchanged") from None
        if not rows or rows[0] != self.header:
            got = ",".join(rows[0])[:80] if rows else "(empty)"
            raise UsageError(f"{where}its first line is {got!r}, this command writes "
                             f"{','.join(self.header)}; the file is unchanged")
        # A complete file is exactly what this writer writes for its rows; an interrupted one
        # may end in part of a row (a kill between two writes), which can end in a newline only
        # inside a quoted name.
        full = _csv_text(rows)
        complete = rows if full == text else rows[:-1]
        good = full if full == text else full[:len(full) - len(_csv_text(rows[-1:]))]
        rest = text[len(good):]
        if not text.startswith(good) or (rest.endswith("\n") and '"' not in rest):
            line = _first_foreign_row(text, rows)
            raise UsageError(f"{where}row {line} is not as lpips-fast writes its rows; the file "
                             "is unchanged")
        for i, row in enumerate(complete[1:], start=2):
            problem = self._row_problem(row)
            if problem:
                raise UsageError(f"{where}row {i}: {problem}; the file is unchanged")
            key = tuple(row[:self.nkey])
            if key in self.row_of:  # counted twice in the summary otherwise (a hand edit, or
                # two runs appending to one file)
                raise UsageError(f"{where}row {i} repeats row {self.row_of[key]} "
                                 f"({', '.join(key)}); the file is unchanged")
            self.row_of[key] = i
            self.done.add(key)
            self.values.append(float(row[-1]))
        self._cut = len(good.encode("utf-8", NAME_ERRORS)) if rest else None
        self.existing = True

    def _row_problem(self, row) -> str | None:
        if len(row) != len(self.header):
            return f"{len(row)} fields, not {len(self.header)}"
        try:
            v = float(row[-1])
        except ValueError:
            return f"{row[-1]!r} is not a number"
        if not math.isfinite(v) or v < 0:
            return f"{row[-1]!r} is not an LPIPS value"
        return self.check_row(row) if self.check_row else None

    def open(self) -> None:
        """Create the file with its header, or continue the file `read()` validated."""
        if self.path is None:
            self.file = sys.stdout
            if hasattr(sys.stdout, "reconfigure"):
                sys.stdout.reconfigure(errors=NAME_ERRORS)
        elif self.existing:
            self.lock()
            if self._cut is not None:  # a row cut short by the interruption: drop it
                os.truncate(self.path, self._cut)
            self.file = open(self.path, "a", newline="", encoding="utf-8", errors=NAME_ERRORS)
            if self._cut != 0:
                return
        else:
            self.lock(create=True)  # before the truncation: another run's rows stay
            self.file = open(self.path, "w", newline="", encoding="utf-8", errors=NAME_ERRORS)
        self.file.write(_csv_text([self.header]))
        self.file.flush()

    def write(self, rows: list[list]) -> None:
        self.file.write(_csv_text(rows))
        self.file.flush()
        self.values.extend(float(r[-1]) for r in rows)
        self.written += len(rows)

    def close(self) -> None:
        if self.file is not None and self.file is not sys.stdout:
            self.file.close()
        self.file = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def summary(values: list[float]) -> dict:
    """count, mean, std (population, ddof=0), min, max of the rows' values."""
    if not values:
        return {"count": 0, "mean": None, "std": None, "min": None, "max": None}
    a = np.asarray(values, dtype=np.float64)
    return {"count": int(a.size), "mean": float(a.mean()), "std": float(a.std()),
            "min": float(a.min()), "max": float(a.max())}


def write_json(path: Path, data: dict) -> None:
    """Written whole or not at all (`atomic.write_atomically`)."""
    text = json.dumps(data, indent=2) + "\n"
    write_atomically(path, text.encode("utf-8", NAME_ERRORS))


def _check_first_run(command: str, s: Settings, job_options: dict, csv_out: CsvOutput,
                     summary_path: Path | None) -> None:
    """A resumed file's rows must have been made with this run's options, which its summary
    (the run record, written when the file was started) holds."""
    if not csv_out.done:  # no rows yet: nothing to mix with
        return
    name = csv_out.path
    if summary_path is None or not summary_path.is_file():
        where = f"its summary {summary_path} is missing" if summary_path else "--summary - was given"
        raise UsageError(f"{name}: cannot resume: {where}, so the options of its first run "
                         "cannot be checked (pass --summary FILE to point at it, or start a "
                         "new file)")
    try:
        record = json.loads(summary_path.read_text(encoding="utf-8", errors=NAME_ERRORS))
        before = record["options"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{name}: cannot resume: its summary {summary_path} cannot be read "
                         f"({type(e).__name__}: {e})") from None
    if record.get("command") != command:
        raise UsageError(f"{name}: cannot resume: it was written by "
                         f"'{record.get('command')}', not '{command}'")
    now = {**s.options(), **job_options}
    # the inputs (resolved folders or videos) are options too: rows scored against another
    # folder of the same file names must not be taken for this run's
    diff = [f"{k if k in INPUT_KEYS else '--' + k} {before.get(k, '(not recorded)')} "
            f"(now {v})" for k, v in now.items() if before.get(k) != v]
    if diff:
        raise UsageError(f"{name} was started with {', '.join(diff)}; resume with the same "
                         "options or write a new file")


# --- ranks ------------------------------------------------------------------------------------

class Quiet(Exception):
    """On a rank other than 0: rank 0 reported an error (and printed it); exit quietly."""


class _Stop(Exception):
    """Raised in rank 0's writer to stop every rank (the reason is kept by the caller)."""


class NotJoined(UsageError):
    """A rank's error found before it joined the launch's process group: rank 0 cannot report
    it, so every rank prints its own (the other ranks printed nothing, and the rank that failed
    exited with status 2 in silence)."""


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
        import torch.distributed as dist
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


def _command_options(job, s: Settings) -> dict:
    """What every rank must share: the job and its inputs (as given), and the settings that
    change the values or the chunks (not -o, --resume, --workers, --device: rank 0's or
    per-rank)."""
    import dataclasses
    fields = {f.name: getattr(job, f.name) for f in dataclasses.fields(job)}
    return {"command": job.command,
            **{k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in fields.items()},
            **s.options(), "impl": s.impl, "batch-size": s.batch_size}


def _same_command(ctx: Context, job, s: Settings) -> None:
    """Refuse a launch whose ranks were started with other arguments (a typo on one machine):
    rank 0 plans the work, but each rank scores it with its own net, version, resize, videos,
    so the CSV mixed values of other options under rank 0's summary, silently."""
    if not ctx.distributed:
        return
    import torch.distributed as dist
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


def _sharded(ctx: Context, chunks: list, compute, write) -> None:
    """compute(c) for each chunk index c on c's rank, write(c, result) on rank 0 in order."""
    fail_rank = os.environ.get(FAIL_RANK_ENV)
    calls = [0]

    def compute_fn(chunk):
        calls[0] += 1
        if fail_rank == str(ctx.rank) and calls[0] == 2:
            raise RuntimeError(f"injected failure ({FAIL_RANK_ENV}={fail_rank})")
        return compute(chunk[0])

    run_sharded(chunks, compute_fn, lambda c, chunk, res: write(chunk[0], res), chunk=1, ctx=ctx)


# --- the pipeline -----------------------------------------------------------------------------

def run(job, s: Settings, note: Callable[[str], None] = stderr_note) -> Outcome | None:
    """Run `job` with settings `s`: see the module's docstring. Returns the Outcome on rank 0
    (None on the other ranks). Raises UsageError for a mistake found before anything is written
    (then nothing is), KeyboardInterrupt is turned into status 'interrupted'."""
    ctx = context(s.device)  # a bad --device fails before any file is written
    try:
        return _run(job, s, ctx, note)
    finally:
        teardown(ctx)


def _plan(job, s: Settings, note) -> tuple:
    """Rank 0: list, check the outputs, read a resumed CSV, plan (nothing written yet)."""
    listing = job.listing(s, note)
    summary_path = s.summary_path()
    check_outputs({"-o": s.output, "--summary": summary_path}, listing.inputs)
    _refuse_foreign_files(s.output, summary_path, s.resume)
    out = CsvOutput(s.output, job.header, job.key_columns, getattr(job, "check_row", None))
    if s.resume and s.output is None:
        raise UsageError("--resume needs an output file (-o FILE)")
    out.lock()  # an existing file: before it is read (released by out.close, also below)
    try:
        return _plan_rest(job, s, note, listing, summary_path, out)
    except BaseException:
        out.close()
        raise


def _plan_rest(job, s: Settings, note, listing, summary_path, out) -> tuple:
    if s.resume:
        out.read()
        _check_first_run(job.command, s, listing.options, out, summary_path)
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
    if s.resume and done:
        note(f"resuming: {len(done)} of {len(listing.keys)} {job.unit}s already in {s.output}, "
             f"{todo} to go")
    return listing, summary_path, out, todo, failures, (work, chunks)


def _run(job, s: Settings, ctx: Context, note) -> Outcome | None:
    main: dict = {}
    _same_command(ctx, job, s)  # before anything is planned or written

    def prepare():
        listing, summary_path, out, todo, failures, shared = _plan(job, s, note)
        main.update(listing=listing, summary_path=summary_path, out=out, todo=todo,
                    failures=failures)
        return shared

    work, chunks = share(ctx, prepare)
    out: CsvOutput | None = main.get("out")
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
            agree(ctx, lambda: built.append(job.scorer(work, model, s, ctx, mine)))
        if ctx.is_main:
            listing = main["listing"]
            info = {"command": job.command, **listing.info,
                    "options": {**s.options(), **listing.options},
                    "output": None if s.output is None else str(s.output)}
            out.open()
            if main["summary_path"]:
                write_json(main["summary_path"], {**info, "complete": False})
    except BaseException:
        for scorer in built:
            scorer.close()
        if out is not None:
            out.close()
        raise
    status, message, t0 = "complete", None, time.perf_counter()
    state: dict = {}
    try:
        if chunks:
            scorer = built[0]
            write = _writer(job, s, ctx, main, out, failures, state) if ctx.is_main else None
            try:
                _sharded(ctx, chunks, lambda c: _guarded(scorer.compute, c), write)
            finally:
                scorer.close()
                if "bar" in main:
                    main["bar"].close()
    except KeyboardInterrupt:
        status = "interrupted"
    except ShardError as e:
        if not ctx.is_main:
            raise
        if "raised" in state:
            raise state["raised"] from None  # rank 0's own writing failed (e.g. a broken pipe)
        if "stop" in state:
            status, message = "stopped", state["stop"]
        else:
            status, message = "failed", _rank_failure(e, ctx, job, work)
    finally:
        if out is not None:
            out.close()
    if not ctx.is_main:
        return None
    stats = summary(out.values)
    unit = job.unit
    info.update(stats, scored_now=out.written, resumed=len(out.done),
                failed=[{unit: list(k), "error": e} for k, e in failures],
                seconds=round(time.perf_counter() - t0, 3), complete=status == "complete")
    if ctx.distributed:
        info["ranks"] = ctx.world_size
    if main["summary_path"]:
        write_json(main["summary_path"], info)
    return Outcome(status, out.written, len(out.done), len(main["listing"].keys), failures, info,
                   message, main["summary_path"], ctx.world_size)


def _guarded(compute, c):
    """A UsageError while scoring (a video frame that changes size) stops the run in order:
    rank 0 writes the chunks before it, then stops every rank."""
    try:
        return "ok", compute(c)
    except UsageError as e:
        return "stop", str(e)


def _writer(job, s: Settings, ctx: Context, main: dict, out: CsvOutput, failures: list, state):
    """Rank 0's write(c, result): new rows to the CSV (flushed), failures kept, the bar."""
    from tqdm import tqdm
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


def _rank_failure(e: ShardError, ctx: Context, job, work) -> str:
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


# --- the job kinds ----------------------------------------------------------------------------

def _images_or_fail(root: Path, recursive: bool, note) -> tuple[list[str], list[str]]:
    names, ignored, skipped = list_images(root, recursive)
    if not names:
        hint = f" ({len(ignored)} non-image files ignored)" if ignored else ""
        hint += "" if recursive else "; pass --recursive to look in subfolders"
        raise UsageError(f"{root}: no images found{hint}")
    if ignored:
        note(f"note: {root}: ignored {len(ignored)} files that are not images by their suffix: "
             f"{listing_text(ignored, 5)}")
    if skipped:
        note(f"note: {root}: skipped {len(skipped)} linked folders (not followed, to avoid "
             f"loops and double counting): {listing_text(skipped, 5)}")
    return names, ignored + skipped


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


@dataclass
class DirsJob:
    """Files of two folders paired by relative name (match="name") or by name without suffix
    (match="stem"): rows name,lpips (name0,name1,lpips with match="stem")."""
    dir0: str | os.PathLike
    dir1: str | os.PathLike
    recursive: bool = False
    match: str = "name"
    command = "dirs"
    unit = "pair"

    def __post_init__(self):
        self.dir0, self.dir1 = Path(self.dir0), Path(self.dir1)
        self.header = ["name", "lpips"] if self.match == "name" else ["name0", "name1", "lpips"]
        self.key_columns = len(self.header) - 1

    def listing(self, s, note) -> Listing:
        d0, d1 = self.dir0, self.dir1
        names0, ign0 = _images_or_fail(d0, self.recursive, note)
        names1, ign1 = _images_or_fail(d1, self.recursive, note)
        matched, only0, only1, ambiguous = match_by_name(names0, names1, self.match)
        if ambiguous:
            note(f"note: {len(ambiguous)} names share a stem with another file in their folder "
                 f"and are not paired: {listing_text(ambiguous)}")
        for d, only in ((d0, only0), (d1, only1)):
            if only:
                note(f"note: {len(only)} names only in {d} (not scored): {listing_text(only)}")
        if not matched:
            raise UsageError(f"no file names in common between {d0} and {d1}"
                             + (" (try --match stem to ignore suffixes)"
                                if self.match == "name" else ""))
        pairs = [Pair((a,) if self.match == "name" else (a, b), d0 / a, d1 / b)
                 for a, b in matched]
        info = {"dir0": str(d0), "dir1": str(d1), "recursive": self.recursive,
                "match": self.match, "only_in_dir0": only0, "only_in_dir1": only1,
                "ambiguous": ambiguous, "ignored": {"dir0": ign0, "dir1": ign1}}
        return Listing([p.key for p in pairs], [d0 / n for n in names0] + [d1 / n for n in names1],
                       info, {"recursive": self.recursive, "match": self.match,
                              "dir0": os.path.realpath(d0), "dir1": os.path.realpath(d1)}, pairs)

    def plan(self, listing, done, s):
        bad, ordered, batches = plan_pairs(listing.state, s.net, s.batch_size, s.resize,
                                           _relative_namer(self.dir0, self.dir1))
        failures = [(r.pair.key, r.error) for r in bad if r.pair.key not in done]
        chunks = [c for c, b in enumerate(batches)
                  if any(ordered[i][0].key not in done for i in b)]
        return failures, (ordered, batches), chunks

    def chunk_keys(self, work, c):
        ordered, batches = work
        return [ordered[i][0].key for i in batches[c]]

    def scorer(self, work, model, s, ctx, mine):
        return _DirsScorer(work, model, s, ctx, mine)


class _DirsScorer:
    """Loads this rank's batches with a DataLoader (worker processes) and scores them."""

    def __init__(self, work, model, s, ctx, mine):
        self.ordered, self.batches = work
        self.model, self.device = model, ctx.device
        self.it = iter(pair_loader(self.ordered, [self.batches[c] for c in mine],
                                   device=ctx.device, workers=s.workers, resample=s.resample))

    def compute(self, c):
        loaded = next(self.it)
        values = score_batch(self.model, self.device, loaded)
        if [i for i, _, _ in values] != self.batches[c]:
            raise RuntimeError(f"chunk {c}: the loader gave other pairs")
        return [(list(self.ordered[i][0].key), v, e) for i, v, e in values], loaded[4]

    def close(self):
        self.it = None


@dataclass
class AllPairsJob:
    """Every unordered pair of the images of a folder, rows a,b,lpips (a before b by name),
    with the embedding engine: one backbone pass per image, a Gram product per layer and
    block of images (lpips_fast.pairwise), not one forward per pair."""
    dir: str | os.PathLike
    recursive: bool = False
    command = "allpairs"
    unit = "pair"
    header = ["a", "b", "lpips"]
    key_columns = 2

    def __post_init__(self):
        self.dir = Path(self.dir)

    def listing(self, s, note) -> Listing:
        d = self.dir
        names, ignored = _images_or_fail(d, self.recursive, note)
        if len(names) < 2:
            raise UsageError(f"{d}: allpairs needs at least 2 images, found {len(names)}")
        pairs = [Pair((a, b), d / a, d / b) for a, b in all_pairs(names)]
        info = {"dir": str(d), "recursive": self.recursive, "images": len(names),
                "ignored": ignored}
        return Listing([p.key for p in pairs], [d / n for n in names], info,
                       {"recursive": self.recursive, "dir": os.path.realpath(d)}, pairs)

    def plan(self, listing, done, s):
        pairs = listing.state
        bad, groups, items = plan_allpairs(pairs, done, s.net, s.batch_size, s.resize,
                                           _relative_namer(self.dir))
        keys = [[pairs[pos].key for pos, _, _ in item[2]] for item in items]
        return ([(r.pair.key, r.error) for r in bad], (groups, items, keys),
                list(range(len(items))))

    def chunk_keys(self, work, c):
        return work[2][c]

    def scorer(self, work, model, s, ctx, mine):
        return _AllPairsScorer(work, model, s)


class _AllPairsScorer:
    def __init__(self, work, model, s):
        groups, self.items, self.keys = work
        self.engine = AllPairsScorer(groups, model, block=s.batch_size, workers=s.workers,
                                     resample=s.resample)

    def compute(self, c):
        values, alphas = self.engine.compute(self.items[c])
        key = dict(zip((pos for pos, _, _ in self.items[c][2]), self.keys[c]))
        return [(list(key[pos]), v, e) for pos, v, e in values], alphas

    def close(self):
        self.engine.close()


@dataclass
class VideoJob:
    """Two videos scored frame by frame: rows frame,time,lpips (time in seconds of the
    reference frame)."""
    ref: str | os.PathLike
    dist: str | os.PathLike
    command = "video"
    unit = "frame"
    header = ["frame", "time", "lpips"]
    key_columns = 1

    def listing(self, s, note) -> Listing:
        from .video import VideoPairs
        video = VideoPairs(self.ref, self.dist, s.net, s.resize, s.resample)  # checks both
        video.close()  # every rank opens the videos again to decode its own chunks
        keys = [(str(i),) for i in range(video.count)]
        return Listing(keys, [Path(self.ref), Path(self.dist)],
                       {"ref": str(self.ref), "dist": str(self.dist)},
                       {"ref": os.path.realpath(self.ref), "dist": os.path.realpath(self.dist)})

    def plan(self, listing, done, s):
        n = len(listing.keys)
        bs = s.batch_size
        chunks = [c for c in range(math.ceil(n / bs))
                  if any((str(i),) not in done for i in range(c * bs, min(n, (c + 1) * bs)))]
        return [], (n, bs), chunks

    def chunk_keys(self, work, c):
        n, bs = work
        return [(str(i),) for i in range(c * bs, min(n, (c + 1) * bs))]

    @staticmethod
    def check_row(row):
        try:
            int(row[0]), float(row[1])
        except ValueError:
            return f"{row[0]!r}, {row[1]!r} is not a frame number and a time"
        return None

    def scorer(self, work, model, s, ctx, mine):
        return _VideoScorer(self, work, model, s, ctx)


class _VideoScorer:
    def __init__(self, job, work, model, s, ctx):
        from .video import VideoPairs
        (self.n, self.bs), self.model, self.ctx = work, model, ctx
        self.video = VideoPairs(job.ref, job.dist, s.net, s.resize, s.resample)

    def compute(self, c):
        times, x0, x1 = self.video.read(c * self.bs, (c + 1) * self.bs)
        with torch.inference_mode():
            d = self.model(x0.to(self.ctx.device), x1.to(self.ctx.device))
        vals = d.flatten().float().cpu().tolist()
        return [([str(c * self.bs + k), f"{times[k]:.6g}"], v, None)
                for k, v in enumerate(vals)], []

    def close(self):
        self.video.close()
