"""Scoring many image pairs: listing and pairing folders, loading, batching, resumable CSVs.

The pieces are separate so that each can change alone:

- `list_images`, `match_by_name`, `all_pairs` enumerate `Pair`s (pure, sorted, deterministic);
- `score_pairs` turns pairs into distances: header scan, size policy, batches of one size,
  a DataLoader with worker processes, the model;
- `CsvRows` writes rows as they come (flushed per batch) and resumes an existing file.
"""
from __future__ import annotations

import csv
import itertools
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from .io import (ImageError, check_min_size, image_size, mismatch_message, read_image, resize,
                 target_size)

# Files whose suffix is not one of these are not images for the folder modes (they are counted
# and reported as ignored, never opened).
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".tif", ".tiff",
                  ".webp", ".gif", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".jp2", ".j2k",
                  ".avif", ".heic", ".qoi", ".dds", ".ico", ".pcx", ".sgi", ".im"}


class UsageError(Exception):
    """A mistake in what the user asked for (exit code 2); str() is the one-line message."""


@dataclass(frozen=True)
class Pair:
    key: tuple          # what identifies the row (and a resumed row): ("name",) or ("a", "b")
    path0: Path
    path1: Path


@dataclass
class Result:
    pair: Pair
    value: float | None = None
    error: str | None = None


# --- enumeration ------------------------------------------------------------------------------

def list_images(root, recursive: bool = False) -> tuple[list[str], list[str]]:
    """Image files under `root` as sorted relative POSIX names, and the non-image names ignored.

    Hidden files and folders (a name starting with '.') are skipped.
    """
    root = Path(root)
    if not root.exists():
        raise UsageError(f"{root}: no such directory")
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory")
    names, ignored = [], []
    walker = os.walk(root) if recursive else [(str(root), [], os.listdir(root))]
    for dirpath, dirnames, filenames in walker:
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if f.startswith("."):
                continue
            full = Path(dirpath) / f
            if not recursive and full.is_dir():
                continue
            rel = full.relative_to(root).as_posix()
            (names if full.suffix.lower() in IMAGE_SUFFIXES else ignored).append(rel)
    return sorted(names), sorted(ignored)


def _stem_key(name: str) -> str:
    p = Path(name)
    return p.with_suffix("").as_posix()


def match_by_name(names0: list[str], names1: list[str], match: str = "name"):
    """Pair two sorted name lists by relative name ("name") or by name without suffix ("stem").

    Returns (pairs of names, names only in the first, names only in the second, ambiguous).
    """
    if match == "name":
        k0, k1 = {n: n for n in names0}, {n: n for n in names1}
        ambiguous = []
    else:
        ambiguous = []
        k0, k1 = {}, {}
        for names, keyed in ((names0, k0), (names1, k1)):
            seen: dict[str, list[str]] = {}
            for n in names:
                seen.setdefault(_stem_key(n), []).append(n)
            for k, ns in seen.items():
                if len(ns) > 1:
                    ambiguous.extend(ns)
                else:
                    keyed[k] = ns[0]
    common = sorted(set(k0) & set(k1))
    only0 = sorted(k0[k] for k in set(k0) - set(k1))
    only1 = sorted(k1[k] for k in set(k1) - set(k0))
    return [(k0[k], k1[k]) for k in common], only0, only1, sorted(ambiguous)


def all_pairs(names: list[str]) -> Iterator[tuple[str, str]]:
    """Every unordered pair of a sorted name list, (a, b) with a before b."""
    return itertools.combinations(names, 2)


# --- loading ----------------------------------------------------------------------------------

class PairDataset(torch.utils.data.Dataset):
    """Loads pair i as two 3 x H x W tensors in [-1, 1] at its scoring size.

    Never raises for a bad file: a failure comes back as a message, so one broken file does not
    stop the DataLoader.
    """

    def __init__(self, pairs: list[Pair], sizes: list[tuple[int, int]], resample: str):
        self.pairs, self.sizes, self.resample = pairs, sizes, resample

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        pair, size = self.pairs[i], self.sizes[i]
        try:
            (a0, alpha0), (a1, alpha1) = read_image(pair.path0), read_image(pair.path1)
        except ImageError as e:
            return i, None, None, str(e), None
        x0 = resize(torch.from_numpy(a0).permute(2, 0, 1), size, self.resample)
        x1 = resize(torch.from_numpy(a1).permute(2, 0, 1), size, self.resample)
        alpha = pair.path0 if alpha0 else pair.path1 if alpha1 else None
        return i, x0.contiguous(), x1.contiguous(), None, alpha


def _collate(items):
    good = [it for it in items if it[3] is None]
    x0 = torch.stack([it[1] for it in good]) if good else None
    x1 = torch.stack([it[2] for it in good]) if good else None
    return ([it[0] for it in good], x0, x1, [(it[0], it[3]) for it in items if it[3] is not None],
            [it[4] for it in items if it[4] is not None])


def _worker_init(_):
    torch.set_num_threads(1)  # workers decode; the model's threads stay with the main process


