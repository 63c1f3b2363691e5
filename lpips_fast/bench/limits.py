"""What the hardware allows for one LPIPS case: the work counted from the layer shapes, and the
peak rates of known devices. bench.py and profile_kernels.py report measured times against it.

What is counted (and what is not):
- FLOPs: the backbone's convolutions only, 2 * (Cin / groups) * kh * kw * Cout * Hout * Wout
  per image (a multiply and an add per weight per output pixel). A forward scores both images
  (2N backbone passes). fwd+bwd (a training loss, gradient w.r.t. in0 only, as bench.py runs
  it): the backbone weights need no gradient, so the backward of the in0 pass computes input
  gradients only, the same FLOPs again: 3N passes in all. Bias, ReLU, pooling, the head
  (about 10 flops per feature element, against >= 2 * 3 * 9 = 54 per conv output element) and
  the lin layers are left out: under 1% of the total, and not tensor-core work anyway.
- Bytes (a floor, not an estimate): the two input images read once (float32), every LPIPS
  layer's features of both images written once in the compute precision, and for fwd+bwd the
  input gradient written once. Everything else (intermediate activations, the backward's
  feature gradients) could in principle stay on chip, so it is not counted.
- The limit time of a case is the larger of FLOPs / tensor-core peak and bytes / HBM bandwidth;
  "% of limit" = limit time / measured time.

Peaks are the vendors' dense (no sparsity) datasheet numbers; fp32 convolutions run on TF32
tensor cores when torch.backends.cudnn.allow_tf32 (PyTorch's default) is set.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from ..backbones import Backbone

TERA = 1e12

# Lower-case substrings of torch.cuda.get_device_name -> dense peaks (TFLOP/s) and HBM (TB/s).
# The first entry whose substrings all occur in the name wins.
DEVICES = [
    (("h200",), dict(fp32=67.0, tf32=494.7, bf16=989.4, fp16=989.4, hbm=4.8)),
    (("h100", "hbm3"), dict(fp32=67.0, tf32=494.7, bf16=989.4, fp16=989.4, hbm=3.35)),
    (("h100", "sxm"), dict(fp32=67.0, tf32=494.7, bf16=989.4, fp16=989.4, hbm=3.35)),
    (("h100", "pcie"), dict(fp32=51.2, tf32=378.0, bf16=756.0, fp16=756.0, hbm=2.0)),
    (("a100", "80gb"), dict(fp32=19.5, tf32=156.0, bf16=312.0, fp16=312.0, hbm=2.039)),
    (("a100", "40gb"), dict(fp32=19.5, tf32=156.0, bf16=312.0, fp16=312.0, hbm=1.555)),
]
KEYS = ("fp32", "tf32", "bf16", "fp16", "hbm")
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def device_limits(name: str) -> dict | None:
    """The peak table entry for a device name, or None (CPU, unknown GPU)."""
    low = name.lower()
    return next((dict(v) for keys, v in DEVICES if all(k in low for k in keys)), None)


def parse_limits(text: str) -> dict:
    """'tf32=495,bf16=990,fp16=990,fp32=67,hbm=3.35' (TFLOP/s, TB/s): numbers for a device the
    table lacks. Every key is required, so that no column silently uses a missing rate."""
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in KEYS:
            raise ValueError(f"expected key=value with keys {', '.join(KEYS)}, "
                             f"got {part!r}")
        try:
            out[key] = float(value)
        except ValueError:
            raise ValueError(f"{key} must be a number, got {value!r}") from None
        if not out[key] > 0:
            raise ValueError(f"{key} must be positive, got {value!r}")
    missing = [k for k in KEYS if k not in out]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    return out


def limits_arg(text: str) -> dict:
    """parse_limits for argparse's type=: its message becomes the option's one-line error."""
    try:
        return parse_limits(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


LIMITS_HELP = ("peaks for a device the table lacks, e.g. tf32=495,bf16=990,fp16=990,fp32=67,"
               "hbm=3.35 (dense TFLOP/s, TB/s)")


def _shapes(net: str, size: int):
    """(conv layers as (module, input shape, output shape), LPIPS feature shapes) of one
    size x size image, from a backbone on the meta device: the real layers, no memory, no
    arithmetic, so the counts cannot drift from the model."""
    with torch.device("meta"):
        backbone = Backbone(net)
    convs = []
    hooks = [m.register_forward_hook(lambda m, i, o: convs.append((m, i[0].shape, o.shape)))
             for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    try:
        features = backbone(torch.empty(1, 3, size, size, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return convs, [f.shape for f in features]


def conv_flops(net: str, size: int) -> int:
    """FLOPs of the backbone's convolutions for one size x size image, forward."""
    total = 0
    for m, _, out in _shapes(net, size)[0]:
        kh, kw = m.kernel_size
        total += 2 * (m.in_channels // m.groups) * kh * kw * out[1] * out[2] * out[3]
    return total


def feature_elements(net: str, size: int) -> int:
    """Elements of all LPIPS layers' features of one size x size image."""
    return sum(s.numel() for s in _shapes(net, size)[1])


def case_work(net: str, n: int, size: int, backward: bool, precision: str = "fp32"):
    """(FLOPs, minimum bytes) of one case: see the module docstring for what is counted."""
    passes = 3 * n if backward else 2 * n
    image = 3 * size * size * 4  # float32 inputs
    nbytes = 2 * n * image + 2 * n * feature_elements(net, size) * ELEMENT_BYTES[precision]
    if backward:
        nbytes += n * image
    return passes * conv_flops(net, size), nbytes


def peak_flops(limits: dict, precision: str) -> float:
    """FLOP/s of the tensor cores for a precision; fp32 convolutions use TF32 when allowed."""
    if precision == "fp32":
        return limits["tf32" if torch.backends.cudnn.allow_tf32 else "fp32"] * TERA
    return limits[precision] * TERA


def limit_seconds(flops: float, nbytes: float, limits: dict | None, precision: str):
    """The larger of the compute and the memory floor, or None without a device entry."""
    if limits is None:
        return None
    return max(flops / peak_flops(limits, precision), nbytes / (limits["hbm"] * TERA))
