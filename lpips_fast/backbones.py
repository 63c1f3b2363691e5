"""The three LPIPS backbones, defined here without torchvision.

Each backbone is torchvision's `features` stack cut into slices exactly as the official
`lpips` package cuts it, and every layer keeps its torchvision index inside its slice
(`slice2.3` is torchvision's `features.3`). So the module's state_dict keys equal the official
LPIPS module's (`net.slice2.3.weight`), and a torchvision checkpoint loads by a key map alone.
"""
from __future__ import annotations

import contextlib
import os
from collections import namedtuple

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from . import _torch_hooks

# How the backbone runs each conv + ReLU pair: "eager" (its modules: conv with bias, ReLU) or
# "fused" (lpips_fast._conv_ops: bias-free conv, one bias + ReLU pass; its backward one mask
# pass + one convolution_backward; a pair followed by a max-pool also computes the pool in
# that pass, and its backward the pool's, the mask and + the tap's gradient in one). The
# default stays "eager" until a GPU run has measured which wins (benchmarks/bench_backbone.py, benchmarks/GPU_NOTES.md "Fused backbone"); on the
# CPU eager already fuses the bias into oneDNN's convolution, so "fused" only adds a pass.
# "fused-head": "fused", and in an LPIPS model's streaming forward (large images without
# autograd, no dropout) a slice that ends in a conv + ReLU with no max-pool after it (alex
# relu3-5, vgg relu5_3) takes the layer's head from that conv's epilogue
# (lpips_fast._conv_head: y read once, the tap written once; the head no longer reads the
# tap again). Off by default until a GPU measures it (GPU_NOTES.md, "Fused backbone").
BACKBONE_IMPLS = ("eager", "fused", "fused-head")
BACKBONE_ENV = "LPIPS_FAST_BACKBONE"

# Layer specs in torchvision order: ("conv", in, out, kernel, stride, padding),
# ("relu",), ("pool", kernel, stride, ceil_mode), ("fire", in, squeeze, expand1x1, expand3x3).
_ALEX = [
    ("conv", 3, 64, 11, 4, 2), ("relu",), ("pool", 3, 2, False),
    ("conv", 64, 192, 5, 1, 2), ("relu",), ("pool", 3, 2, False),
    ("conv", 192, 384, 3, 1, 1), ("relu",),
    ("conv", 384, 256, 3, 1, 1), ("relu",),
    ("conv", 256, 256, 3, 1, 1), ("relu",),
]


def _vgg16_specs():
    specs, cin = [], 3
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]:
        if v == "M":
            specs.append(("pool", 2, 2, False))
        else:
            specs += [("conv", cin, v, 3, 1, 1), ("relu",)]
            cin = v
    return specs


_SQUEEZE = [
    ("conv", 3, 64, 3, 2, 0), ("relu",), ("pool", 3, 2, True),
    ("fire", 64, 16, 64, 64), ("fire", 128, 16, 64, 64), ("pool", 3, 2, True),
    ("fire", 128, 32, 128, 128), ("fire", 256, 32, 128, 128), ("pool", 3, 2, True),
    ("fire", 256, 48, 192, 192), ("fire", 384, 48, 192, 192),
    ("fire", 384, 64, 256, 256), ("fire", 512, 64, 256, 256),
]

# name -> (layer specs, slice boundaries as [start, stop) torchvision indices, channels,
#          torchvision checkpoint file name; its 8 hex digits start the file's SHA-256)
NETS = {
    "alex": (_ALEX, [(0, 2), (2, 5), (5, 8), (8, 10), (10, 12)],
             [64, 192, 384, 256, 256], "alexnet-owt-7be5be79.pth"),
    "vgg": (_vgg16_specs(), [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)],
            [64, 128, 256, 512, 512], "vgg16-397923af.pth"),
    "squeeze": (_SQUEEZE, [(0, 2), (2, 5), (5, 8), (8, 10), (10, 11), (11, 12), (12, 13)],
                [64, 128, 256, 384, 384, 512, 512], "squeezenet1_1-b8a52dc0.pth"),
}
ALIASES = {"vgg16": "vgg"}


class Fire(nn.Module):
    """SqueezeNet's fire module, with torchvision's attribute names."""

    def __init__(self, cin: int, squeeze: int, e1: int, e3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        x = _conv_relu(self.squeeze, self.squeeze_activation, x, fused)
        return torch.cat([_conv_relu(self.expand1x1, self.expand1x1_activation, x, fused),
                          _conv_relu(self.expand3x3, self.expand3x3_activation, x, fused)], 1)


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks)


