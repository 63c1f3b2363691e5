"""`lpips(x0, x1)`: the functional LPIPS, on tensors or two image files, with one cached module
per (net, version, device, dtype, options)."""
from __future__ import annotations

import os

import torch

from .backbones import canonical
from .checks import check_images
from .io import load_pair
from .model import LPIPS

_cache: dict = {}
REDUCTIONS = ("none", "mean", "sum")


def lpips(x0, x1, net="alex", version="0.1", normalize=False, spatial=False, retPerLayer=False,
          *, reduction="none", resize="none", resample="bicubic", device=None, **kwargs):
    """Functional LPIPS: builds the module once per (net, version, device, dtype, options).

    x0, x1: N x 3 x H x W tensors, or two image file paths (str or os.PathLike), read as the
    command line reads them (`lpips_fast.io`: EXIF, 16-bit, alpha, grayscale) into [-1, 1],
    resampled by `resize` ('none', 'to-first', 'to-smaller') with `resample` ('bicubic',
    'bilinear'), and scored on `device` (default CPU).
    reduction: 'none' (the module's output), 'mean' or 'sum' over all its elements, as torch's
    losses reduce (with spatial=True, over the map's pixels too; with retPerLayer, each layer
    is reduced the same way).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    x0, x1 = _inputs(x0, x1, net, normalize, resize, resample, device)
    # Checked before x0's dtype picks the module: uint8 or bool images failed in Module.to
    # ("only accepts floating point ... dtypes"), a list or None with an AttributeError, and
    # complex images converted (and cached) a complex module before the forward refused them.
    for name, x in (("x0", x0), ("x1", x1)):
        check_images(x, name)
    key = (canonical(net), version, x0.device, x0.dtype, spatial, tuple(sorted(kwargs.items())))
    try:
        model = _cache.get(key)
    except TypeError:  # an unhashable option (a list): LPIPS's own check names it below
        key = model = None
    if model is None:
        model = LPIPS(net=net, version=version, spatial=spatial, verbose=False, **kwargs)
        model = model.to(device=x0.device, dtype=x0.dtype)
        if key is not None:
            _cache[key] = model
    model._check_inputs(x0, x1, ("x0", "x1"))  # the forward's checks, under these names
    out = model(x0, x1, retPerLayer=retPerLayer, normalize=normalize)
    if reduction == "none":
        return out
    reduce = torch.mean if reduction == "mean" else torch.sum
    return (reduce(out[0]), [reduce(v) for v in out[1]]) if retPerLayer else reduce(out)


def _inputs(x0, x1, net, normalize, resize, resample, device):
    """The tensors to score: x0 and x1 as given, or the two image files loaded and resized."""
    paths = [isinstance(x, (str, os.PathLike)) for x in (x0, x1)]
    if not any(paths):
        if resize != "none" or device is not None:
            raise ValueError("resize and device apply to image files; tensors are scored as "
                             "given, on their own device")
        return x0, x1
    if not all(paths):
        raise TypeError(f"x0 and x1 must both be tensors or both be image paths, got "
                        f"{type(x0).__name__} and {type(x1).__name__}")
    if normalize:
        raise ValueError("normalize=True describes [0, 1] tensors; images read from files "
                         "are mapped to [-1, 1] already (leave normalize=False)")
    x0, x1, _ = load_pair(x0, x1, resize, resample, canonical(net), option="resize='{}'")
    return x0.to(device or "cpu"), x1.to(device or "cpu")
