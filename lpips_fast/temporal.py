"""Temporal LPIPS (tLP; TecoGAN, Chu et al. 2020): how much a video's frame-to-frame change
differs from its reference's,

    tLP_t = | LPIPS(ref_{t-1}, ref_t) - LPIPS(dist_{t-1}, dist_t) |,   t = 1 .. T-1,

averaged over the video (papers often report it x100). It catches flicker that per-frame LPIPS
misses.

Each frame goes through the backbone once: a batch of reference frames and its batch of
distorted frames run as one pass (as the forward runs a pair), and every layer's features
serve three heads, LPIPS(ref_t, dist_t) and the two temporal terms, before the next layer is
computed (the forward's streaming order). The last frame's features are carried to the next
batch, so a batch boundary loses no pair: 2 backbone passes per frame pair, where three
forward calls would make 6. The heads are the model's own (fused kernels or the reference),
so the values are the forward's up to float rounding (the backbone's convolutions may round
differently for another batch size).

With tile_size / memory_budget set and frames large enough to be tiled, the features of a
frame are never held whole (that is what tiling saves): each of the three values is then a
tiled forward of its pair, 6 passes per frame pair in tiles, the same values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import tiling

__all__ = ["tlp", "TemporalLPIPS", "TLPResult"]


@dataclass
class TLPResult:
    """Per-frame values of `tlp`, float64 CPU tensors of length T (frame t at index t).

    lpips[t] = LPIPS(ref_t, dist_t); ref_change[t] = LPIPS(ref_{t-1}, ref_t), dist_change[t]
    = LPIPS(dist_{t-1}, dist_t) and tlp[t] = |ref_change[t] - dist_change[t]|, NaN at t = 0
    (no previous frame). Means: `lpips_mean` over the T frames, `tlp_mean` over the T - 1
    temporal terms (NaN for a single frame); multiply by 100 for the usual tLP x100.
    """
    lpips: torch.Tensor
    tlp: torch.Tensor
    ref_change: torch.Tensor
    dist_change: torch.Tensor

    def __len__(self) -> int:
        return self.lpips.numel()

    @staticmethod
    def cat(parts) -> "TLPResult":
        """The results of consecutive `TemporalLPIPS.update` calls as one."""
        return TLPResult(*(torch.cat([getattr(p, f) for p in parts])
                           for f in ("lpips", "tlp", "ref_change", "dist_change")))

    @property
    def lpips_mean(self) -> float:
        return float(self.lpips.mean()) if len(self) else math.nan

    @property
    def tlp_mean(self) -> float:
        return float(self.tlp[1:].mean()) if len(self) > 1 else math.nan


class TemporalLPIPS:
    """The streaming state of a tLP computation: feed consecutive frames with `update(ref,
    dist)` (N x C x H x W frames as the model's forward takes them, in [-1, 1], or [0, 1]
    with normalize=True); it returns those frames' values and keeps the last frame for the
    next call (`TLPResult.cat` joins the results). A fresh object
    (or `reset()`) starts a new video: its first frame has no temporal terms (NaN).
    The model runs as it is (its precision, head, weights, device); call under
    torch.inference_mode() unless gradients are wanted."""

    def __init__(self, model, normalize: bool = False):
        if getattr(model, "spatial", False):
            raise ValueError("tLP scores whole frames: give a model with spatial=False")
        self.model, self.normalize = model, normalize
        self.reset()

    def reset(self) -> None:
        self._last = None      # the previous frame: (prepared ref, prepared dist) 1 x 3 x H x W
        self._feats = None     # its features per layer [(ref, dist)], or None (tiled)
        self.frames = 0

    def update(self, ref: torch.Tensor, dist: torch.Tensor) -> TLPResult:
        """The values of frames ref[i], dist[i] (N x C x H x W, N >= 1, one size for the
        whole video), float64 CPU tensors of length N."""
        if ref.shape[0] != dist.shape[0]:
            raise ValueError(f"a batch of {ref.shape[0]} reference frames but "
                             f"{dist.shape[0]} distorted frames")
        if ref.shape[0] == 0:
            raise ValueError("an empty batch of frames")
        m = self.model
        r, d = m._prepare(ref, dist, self.normalize, names=("ref frames", "dist frames"))
        if self._last is not None and self._last[0].shape[1:] != r.shape[1:]:
            raise ValueError(f"frame {self.frames} is {tuple(ref.shape[1:])} (C x H x W) but "
                             f"the frames before were {tuple(self._last[0].shape[1:])}")
        tile = m._tile(r, d)
        if tile is None:
            own, rc, dc = self._from_features(r, d)
        else:
            own, rc, dc = self._tiled(r, d, tile)
        self._last = (r[-1:].clone(), d[-1:].clone())
        self.frames += r.shape[0]
        # Each value rounded to float32 (the forward's output dtype) before the difference,
        # which is taken in float64: |a - b| of two floats is then exact.
        own, rc, dc = (_finish(v, r.dtype) for v in (own, rc, dc))
        return TLPResult(own, (rc - dc).abs(), rc, dc)

    def _from_features(self, r, d):
        """One backbone pass over both batches; per layer, the three heads."""
        m, prev, carry = self.model, self._feats, []
        lead = 0
        if prev is None and self._last is not None:
            # The batch before was tiled (a budget tiles larger batches only), so no features
            # were kept: the previous frame runs again, in this pass.
            r, d = torch.cat([self._last[0], r]), torch.cat([self._last[1], d])
            lead = 1
        own, rc, dc = [], [], []
        for k, (fr, fd) in enumerate(m._features(r, d)):
            own.append(m._layer(k, fr[lead:], fd[lead:], False)[0])
            before = (None, None) if prev is None else prev[k]
            rc.append(_changes(m, k, before[0], fr))
            dc.append(_changes(m, k, before[1], fd))
            carry.append((fr[-1:].clone(), fd[-1:].clone()))
        self._feats = carry
        first = self._last is None  # the video's first frame: no temporal terms
        return own, _pad(rc, first), _pad(dc, first)

    def _tiled(self, r, d, tile):
        """Three tiled forwards (tiling holds no frame's features whole)."""
        m = self.model
        self._feats = None
        own = [v for v, _ in tiling.tiled_heads(m, r, d, tile, False)]
        if self._last is not None:
            r, d = torch.cat([self._last[0], r]), torch.cat([self._last[1], d])
        terms = []
        for x in (r, d):
            if x.shape[0] < 2:  # the video's first frame alone: no pair
                terms.append(_pad([x.new_zeros(0)], True))
                continue
            pair = (x[:-1], x[1:])
            step = m._tile(*pair) or tile
            terms.append(_pad([v for v, _ in tiling.tiled_heads(m, *pair, step, False)],
                              self._last is None))
        return own, terms[0], terms[1]


def _changes(m, k, before, f):
    """Layer k's LPIPS between consecutive frames: the previous batch's last frame `before`
    (or None) against f[0], then f[i - 1] against f[i]. Two head calls rather than one on a
    concatenation, whose copy of the batch's features cost more than the heads (CPU)."""
    values = [] if before is None else [m._layer(k, before, f[:1], False)[0]]
    if f.shape[0] > 1:
        values.append(m._layer(k, f[:-1], f[1:], False)[0])
    if not values:  # the video's first frame alone: no pair
        return f.new_zeros(0, dtype=torch.float32 if f.dtype != torch.float64 else f.dtype)
    return values[0] if len(values) == 1 else torch.cat(values)


def _pad(per_layer: list, first: bool) -> list:
    """Per-layer temporal values with a NaN in front for the video's first frame."""
    if not first:
        return per_layer
    return [torch.cat([v.new_full((1,), math.nan), v]) for v in per_layer]


def _finish(per_layer: list, dtype) -> torch.Tensor:
    """The layers' sum, as the forward's one-launch path forms it (in float64, then rounded to
    the model's output dtype), as a float64 CPU vector."""
    total = torch.stack([v.reshape(-1).double() for v in per_layer]).sum(0)
    return total.to(dtype).double().cpu()


def _batches(frames, batch_size: int, name: str):
    """Frames as a stream of N x C x H x W batches: a tensor T x C x H x W is cut into
    batch_size frames, an iterable gives its items (a C x H x W item is one frame)."""
    if isinstance(frames, torch.Tensor):
        if frames.dim() != 4:
            raise ValueError(f"{name} must be a T x C x H x W tensor (or an iterable of "
                             f"batches), got shape {tuple(frames.shape)}")
        yield from frames.split(batch_size)
        return
    if isinstance(frames, (str, bytes)) or not hasattr(frames, "__iter__"):
        raise TypeError(f"{name} must be a T x C x H x W tensor or an iterable of frame "
                        f"batches, got {type(frames).__name__}")
    for k, b in enumerate(frames):
        if not isinstance(b, torch.Tensor) or b.dim() not in (3, 4):
            what = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
            raise ValueError(f"{name}: item {k} must be an N x C x H x W batch or a C x H x W "
                             f"frame tensor, got {what}")
        yield b[None] if b.dim() == 3 else b


def aligned(ref_frames, dist_frames, batch_size: int = 16):
    """Pairs of equal-length batches from two frame streams batched in any way (a tensor and a
    generator, batches of 8 against batches of 5); a stream that ends first is an error
    naming both frame counts."""
    rs, ds = _batches(ref_frames, batch_size, "ref_frames"), _batches(dist_frames, batch_size,
                                                                       "dist_frames")
    r = d = None
    seen = 0
    while True:
        if r is None or r.shape[0] == 0:
            r = next(rs, None)
        if d is None or d.shape[0] == 0:
            d = next(ds, None)
        if r is None or d is None:
            if r is None and d is None:
                return
            rest, other = (d, ds) if r is None else (r, rs)
            more = rest.shape[0] + sum(b.shape[0] for b in other)
            n0, n1 = (seen, seen + more) if r is None else (seen + more, seen)
            raise ValueError(f"ref_frames has {n0} frames but dist_frames has {n1}: tLP pairs "
                             "frames by index and needs the same number")
        n = min(r.shape[0], d.shape[0])
        yield r[:n], d[:n]
        seen += n
        r, d = r[n:], d[n:]


def tlp(ref_frames, dist_frames, model=None, net="alex", version="0.1", normalize=False,
        device=None, batch_size: int = 16, **options) -> TLPResult:
    """Per-frame LPIPS and temporal LPIPS of a distorted video against its reference.

    ref_frames, dist_frames: T x 3 x H x W tensors (grey T x 1 x H x W too), in [-1, 1]
    ([0, 1] with normalize=True), or iterables of N x C x H x W batches (or of single
    C x H x W frames) for videos that do not fit in memory; the two may be batched
    differently (frames pair by index). model: an `lpips_fast.LPIPS` to use as it is;
    without it one is built from net, version and `options` (LPIPS's keyword arguments:
    precision, impl, tile_size, memory_budget, model_path, lpips, ...) on `device` (default:
    the CPU) and kept for later calls. Batches are moved to the model's device. batch_size:
    frames per backbone pass for tensor inputs (iterables: as they come, cut to agree).

    Runs without autograd. Returns a `TLPResult` (per-frame float64 tensors; `tlp_mean`,
    `lpips_mean`). Cost: 2 backbone passes per frame pair (see the module docstring).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    model, device = _model(model, net, version, device, options)
    state = TemporalLPIPS(model, normalize)
    parts = []
    with torch.inference_mode():
        for r, d in aligned(ref_frames, dist_frames, batch_size):
            parts.append(state.update(r.to(device), d.to(device)))
    if not parts:
        raise ValueError("ref_frames and dist_frames hold no frames")
    return TLPResult.cat(parts)


_models: dict = {}


def _model(model, net, version, device, options):
    """The model to use and its device: `model` itself, or one built (and cached) from the
    options."""
    if model is not None:
        if options:
            raise ValueError(f"options {sorted(options)} configure a model tlp builds; with "
                             "model= set them on that model instead")
        from .pairwise import _resolve_model
        return _resolve_model(model, net, version, device)
    from .model import LPIPS
    device = torch.device(device if device is not None else "cpu")
    key = (net, version, device, tuple(sorted((k, str(v)) for k, v in options.items())))
    if key not in _models:
        _models[key] = LPIPS(net=net, version=version, verbose=False, **options).to(device)
    return _models[key], device