def default_workers() -> int:
    return min(8, max(1, (os.cpu_count() or 1) // 2))


def scan_sizes(paths: Iterable[Path], net: str) -> dict[Path, tuple[int, int] | str]:
    """Each file's (H, W) from its header, or the error message (missing, not an image,
    too small for `net`)."""
    def one(p):
        try:
            size = image_size(p)
            check_min_size(p, size, net)
            return size
        except ImageError as e:
            return str(e)
    paths = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(max_workers=min(16, 4 * (os.cpu_count() or 1))) as ex:
        return dict(zip(paths, ex.map(one, paths)))


def score_pairs(pairs: list[Pair], model, *, device, batch_size: int = 32, workers: int = 0,
                resize_policy: str = "none", resample: str = "bicubic",
                names: Callable[[Path], str] = str, note: Callable[[str, str], None] | None = None
                ) -> Iterator[list[Result]]:
    """LPIPS distances of `pairs` with `model`, yielded as lists of Results, batch by batch.

    Pairs whose files cannot be scored come back as Results with an error (one line naming the
    file). Order: pairs are grouped by their scoring size (groups in order of first appearance),
    each group in the given order, so a given input always gives the same order, also when
    resumed. `names` turns a path into the name used in messages.
    """
    sizes = scan_sizes([p for pair in pairs for p in (pair.path0, pair.path1)], model.pnet_type)
    groups: dict[tuple[int, int], list[Pair]] = {}
    bad: list[Result] = []
    for pair in pairs:
        s0, s1 = sizes[pair.path0], sizes[pair.path1]
        if isinstance(s0, str) or isinstance(s1, str):
            bad.append(Result(pair, error=s0 if isinstance(s0, str) else s1))
            continue
        size = target_size(s0, s1, resize_policy)
        if size is None:
            bad.append(Result(pair, error=mismatch_message(names(pair.path0), s0,
                                                           names(pair.path1), s1)))
            continue
        groups.setdefault(size, []).append(pair)
    if bad:
        yield bad
    ordered = [(pair, size) for size, ps in groups.items() for pair in ps]
    if not ordered:
        return
    batches, start = [], 0
    for size, ps in groups.items():
        for k in range(0, len(ps), batch_size):
            batches.append(list(range(start + k, start + min(k + batch_size, len(ps)))))
        start += len(ps)
    dataset = PairDataset([p for p, _ in ordered], [s for _, s in ordered], resample)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, collate_fn=_collate,
        pin_memory=device.type == "cuda", worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None)
    with torch.inference_mode():
        for idx, x0, x1, failed, alphas in loader:
            if note and alphas:
                note("alpha", alphas[0])
            out = [(i, Result(dataset.pairs[i], error=msg)) for i, msg in failed]
            if idx:
                d = model(x0.to(device, non_blocking=True), x1.to(device, non_blocking=True))
                out += [(i, Result(dataset.pairs[i], value=float(v)))
                        for i, v in zip(idx, d.flatten().float().cpu().tolist())]
            yield [r for _, r in sorted(out, key=lambda t: t[0])]


# --- CSV output -------------------------------------------------------------------------------

def format_value(v: float) -> str:
    return f"{v:.8g}"


class CsvRows:
    """Rows written as they come and flushed per batch; `path=None` writes to stdout.

    With `resume`, an existing file's complete rows are kept (a half-written last line from an
    interrupted run is cut off), its header must match, and `done` holds their keys.
    """

    def __init__(self, path, header: list[str], key_columns: int, resume: bool = False):
        self.path, self.header, self.nkey = (Path(path) if path else None), header, key_columns
        self.done: set = set()
        self.values: list[float] = []
        self.written = 0
        if self.path is None:
            if resume:
                raise UsageError("--resume needs an output file (-o FILE)")
            self.file = sys.stdout
            self._writer().writerow(header)
            return
        if self.path.is_dir():
            raise UsageError(f"{self.path}: is a directory (give -o a file name)")
        if resume and self.path.exists() and self.path.stat().st_size > 0:
            self._load_existing()
            self.file = open(self.path, "a", newline="", encoding="utf-8")
        else:
            if not self.path.parent.exists():
                raise UsageError(f"{self.path.parent}: no such directory for the output file")
            self.file = open(self.path, "w", newline="", encoding="utf-8")
            self._writer().writerow(header)
            self.file.flush()

    def _writer(self):
        return csv.writer(self.file, lineterminator="\n")

    def _load_existing(self):
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):  # a row cut short by the interruption: drop it
            cut = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(cut)
            data = data[:cut]
        rows = list(csv.reader(data.decode("utf-8").splitlines()))
        if not rows or rows[0] != self.header:
            raise UsageError(f"{self.path}: cannot resume: its header is "
                             f"{','.join(rows[0]) if rows else '(empty)'}, this command writes "
                             f"{','.join(self.header)}")
        for row in rows[1:]:
            if len(row) != len(self.header):
                continue
            self.done.add(tuple(row[:self.nkey]))
            self.values.append(float(row[-1]))

    def write(self, rows: list[list]) -> None:
        w = self._writer()
        for row in rows:
            w.writerow(row)
            self.values.append(float(row[-1]))
        self.written += len(rows)
        self.file.flush()

    def close(self):
        if self.file is not sys.stdout:
            self.file.close()


def summary(values: list[float]) -> dict:
    """count, mean, std (population, ddof=0), min, max of the rows' values."""
    if not values:
        return {"count": 0, "mean": None, "std": None, "min": None, "max": None}
    a = np.asarray(values, dtype=np.float64)
    return {"count": int(a.size), "mean": float(a.mean()), "std": float(a.std()),
            "min": float(a.min()), "max": float(a.max())}
