"""The image-folder pieces of the batch jobs (`lpips_fast.jobs` runs them):

- `list_images`, `match_by_name`, `all_pairs` enumerate `Pair`s (pure, sorted, deterministic);
- `plan_pairs` / `plan_allpairs` order them from the image headers alone (size policy, batches
  of one size, failures known before any decoding);
- `score_batch` scores a batch of `batches.BatchLoader` (dirs); `AllPairsScorer` loads
  (DataLoader workers) and scores allpairs' images.
"""
from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .errors import UsageError  # also imported from here (its home before errors.py)
from .pairwise import ImageSet
from .tiling import bytes_per_pixel
from .io import (ImageError, check_scoring_size, image_size, mismatch_message, read_image,
                 resize, target_size)

# Files whose suffix is not one of these are not images for the folder modes (they are counted
# and reported as ignored, never opened).
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".tif", ".tiff",
                  ".webp", ".gif", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".jp2", ".j2k",
                  ".avif", ".heic", ".qoi", ".dds", ".ico", ".pcx", ".sgi", ".im"}


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

def list_images(root, recursive: bool = False) -> tuple[list[str], list[str], list[str]]:
    """Image files under `root` as sorted relative POSIX names, the non-image names ignored, and
    (with `recursive`) the linked folders skipped: they are not followed, as a link to a parent
    would loop and a link to a sibling would count its images twice.

    Hidden files and folders (a name starting with '.') are skipped.
    """
    root = Path(root)
    if not root.exists():
        raise UsageError(f"{root}: no such directory")
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory")
    names, ignored, skipped = [], [], []

    def refuse(e):  # os.walk's onerror: an unreadable folder is the user's to know about
        raise UsageError(f"{e.filename}: cannot list the folder ({e.strerror})")
    try:
        walker = (os.walk(root, onerror=refuse) if recursive
                  else [(str(root), [], os.listdir(root))])
    except OSError as e:
        raise UsageError(f"{root}: cannot list the folder ({e.strerror})") from None
    for dirpath, dirnames, filenames in walker:
        keep = []
        for d in dirnames:
            if d.startswith("."):
                continue
            full = Path(dirpath) / d
            (skipped if full.is_symlink() else keep).append(full)
        dirnames[:] = [d.name for d in keep]
        for f in filenames:
            if f.startswith("."):
                continue
            full = Path(dirpath) / f
            if not recursive and full.is_dir():
                continue
            rel = full.relative_to(root).as_posix()
            (names if full.suffix.lower() in IMAGE_SUFFIXES else ignored).append(rel)
    skipped = [p.relative_to(root).as_posix() + "/" for p in skipped]
    return sorted(names), sorted(ignored), sorted(skipped)


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

def _worker_init(_):
    torch.set_num_threads(1)  # workers decode; the model's threads stay with the main process


