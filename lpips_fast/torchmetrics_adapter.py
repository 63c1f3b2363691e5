"""LPIPS as a torchmetrics `Metric`, scored by lpips_fast (needs torchmetrics; lpips_fast does
not depend on it). The arguments are those of
`torchmetrics.image.lpip.LearnedPerceptualImagePatchSimilarity`, so swapping the import is
enough; torchmetrics' own machinery (MetricCollection, Lightning logging, sync across ranks
through its `process_group`, `dist_sync_on_step` ... keyword arguments) applies unchanged.

    from lpips_fast.torchmetrics_adapter import LearnedPerceptualImagePatchSimilarity
    metric = LearnedPerceptualImagePatchSimilarity(net_type="vgg", normalize=True)
"""
from __future__ import annotations

try:
    from torchmetrics import Metric
    from torchmetrics.utilities import dim_zero_cat
except ImportError as e:
    raise ImportError("lpips_fast.torchmetrics_adapter needs torchmetrics (pip install "
                      "torchmetrics); lpips_fast.LPIPSMetric needs nothing but torch") from e

import torch

from .metric import check_reduction, metric_model, per_pair


class LearnedPerceptualImagePatchSimilarity(Metric):
    """torchmetrics' LPIPS metric on lpips_fast: net_type 'alex' | 'vgg' | 'squeeze',
    reduction 'mean' | 'sum' | 'none' (None means 'none'), normalize (inputs in [0, 1]);
    model: an `lpips_fast.LPIPS` to use instead of building one from net_type. Sums are
    float64. Other keyword arguments go to torchmetrics' `Metric`."""

    higher_is_better = False
    is_differentiable = True
    full_state_update = False
    plot_lower_bound = 0.0

    def __init__(self, net_type: str = "alex", reduction: str | None = "mean",
                 normalize: bool = False, model=None, **kwargs):
        super().__init__(**kwargs)
        reduction = "none" if reduction is None else reduction
        check_reduction(reduction)
        self.net = metric_model(model, {} if model is not None else {"net": net_type})
        self.reduction, self.normalize = reduction, normalize
        self.add_state("sum_scores", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        if reduction == "none":
            self.add_state("scores", [], dist_reduce_fx="cat")

    def train(self, mode: bool = True):
        """The LPIPS model stays in eval mode (no dropout), as in torchmetrics."""
        super().train(mode)
        self.net.eval()
        return self

    def update(self, img1: torch.Tensor, img2: torch.Tensor) -> None:
        d = per_pair(self.net, img1, img2, self.normalize, names=("img1", "img2"))
        self.sum_scores += d.sum()
        self.total += d.numel()
        if self.reduction == "none":
            self.scores.append(d)

    def compute(self) -> torch.Tensor:
        if int(self.total) == 0:
            raise RuntimeError(f"{type(self).__name__}.compute() before any update(): no pairs "
                               "were scored")
        if self.reduction == "mean":
            return self.sum_scores / self.total
        return self.sum_scores if self.reduction == "sum" else dim_zero_cat(self.scores)
