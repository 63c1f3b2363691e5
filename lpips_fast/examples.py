"""A built-in example: a synthetic reference image and distorted versions of it.

Made procedurally (no image files ship with the package), so the demo runs anywhere.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter


def reference_image(size: int = 256, seed: int = 0) -> Image.Image:
    """Smooth colour gradients, sharp discs and fine stripes: structure at every scale."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([x, y, 1 - (x + y) / 2], axis=-1) * 0.6 + 0.2
    for _ in range(12):
        cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.03, 0.15)
        disc = (x - cx) ** 2 + (y - cy) ** 2 < r ** 2
        img[disc] = rng.uniform(0, 1, 3)
    stripes = (np.sin(2 * np.pi * 24 * x) > 0) & (y > 0.8)
    img[stripes] *= 0.5
    return Image.fromarray((img * 255).round().astype(np.uint8))


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _noise(img: Image.Image, sigma: float, seed: int) -> Image.Image:
    a = np.asarray(img, dtype=np.float32)
    a = a + np.random.default_rng(seed).normal(0, sigma, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))


def distortions(ref: Image.Image) -> dict[str, Image.Image]:
    """Named distortions of `ref`, mild to strong."""
    return {
        "identical": ref.copy(),
        "jpeg q=90": _jpeg(ref, 90),
        "noise sigma=8": _noise(ref, 8, seed=1),
        "blur r=1": ref.filter(ImageFilter.GaussianBlur(1)),
        "jpeg q=10": _jpeg(ref, 10),
        "blur r=4": ref.filter(ImageFilter.GaussianBlur(4)),
        "noise sigma=48": _noise(ref, 48, seed=2),
    }
