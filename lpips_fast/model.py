"""`LPIPS`: a drop-in for `lpips.LPIPS` 0.1.4 (same arguments, values, outputs, state_dict)."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from . import reference
from .backbones import Backbone, canonical, min_input_size
from .weights import lin_weights_path, load_lin_weights, resolve_backbone

IMPLS = ("auto", "fused", "reference")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class ScalingLayer(nn.Module):
    """v0.1's input scaling (x - shift) / scale, with upstream's buffer names."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-.030, -.088, -.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([.458, .448, .450])[None, :, None, None])

    def forward(self, x):
        return (x - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """Dropout (optional) + 1x1 conv without bias: the learned channel weights of a layer."""

    def __init__(self, channels: int, use_dropout: bool = False):
        super().__init__()
        layers = [nn.Dropout()] if use_dropout else []
        self.model = nn.Sequential(*layers, nn.Conv2d(channels, 1, 1, bias=False))

    @property
    def weight(self) -> torch.Tensor:
        return self.model[-1].weight

    def forward(self, x):
        return self.model(x)


def _fused_ops():
    """The compiled ops module, or None (with the reason) when the extension is not built."""
    try:
        from . import _ops
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"
    return (_ops, None) if _ops.available() else (None, _ops.load_error)


_warned_fallback = False


def _select_head(impl: str):
    global _warned_fallback
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return reference.head
    ops, why = _fused_ops()
    if ops is not None:
        return ops.head
    if impl == "fused":
        raise RuntimeError(f"impl='fused' but the lpips_fast extension is not available ({why}). "
                           "Build it with `pip install --no-build-isolation -e .`.")
    if not _warned_fallback:
        warnings.warn(f"lpips_fast: compiled kernels not available ({why}); using the "
                      "pure-PyTorch reference head (same values, slower).", stacklevel=3)
        _warned_fallback = True
    return reference.head


class LPIPS(nn.Module):
    """Learned Perceptual Image Patch Similarity, with the official module's interface.

    Arguments as in `lpips.LPIPS`. Differences, all deliberate:
    - parameters are frozen unless asked otherwise: the backbone trains with pnet_tune=True,
      the lin layers with eval_mode=False (upstream leaves lin weights trainable always);
    - pretrained lin weights load also with use_dropout=False (upstream's key mismatch
      silently leaves them random there);
    - the gradient at an all-zero feature vector is finite (upstream: NaN).
    Extra keyword-only arguments: impl ('auto', 'fused', 'reference') picks the head;
    backbone_path names a backbone weight file (see `lpips_fast.weights`); precision
    ('fp32' exact, 'bf16', 'fp16') runs the backbone under autocast, the head in float32.
    """

    def __init__(self, pretrained=True, net="alex", version="0.1", lpips=True, spatial=False,
                 pnet_rand=False, pnet_tune=False, use_dropout=True, model_path=None,
                 eval_mode=True, verbose=True, *, impl="auto", backbone_path=None,
                 precision="fp32"):
        super().__init__()
        if version not in ("0.1", "0.0"):
            raise ValueError(f"version must be '0.1' or '0.0', got {version!r}")
        self.pnet_type, self.version = canonical(net), version
        self.pnet_tune, self.pnet_rand = pnet_tune, pnet_rand
        self.spatial, self.lpips, self.use_dropout = spatial, lpips, use_dropout
        self.impl = impl
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self._head = _select_head(impl)
        self.scaling_layer = ScalingLayer()
        self.net = Backbone(self.pnet_type)
        self.chns, self.L = self.net.channels, self.net.n_slices
        if verbose:
            print(f"Setting up [{'LPIPS' if lpips else 'baseline'}] perceptual loss: trunk "
                  f"[{self.pnet_type}], v[{version}], spatial [{'on' if spatial else 'off'}]")
        if not pnet_rand:
            found = resolve_backbone(self.pnet_type, backbone_path)
            self.net.load_state_dict(found.state_dict)
            if verbose:
                print(f"Loaded backbone weights from {found.source}: {found.location}")
        self.net.requires_grad_(pnet_tune)

        if lpips:
            # Registered twice (lin0.. and lins.0..) exactly as upstream, so checkpoints and
            # state_dict keys move both ways.
            for k, c in enumerate(self.chns):
                setattr(self, f"lin{k}", NetLinLayer(c, use_dropout))
            self.lins = nn.ModuleList([getattr(self, f"lin{k}") for k in range(self.L)])
            if pretrained:
                self._load_lins(model_path or lin_weights_path(self.pnet_type, version), verbose)
            self.lins.requires_grad_(not eval_mode)
        if eval_mode:
            self.eval()

    def _load_lins(self, path, verbose):
        if verbose:
            print(f"Loading model from: {path}")
        sd = load_lin_weights(path)
        for k, lin in enumerate(self.lins):
            matches = [v for key, v in sd.items()
                       if key.startswith(f"lin{k}.model.") and key.endswith(".weight")]
            if len(matches) != 1:
                raise KeyError(f"{path}: expected one weight for lin{k}, found {len(matches)}")
            with torch.no_grad():
                lin.weight.copy_(matches[0].reshape(lin.weight.shape))

    # --- forward -----------------------------------------------------------------------------

    def forward(self, in0, in1, retPerLayer=False, normalize=False):
        self._check_inputs(in0, in1)
        if normalize:  # inputs in [0, 1]
            in0, in1 = 2 * in0 - 1, 2 * in1 - 1
        if self.version == "0.1":
            in0, in1 = self.scaling_layer(in0), self.scaling_layer(in1)
        low = PRECISIONS[self.precision]
        with torch.autocast(in0.device.type, dtype=low, enabled=low is not None):
            feats0, feats1 = self._features(in0, in1)
        out_size = tuple(in0.shape[2:]) if self.spatial else None
        res = [self._layer(k, f0, f1, out_size).to(in0.dtype)
               for k, (f0, f1) in enumerate(zip(feats0, feats1))]
        val = sum(res)
        return (val, res) if retPerLayer else val

    def _features(self, in0, in1):
        """Both images' features: one backbone pass over the pair when both need the same
        gradient mode (fewer, larger convolutions), two passes otherwise."""
        if in0.requires_grad == in1.requires_grad:
            n0 = in0.shape[0]
            outs = self.net(torch.cat([in0, in1]))
            return [f[:n0] for f in outs], [f[n0:] for f in outs]
        return self.net(in0), self.net(in1)

    def _layer(self, k, f0, f1, out_size):
        weight = self.lins[k].weight if self.lpips else None
        if self.lpips and self.use_dropout and self.training:
            # Dropout acts on the squared differences before the 1x1 conv: upstream's order.
            diff = (reference.normalize(f0) - reference.normalize(f1)) ** 2
            d = self.lins[k](diff)
            value = d.mean(dim=(1, 2, 3))
        else:
            value, d = self._head(f0, f1, weight, return_map=out_size is not None)
        if out_size is not None:
            return reference.upsample(d.float() if d.dtype != torch.float64 else d, out_size)
        return value.view(-1, 1, 1, 1)

    def _check_inputs(self, in0, in1):
        for name, x in (("in0", in0), ("in1", in1)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"{name} must be N x 3 x H x W (RGB), got shape {tuple(x.shape)}")
            if not x.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if in0.device != in1.device:
            raise ValueError(f"in0 is on {in0.device} but in1 is on {in1.device}")
        if in0.shape[2:] != in1.shape[2:]:
            raise ValueError(f"in0 and in1 differ in size: {tuple(in0.shape[2:])} vs "
                             f"{tuple(in1.shape[2:])}")
        if in0.shape[0] != in1.shape[0] and 1 not in (in0.shape[0], in1.shape[0]):
            raise ValueError(f"batch sizes {in0.shape[0]} and {in1.shape[0]} do not broadcast "
                             "(they must be equal, or one of them 1)")
        smallest = min_input_size(self.pnet_type)
        if min(in0.shape[2:]) < smallest:
            raise ValueError(f"images of {tuple(in0.shape[2:])} pixels are too small for net "
                             f"{self.pnet_type!r}: it needs at least {smallest} x {smallest}")


_cache: dict = {}


def lpips(x0, x1, net="alex", version="0.1", normalize=False, spatial=False, retPerLayer=False,
          **kwargs):
    """Functional LPIPS: builds the module once per (net, version, device, dtype, options)."""
    key = (canonical(net), version, x0.device, x0.dtype, spatial, tuple(sorted(kwargs.items())))
    if key not in _cache:
        model = LPIPS(net=net, version=version, spatial=spatial, verbose=False, **kwargs)
        _cache[key] = model.to(device=x0.device, dtype=x0.dtype)
    return _cache[key](x0, x1, retPerLayer=retPerLayer, normalize=normalize)
