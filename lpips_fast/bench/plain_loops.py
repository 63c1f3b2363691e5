"""The plain loops `lpips-fast bench dirs` times against `lpips-fast dirs`: what a user writes
with another package, one pair per call, reading each file with Pillow and writing a CSV row.

Run as a script by path (python plain_loops.py KIND NET STATE DIR0 DIR1 OUT DEVICE), never imported
from lpips_fast: the process imports only torch, Pillow, numpy and the package it times, so its
start-up is that package's own. STATE is the official state_dict (lpips_fast's weights, saved
by the benchmark), loaded into each package's module, as benchmarks/bench_packages.py does
offline: the values must agree with lpips-fast's to float rounding (the benchmark checks)."""
import os
import sys
import warnings

import numpy as np
import torch
from PIL import Image


def rgb(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def official(net, state, device):
    import lpips
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    m.load_state_dict(state)
    m.eval().to(device)
    return lambda p0, p1: m(lpips.im2tensor(rgb(p0)).to(device),
                            lpips.im2tensor(rgb(p1)).to(device))


def _x(path, device):  # [-1, 1], what torchmetrics takes with normalize=False
    return torch.from_numpy(rgb(path)).to(device).permute(2, 0, 1)[None].float() / 127.5 - 1


def torchmetrics(net, state, device):
    from torchmetrics.functional.image import lpips as tm
    from torchmetrics.image import LearnedPerceptualImagePatchSimilarity
    get = tm._get_tv_model_features
    tm._get_tv_model_features = lambda name, pretrained=False: get(name, False)  # no download
    m = LearnedPerceptualImagePatchSimilarity(net_type=net, reduction="mean")
    m.net.load_state_dict({k: v for k, v in state.items() if not k.startswith("scaling")})
    m.to(device)

    def score(p0, p1):
        m.reset()
        return m(_x(p0, device), _x(p1, device))
    return score


def pyiqa(net, state, device):
    import pyiqa as iqa
    import torchvision
    for name in ("alexnet", "vgg16"):  # its backbone without a download; weights loaded below
        build = getattr(torchvision.models, name)
        setattr(torchvision.models, name, lambda *a, _b=build, **k: _b(weights=None))
    m = iqa.create_metric({"alex": "lpips", "vgg": "lpips-vgg"}[net], device=device,
                          pretrained=False)
    m.net.load_state_dict(state)
    return lambda p0, p1: m(str(p0), str(p1))  # pyiqa reads the files itself


def main(argv):
    kind, net, state, dir0, dir1, out, device = argv
    torch.set_grad_enabled(False)
    score = {"official": official, "torchmetrics": torchmetrics, "pyiqa": pyiqa}[kind](
        net, torch.load(state), torch.device(device))
    with open(out, "w") as f:
        f.write("name,lpips\n")
        for name in sorted(os.listdir(dir0)):
            d = score(os.path.join(dir0, name), os.path.join(dir1, name))
            f.write(f"{name},{float(d):.6f}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
