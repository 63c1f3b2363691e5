"""Readers of BAPPS-layout folders, with the official data loader's conventions
(richzhang/PerceptualSimilarity, data/dataset/twoafc_dataset.py and jnd_dataset.py):

- 2AFC: ROOT/ref, ROOT/p0, ROOT/p1 hold images and ROOT/judge holds .npy files (the fraction
  of people who judged p1 closer to ref, in [0, 1]); JND: ROOT/p0, ROOT/p1 and ROOT/same
  (.npy, the fraction who saw no difference).
- Each folder's files (searched recursively) are sorted by path and paired by rank: the k-th
  ref, p0, p1 and judge form the k-th triplet (names are not compared, as upstream).
- Images are converted to RGB, their shorter side resized to load_size (default 64; bilinear,
  the aspect ratio kept; untouched when already that size) and mapped to [-1, 1].
- A sample is a dict of 3 x H x W tensors and a 1 x 1 x 1 judgment, plus the paths.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".ppm", ".bmp"}  # upstream's list, any case
LAYOUTS = {"2afc": (("ref", "p0", "p1"), "judge"), "jnd": (("p0", "p1"), "same")}


def _files(folder: Path, extensions) -> list[str]:
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder (a BAPPS data set needs it)")
    found = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names
             if os.path.splitext(f)[1].lower() in extensions]
    return sorted(found)


def load_bapps_image(path, load_size=64) -> torch.Tensor:
    """One image as the official loader gives it: 3 x H x W float32 in [-1, 1]."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        if short != load_size:  # torchvision's Resize(int): the shorter side to load_size
            other = int(load_size * long / short)
            img = img.resize((load_size, other) if w <= h else (other, load_size),
                             Image.BILINEAR)
        a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return (a.float() / 255 - 0.5) / 0.5  # ToTensor, then Normalize(0.5, 0.5)


class BAPPSFolder(torch.utils.data.Dataset):
    """A 2AFC (kind='2afc') or JND (kind='jnd') folder in the BAPPS layout."""

    def __init__(self, root, kind="2afc", load_size=64):
        if kind not in LAYOUTS:
            raise ValueError(f"kind must be one of {sorted(LAYOUTS)}, got {kind!r}")
        self.root, self.kind, self.load_size = Path(root), kind, load_size
        images, label = LAYOUTS[kind]
        self.label = label
        self.paths = {k: _files(self.root / k, IMAGE_EXTENSIONS) for k in images}
        self.paths[label] = _files(self.root / label, {".npy"})
        counts = {k: len(v) for k, v in self.paths.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"{root}: the {kind} folders hold different numbers of files "
                             f"({', '.join(f'{k}: {n}' for k, n in counts.items())})")
        if not counts[label]:
            raise ValueError(f"{root}: no {kind} samples (empty {label}/ folder)")

    def __len__(self):
        return len(self.paths[self.label])

    def __getitem__(self, index):
        sample = {}
        for key, paths in self.paths.items():
            path = paths[index]
            if key == self.label:
                value = np.load(path).reshape((1, 1, 1))  # a fraction of people, in [0, 1]
                sample[key] = torch.tensor(value, dtype=torch.float32)
            else:
                sample[key] = load_bapps_image(path, self.load_size)
            sample[f"{key}_path"] = path
        return sample


def bapps_loader(root, kind="2afc", batch_size=50, shuffle=False, load_size=64, workers=0,
                 generator=None):
    """A DataLoader over a BAPPS folder (upstream: batch 50, shuffled for training only)."""
    return torch.utils.data.DataLoader(BAPPSFolder(root, kind, load_size),
                                       batch_size=batch_size, shuffle=shuffle,
                                       num_workers=workers, generator=generator)


# --- synthetic data sets (tests, examples, benchmarks) ----------------------------------------

def _smooth_image(rng, size):
    """A smooth random image with some fine texture, in [0, 1]."""
    low = rng.random((8, 8, 3))
    x = np.kron(low, np.ones((-(-size // 8), -(-size // 8), 1)))[:size, :size]
    return np.clip(x + 0.1 * rng.standard_normal((size, size, 3)), 0, 1)


def _distort(rng, x):
    """Noise, a box blur or a colour shift of random strength: kinds that the network's
    layers rank differently."""
    kind, s = rng.integers(3), rng.random()
    if kind == 0:
        return x + 0.3 * s * rng.standard_normal(x.shape)
    if kind == 1:
        k = 2 + int(3 * s)
        c = np.cumsum(np.cumsum(np.pad(x, ((k, k), (k, k), (0, 0)), mode="edge"), 0), 1)
        return (c[k:-k, k:-k] - c[:-2 * k, k:-k] - c[k:-k, :-2 * k]
                + c[:-2 * k, :-2 * k]) / (2 * k) ** 2
    return x + 0.4 * s * (rng.random(3) - 0.5)


def write_synthetic_2afc(root, n, judge, seed=0, size=64):
    """Write n synthetic triplets in the BAPPS 2AFC layout under root (which must not hold
    one): a smooth random ref and two random distortions of it, PNG; judge/ holds 1 where
    the distance function judge(x0, x1) (images 1 x 3 x H x W in [-1, 1]) finds p1 closer
    to ref than p0, else 0. Returns root as a Path."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for d in ("ref", "p0", "p1", "judge"):
        (root / d).mkdir(parents=True)
    for i in range(n):
        ref = _smooth_image(rng, size)
        imgs = [(np.clip(v, 0, 1) * 255).round().astype(np.uint8)
                for v in (ref, _distort(rng, ref), _distort(rng, ref))]
        for d, v in zip(("ref", "p0", "p1"), imgs):
            Image.fromarray(v).save(root / d / f"{i:06d}.png")
        x = [torch.from_numpy(v).permute(2, 0, 1)[None].float() / 255 * 2 - 1 for v in imgs]
        with torch.no_grad():
            d0, d1 = float(judge(x[0], x[1])), float(judge(x[0], x[2]))
        np.save(root / "judge" / f"{i:06d}.npy", np.array([float(d1 < d0)]))
    return root
