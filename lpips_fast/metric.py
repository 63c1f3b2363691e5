"""`LPIPSMetric`: LPIPS accumulated over batches, and over the ranks of a process group, for
reporting a dataset's score (the torchmetrics pattern: update, compute, reset).

    metric = lpips_fast.LPIPSMetric(net="vgg", normalize=True).to(device)
    for fake, real in loader:
        metric.update(fake, real)
    score = metric.compute()        # float64 mean over every pair of every rank
    metric.reset()

Each rank contributes exactly the pairs it was given: the sums and counts are all-reduced, and
for reduction='none' the per-pair values are gathered in rank order (no padding samples, as a
DistributedSampler would add, are ever counted).
"""
from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from torch import nn

from .model import LPIPS

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def metric_model(model: LPIPS | None, lpips_kwargs: dict) -> LPIPS:
    """The given model, checked, or one built from LPIPS arguments; in eval mode."""
    if model is None:
        model = LPIPS(**{"verbose": False, **lpips_kwargs})
    elif lpips_kwargs:
        raise ValueError(f"pass either a model or LPIPS arguments, not both (got model and "
                         f"{sorted(lpips_kwargs)})")
    if not isinstance(model, LPIPS):
        raise TypeError(f"model must be an lpips_fast.LPIPS, got {type(model).__name__}")
    _check_not_spatial(model)
    return model.eval()


def _check_not_spatial(model: LPIPS) -> None:
    if model.spatial:
        raise ValueError("the metric needs one value per pair: pass a model built with "
                         "spatial=False")


def per_pair(model: LPIPS, img0, img1, normalize: bool,
             names=("img0", "img1")) -> torch.Tensor:
    """One float64 value per pair of the batch (N against 1 broadcasts). The inputs are
    checked first under the caller's argument names (the forward would say in0, in1)."""
    model._check_inputs(img0, img1, names)
    # Again at every call: `spatial` is a plain attribute, and a shared model switched to
    # spatial=True after the metric was built would add every map pixel as a pair.
    _check_not_spatial(model)
    return model(img0, img1, normalize=normalize).flatten().double()


class LPIPSMetric(nn.Module):
    """LPIPS over a whole evaluation set, as a float64 mean, sum or list of per-pair values.

    model: an `LPIPS` (spatial=False) to use; without it one is built from `lpips_kwargs`
    (net, version, pnet_rand, impl, precision, ...; verbose defaults to False).
    normalize: inputs are in [0, 1] (as in `LPIPS.forward`).
    reduction: 'mean' (default), 'sum', or 'none' (every pair's value, in update order; across
    ranks, rank 0's values first).
    process_group: the group `compute()` synchronises over (default: the default group, when
    torch.distributed is initialized; otherwise the metric is local).

    The state (sum, count, values) lives on the model's device and follows `.to()`, but stays
    float64 through `.half()` or `.to(dtype)`. The model is always evaluated in eval mode.
    """

    def __init__(self, model: LPIPS | None = None, *, reduction: str = "mean",
                 normalize: bool = False, process_group=None, **lpips_kwargs):
        super().__init__()
        check_reduction(reduction)
        self.model = metric_model(model, lpips_kwargs)
        self.reduction, self.normalize, self.process_group = reduction, normalize, process_group
        device = next(itertools.chain(self.model.parameters(), self.model.buffers())).device
        # Not buffers: they stay out of state_dict, and their dtype must not follow .half().
        self._sum = torch.zeros((), dtype=torch.float64, device=device)
        self._count = torch.zeros((), dtype=torch.int64, device=device)
        self._values: list[torch.Tensor] = []

    def train(self, mode: bool = True):
        """A metric never trains: the model stays in eval mode (no dropout), whatever a parent
        module is switched to."""
        super().train(mode)
        self.model.eval()
        return self

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        # Follow the device of a .to()/.cuda()/.cpu(), never the dtype: a probe tells which.
        device = fn(torch.zeros((), device=self._sum.device)).device
        self._sum, self._count = self._sum.to(device), self._count.to(device)
        self._values = [v.to(device) for v in self._values]
        return self

    @torch.no_grad()
    def update(self, img0: torch.Tensor, img1: torch.Tensor) -> None:
        """Score a batch of pairs (N x 3 x H x W each, or N against 1) and add them."""
        self._add(self._score(img0, img1))

    @torch.no_grad()
    def forward(self, img0: torch.Tensor, img1: torch.Tensor) -> torch.Tensor:
        """update(), returning this batch's value under the metric's reduction."""
        d = self._score(img0, img1)
        self._add(d)
        return self._reduce(d.sum(), d.numel(), d)

    def _score(self, img0, img1):
        return per_pair(self.model, img0, img1, self.normalize)

    def _add(self, d):
        self._sum += d.sum()
        self._count += d.numel()
        if self.reduction == "none":
            self._values.append(d)

    @torch.no_grad()
    def compute(self) -> torch.Tensor:
        """The float64 result over every update since the last reset, of every rank of the
        process group (a collective: call it on every rank). Local state is left as it is."""
        total, count = self._sum, self._count
        values = torch.cat(self._values) if self._values else self._sum.new_zeros(0)
        if self._synchronised():
            # counts are exact in float64 to 2^53; the one-hot reduction rides along, so that
            # ranks built with other reductions all raise here instead of running different
            # collectives below ('none' gathers, the others do not: a hang)
            kind = torch.zeros(len(REDUCTIONS), dtype=torch.float64, device=total.device)
            kind[REDUCTIONS.index(self.reduction)] = 1
            both = torch.cat([torch.stack([total, count.double()]), kind])
            dist.all_reduce(both, group=self.process_group)
            total, count = both[0], both[1].long()
            world = dist.get_world_size(self.process_group)
            if int(both[2:].max()) != world:
                ranks = ", ".join(f"{int(n)} {r!r}" for r, n in zip(REDUCTIONS, both[2:]) if n)
                raise ValueError(f"LPIPSMetric.compute(): the {world} ranks were built with "
                                 f"other reductions ({ranks}): every rank must use the same")
            if self.reduction == "none":
                values = _gather_uneven(values, self.process_group)
        if int(count) == 0:
            raise RuntimeError("LPIPSMetric.compute() before any update(): no pairs were scored "
                               "(on any rank) since construction or the last reset()")
        return self._reduce(total, count, values)

    def _reduce(self, total, count, values):
        if self.reduction == "mean":
            return total / count
        return total if self.reduction == "sum" else values

    def reset(self) -> None:
        self._sum.zero_()
        self._count.zero_()
        self._values = []

    def _synchronised(self) -> bool:
        return (dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)


def _gather_uneven(values: torch.Tensor, group) -> torch.Tensor:
    """Every rank's 1-D `values`, of any lengths, concatenated in rank order: the lengths are
    gathered first, each rank pads to the longest (all_gather needs one shape), and the
    padding is cut off again."""
    world = dist.get_world_size(group)
    n = torch.tensor([values.numel()], device=values.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    if max(sizes) == 0:
        return values
    padded = values.new_zeros(max(sizes))
    padded[:values.numel()] = values
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])
