"""Exact tiling: the geometry that makes tiled features equal untiled ones.

For each LPIPS layer l of a net, walking its conv/pool stack gives
  S_l  the cumulative stride (feature i sits at input i * S_l - P_l),
  P_l  the cumulative padding offset,
  R_l  the receptive field: feature i depends on input pixels [i*S_l - P_l, i*S_l - P_l + R_l).
A crop of the input that starts at a multiple of S = max_l S_l has, at every layer, feature j
equal to the global feature j + start / S_l, provided that feature's receptive field lies
inside the crop or is cut only by a true image border (where the crop's zero padding is the
image's own). Tiles therefore have cores on a grid of multiples of S, and crops that add a halo
of at least max_l P_l on the left and max_l (R_l - P_l - S_l) on the right, rounded up to a
multiple of S. Each layer's features are split among the tiles' cores with no overlap; the
last tile in a row or column takes whatever is left.

`tile_for` picks an LPIPS model's tile size (tile_size, or memory_budget), `tiled_heads` runs
its heads tile by tile.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .backbones import NETS, canonical, feature_sizes


@dataclass(frozen=True)
class LayerGeometry:
    stride: int      # S_l
    padding: int     # P_l
    receptive: int   # R_l


def _ops(spec):
    """A layer spec as (kernel, stride, padding) steps; a fire module's widest path is its
    3x3 expand conv (its 1x1 convs change nothing)."""
    kind, *a = spec
    if kind == "conv":
        return [(a[2], a[3], a[4])]
    if kind == "pool":
        return [(a[0], a[1], 0)]
    if kind == "fire":
        return [(3, 1, 1)]
    return []  # relu


def geometry(net: str) -> list[LayerGeometry]:
    specs, bounds, _, _ = NETS[canonical(net)]
    out, jump, pad, field = [], 1, 0, 1
    for start, stop in bounds:
        for spec in specs[start:stop]:
            for k, s, p in _ops(spec):
                field += (k - 1) * jump
                pad += p * jump
                jump *= s
        out.append(LayerGeometry(jump, pad, field))
    return out


def halo(net: str) -> int:
    geo = geometry(net)
    step = max(g.stride for g in geo)
    need = max(max(g.padding, g.receptive - g.padding - g.stride) for g in geo)
    return step * math.ceil(need / step)


def alignment(net: str) -> int:
    return max(g.stride for g in geometry(net))


@dataclass(frozen=True)
class Span:
    """One tile along one axis: its core [lo, hi) and its crop [crop_lo, crop_hi) in input
    pixels, and whether it is the last (it then owns every remaining feature)."""
    lo: int
    hi: int
    crop_lo: int
    crop_hi: int
    last: bool

    def feature_core(self, stride: int, n_features: int) -> tuple[int, int]:
        """The features this tile owns at a layer of cumulative stride `stride` with
        `n_features` features, as a range in the crop's own feature coordinates."""
        shift = self.crop_lo // stride
        lo = min(self.lo // stride, n_features)
        hi = n_features if self.last else min(self.hi // stride, n_features)
        return lo - shift, hi - shift  # may be empty: a small last tile at a coarse layer


def spans(length: int, tile: int, net: str) -> list[Span]:
    """Split an axis of `length` input pixels into tiles with cores of `tile` pixels
    (rounded down to the net's alignment, at least one alignment step)."""
    step, margin = alignment(net), halo(net)
    tile = max(step, tile // step * step)
    cuts = list(range(0, length, tile))
    if len(cuts) > 1 and length - cuts[-1] < step:  # a sliver owns no feature: merge it
        cuts.pop()
    ends = cuts[1:] + [length]
    return [Span(a, b, max(0, a - margin), min(length, b + margin), b == length)
            for a, b in zip(cuts, ends)]


def bytes_per_pixel(net: str, element_size: int, images: int) -> float:
    """Peak activation bytes per input pixel of one op (its input plus output), for
    `images` images: what bounds a streaming pass's memory."""
    specs, _, _, _ = NETS[canonical(net)]
    jump, channels, peak = 1, 3, 0.0
    for spec in specs:
        kind, *a = spec
        if kind == "relu":
            continue
        out_ch = a[1] if kind == "conv" else (a[2] + a[3] if kind == "fire" else channels)
        out_jump = jump * ((a[3] if kind == "conv" else a[1]) if kind in ("conv", "pool") else 1)
        extra = a[1] / jump ** 2 if kind == "fire" else 0  # the squeeze output lives too
        peak = max(peak, channels / jump ** 2 + out_ch / out_jump ** 2 + extra)
        jump, channels = out_jump, out_ch
    return peak * element_size * images


def tile_for_budget(net: str, budget_bytes: float, element_size: int, images: int,
                    held_bytes: float = 0) -> int:
    """The largest tile core whose crop's activations fit in `budget_bytes` less `held_bytes`
    (what the forward holds through every tile: the prepared whole images), with a 1.5x
    margin for the convolution's workspace and the head's outputs."""
    crop_pixels = (budget_bytes - held_bytes) / (1.5 * bytes_per_pixel(net, element_size, images))
    margin = halo(net)
    side = int(math.sqrt(max(crop_pixels, 0))) - 2 * margin
    if side < margin:  # smaller cores would spend over 9x the untiled work on halos
        need = 1.5 * bytes_per_pixel(net, element_size, images) * (3 * margin) ** 2
        held = (f" plus {held_bytes / 2**20:.0f} MiB for the prepared images"
                if held_bytes else "")
        raise ValueError(f"memory budget of {budget_bytes / 2**20:.0f} MiB is too small for "
                         f"net {net!r} with {images} images: a useful tile (core >= halo = "
                         f"{margin} pixels) needs about {need / 2**20:.0f} MiB{held}")
    step = alignment(net)
    return side // step * step


# --- the tiled forward of an LPIPS model ------------------------------------------------------

def tile_for(model, in0, in1, recording_graph) -> int | None:
    """The tile core size for `model` (an LPIPS) on these inputs, or None to run untiled.
    `recording_graph`: the model's test for a graph being recorded (`model.recording_graph`)."""
    if model.tile_size is None and model.memory_budget is None:
        return None
    if model._dropout_active():
        return None  # dropout masks cannot be made to agree across tiles
    if 0 in (in0.shape[0], in1.shape[0]):
        # An empty batch needs no memory: the tiled path would size its sums by the
        # larger batch (1 of a 0-vs-1 broadcast) and hand the kernels empty crops.
        return None
    if recording_graph():
        # The tile grid is Python arithmetic on the image size: a trace would bake the
        # example's grid in and score other sizes wrong without an error. The recorded
        # graph runs untiled instead (same values, untiled memory).
        warnings.warn("lpips_fast: tile_size / memory_budget do not carry over into a "
                      "traced or exported graph; it runs untiled (same values, the "
                      "untiled memory)", stacklevel=3)
        return None
    tile = model.tile_size
    if tile is None:
        element = model._backbone_dtype(in0).itemsize
        # in0, in1 are prepared (for v0.1 the scaling layer's copies of the caller's images):
        # whole, they live through every tile, so they count against the budget.
        held = in0.numel() * in0.element_size() + in1.numel() * in1.element_size()
        tile = tile_for_budget(model.pnet_type, model.memory_budget, element,
                               in0.shape[0] + in1.shape[0], held)
    return tile if tile < max(in0.shape[2:]) else None


def tiled_heads(model, in0, in1, tile: int, want_map: bool) -> list:
    """Every layer's (value, map) of `model` (an LPIPS) from overlapping crops whose cores
    partition each layer's features: equal to the untiled result up to float rounding."""
    (H, W), n = in0.shape[2:], max(in0.shape[0], in1.shape[0])
    geo = geometry(model.pnet_type)
    hs, ws = feature_sizes(model.pnet_type, H), feature_sizes(model.pnet_type, W)
    acc = torch.float64 if in0.dtype == torch.float64 else torch.float32
    # No in-place writes into tensors made here: under torch.func.vmap the tiles' values
    # and maps are batched and such a buffer is not (vmap refused the += and the slice
    # assignment). The sums add out of place; each layer's map is the concatenation of
    # its tiles' cores, which partition it in row-major order.
    sums = [torch.zeros(n, dtype=torch.float64, device=in0.device) for _ in geo]
    rows = [[] for _ in geo]  # per layer: rows of core maps, one row per tile row
    for ys in spans(H, tile, model.pnet_type):
        for row in rows:
            row.append([])
        for xs in spans(W, tile, model.pnet_type):
            crop = (..., slice(ys.crop_lo, ys.crop_hi), slice(xs.crop_lo, xs.crop_hi))
            for k, (f0, f1) in enumerate(model._features(in0[crop], in1[crop])):
                (a, b), (c, d) = (ys.feature_core(geo[k].stride, hs[k]),
                                  xs.feature_core(geo[k].stride, ws[k]))
                if a >= b or c >= d:
                    continue  # this tile owns no feature of this coarse layer
                core = (..., slice(a, b), slice(c, d))
                value, dmap = model._layer(k, f0[core], f1[core], want_map)
                sums[k] = sums[k] + value.double() * ((b - a) * (d - c))
                if want_map:
                    rows[k][-1].append(dmap.to(acc))
    maps = [torch.cat([torch.cat(r, dim=3) for r in layer if r], dim=2) if want_map
            else None for layer in rows]
    return [((s / (h * w)).to(acc), m) for s, m, h, w in zip(sums, maps, hs, ws)]