def _fusable(conv: nn.Module, relu: nn.Module) -> bool:
    """A plain conv + ReLU pair that the fused op computes exactly: no hooks to honour
    (the op bypasses the modules' __call__), a bias, zero padding given as numbers,
    dilation 1, one group, one dtype."""
    return (type(conv) is nn.Conv2d and type(relu) is nn.ReLU and conv.bias is not None
            and conv.groups == 1 and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and conv.bias.dtype == conv.weight.dtype
            and not (_has_hooks(conv) or _has_hooks(relu)))


def _conv_relu(conv: nn.Conv2d, relu: nn.ReLU, x: torch.Tensor, fused: bool) -> torch.Tensor:
    if fused and _fusable(conv, relu):
        from . import _conv_ops
        return _conv_ops.conv_bias_relu(x, conv.weight, conv.bias, conv.stride, conv.padding)
    return relu(conv(x))


def _pool_fusable(pool: nn.Module, conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """A plain max-pool that conv_bias_relu_pool computes (padding 0, dilation 1, no indices,
    no hooks) and that has an output for conv's output size (else eager's error is raised)."""
    if not (type(pool) is nn.MaxPool2d and not _has_hooks(pool) and not pool.return_indices
            and _pair(pool.padding) == (0, 0) and _pair(pool.dilation) == (1, 1)):
        return False
    k, s = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size)
    for d in (0, 1):
        y = (x.shape[2 + d] + 2 * conv.padding[d] - conv.kernel_size[d]) // conv.stride[d] + 1
        if y < k[d]:  # no whole window (ceil mode may still have one: eager pools it)
            return False
    return True


def _conv_relu_pool(conv: nn.Conv2d, relu: nn.ReLU, pool: nn.Module, x: torch.Tensor):
    """(relu(conv(x)), pool(of it)): one fused op where it computes both exactly, else
    today's path (conv_bias_relu or the modules, then the pool module)."""
    if _fusable(conv, relu) and _pool_fusable(pool, conv, x):
        from . import _conv_ops
        return _conv_ops.conv_bias_relu_pool(x, conv.weight, conv.bias, conv.stride, conv.padding,
                                             _pair(pool.kernel_size),
                                             _pair(pool.stride or pool.kernel_size),
                                             pool.ceil_mode)
    tap = _conv_relu(conv, relu, x, True)
    return tap, pool(tap)


def _head_fusable(conv: nn.Conv2d, relu: nn.ReLU, x: torch.Tensor) -> bool:
    """A pair that conv_bias_relu_head computes: fusable, and x the pair's two equal
    batches (sample n paired with n + N)."""
    return _fusable(conv, relu) and x.shape[0] % 2 == 0


def _run_fused(block: nn.Sequential, x: torch.Tensor, skip: int = 0, next_pool=None,
               head=None):
    """A slice, less its first `skip` layers (a pool already run), with each conv + ReLU pair
    (also inside fire modules) through the fused op. next_pool: the max-pool that starts the
    next slice; when the slice ends in a conv + ReLU pair, that pair and the pool run as one
    op. head: None, or (lin weight or None, return_map) to take the LPIPS head of the slice's
    output from its last conv's epilogue where the slice ends in a conv + ReLU pair that no
    pool follows (conv_bias_relu_head; x holds the pair's two batches). Returns (the slice's
    output, the next slice's input, its layers already run, the head's (value, map) or None
    where it was not taken)."""
    layers = list(block)[skip:]
    ends_in_pair = (len(layers) >= 2 and isinstance(layers[-2], nn.Conv2d)
                    and isinstance(layers[-1], nn.ReLU))
    with_pool = next_pool is not None and ends_in_pair
    with_head = head is not None and next_pool is None and ends_in_pair
    i, end = 0, len(layers) - 2 if with_pool or with_head else len(layers)
    while i < end:
        m = layers[i]
        if isinstance(m, nn.Conv2d) and i + 1 < end and isinstance(layers[i + 1], nn.ReLU):
            x = _conv_relu(m, layers[i + 1], x, True)
            i += 2
            continue
        x = m.forward(x, fused=True) if type(m) is Fire and not _has_hooks(m) else m(x)
        i += 1
    if with_pool:
        tap, pooled = _conv_relu_pool(layers[-2], layers[-1], next_pool, x)
        return tap, pooled, 1, None
    if with_head:
        conv, relu = layers[-2], layers[-1]
        if not _head_fusable(conv, relu, x):
            x = _conv_relu(conv, relu, x, True)
            return x, x, 0, None
        from . import _conv_head
        tap, result = _conv_head.conv_bias_relu_head(x, conv.weight, conv.bias, conv.stride,
                                                     conv.padding, *head)
        return tap, tap, 0, result
    return x, x, 0, None


