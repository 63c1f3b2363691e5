"""The job kinds of the command line, each only what is its own (the `Job` protocol): `DirsJob`
(two folders paired by name), `AllPairsJob` (every pair of a folder's images, with the
embedding engine) and `VideoJob` (two videos frame by frame), with their scorers."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checks import parse_bytes
from ..devices import resolve_device
from ..errors import UsageError
from ..batches import BatchLoader, choose
from ..folders import (AllPairsScorer, Pair, all_pairs, default_workers, list_images,
                       match_by_name, plan_allpairs, plan_pairs, score_batch)
from ..temporal import TemporalLPIPS
from ..video import VideoPairs
from .outputs import format_value
from .protocol import Listing

MAX_LISTED = 20


def listing_text(names: list, limit: int = MAX_LISTED) -> str:
    names = [str(n) for n in names]
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


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
                                           _relative_namer(self.dir0, self.dir1),
                                           resolve_device(s.device).type,
                                           parse_bytes(s.memory_budget, "--memory-budget"))
        failures = [(r.pair.key, r.error) for r in bad if r.pair.key not in done]
        chunks = [c for c, b in enumerate(batches)
                  if any(ordered[i][0].key not in done for i in b)]
        return failures, (ordered, batches), chunks

    def chunk_keys(self, work, c):
        ordered, batches = work
        return [ordered[i][0].key for i in batches[c]]

    def scorer(self, work, model, s, ctx, mine):
        return _DirsScorer(work, model, s, ctx, mine)

    def map_pair(self, key):
        """The heat map's name (the pair's relative name in dir0, unique in a listing) and
        the pair's files (maps.py)."""
        a, b = (key[0], key[0]) if self.match == "name" else key
        return a, self.dir0 / a, self.dir1 / b


class _DirsScorer:
    """Loads this rank's batches (batches.BatchLoader: threads decoding into the batch's
    tensor) and scores them."""

    def __init__(self, work, model, s, ctx, mine):
        self.ordered, self.batches = work
        self.model, self.device = model, ctx.device
        workers, prefetch = choose(s.workers, s.prefetch, ctx.device)
        self.it = BatchLoader(self.ordered, [self.batches[c] for c in mine], device=ctx.device,
                              workers=workers, prefetch=prefetch, resample=s.resample,
                              decoder=s.decoder)

    def compute(self, c):
        loaded = next(self.it)
        values = score_batch(self.model, self.device, loaded)
        if [i for i, _, _ in values] != self.batches[c]:
            raise RuntimeError(f"chunk {c}: the loader gave other pairs")
        return [(list(self.ordered[i][0].key), v, e) for i, v, e in values], loaded[4]

    def close(self):
        self.it.close()


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

    def map_pair(self, key):
        """`a/b` (maps.py: a path names a file or a folder, so no two pairs share a name)."""
        a, b = key
        return f"{a}/{b}", self.dir / a, self.dir / b


class _AllPairsScorer:
    def __init__(self, work, model, s):
        groups, self.items, self.keys = work
        workers = default_workers() if s.workers == "auto" else s.workers  # processes
        self.engine = AllPairsScorer(groups, model, block=s.batch_size, workers=workers,
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
    reference frame). tlp=True adds the temporal LPIPS of each frame against the one before
    (`lpips_fast.temporal`): rows frame,time,tlp,lpips, tlp empty for frame 0."""
    ref: str | os.PathLike
    dist: str | os.PathLike
    tlp: bool = False
    command = "video"
    unit = "frame"
    key_columns = 1

    def __post_init__(self):
        self.header = ["frame", "time", "tlp", "lpips"] if self.tlp else ["frame", "time", "lpips"]
        # summarized like the lpips column (empty cells skipped), in the summary's "tlp"
        self.summary_columns = {"tlp": 2} if self.tlp else {}

    def listing(self, s, note) -> Listing:
        video = VideoPairs(self.ref, self.dist, s.net, s.resize, s.resample)  # checks both
        video.close()  # every rank opens the videos again to decode its own chunks
        keys = [(str(i),) for i in range(video.count)]
        return Listing(keys, [Path(self.ref), Path(self.dist)],
                       {"ref": str(self.ref), "dist": str(self.dist)},
                       {"ref": os.path.realpath(self.ref), "dist": os.path.realpath(self.dist),
                        "tlp": self.tlp})

    def plan(self, listing, done, s):
        n = len(listing.keys)
        bs = s.batch_size
        chunks = [c for c in range(math.ceil(n / bs))
                  if any((str(i),) not in done for i in range(c * bs, min(n, (c + 1) * bs)))]
        return [], (n, bs), chunks

    def chunk_keys(self, work, c):
        n, bs = work
        return [(str(i),) for i in range(c * bs, min(n, (c + 1) * bs))]

    def check_row(self, row):
        try:
            frame, _ = int(row[0]), float(row[1])
        except ValueError:
            return f"{row[0]!r}, {row[1]!r} is not a frame number and a time"
        if self.tlp and (row[2] == "") != (frame == 0):
            return f"frame {frame} has tlp {row[2]!r} (empty for frame 0 only)"
        if self.tlp and frame:
            try:
                v = float(row[2])
            except ValueError:
                v = -1.0
            if not math.isfinite(v) or v < 0:
                return f"{row[2]!r} is not a tLP value"
        return None

    def scorer(self, work, model, s, ctx, mine):
        return _VideoScorer(self, work, model, s, ctx)


class _VideoScorer:
    def __init__(self, job, work, model, s, ctx):
        (self.n, self.bs), self.model, self.ctx = work, model, ctx
        self.tlp = job.tlp
        self.video = VideoPairs(job.ref, job.dist, s.net, s.resize, s.resample)

    def compute(self, c):
        lo = c * self.bs
        if self.tlp:
            return self._temporal(lo), []
        times, x0, x1 = self.video.read(lo, lo + self.bs)
        with torch.inference_mode():
            d = self.model(x0.to(self.ctx.device), x1.to(self.ctx.device))
        vals = d.flatten().float().cpu().tolist()
        return [([str(lo + k), f"{times[k]:.6g}"], v, None) for k, v in enumerate(vals)], []

    def _temporal(self, lo):
        """A chunk with tLP. Every chunk but the first starts from its previous frame, decoded
        and run through the backbone again: the chunk's values then depend on nothing outside
        it, so a resumed or sharded run writes the same bytes as one that ran straight
        through (one more frame per video in the chunk's backbone pass)."""
        first = max(lo - 1, 0)
        times, x0, x1 = self.video.read(first, lo + self.bs)
        dev = self.ctx.device
        with torch.inference_mode():
            res = TemporalLPIPS(self.model).update(x0.to(dev), x1.to(dev))
        rows = []
        for k in range(lo - first, len(times)):
            t = res.tlp[k].item()
            rows.append(([str(first + k), f"{times[k]:.6g}",
                          "" if math.isnan(t) else format_value(t)], res.lpips[k].item(), None))
        return rows

    def close(self):
        self.video.close()
