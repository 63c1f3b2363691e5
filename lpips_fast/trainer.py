"""Calibration of the lin layers on 2AFC judgments: `Trainer` (drop-in for `lpips.Trainer`)
and the official 2AFC / JND scoring functions.

The training step is the official one: d0 = LPIPS(ref, p0), d1 = LPIPS(ref, p1), a small
Dist2LogitLayer net maps (d0, d1) to the probability that p1 is judged closer, BCE against
the human judgment, Adam, then every 1x1 convolution of the LPIPS net clamped to >= 0.

Dropout: the official Trainer builds its LPIPS with use_dropout=True in train mode, so its
lin layers see a random element-wise mask on the squared feature differences. Such a mask
cannot go through the fused head (which folds the channel weights into one reduction), so
`dropout=True` (the default, the official behaviour) runs the heads' PyTorch math with
upstream's mask order; `dropout=False` runs the fused head forward and backward (the
faster choice; the same loss as the official Trainer with its net in eval mode).
"""
from __future__ import annotations

import os
import sys
from collections import OrderedDict

import numpy as np
import torch

from .compat import tensor2im, voc_ap
from .layers import BCERankingLoss, DSSIM, L2
from .model import LPIPS


class Trainer:
    """`lpips.Trainer`'s API: initialize(...), set_input, optimize_parameters, forward,
    get_current_errors, get_current_visuals, clamp_weights, save, update_learning_rate."""

    def name(self):
        return self.model_name

    def initialize(self, model="lpips", net="alex", colorspace="Lab", pnet_rand=False,
                   pnet_tune=False, model_path=None, use_gpu=True, printNet=False,
                   spatial=False, is_train=False, lr=.0001, beta1=0.5, version="0.1",
                   gpu_ids=[0], *, dropout=True, impl="auto", verbose=True):  # noqa: B006
        """The official arguments; keyword-only extras: dropout (see the module's doc), impl
        (LPIPS's head), verbose. use_gpu=True puts everything on cuda:gpu_ids[0] (one device:
        no DataParallel)."""
        if use_gpu and not torch.cuda.is_available():
            raise ValueError("use_gpu=True but CUDA is not available; pass use_gpu=False")
        self.use_gpu, self.gpu_ids = use_gpu, gpu_ids
        self.device = torch.device(f"cuda:{gpu_ids[0]}" if use_gpu else "cpu")
        self.model, self.is_train, self.spatial = model, is_train, spatial
        self.dropout = dropout
        self.model_name = f"{model} [{net}]"
        self.net = self._build(model, net, colorspace, pnet_rand, pnet_tune, model_path,
                               spatial, is_train, version, impl, verbose).to(self.device)
        self.parameters = [p for p in self.net.parameters() if p.requires_grad]
        if is_train:
            # (d0, d1) -> predicted human judgment, trained along with the lin layers
            self.rankLoss = BCERankingLoss().to(self.device)
            self.parameters += list(self.rankLoss.net.parameters())
            self.lr = self.old_lr = lr
            self.optimizer_net = torch.optim.Adam(self.parameters, lr=lr, betas=(beta1, 0.999))
            self._set_mode()
        else:
            self.net.eval()
        if printNet:
            from .compat import print_network
            print_network(self.net)

    def _build(self, model, net, colorspace, pnet_rand, pnet_tune, model_path, spatial,
               is_train, version, impl, verbose):
        if model == "lpips":  # pretrained backbone + (trainable) linear layers
            return LPIPS(pretrained=not is_train, net=net, version=version, lpips=True,
                         spatial=spatial, pnet_rand=pnet_rand, pnet_tune=pnet_tune,
                         use_dropout=True, model_path=model_path, eval_mode=not is_train,
                         verbose=verbose, impl=impl)
        if model == "baseline":  # the backbone's unweighted distance
            return LPIPS(pnet_rand=pnet_rand, net=net, lpips=False, verbose=verbose, impl=impl)
        if model in ("L2", "l2"):
            self.model_name = "L2"
            return L2(use_gpu=self.use_gpu, colorspace=colorspace)
        if model in ("DSSIM", "dssim", "SSIM", "ssim"):
            self.model_name = "SSIM"
            return DSSIM(use_gpu=self.use_gpu, colorspace=colorspace)
        raise ValueError(f"model must be 'lpips', 'baseline', 'L2' or 'SSIM', got {model!r}")

    def _set_mode(self):
        """Train mode (dropout active) or eval mode (no dropout: LPIPS takes the fused
        head); the lin weights train either way (their requires_grad)."""
        self.net.train(self.dropout)

    def forward(self, in0, in1, retPerLayer=False):
        """Distances between image batches in0, in1 (N x 3 x H x W in [-1, 1])."""
        return self.net(in0, in1, retPerLayer=retPerLayer)

    # --- training -----------------------------------------------------------------------------

    def set_input(self, data):
        """A batch as the BAPPS 2AFC loader gives it: ref, p0, p1 images and judge (the
        fraction of people who chose p1, N x 1 x 1 x 1 or N)."""
        missing = [k for k in ("ref", "p0", "p1", "judge") if k not in data]
        if missing:
            raise KeyError(f"set_input: the batch has no {', '.join(missing)}")
        self.input_ref, self.input_p0, self.input_p1, self.input_judge = (
            data[k].to(self.device) for k in ("ref", "p0", "p1", "judge"))
        # the official Trainer asks gradients of the images too (its Variables); nothing
        # reads them, and without them the backbone backward stops at the lin layers
        self.var_ref, self.var_p0, self.var_p1 = self.input_ref, self.input_p0, self.input_p1

    def forward_train(self):
        self.d0 = self.forward(self.var_ref, self.var_p0)
        self.d1 = self.forward(self.var_ref, self.var_p1)
        self.acc_r = self.compute_accuracy(self.d0, self.d1, self.input_judge)
        self.var_judge = (1. * self.input_judge).view(self.d0.size())
        self.loss_total = self.rankLoss(self.d0, self.d1, self.var_judge * 2. - 1.)
        return self.loss_total

    def backward_train(self):
        torch.mean(self.loss_total).backward()

    def optimize_parameters(self):
        if not self.is_train:
            raise RuntimeError("optimize_parameters needs a Trainer initialized with "
                               "is_train=True")
        self.forward_train()
        self.optimizer_net.zero_grad()
        self.backward_train()
        self.optimizer_net.step()
        self.clamp_weights()

    def clamp_weights(self):
        """Every 1x1 convolution of the LPIPS net (the lin layers; with pnet_tune also
        SqueezeNet's) clamped to >= 0, as upstream: distances stay non-negative."""
        with torch.no_grad():
            for module in self.net.modules():
                if hasattr(module, "weight") and getattr(module, "kernel_size", None) == (1, 1):
                    module.weight.clamp_(min=0)

    @staticmethod
    def compute_accuracy(d0, d1, judge):
        """Per sample: the fraction of people who agree with 'd1 < d0 means p1 is closer'."""
        d1_lt_d0 = (d1 < d0).cpu().numpy().flatten()
        judge_per = judge.cpu().numpy().flatten()
        return d1_lt_d0 * judge_per + (1 - d1_lt_d0) * (1 - judge_per)

    def get_current_errors(self):
        return OrderedDict([("loss_total", float(np.mean(self.loss_total.detach().cpu().numpy()))),
                            ("acc_r", float(np.mean(self.acc_r)))])

    def get_current_visuals(self):
        """ref, p0, p1 of the first sample as uint8 H x W x 3, enlarged to 256 pixels high by
        nearest-neighbour sampling (upstream: scipy's zoom with order=0, whose output pixel o
        of n_out reads input pixel o * (n_in - 1) / (n_out - 1), rounded)."""
        factor = 256 / self.var_ref.shape[2]

        def index(n_in):
            n_out = round(n_in * factor)
            pos = np.arange(n_out) * ((n_in - 1) / max(n_out - 1, 1))
            return np.minimum(np.floor(pos + 0.5).astype(int), n_in - 1)

        def vis(x):
            img = tensor2im(x.detach())
            return img[index(img.shape[0])][:, index(img.shape[1])]
        return OrderedDict([("ref", vis(self.var_ref)), ("p0", vis(self.var_p0)),
                            ("p1", vis(self.var_p1))])

    def save(self, path, label):
        """`{label}_net_.pth` (the LPIPS state_dict: `LPIPS(model_path=...)` loads it) and
        `{label}_net_rank.pth` (the ranking net), as upstream."""
        self.save_network(self.net, path, "", label)
        self.save_network(self.rankLoss.net, path, "rank", label)

    def save_network(self, network, path, network_label, epoch_label):
        torch.save(network.state_dict(),
                   os.path.join(path, f"{epoch_label}_net_{network_label}.pth"))

    def update_learning_rate(self, nepoch_decay):
        """Linear decay: lr drops by the initial lr / nepoch_decay per call."""
        lr = self.old_lr - self.lr / nepoch_decay
        for group in self.optimizer_net.param_groups:
            group["lr"] = lr
        print(f"update lr decay: {self.old_lr:f} -> {lr:f}")
        self.old_lr = lr