def _layer(spec) -> nn.Module:
    kind, *args = spec
    if kind == "conv":
        cin, cout, k, s, p = args
        return nn.Conv2d(cin, cout, k, stride=s, padding=p)
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "pool":
        k, s, ceil = args
        return nn.MaxPool2d(k, s, ceil_mode=ceil)
    return Fire(*args)


def feature_sizes(net: str, size: int) -> list[int]:
    """Each LPIPS layer's output length along an input axis of `size` pixels (0 = none)."""
    specs, bounds, _, _ = NETS[canonical(net)]
    sizes, s = [], size
    for start, stop in bounds:
        for kind, *args in specs[start:stop]:
            if s < 1:
                break
            if kind == "conv":
                s = (s + 2 * args[4] - args[2]) // args[3] + 1 if s + 2 * args[4] >= args[2] else 0
            elif kind == "pool":
                k, st, ceil = args  # PyTorch's rule: a ceil-mode window may overhang the
                out = (s - k + (st - 1 if ceil else 0)) // st + 1  # edge, but must start
                s = out - 1 if ceil and (out - 1) * st >= s else out  # inside the input
        sizes.append(max(s, 0))
    return sizes


def min_input_size(net: str) -> int:
    """Smallest H (and W) for which every layer of `net` has at least one output pixel."""
    return _MIN_SIZE[canonical(net)]


def too_small(net: str, height: int, width: int) -> str | None:
    """Why an H x W image cannot be scored by `net`, or None if it can: the one size rule
    that the module, pairwise and image loading all report."""
    smallest = min_input_size(net)
    if min(height, width) >= smallest:
        return None
    return (f"{width} x {height} pixels is too small for net {canonical(net)!r}, which needs "
            f"at least {smallest} x {smallest}")


def canonical(net: str) -> str:
    name = ALIASES.get(net, net) if isinstance(net, str) else None
    if name not in NETS:
        raise ValueError(f"net must be one of {sorted(NETS)} (or 'vgg16'), got {net!r}")
    return name


# Computed once: every forward checks its input size against it (a plain dict, which
# torch.compile traces without the warning an lru_cache would bring).
_MIN_SIZE = {name: next(s for s in range(1, 256) if min(feature_sizes(name, s)) >= 1)
             for name in NETS}


# The official package's names for the slices' outputs (lpips/pretrained_networks.py). Module
# attributes under their own names: a Backbone holds its class, and pickle (torch.save of a
# whole model, multiprocessing, deepcopy-free copies) finds classes by module and name.
AlexnetOutputs = namedtuple("AlexnetOutputs", ["relu1", "relu2", "relu3", "relu4", "relu5"])
VggOutputs = namedtuple("VggOutputs", ["relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"])
SqueezeOutputs = namedtuple("SqueezeOutputs", [f"relu{i}" for i in range(1, 8)])
OUTPUTS = {"alex": AlexnetOutputs, "vgg": VggOutputs, "squeeze": SqueezeOutputs}


