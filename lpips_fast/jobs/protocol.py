"""What every job kind and the pipeline share: `Settings` (how a job runs), `Listing` (what a
job found), `Outcome` (what a run returns), and the `Job` / `Scorer` protocols a job kind
implements (`kinds.py` has the three of the command line)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from ..checks import parse_bytes


@dataclass
class Settings:
    """How a job runs. `summary`: a path, "auto" (next to the CSV: out.csv -> out.summary.json)
    or None (none; then `resume` cannot check the first run's options and refuses)."""
    output: str | os.PathLike | None = None   # the CSV; None or "-": stdout
    summary: str | os.PathLike | None = "auto"
    resume: bool = False
    net: str = "alex"
    version: str = "0.1"
    precision: str = "fp32"
    impl: str = "auto"
    resize: str = "none"
    resample: str = "bicubic"
    device: str = "auto"
    batch_size: int | str = 32                # dirs also "auto" (folders.auto_pairs)
    workers: int | str = "auto"               # dirs: loader threads; allpairs: processes
    prefetch: int | str = "auto"              # dirs: batches decoded while one is scored
    decoder: str = "auto"                     # dirs: pillow, torchvision (JPEG on the device)
    progress: bool | None = False             # a tqdm bar on stderr; None: when it is a terminal
    tile_size: int | None = None              # the model's exact tiling (lpips_fast.tiling)
    memory_budget: int | str | None = None    # bytes or '1GiB'; the model's tile choice
    model_path: str | os.PathLike | None = None  # lin weights (LPIPS(model_path=...))
    spatial_map: str | os.PathLike | None = None  # a folder of heat maps, one per pair (maps.py)
    map_format: str = "png"                   # png (a heat map with its scale) or npy (values)
    map_max: float | None = None              # the top of every map's colour scale
    stdout: Any = None                        # where the CSV goes without output (None: sys.stdout)

    def options(self) -> dict:
        """The options that change the values: a resumed file must have been made with them."""
        # Tiling changes the values only by float rounding (the summation order), but a resumed
        # file keeps one order. A budget is compared in bytes ('1GiB' is '1024MiB'); files
        # whose summary predates these keys read them as None: untiled, as they were.
        # Lin weights: the file (resolved) and its content's digest, so that weights trained
        # again into the same file are not mixed in either; None without --model-path.
        path = None if self.model_path is None else os.path.realpath(self.model_path)
        return {"net": self.net, "version": self.version, "precision": self.precision,
                "resize": self.resize, "resample": self.resample,
                "tile-size": self.tile_size,
                # only an explicit torchvision decode is recorded (auto: the device's choice)
                "decoder": self.decoder if self.decoder == "torchvision" else None,
                "memory-budget": parse_bytes(self.memory_budget, "--memory-budget"),
                "model-path": path, "model-sha256": None if path is None else _digest(path)}

    def __post_init__(self):
        if self.output is not None and os.fspath(self.output) == "-":  # as on a command line
            self.output = None

    def summary_path(self) -> Path | None:
        """"auto": beside a CSV file; none beside stdout, a device or a pipe (-o /dev/null
        wrote /dev/null.summary.json)."""
        if self.summary is None or self.summary == "-":
            return None
        if self.summary != "auto":
            return Path(self.summary)
        out = None if self.output is None else Path(self.output)
        if out is None or (out.exists() and not out.is_file()):
            return None
        return out.with_name(out.stem + ".summary.json")


def _digest(path: str) -> str | None:
    """The file's SHA-256, or None where it cannot be read (its model then fails to build,
    with one line naming it)."""
    from ..weights import sha256
    try:
        return sha256(path)
    except OSError:
        return None


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


class Scorer(Protocol):
    """Scores the chunks given to one rank, in order; the pipeline closes it (also on failure)."""

    def compute(self, c: int) -> tuple[list, list]:
        """Chunk c's rows as (cells, value, error) (the cells without the value; error None
        or a message for an item that could not be scored), and the paths of images whose
        alpha channel was dropped."""

    def close(self) -> None: ...


class Job(Protocol):
    """A job kind: only what is its own. A kind is a dataclass (its fields are the options every
    rank must share) and may define `check_row(row) -> str | None`, a further check of a
    resumed CSV's rows, and `summary_columns` ({name: column index}: other numeric columns,
    summarized under that name like the last column, the value, is at the top level)."""
    command: str          # the command's name, recorded in the summary
    unit: str             # what a row scores: "pair", "frame"
    header: list[str]     # the CSV's columns
    key_columns: int      # the leading columns that identify a row

    def listing(self, s: Settings, note: Callable[[str], None]) -> Listing:
        """Rank 0: what the job reads and the keys of its rows (UsageError: an input it
        cannot use)."""

    def plan(self, listing: Listing, done: set, s: Settings) -> tuple[list, Any, list[int]]:
        """(failures known before scoring [(key, error)], the work every rank gets, the
        indices of the chunks still to score), cut from the whole listing."""

    def chunk_keys(self, work: Any, c: int) -> list[tuple]:
        """The keys of chunk c's rows, in order."""

    def scorer(self, work: Any, model, s: Settings, ctx, mine: list[int]) -> Scorer:
        """This rank's scorer of its chunks `mine` (built before anything is written)."""
