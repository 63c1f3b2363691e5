"""The LPIPS head in plain PyTorch: the oracle for every test and the fallback path.

This is the math of the official `lpips` 0.1.4 package, written out for this project:

    r(p)  = sqrt(sum_c f_c(p)^2)            per pixel p, over channels c
    n     = f / (r + eps),  eps = 1e-10     (eps outside the sqrt, as upstream)
    d(p)  = sum_c w_c (n0_c(p) - n1_c(p))^2 (w = ones when lpips=False: a plain channel sum)
    value = mean_p d(p)

One deliberate difference from upstream: the norm's gradient at an all-zero feature vector
(common after ReLU) is finite here. Upstream differentiates sqrt at 0 and gets NaN;
`torch.linalg.vector_norm` defines that subgradient as 0, which is what the fused kernels do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-10


def normalize(f: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Divide each pixel's feature vector (dim 1) by its Euclidean norm + eps."""
    return f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + eps)


def distance_map(f0: torch.Tensor, f1: torch.Tensor, weight: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Per-pixel distance d, shape N x 1 x h x w, for features N x C x h x w.

    `weight` holds the C channel weights (any shape with C elements) or is None for the
    unweighted channel sum (lpips=False). f0 and f1 broadcast over the batch (N vs 1).
    """
    diff = (normalize(f0) - normalize(f1)) ** 2
    if weight is None:
        return diff.sum(dim=1, keepdim=True)
    return (diff * weight.reshape(1, -1, 1, 1).to(diff.dtype)).sum(dim=1, keepdim=True)


def head(f0: torch.Tensor, f1: torch.Tensor, weight: torch.Tensor | None = None,
         return_map: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One layer's head: (per-sample value of shape N, and the N x 1 x h x w map or None).

    Low-precision features are promoted to float32 first, as the fused kernels accumulate.
    """
    if f0.dtype in (torch.float16, torch.bfloat16):
        f0, f1 = f0.float(), f1.float()
    d = distance_map(f0, f1, weight)
    return d.mean(dim=(1, 2, 3)), (d if return_map else None)


def head_all(f0s, f1s, weights, return_map: bool = False):
    """All layers of a call: (values L x N, list of maps or None), as the fused head_all."""
    outs = [head(f0, f1, w, return_map) for f0, f1, w in zip(f0s, f1s, weights)]
    return torch.stack([v for v, _ in outs]), ([d for _, d in outs] if return_map else None)


def upsample(d: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a distance map to the input's size, as upstream's spatial mode."""
    return F.interpolate(d, size=size, mode="bilinear", align_corners=False)


def lpips_from_features(feats0, feats1, weights, spatial_size=None):
    """Full LPIPS from per-layer features (weights: list of tensors or Nones).

    Returns (value, per-layer list): N x 1 x 1 x 1 each, or N x 1 x H x W when spatial_size
    is given. Used by tests as the oracle for whole-model results.
    """
    layers = []
    for f0, f1, w in zip(feats0, feats1, weights):
        value, d = head(f0, f1, w, return_map=spatial_size is not None)
        layers.append(value.view(-1, 1, 1, 1) if d is None else upsample(d, spatial_size))
    return sum(layers), layers