class Backbone(nn.Module):
    """Runs the slices in turn and returns the output of each (the LPIPS layers)."""

    def __init__(self, net: str):
        super().__init__()
        specs, bounds, self.channels, _ = NETS[canonical(net)]
        self.n_slices = len(bounds)
        for k, (start, stop) in enumerate(bounds, 1):
            block = nn.Sequential()
            for i in range(start, stop):
                block.add_module(str(i), _layer(specs[i]))
            setattr(self, f"slice{k}", block)
        self._init_like_torchvision(canonical(net))
        self._outputs = OUTPUTS[canonical(net)]
        self.impl = None

    @property
    def impl(self):
        """None (follow the LPIPS_FAST_BACKBONE environment variable, read at every call;
        "eager" when unset), "eager", "fused" or "fused-head": how conv + ReLU pairs run
        (BACKBONE_IMPLS; "fused-head" runs the backbone as "fused")."""
        return getattr(self, "_impl", None)  # (a Backbone pickled before it had one)

    @impl.setter
    def impl(self, value):
        if value is not None and value not in BACKBONE_IMPLS:
            raise ValueError(f"backbone impl must be None or one of {BACKBONE_IMPLS}, got {value!r}")
        self._impl = value

    def resolved_impl(self) -> str:
        """The impl in force now: the attribute, else LPIPS_FAST_BACKBONE, else "eager"."""
        if self.impl is not None:
            return self.impl
        value = os.environ.get(BACKBONE_ENV, "") or "eager"
        if value not in BACKBONE_IMPLS:
            raise ValueError(f"{BACKBONE_ENV} must be one of {BACKBONE_IMPLS}, got {value!r}")
        return value

    def _fused_now(self, x: torch.Tensor) -> bool:
        """Whether this call takes the fused ops. Eager instead (same values) while a graph
        is recorded for export (jit.trace, ONNX, torch.export: the graph holds standard
        ops only, as for the head), under torch.func transforms and forward-mode AD (the
        ops' autograd is reverse mode only), and on devices without the ops' kernels."""
        if self.resolved_impl() == "eager":
            return False
        from . import _ops
        from .model import recording_graph
        if not _ops.available():
            raise RuntimeError(f"backbone impl 'fused' but the lpips_fast extension is not "
                               f"available ({_ops.load_error}); use 'eager'")
        return not (recording_graph() or _torch_hooks.functorch_active()
                    or _torch_hooks.forward_ad_level() >= 0 or not _ops.has_kernels(x.device))

    def taps(self, x: torch.Tensor, context=contextlib.nullcontext):
        """Yield each slice's output (the LPIPS layers) for x, by the impl in force, every
        slice run inside `context()` (the model's precision), the yield outside it. The fused
        impl runs a slice's last conv + ReLU with the max-pool that starts the next slice
        (conv_bias_relu_pool: the slice's output stays the ReLU's, the pool reads it from the
        same pass); the next slice then starts after its pool."""
        blocks = self.slices()
        if not self._fused_now(x):
            for block in blocks:
                with context():
                    x = block(x)
                yield x
            return
        for tap, _ in self._fused_taps(x, context, None):
            yield tap

    def taps_and_heads(self, x: torch.Tensor, weights, return_map: bool,
                       context=contextlib.nullcontext):
        """Yield (tap, head) per slice for x holding a pair's two batches (sample n paired
        with n + N), by the fused impl ("fused-head": the caller checks `heads_fusable`):
        head = (value N, map N x 1 x h x w or None) of the LPIPS head with weights[k] (None:
        the plain channel sum) where it was taken from the slice's last conv epilogue (a
        conv + ReLU that no max-pool follows), None where the caller runs the head."""
        for pair in self._fused_taps(x, context, (weights, return_map)):
            yield pair

    def heads_fusable(self, x: torch.Tensor) -> bool:
        """Whether taps_and_heads may run for x: impl "fused-head" and the fused ops taken."""
        return self.resolved_impl() == "fused-head" and self._fused_now(x)

    def _fused_taps(self, x, context, heads):
        """(tap, head or None) per slice by the fused ops (see taps and taps_and_heads)."""
        blocks, skip = self.slices(), 0
        for k, block in enumerate(blocks):
            first = blocks[k + 1][0] if k + 1 < len(blocks) else None
            head = None if heads is None else (heads[0][k], heads[1])
            with context():
                tap, x, skip, result = _run_fused(
                    block, x, skip, first if isinstance(first, nn.MaxPool2d) else None, head)
            yield tap, result

    def _init_like_torchvision(self, net: str):
        """pnet_rand=True draws the same distributions as torchvision's untrained models
        (alexnet keeps PyTorch's default; vgg and squeezenet re-initialize their convs)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and net != "alex":
                if net == "vgg":
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                else:
                    nn.init.kaiming_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def slices(self):
        return [getattr(self, f"slice{k}") for k in range(1, self.n_slices + 1)]

    def forward(self, x: torch.Tensor):
        """Each slice's output, as the official package returns them: a named tuple
        (`.relu1` ... for alex and squeeze, `.relu1_2` ... for vgg)."""
        return self._outputs(*self.taps(x))


def from_torchvision(net: str, state_dict: dict) -> dict:
    """Map a torchvision checkpoint (`features.i.*`, plus a classifier we drop) onto a
    Backbone's keys (`slice{k}.i.*`). Raises if any backbone tensor is missing."""
    _, bounds, _, _ = NETS[canonical(net)]
    slice_of = {i: k for k, (a, b) in enumerate(bounds, 1) for i in range(a, b)}
    out = {}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        if parts[0] == "features" and int(parts[1]) in slice_of:
            out[".".join([f"slice{slice_of[int(parts[1])]}"] + parts[1:])] = tensor
    with torch.device("meta"):  # only the key names are needed: allocate nothing
        expected = set(Backbone(net).state_dict())
    missing = expected - set(out)
    if missing:
        raise KeyError(f"checkpoint for {net!r} lacks {len(missing)} backbone tensors, "
                       f"e.g. {sorted(missing)[:3]}")
    return out
