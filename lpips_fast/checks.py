"""The checks of what `LPIPS` is given: its inputs (`check_images`, `check_pair`, the 0-255 /
[0, 1] range warning, `nan_if_too_small` inside recorded graphs) and its byte sizes
(`parse_bytes`: memory_budget, pairwise's max_memory)."""
from __future__ import annotations

import math
import re
import numbers
import warnings

import torch

from .backbones import min_input_size, too_small


# The units of a size, as text (any case); 1024-based KiB..TiB, 1000-based KB..TB.
BYTE_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)\s*([a-z]*)\s*", re.I)


def parse_bytes(budget, what="memory_budget", minimum=1):
    """None, or a size in whole bytes (at least `minimum`): a number, or a string such as
    '512MiB', '16GiB', '2GB'. Smaller, infinite and unparsable sizes raise a ValueError; a
    string with a unit that is not one of BYTE_UNITS ('16G', '1PiB') says so and lists them."""
    if budget is None:
        return None
    value = None
    if isinstance(budget, numbers.Real) and not isinstance(budget, bool):  # numpy's too
        try:
            value = float(budget)
        except OverflowError:  # an int beyond float's range (10**400)
            value = math.inf
    elif isinstance(budget, str):
        m = _SIZE.fullmatch(budget)
        unit = m.group(2).lower() if m else None
        if unit and unit not in BYTE_UNITS:
            units = ", ".join(u.upper().replace("I", "i") for u in BYTE_UNITS)
            raise ValueError(f"{what}: unknown unit {m.group(2)!r} in {budget!r}; the units "
                             f"are {units} (e.g. '16GiB')")
        if m:
            value = float(m.group(1)) * BYTE_UNITS[unit or "b"]
    if value is None or not math.isfinite(value) or value < minimum:
        raise ValueError(f"{what} must be a size of at least {minimum} bytes, as a number or a "
                         f"string such as '16GiB', got {budget!r}")
    return int(value)


def check_images(x, name="x"):
    """The check of one input of `LPIPS.forward` (also of `embed` and each image set of
    `lpips_fast.pairwise`): a floating-point tensor N x 3 x H x W (RGB) or N x 1 x H x W
    (grey). 8-bit images scored as numbers up to 255 would be silently wrong."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{name} must be N x 3 x H x W (RGB) or N x 1 x H x W (grey), "
                         f"got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_pair(in0, in1, names, device, net):
    """The checks of `LPIPS.forward`'s two inputs against each other and a model of `net` on
    `device`. Every message names the inputs as the caller calls them (`names`: forward's
    in0, in1; the metric's img0, img1; embed's x twice, for its one set)."""
    a, b = names
    for name, x in zip(names, (in0, in1)):
        check_images(x, name)
    if in0.device != in1.device:
        raise ValueError(f"{a} is on {in0.device} but {b} is on {in1.device}")
    if in0.device != device:
        who = f"{a} is" if a == b else "the inputs are"
        raise ValueError(f"{who} on {in0.device} but the model is on {device}: move one "
                         "of them with .to()")
    if in0.shape[2:] != in1.shape[2:]:
        raise ValueError(f"{a} and {b} differ in size: {tuple(in0.shape[2:])} vs "
                         f"{tuple(in1.shape[2:])}")
    if in0.shape[0] != in1.shape[0] and 1 not in (in0.shape[0], in1.shape[0]):
        raise ValueError(f"batch sizes of {a} ({in0.shape[0]}) and {b} ({in1.shape[0]}) "
                         "do not broadcast (they must be equal, or one of them 1)")
    problem = too_small(net, *in0.shape[2:])
    if problem:
        raise ValueError(f"{a if a == b else f'{a} and {b}'}: {problem}")


def warn_if_out_of_range(in0, in1, normalize):
    """A warning when the inputs are very likely in the wrong range (0-255 pixel values, [0, 1]
    images without normalize=True, or [-1, 1] images with it). Reads their values: a device
    sync."""
    lo0, lo1, hi0, hi1 = torch.stack([t.double() for t in (in0.min(), in1.min(), in0.max(),
                                                          in1.max())]).tolist()
    lo, hi = min(lo0, lo1), max(hi0, hi1)
    if lo >= 0 and 1.5 < hi <= 255:
        warnings.warn(f"lpips_fast: the inputs look like 0-255 pixel values (min {lo:g}, "
                      f"max {hi:g}); LPIPS expects [-1, 1], or [0, 1] with "
                      "normalize=True: divide by 255 and pass normalize=True",
                      stacklevel=5)
    elif lo >= 0 and hi <= 1 and not normalize:
        warnings.warn(f"lpips_fast: the inputs are all in [0, 1] (min {lo:g}, max {hi:g}) "
                      "but normalize=False, which means [-1, 1]; pass normalize=True if "
                      "they are [0, 1] images", stacklevel=5)
    elif normalize and lo < -0.5 and hi <= 1:
        # Clearly negative: a [0, 1] image resampled with bicubic overshoots by a few
        # hundredths, not by half its range; normalize=True maps this to below -2.
        warnings.warn(f"lpips_fast: the inputs have negative values (min {lo:g}, max {hi:g}) "
                      "but normalize=True, which means [0, 1]; pass normalize=False if they "
                      "are [-1, 1] images", stacklevel=5)


def nan_if_too_small(out, x, net):
    """In a recorded graph: `out` (a value, a map, or (value, per-layer list)), NaN wherever
    the image x is smaller than `net`'s minimum. An ONNX graph cannot raise, and below the
    minimum onnxruntime returned finite, meaningless values (a pooling without an output
    pixel); NaN cannot pass for a distance. H and W come from the input's data (a sum of
    ones), which every recorder keeps dynamic: a Python size would be baked in as a constant
    (jit.trace) or turned into a guard (torch.export)."""
    h = torch.ones_like(x[:1, :1, :, :1]).sum()
    w = torch.ones_like(x[:1, :1, :1, :]).sum()
    ok = torch.minimum(h, w) >= min_input_size(net)

    def flag(t):
        return torch.where(ok, t, torch.full_like(t, float("nan")))
    return (flag(out[0]), [flag(r) for r in out[1]]) if isinstance(out, tuple) else flag(out)
