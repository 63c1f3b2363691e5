"""Heat maps per pair for the folder jobs (`--spatial-map DIR` of dirs and allpairs): one file
per pair in a folder, written by the rank that scores the pair.

The rows' values come from the job's own scorer (batched forwards, or allpairs' embeddings);
a map needs the spatial forward of its pair: one more load and backbone pass per pair, at the
pair's scoring size, one pair at a time (images of a folder may differ in size).

Names: a job's `map_pair(key)` gives the map's name relative to the folder, made so that two
pairs never share one (dirs: the pair's relative name plus the format's suffix; allpairs:
`<a>/<b>.png`, a folder per first image: a path names a file or a folder, never both, so no
two pairs of one listing meet). Existing files follow the rule of every output
(outputs.refuse_foreign_files): an earlier run's map (a PNG marked as lpips-fast's) is replaced,
anything else (a user's file, an .npy) is refused before anything is scored; a file that
appears during the run is not overwritten.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UsageError
from ..heatmap import save_map
from ..io import load_pair, resize
from .kinds import listing_text
from .outputs import refuse_foreign_files

FORMATS = ("png", "npy")


def map_path(job, key, s) -> tuple[Path, Path, Path]:
    """(the map's path, the pair's two images) for the row `key`."""
    name, path0, path1 = job.map_pair(key)
    return Path(s.spatial_map) / f"{name}.{s.map_format}", path0, path1


def check_maps(job, keys: list, s) -> set:
    """Rank 0, before anything is written: {key: whether its map replaces an earlier run's}
    for the keys whose maps this run writes (those it scores), after refusing a map folder that
    is a file, a job without maps, and files in the way that lpips-fast did not write."""
    if s.spatial_map is None:
        return set()
    if not hasattr(job, "map_pair"):
        raise UsageError(f"{job.command} cannot write heat maps (--spatial-map)")
    if s.map_format not in FORMATS:
        raise UsageError(f"map format must be one of {FORMATS}, got {s.map_format!r}")
    root = Path(s.spatial_map)
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root}: is a file; --spatial-map needs a folder (it is created)")
    paths = {k: map_path(job, k, s)[0] for k in keys}
    # the one rule of every output (outputs.refuse_foreign_files): an earlier run's marked map
    # is replaced, any other file in the way is refused before anything is written
    refuse_foreign_files([("--spatial-map", p, "image") for p in paths.values() if p.exists()])
    links = [str(p) for p in paths.values() if p.is_symlink()]
    if links:
        raise UsageError(f"--spatial-map {root}: {len(links)} of the maps to write are links "
                         f"({listing_text(links, 3)}); lpips-fast does not write through them")
    return {k: p.is_file() for k, p in paths.items()}  # key -> an own map to replace


class MapScorer:
    """Wraps a job's scorer: after each chunk, writes the maps of its scored rows in `todo`."""

    def __init__(self, inner, job, model, s, device, todo: dict):
        self.inner, self.job, self.model, self.s = inner, job, model, s
        self.device, self.todo = device, todo

    def compute(self, c):
        rows, alphas = self.inner.compute(c)
        for cells, _, error in rows:
            key = tuple(cells[:self.job.key_columns])
            if error is None and key in self.todo:
                self._write(key)
        return rows, alphas

    def _write(self, key) -> None:
        s = self.s
        out, path0, path1 = map_path(self.job, key, s)
        x0, x1, (s0, _) = load_pair(path0, path1, s.resize, s.resample, s.net)
        with torch.inference_mode():
            dmap = self.model(x0.to(self.device), x1.to(self.device))
        dmap = resize(dmap.float().cpu(), s0, "bilinear")[0, 0]  # at the first image's size
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            save_map(out, dmap.clamp(min=0).numpy(), s.map_max, exclusive=not self.todo[key])
        except FileExistsError:
            raise UsageError(f"{out}: appeared during the run; lpips-fast does not overwrite "
                             "files in --spatial-map") from None

    def close(self):
        self.inner.close()