def default_workers() -> int:
    return min(8, max(1, (os.cpu_count() or 1) // 2))


def scan_sizes(paths: Iterable[Path]) -> dict[Path, tuple[int, int] | str]:
    """Each file's (H, W) from its header, or the error message (missing, not an image)."""
    def one(p):
        try:
            return image_size(p)
        except ImageError as e:
            return str(e)
    paths = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(max_workers=min(16, 4 * (os.cpu_count() or 1))) as ex:
        return dict(zip(paths, ex.map(one, paths)))


# --batch-size auto (dirs): at most AUTO_PAIRS pairs per batch, and no more than keep the
# backbone's largest activation (tiling.bytes_per_pixel, with tile_for_budget's 1.5x margin)
# within the device's BATCH_BYTES. A fixed count either fails or wastes: 32 pairs of 1920x1080
# make a 63 GiB vgg activation (more than most machines hold), and on a 2-core CPU vgg 512x384
# scored 24 pairs per batch at 0.90x the official one-pair loop against 1.07x-1.08x for 1 or 4
# pairs (benchmarks/results/dirs-cpu-batch.md); alex at 512x384 (16 MiB a pair) keeps 32.
AUTO_PAIRS = 32
BATCH_BYTES = {"cpu": 1 << 30, "cuda": 8 << 30}  # other devices: the CPU's


def auto_pairs(net: str, size: tuple[int, int], device_type: str = "cpu",
               memory_budget: int | None = None) -> int:
    """Pairs per batch of `size` (h, w) images under --batch-size auto (see AUTO_PAIRS),
    within `memory_budget` bytes too when one is given (the model tiles a pair that alone
    does not fit)."""
    pair_bytes = 1.5 * bytes_per_pixel(net, 4, 2) * size[0] * size[1]
    budget = BATCH_BYTES.get(device_type, BATCH_BYTES["cpu"])
    if memory_budget is not None:
        budget = min(budget, memory_budget)
    return max(1, min(AUTO_PAIRS, int(budget // pair_bytes)))


def plan_pairs(pairs: list[Pair], net: str, batch_size: int | str = 32,
               resize_policy: str = "none", names: Callable[[Path], str] = str,
               device_type: str = "cpu", memory_budget: int | None = None):
    """The scoring order of `pairs`, from the image headers alone.

    Returns (failed Results, ordered list of (pair, scoring size), batches): pairs that cannot be
    scored (a missing, unreadable or too small file, a size mismatch) come back as Results with
    an error; the rest are grouped by scoring size (groups in order of first appearance, each in
    the given order) and cut into batches of at most `batch_size` indices into `ordered` ("auto":
    auto_pairs(net, size, device_type, memory_budget) for each size), never across groups.
    Deterministic: a given input always gives the same order, also when resumed.
    """
    sizes = scan_sizes([p for pair in pairs for p in (pair.path0, pair.path1)])
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
        try:
            check_scoring_size(pair.path0, s0, pair.path1, s1, size, net)
        except ImageError as e:
            bad.append(Result(pair, error=str(e)))
            continue
        groups.setdefault(size, []).append(pair)
    ordered = [(pair, size) for size, ps in groups.items() for pair in ps]
    batches, start = [], 0
    for size, ps in groups.items():
        n = (auto_pairs(net, size, device_type, memory_budget) if batch_size == "auto"
             else batch_size)
        for k in range(0, len(ps), n):
            batches.append(list(range(start + k, start + min(k + n, len(ps)))))
        start += len(ps)
    return bad, ordered, batches


def score_batch(model, device, loaded) -> list[tuple[int, float | None, str | None]]:
    """(index, value, error) for one batch from `batches.BatchLoader`, by index."""
    idx, x0, x1, failed, _ = loaded
    out = [(i, None, msg) for i, msg in failed]
    if idx:
        with torch.inference_mode():
            d = model(x0.to(device, non_blocking=True), x1.to(device, non_blocking=True))
        out += [(i, float(v), None) for i, v in zip(idx, d.flatten().float().cpu().tolist())]
    return sorted(out, key=lambda t: t[0])


# --- all pairs of a folder: one backbone pass per image ----------------------------------------

class ImageDataset(torch.utils.data.Dataset):
    """Image i of `paths` as a 3 x H x W tensor in [-1, 1] at `size`, or its error message."""

    def __init__(self, paths, size, resample):
        self.paths, self.size, self.resample = list(paths), tuple(size), resample

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            a, alpha = read_image(self.paths[i])
        except ImageError as e:
            return i, None, str(e), None
        x = resize(torch.from_numpy(a).permute(2, 0, 1), self.size, self.resample)
        return i, x.contiguous(), None, self.paths[i] if alpha else None


def _list_collate(items):
    return items


class FileImages(ImageSet):
    """Image files at one size for `PairwisePlan`, decoded by a DataLoader (worker processes)
    in the order the engine embeds them (each image once). A file that cannot be decoded is
    embedded as a gray image and listed in `failed` (index -> message); its pairs are failures.
    """

    def __init__(self, paths, size, resample="bicubic", batch_size=32, workers=0):
        self.name, self.lazy, self.tensor = "images", True, None
        self.items, self.size = list(paths), tuple(size)
        self.dataset = ImageDataset(self.items, self.size, resample)
        self.batch_size, self.workers = batch_size, workers
        self.failed: dict[int, str] = {}
        self.alphas: list = []
        self._it, self._buf = None, {}

    def __len__(self):
        return len(self.items)

    def _one(self, item):
        i, x, err, alpha = item
        if err is not None:
            self.failed[i] = err
            x = torch.zeros(3, *self.size)
        if alpha is not None:
            self.alphas.append(alpha)
        return x

    def batch(self, lo: int, hi: int) -> torch.Tensor:
        if self._it is None:
            self._it = iter(torch.utils.data.DataLoader(
                self.dataset, batch_size=self.batch_size, num_workers=self.workers,
                collate_fn=_list_collate, worker_init_fn=_worker_init if self.workers else None,
                prefetch_factor=4 if self.workers else None))
        out = []
        for i in range(lo, hi):
            while i not in self._buf:
                item = next(self._it, None)
                if item is None:  # asked again for an image already passed: decode it here
                    self._buf[i] = self.dataset[i]
                    break
                for it in item:
                    self._buf[it[0]] = it
            out.append(self._one(self._buf.pop(i)))
        return torch.stack(out)


def plan_allpairs(pairs: list[Pair], done: set, net: str, block: int,
                  resize_policy: str = "none", names: Callable[[Path], str] = str):
    """The work of `allpairs` (pairs: every unordered pair of a sorted name list, a before b).

    Returns (failed Results, groups, items). Pairs are grouped by scoring size, as `plan_pairs`
    does; a group is (size, its image paths in name order); the pairs of a group are then in
    (row, column) order of its images. An item is (group, row block, [(position in `pairs`,
    row, column)]) for the pairs not in `done` whose row image is in that block of `block`
    images; items are in output order. The images of a group and its blocks do not depend on
    `done`, so a resumed run computes every value exactly as an uninterrupted one.
    """
    sizes = scan_sizes([p for pair in pairs for p in (pair.path0, pair.path1)])
    bad: list[Result] = []
    grouped: dict[tuple[int, int], list[int]] = {}
    for pos, pair in enumerate(pairs):
        s0, s1 = sizes[pair.path0], sizes[pair.path1]
        if isinstance(s0, str) or isinstance(s1, str):
            error = s0 if isinstance(s0, str) else s1
        else:
            size = target_size(s0, s1, resize_policy)
            try:
                if size is not None:
                    check_scoring_size(pair.path0, s0, pair.path1, s1, size, net)
                    grouped.setdefault(size, []).append(pos)
                    continue
                error = mismatch_message(names(pair.path0), s0, names(pair.path1), s1)
            except ImageError as e:
                error = str(e)
        if pair.key not in done:
            bad.append(Result(pair, error=error))
    named: dict = {}
    for pair in pairs:
        named.setdefault(pair.key[0], pair.path0)
        named.setdefault(pair.key[1], pair.path1)
    rank = {p: k for k, (_, p) in enumerate(sorted(named.items()))}
    groups, items = [], []
    for size, positions in grouped.items():
        paths = sorted({p for pos in positions for p in (pairs[pos].path0, pairs[pos].path1)},
                       key=rank.__getitem__)
        index = {p: k for k, p in enumerate(paths)}
        blocks: dict[int, list] = {}
        for pos in positions:
            if pairs[pos].key in done:
                continue
            r, c = index[pairs[pos].path0], index[pairs[pos].path1]
            blocks.setdefault(r // block, []).append((pos, r, c))
        if blocks:
            groups.append((size, paths))
            items += [(len(groups) - 1, b, blocks[b]) for b in sorted(blocks)]
    return bad, groups, items


class AllPairsScorer:
    """Scores the items of `plan_allpairs` with the embedding engine (`PairwisePlan`): the
    images of a group are embedded once (when the first item of that group comes), a row block
    is one Gram product per layer against the column blocks at or right of it."""

    def __init__(self, groups, model, *, block: int, workers: int = 0, resample="bicubic"):
        self.groups, self.model, self.block = groups, model, block
        self.workers, self.resample = workers, resample
        self._group, self._plan, self._images = None, None, None

    def _use(self, g):
        from .pairwise import PairwisePlan
        if self._group != g:
            self.close()
            size, paths = self.groups[g]
            self._images = FileImages(paths, size, self.resample, self.block, self.workers)
            self._plan = PairwisePlan(self._images, model=self.model, batch_size=self.block,
                                      block=self.block)
            self._group = g
        return self._plan, self._images

    def compute(self, item):
        """[(position, value, error)] of the item's pairs, and the paths noted for alpha."""
        g, b, wanted = item
        plan, images = self._use(g)
        first = b * plan.block
        rows = torch.cat([plan.block_distances(b, j) for j in range(b, plan.n_col_blocks)],
                         dim=1).to("cpu", plan.out_dtype)
        out = []
        for pos, r, c in wanted:
            err = images.failed.get(r) or images.failed.get(c)
            out.append((pos, None, err) if err else (pos, float(rows[r - first, c - first]), None))
        alphas, images.alphas = images.alphas, []
        return out, alphas

    def close(self):
        if self._plan is not None:
            self._plan.close()
        self._group, self._plan, self._images = None, None, None
