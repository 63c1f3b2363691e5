"""The run record: the summary JSON (`summary`, `write_json`; `SummaryFile`, locked while a run
writes it) written when a CSV is started and when it ends, and the check that a resumed CSV was
started with this run's options."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import os

from ..atomic import write_atomically
from ..errors import UsageError
from .outputs import NAME_ERRORS, CsvOutput, hold_lock
from .protocol import Settings

# The keys of a job's options that are its inputs (resolved paths), not command line flags.
INPUT_KEYS = ("dir0", "dir1", "dir", "ref", "dist")


def summary(values: list[float]) -> dict:
    """count, mean, std (population, ddof=0), min, max of the rows' values."""
    if not values:
        return {"count": 0, "mean": None, "std": None, "min": None, "max": None}
    a = np.asarray(values, dtype=np.float64)
    return {"count": int(a.size), "mean": float(a.mean()), "std": float(a.std()),
            "min": float(a.min()), "max": float(a.max())}


def write_json(path: Path, data: dict, lock: bool = False) -> int | None:
    """Written whole or not at all (`atomic.write_atomically`; lock: see there). A device or a
    pipe (--summary /dev/null) is written to: a rename would replace it (as root, /dev/null
    itself) with a regular file."""
    text = (json.dumps(data, indent=2) + "\n").encode("utf-8", NAME_ERRORS)
    path = Path(path)
    if path.exists() and not path.is_file():
        with open(path, "wb") as f:
            f.write(text)
        return None
    return write_atomically(path, text, lock=lock)


class SummaryFile:
    """A run's summary file, under an exclusive lock from `lock()` to `close()`, as its CSV:
    two runs given one --summary (with different -o) replaced each other's record, and a
    --resume then checked the options of the wrong run. The file is replaced whole by each
    `write` (a rename), so the lock moves with it: the new file is locked before it takes the
    name and the old one is released after, and a second run finds the name locked at every
    moment."""

    def __init__(self, path: Path | None):
        self.path, self._fd = path, None

    def lock(self, create: bool = False) -> None:
        """An existing file at the plan (before it is read; a second run is refused there,
        before anything is written), a new one (create=True, empty) before its first write."""
        if self.path is not None and self._fd is None:
            self._fd = hold_lock(self.path, create, "--summary")

    def write(self, data: dict) -> None:
        if self.path is None:
            return
        self.lock(create=True)
        held = write_json(self.path, data, lock=self._fd is not None)
        self._release()
        self._fd = held

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    close = _release


def check_first_run(command: str, s: Settings, job_options: dict, csv_out: CsvOutput,
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