# --- scoring ----------------------------------------------------------------------------------

def _batches(data_loader):
    """The batches of an official CustomDatasetDataLoader (load_data()) or any iterable."""
    return data_loader.load_data() if hasattr(data_loader, "load_data") else data_loader


def progress_bar(it, name, progress=None):
    """A tqdm bar on stderr: progress True, False, or None (only on a terminal)."""
    if progress is False:
        return it
    from tqdm import tqdm
    return tqdm(it, desc=name, file=sys.stderr, leave=False, disable=None if progress is None
                else False)


def _numbers(x):
    x = x.detach().cpu() if torch.is_tensor(x) else x
    return np.asarray(x, dtype=np.float64).flatten().tolist()


def score_2afc_dataset(data_loader, func, name="", progress=None):
    """2AFC score: the mean fraction of people `func` agrees with. Returns (score,
    dict(d0s, d1s, gts, scores)) as upstream; a tie counts one half. data_loader: upstream's
    loader (load_data()) or any iterable of batches; progress: see progress_bar."""
    d0s, d1s, gts = [], [], []
    for data in progress_bar(_batches(data_loader), name, progress):
        d0s += _numbers(func(data["ref"], data["p0"]))
        d1s += _numbers(func(data["ref"], data["p1"]))
        gts += _numbers(data["judge"])
    d0s, d1s, gts = np.array(d0s), np.array(d1s), np.array(gts)
    scores = (d0s < d1s) * (1. - gts) + (d1s < d0s) * gts + (d1s == d0s) * .5
    return np.mean(scores), dict(d0s=d0s, d1s=d1s, gts=gts, scores=scores)


def score_jnd_dataset(data_loader, func, name="", progress=None):
    """JND score: the average precision of 'small distance means judged the same'. Returns
    (score, dict(ds, sames)) as upstream. func may return N or N x 1 x 1 x 1 distances (both
    flattened; upstream's only works with N)."""
    ds, sames = [], []
    for data in progress_bar(_batches(data_loader), name, progress):
        ds += _numbers(func(data["p0"], data["p1"]))
        sames += _numbers(data["same"])
    ds, sames = np.array(ds), np.array(sames)
    order = np.argsort(ds)
    same_sorted = sames[order]
    tps = np.cumsum(same_sorted)
    fps = np.cumsum(1 - same_sorted)
    fns = np.sum(same_sorted) - tps
    return voc_ap(tps / (tps + fns), tps / (tps + fps)), dict(ds=ds, sames=sames)
