"""The official package's small modules besides LPIPS itself (lpips/lpips.py 0.1.4), for
`import lpips_fast as lpips`: the 2AFC ranking head trained with the lin layers
(`Dist2LogitLayer`, `BCERankingLoss`) and the L2 / DSSIM baselines (`FakeNet`, `L2`, `DSSIM`).
State-dict keys, defaults and values are the official ones.

Deliberate differences in the baselines: their result is on the inputs' device (the official
ones call `.cuda()` when `use_gpu`, the default, which fails on a machine without a GPU; the
flag is kept and ignored), and a batch of more than one image is a ValueError naming the size
(the official code asserts).
"""
from __future__ import annotations

import torch
from torch import nn

from . import compat


class Dist2LogitLayer(nn.Module):
    """Two distances d0, d1 (N x 1 x 1 x 1) -> the probability that d1 is judged closer: three
    1x1 convolutions with LeakyReLU(0.2) over (d0, d1, d0 - d1, d0 / (d1 + eps), d1 / (d0 + eps))."""

    def __init__(self, chn_mid=32, use_sigmoid=True):
        super().__init__()
        layers = [nn.Conv2d(5, chn_mid, 1), nn.LeakyReLU(0.2, True),
                  nn.Conv2d(chn_mid, chn_mid, 1), nn.LeakyReLU(0.2, True),
                  nn.Conv2d(chn_mid, 1, 1)]
        self.model = nn.Sequential(*layers, *([nn.Sigmoid()] if use_sigmoid else []))

    def forward(self, d0, d1, eps=0.1):
        return self.model(torch.cat((d0, d1, d0 - d1, d0 / (d1 + eps), d1 / (d0 + eps)), dim=1))


class BCERankingLoss(nn.Module):
    """Binary cross-entropy between Dist2LogitLayer's output and the human judgment (a judge in
    [-1, 1] is the fraction of people preferring p1, mapped to [0, 1]). Keeps `self.logit`."""

    def __init__(self, chn_mid=32):
        super().__init__()
        self.net = Dist2LogitLayer(chn_mid=chn_mid)
        self.loss = nn.BCELoss()

    def forward(self, d0, d1, judge):
        self.logit = self.net(d0, d1)
        return self.loss(self.logit, (judge + 1.) / 2.)


class FakeNet(nn.Module):
    """Base of the non-learned baselines: `colorspace` 'Lab' or 'RGB'."""

    def __init__(self, use_gpu=True, colorspace="Lab"):
        super().__init__()
        self.use_gpu = use_gpu  # kept for compatibility: results follow the inputs' device
        self.colorspace = colorspace

    def _single(self, in0, in1):
        if in0.shape[0] != 1 or in1.shape[0] != 1:
            raise ValueError(f"{type(self).__name__} scores one image pair at a time (batch "
                             f"size 1, as the official baseline); got {in0.shape[0]} and "
                             f"{in1.shape[0]}")
        if self.colorspace not in ("Lab", "RGB"):
            raise ValueError(f"colorspace must be 'Lab' or 'RGB', got {self.colorspace!r}")

    def _lab(self, x):
        return compat.tensor2np(compat.tensor2tensorlab(x.detach(), to_norm=False))

    @staticmethod
    def _as_tensor(value, like):
        return torch.tensor((float(value),), dtype=torch.float32, device=like.device)


class L2(FakeNet):
    """Mean squared difference: over RGB values in [-1, 1], or half of it over Lab / 100."""

    def forward(self, in0, in1, retPerLayer=None):
        self._single(in0, in1)
        if self.colorspace == "RGB":
            # channels, then rows, then columns: the official order of the means (same rounding)
            return ((in0 - in1) ** 2).mean(1).mean(1).mean(1)
        return self._as_tensor(compat.l2(self._lab(in0), self._lab(in1), range=100.), in0)


class DSSIM(FakeNet):
    """(1 - SSIM) / 2 of the 8-bit RGB images, or of their Lab values (data range 100)."""

    def forward(self, in0, in1, retPerLayer=None):
        self._single(in0, in1)
        if self.colorspace == "RGB":
            value = compat.dssim(1. * compat.tensor2im(in0.detach()),
                                 1. * compat.tensor2im(in1.detach()), range=255.)
        else:
            value = compat.dssim(self._lab(in0), self._lab(in1), range=100.)
        return self._as_tensor(value, in0)
