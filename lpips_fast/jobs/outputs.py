"""Output files: the checks made before anything is written (`check_outputs`, and
`refuse_foreign_files`, the one rule for replacing an existing file, for every command), the
lock a run holds on what it writes (`hold_lock`), and a job's CSV (`CsvOutput`: read a file to
resume, create or continue it under an exclusive lock, append rows)."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from pathlib import Path

from ..errors import UsageError
from ..heatmap import map_format, marked

# Text files are written and read with this error handler, so that a file name that is not
# valid UTF-8 (possible on Linux) goes out as its own bytes and comes back as the same path.
NAME_ERRORS = "surrogateescape"


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
HEADERS = ("name,lpips\n", "name0,name1,lpips\n", "a,b,lpips\n", "frame,time,lpips\n",
           "frame,time,tlp,lpips\n")


def _csv_problem(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.readline(100).decode("utf-8", "replace")
    return None if head in HEADERS else \
        f"is not an lpips-fast CSV (its first line is {head.rstrip()[:60]!r})"


def _summary_problem(path: Path) -> str | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8", errors=NAME_ERRORS))
        if isinstance(record, dict) and {"command", "options"} <= record.keys():
            return None
    except (OSError, ValueError):
        pass
    return "is not an lpips-fast summary"


def _image_problem(path: Path) -> str | None:
    if marked(path):
        return None
    if map_format(path) != "PNG":
        return (f"may not have been written by lpips-fast (a {path.suffix} file carries no "
                "lpips-fast mark; only its PNGs do)")
    return "is not a PNG that lpips-fast wrote (it has no lpips-fast mark)"


# How each kind of output recognizes a file lpips-fast wrote: None if it did, else why not.
_PROBLEM = {"csv": _csv_problem, "summary": _summary_problem, "image": _image_problem}


def refuse_foreign_files(outputs) -> None:
    """The one rule for every output of every command: an existing, non-empty regular file is
    replaced only when lpips-fast recognizably wrote it, as that kind of output (`outputs`:
    (label, path or None, kind) with kind csv, summary or image). So a re-run replaces its
    own earlier files (a CSV with a job's header; a summary JSON with "command" and
    "options"; a PNG heat map or demo image, which carries the text chunk Software=lpips-fast),
    and a user's file in the way (notes, a config, a photo, a typo for another name; a .npy or
    .jpg map, formats that carry no mark) is refused with one line, before anything is written.
    An empty file holds nothing to lose; a device or a pipe (/dev/null) is written to, not
    replaced. (A resumed CSV is checked by CsvOutput.read instead: pass None for it.)"""
    for label, path, kind in outputs:
        if path is None:
            continue
        p = Path(path)
        if not p.is_file() or p.stat().st_size == 0:
            continue
        problem = _PROBLEM[kind](p)
        if problem:
            raise UsageError(f"{p}: exists and {problem}; refusing to overwrite it: remove it "
                             f"or choose another {label}")


def hold_lock(path: Path, create: bool, label: str) -> int | None:
    """An open fd holding an exclusive flock on `path` (closing it releases it), so that a
    second run writing the same file at once (two --resume runs appended the same rows twice,
    two new runs mixed their bytes or replaced each other's summary) stops with one line
    instead. None where nothing is locked: no such file (unless `create`: then it is created
    empty), not a regular file (/dev/null, a pipe), no flock (Windows) or a file system
    without locks."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the file is not protected
        return None
    if path.exists() and not path.is_file():
        return None
    if not create and not path.exists():
        return None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT if create else os.O_RDONLY, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(f"{path}: another lpips-fast run is writing this file; wait for it "
                         f"to finish (then --resume) or choose another {label}") from None
    except OSError:  # a file system without locks: go on unprotected
        pass
    return fd


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
    or continues it, `write()` appends rows and flushes. `path=None` writes to `stream` (None:
    sys.stdout when the file is opened). The last column is the LPIPS value (`values`);
    `columns` names other numeric columns (name -> index) whose non-empty cells are kept in
    `column_values` for the summary, from resumed and new rows alike."""

    def __init__(self, path, header: list[str], key_columns: int, check_row=None, stream=None,
                 columns: dict | None = None):
        self.path = Path(path) if path is not None else None
        self.stream = stream
        self.header, self.nkey, self.check_row = header, key_columns, check_row
        self.done: set = set()
        self.row_of: dict = {}  # a resumed row's key -> its row number (1 = the header)
        self.values: list[float] = []
        self.columns = dict(columns or {})
        self.column_values: dict = {name: [] for name in self.columns}
        self.written = 0
        self.file = None
        self.existing, self._cut = False, None  # read() found a file to continue
        self._lock_fd = None
        self.broken = False  # a write failed (a full disk)

    def lock(self, create: bool = False) -> None:
        """Hold an exclusive lock on the file (`hold_lock`, released by `close`). An existing
        regular file is locked before it is read; a new one (create=True) when it is created."""
        if self.path is not None and self._lock_fd is None:
            self._lock_fd = hold_lock(self.path, create, "-o")

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
            self._keep(row)
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
            self.file = self.stream if self.stream is not None else sys.stdout
            if hasattr(self.file, "reconfigure"):
                self.file.reconfigure(errors=NAME_ERRORS)
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
        try:
            self.file.write(_csv_text(rows))
            self.file.flush()
        except OSError:  # a full disk: the rows that did not fit stay in the buffer
            self.broken = True
            raise
        for r in rows:
            self._keep(r)
        self.written += len(rows)

    def _keep(self, row) -> None:
        """A row's values for the summary, read from its text (resumed rows are only text)."""
        self.values.append(float(row[-1]))
        for name, i in self.columns.items():
            if row[i] != "":
                self.column_values[name].append(float(row[i]))

    def close(self) -> None:
        if self.file is not None and self.path is not None:
            try:
                self.file.close()
            except OSError:  # its flush failed again (the disk is still full): said already
                if not self.broken:
                    raise
        self.file = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
