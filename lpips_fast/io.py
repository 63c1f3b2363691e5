"""Image loading for scoring: files to N x 3 x H x W tensors in [-1, 1]."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def load_image(path) -> torch.Tensor:
    """Read an image with Pillow as a 1 x 3 x H x W float32 tensor in [-1, 1].

    Grayscale becomes RGB, alpha is dropped; errors name the file.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with Image.open(path) as img:
            return to_tensor(img)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None


def to_tensor(img) -> torch.Tensor:
    """A Pillow image (any mode) as a 1 x 3 x H x W float32 tensor in [-1, 1]."""
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1
