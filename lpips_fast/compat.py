"""The official package's image helpers, so that scripts written for `import lpips` run with
`import lpips_fast as lpips`: `load_image`, `im2tensor`, `tensor2im` (the ones its README and
example scripts use), with the same signatures and results.

Two deliberate differences, both where the official code fails or gives a wrong number:
- `load_image` reads with Pillow (lpips_fast.io: EXIF orientation, 16-bit, grey, alpha
  dropped, one-line `ImageError`s naming the file) where the official one calls OpenCV for
  .bmp/.jpg/.jpeg/.png names (a missing file gives a TypeError there) and fails with a
  NameError for any other name. 8-bit files give the same array (tested against the official
  function on PNG and JPEG files); 16-bit files are scaled by 255/65535 and rounded (OpenCV
  divides by 256), so a value may differ by one.
- `tensor2im` clips to the integer type's range before converting: the official one wraps
  values below -1 or above 1 around (-1.5 becomes 193 in uint8).
"""
from __future__ import annotations

import numpy as np
import torch

from .io import read_image


def load_image(path) -> np.ndarray:
    """An image file as an H x W x 3 uint8 RGB array (the official `lpips.load_image`)."""
    a, _ = read_image(path)  # float32 in [-1, 1]: k / 127.5 - 1 for the 8-bit value k
    return np.rint((a + 1) * np.float32(127.5)).astype(np.uint8)


def im2tensor(image, imtype=np.uint8, cent=1., factor=255. / 2.) -> torch.Tensor:
    """H x W x C array (0..255) -> 1 x C x H x W float32 tensor in [-1, 1] by default.

    `imtype` is unused, as in the official function. The arithmetic is the official one's:
    float64 (numpy's promotion of image / factor), then rounded once to float32."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"im2tensor takes an H x W x C array (as load_image gives); got shape "
                         f"{tuple(image.shape)}")
    a = image / factor - cent
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)[None])).float()


def tensor2im(image_tensor, imtype=np.uint8, cent=1., factor=255. / 2.) -> np.ndarray:
    """The first image of an N x C x H x W tensor (in [-1, 1] by default) as an H x W x C
    array of `imtype`, clipped to that type's range when it is an integer type."""
    if image_tensor.dim() != 4:
        raise ValueError(f"tensor2im takes an N x C x H x W tensor; got shape "
                         f"{tuple(image_tensor.shape)}")
    a = (image_tensor[0].detach().cpu().float().numpy().transpose(1, 2, 0) + cent) * factor
    if np.issubdtype(imtype, np.integer):
        info = np.iinfo(imtype)
        a = np.clip(a, info.min, info.max)
    return a.astype(imtype)
