"""`LPIPS`: a drop-in for `lpips.LPIPS` 0.1.4 (same arguments, values, outputs, state_dict)."""
from __future__ import annotations

import contextlib
import numbers
import warnings

import torch
from torch import nn

from . import _torch_hooks, checks, reference, tiling
from .backbones import NETS, Backbone, canonical
# check_images, parse_bytes: also imported from here (their home before checks.py)
from .checks import check_images, nan_if_too_small, parse_bytes  # noqa: F401
from .weights import lin_weights_path, load_lin_weights, resolve_backbone

IMPLS = ("auto", "fused", "reference")
# The backbone's autocast dtype per `precision`; precision=None (the default) follows the
# caller: an enclosing torch.autocast applies, else float32.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Inputs up to this many pixels per image take the all-layer head (one launch) even without
# autograd: their features are small, so keeping all layers alive costs little memory.
ONE_LAUNCH_MAX_PIXELS = 256 * 256


def read_lins(path, net: str) -> list[torch.Tensor]:
    """The lin layers' weights of `net` from a file (a released set, `lpips-fast train`'s
    output, a Trainer's or LPIPS's state_dict: keys `linK.model.*.weight`), one tensor per
    layer. A file that is not one is a one-line ValueError naming it."""
    sd = load_lin_weights(path)
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: not a lin weight file (it holds a {type(sd).__name__}, "
                         "not a state_dict)")
    out = []
    for k, c in enumerate(NETS[canonical(net)][2]):
        matches = [v for key, v in sd.items() if isinstance(key, str)
                   and key.startswith(f"lin{k}.model.") and key.endswith(".weight")]
        if len(matches) != 1 or not isinstance(matches[0], torch.Tensor):
            raise ValueError(f"{path}: not a lin weight file of LPIPS (expected one tensor "
                             f"'lin{k}.model.*.weight', found {len(matches)})")
        if matches[0].numel() != c:
            raise ValueError(f"{path}: lin{k} has {matches[0].numel()} channel weights, but "
                             f"{canonical(net)}'s layer {k + 1} has {c} channels (lin weights "
                             "of another net?)")
        out.append(matches[0])
    return out


class ScalingLayer(nn.Module):
    """v0.1's input scaling (x - shift) / scale, with upstream's buffer names."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-.030, -.088, -.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([.458, .448, .450])[None, :, None, None])

    def forward(self, x):
        # Divided in place: the subtraction's result is a fresh tensor, so the same arithmetic
        # (bit for bit) without a second whole-image temporary. Preparing a pair held three
        # image copies at once, the peak of a tiled 4096x4096 alex forward (docs/python.md).
        return (x - self.shift).div_(self.scale)


class NetLinLayer(nn.Module):
    """Dropout (optional) + 1x1 conv without bias: the learned channel weights of a layer.
    The official signature (chn_in, chn_out=1, use_dropout=False)."""

    def __init__(self, chn_in: int, chn_out: int = 1, use_dropout: bool = False):
        super().__init__()
        layers = [nn.Dropout()] if use_dropout else []
        self.model = nn.Sequential(*layers, nn.Conv2d(chn_in, chn_out, 1, bias=False))

    @property
    def weight(self) -> torch.Tensor:
        return self.model[-1].weight

    def forward(self, x):
        return self.model(x)


def _autocast(device_type, dtype=None, enabled=True):
    """torch.autocast, or nothing on the meta device, which autocast does not know (shapes
    are all that runs there)."""
    if device_type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


def _fused_ops():
    """The compiled ops module, or None (with the reason) when the extension is not built."""
    try:
        from . import _ops
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"
    return (_ops, None) if _ops.available() else (None, _ops.load_error)


_warned_fallback = False


def _select_head(impl: str):
    """The (per-layer head, all-layer head) pair of functions for `impl`."""
    global _warned_fallback
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return reference.head, reference.head_all
    ops, why = _fused_ops()
    if ops is not None:
        return ops.head, ops.head_all
    if impl == "fused":
        raise RuntimeError(f"impl='fused' but the lpips_fast extension is not available ({why}). "
                           "Build it with `pip install --no-build-isolation -e .`.")
    if not _warned_fallback:
        warnings.warn(f"lpips_fast: compiled kernels not available ({why}); using the "
                      "pure-PyTorch reference head (same values, slower).", stacklevel=3)
        _warned_fallback = True
    return reference.head, reference.head_all


def recording_graph() -> bool:
    """True while torch.jit.trace, torch.onnx.export or torch.export records a graph. The
    model then runs the reference head: the recorded graph holds standard ops only, so it
    loads without the extension and ONNX can express it (torch.compile keeps the fused
    ops; it only records them to run them in the same process)."""
    return (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
            or _torch_hooks.is_exporting())


class LPIPS(nn.Module):
    """Learned Perceptual Image Patch Similarity, with the official module's interface.

    Arguments as in `lpips.LPIPS`. Differences, all deliberate:
    - parameters are frozen unless asked otherwise: the backbone trains with pnet_tune=True,
      the lin layers with eval_mode=False (upstream leaves lin weights trainable always);
    - pretrained lin weights load also with use_dropout=False (upstream's key mismatch
      silently leaves them random there);
    - the gradient at an all-zero feature vector is finite (upstream: NaN);
    - dropout acts in train mode only while the lin layers train (eval_mode=False, or their
      requires_grad set): train() on a parent module leaves a frozen LPIPS deterministic;
    - N x 1 x H x W inputs are broadcast to 3 channels also with version='0.0'.
    Extra keyword-only arguments: impl ('auto', 'fused', 'reference') picks the head;
    backbone_path names a backbone weight file (see `lpips_fast.weights`); precision: None
    (default) runs the backbone as the caller does (under an enclosing torch.autocast in its
    dtype, else float32), 'fp32' forces float32 even inside autocast, 'bf16' / 'fp16' run it
    under autocast to that dtype; the head always accumulates in float32 (float64 inputs: float64);
    tile_size (input pixels) or memory_budget (bytes, or a string such as '16GiB') splits
    large images into exact overlapping tiles (see `lpips_fast.tiling`); both attributes
    can also be set after construction; channels_last (default True) runs the backbone in
    NHWC memory format, which the fused head reads without copies.
    """

    def __init__(self, pretrained=True, net="alex", version="0.1", lpips=True, spatial=False,
                 pnet_rand=False, pnet_tune=False, use_dropout=True, model_path=None,
                 eval_mode=True, verbose=True, *, impl="auto", backbone_path=None,
                 precision=None, tile_size=None, memory_budget=None, channels_last=True):
        super().__init__()
        if version not in ("0.1", "0.0"):
            raise ValueError(f"version must be '0.1' or '0.0', got {version!r}")
        self.pnet_type, self.version = canonical(net), version
        self.pnet_tune, self.pnet_rand = pnet_tune, pnet_rand
        self.spatial, self.lpips, self.use_dropout = spatial, lpips, use_dropout
        self.impl = impl                    # selects the head (the property below)
        self.precision = precision          # validated by the property below
        self.tile_size = tile_size          # validated by the properties below
        self.memory_budget = memory_budget
        self._range_checked = False
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
        self.channels_last = channels_last
        if channels_last:  # NHWC convolutions: 1.2-1.3x on this CPU for large images
            self.net.to(memory_format=torch.channels_last)

        if lpips:
            # Registered twice (lin0.. and lins.0..) exactly as upstream, so checkpoints and
            # state_dict keys move both ways.
            for k, c in enumerate(self.chns):
                setattr(self, f"lin{k}", NetLinLayer(c, use_dropout=use_dropout))
            self.lins = nn.ModuleList([getattr(self, f"lin{k}") for k in range(self.L)])
            if pretrained:
                self._load_lins(model_path or lin_weights_path(self.pnet_type, version), verbose)
            self.lins.requires_grad_(not eval_mode)
        if eval_mode:
            self.eval()

    @property
    def impl(self):
        """The head's implementation: 'auto', 'fused' or 'reference'. Setting it selects the
        head again (as a plain attribute, a later `model.impl = ...` changed nothing)."""
        return self._impl

    @impl.setter
    def impl(self, value):
        self._head, self._head_all = _select_head(value)
        self._impl = value

    @property
    def backbone_impl(self):
        """How the backbone's conv + ReLU pairs run: None (LPIPS_FAST_BACKBONE, default
        'eager'), 'eager' or 'fused' (see lpips_fast.backbones.Backbone.impl)."""
        return self.net.impl

    @backbone_impl.setter
    def backbone_impl(self, value):
        self.net.impl = value

    @property
    def precision(self):
        """The backbone's precision: None (follow the caller's autocast), 'fp32', 'bf16', 'fp16'."""
        return self._precision

    @precision.setter
    def precision(self, value):
        if value is not None and not (isinstance(value, str) and value in PRECISIONS):
            raise ValueError(f"precision must be None (follow the caller's autocast) or one of "
                             f"{sorted(PRECISIONS)}, got {value!r}")
        self._precision = value

    @property
    def tile_size(self):
        """Tile core size in input pixels, or None (see memory_budget)."""
        return self._tile_size

    @tile_size.setter
    def tile_size(self, value):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                                  or value < 1):
            raise ValueError(f"tile_size must be a positive whole number of input pixels (or "
                             f"None), got {value!r}")
        self._tile_size = None if value is None else int(value)

    @property
    def memory_budget(self):
        """Bytes the tiled forward may use, or None; set as a number or a string ('16GiB')."""
        return self._memory_budget

    @memory_budget.setter
    def memory_budget(self, value):
        self._memory_budget = parse_bytes(value, "memory_budget")

    def _load_lins(self, path, verbose):
        if verbose:
            print(f"Loading model from: {path}")
        found = read_lins(path, self.pnet_type)
        with torch.no_grad():
            for lin, w in zip(self.lins, found):
                lin.weight.copy_(w.reshape(lin.weight.shape))

    # --- forward -----------------------------------------------------------------------------

    def forward(self, in0, in1, retPerLayer=False, normalize=False):
        out = self._score(in0, in1, retPerLayer, normalize)
        return nan_if_too_small(out, in0, self.pnet_type) if recording_graph() else out

    def _score(self, in0, in1, retPerLayer, normalize):
        in0, in1 = self._prepare(in0, in1, normalize)
        out_size = tuple(in0.shape[2:]) if self.spatial else None
        tile = self._tile(in0, in1)
        if tile is not None:
            heads = tiling.tiled_heads(self, in0, in1, tile, out_size is not None)
        elif self._one_launch(in0, in1):
            f0s, f1s = zip(*self._features(in0, in1))
            weights = [lin.weight for lin in self.lins] if self.lpips else [None] * self.L
            head_all = reference.head_all if recording_graph() else self._head_all
            values, maps = head_all(f0s, f1s, weights, return_map=out_size is not None)
            if out_size is None and not retPerLayer and values.dtype == torch.float32:
                # One launch instead of L - 1 adds. In float64 the sum of L float32 values is
                # exact (unless they span over 2^27), so the result does not depend on the
                # reduction order, which torch picks by batch size: a sample scores the same
                # in any batch.
                return values.sum(0, dtype=torch.float64).view(-1, 1, 1, 1).to(in0.dtype)
            heads = list(zip(values, maps or [None] * self.L))
        else:  # streaming: each layer's head runs before the next slice
            heads = self._streaming_heads(in0, in1, out_size is not None)
        res = [(reference.upsample(d.float() if d.dtype != torch.float64 else d, out_size)
                if out_size else value.view(-1, 1, 1, 1)).to(in0.dtype) for value, d in heads]
        val = sum(res)
        return (val, res) if retPerLayer else val

    def _prepare(self, in0, in1=None, normalize=False, names=("in0", "in1")):
        """The inputs' whole preparation, one piece of code for forward and `embed` (and
        through it `lpips_fast.pairwise`): `_check_inputs`, the once-per-model range warning,
        then `preprocess`. in1=None: one set of images (embed). Returns a tuple of the
        prepared inputs."""
        inputs = (in0,) if in1 is None else (in0, in1)
        self._check_inputs(in0, inputs[-1], names)
        self._warn_if_out_of_range(in0, inputs[-1], normalize)
        return tuple(self.preprocess(x, normalize) for x in inputs)

    def preprocess(self, x, normalize=False):
        """The input mapping: [0, 1] -> [-1, 1] when normalize, then v0.1's scaling layer.
        Grey N x 1 x H x W images become 3 equal channels, as upstream's scaling layer
        broadcasts them (a view: no copy before the scaling). Inputs of another floating
        dtype than the backbone's (float16 images into a float32 model, float64 into float32)
        are first cast to it, as v0.1's float32 scaling layer already promoted float16: the
        convolutions refuse mixed dtypes."""
        dtype = next(self.net.parameters()).dtype
        if x.dtype != dtype:
            x = x.to(dtype)
        if normalize:
            x = 2 * x - 1
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.scaling_layer(x) if self.version == "0.1" else x

    def _precision_context(self, device_type):
        """The autocast state the backbone runs in: the caller's for precision=None, else
        autocast off ('fp32') or on in the precision's dtype."""
        if self.precision is None:
            return contextlib.nullcontext()
        low = PRECISIONS[self.precision]
        return _autocast(device_type, dtype=low, enabled=low is not None)

    def _backbone_dtype(self, x):
        """The dtype of the backbone's features for inputs x (autocast leaves float64 alone)."""
        low = PRECISIONS.get(self.precision)
        if self.precision is None and x.device.type != "meta" and torch.is_autocast_enabled(
                x.device.type):
            low = torch.get_autocast_dtype(x.device.type)
        return x.dtype if low is None or x.dtype == torch.float64 else low

    def features(self, x):
        """Yield each layer's features of preprocessed images x, one slice at a time, under
        the model's precision: the caller consumes a layer before the next is computed, so
        without autograd only one stage's activations are alive ("streaming")."""
        x, context = self._backbone_input(x)
        for tap in self.net.taps(x, context):  # (slices run eager or fused: backbone_impl)
            yield tap  # (a loop, not `yield from`: as _features says, for dynamo 2.6)

    def _backbone_input(self, x):
        """(x in the backbone's memory format, the context its slices run in)."""
        if self.channels_last and not _torch_hooks.functorch_active():
            x = x.contiguous(memory_format=torch.channels_last)  # (vmap cannot: layout only)
        device_type = x.device.type
        return x, lambda: self._precision_context(device_type)

    def _features(self, in0, in1):
        """Yield (f0, f1) per layer: one backbone pass over the pair when both inputs need
        the same gradient mode (fewer, larger convolutions), two passes in step otherwise
        (no input gradient for the input that needs none). One pass for a training pair was
        measured too: no faster for alex at 64x64, 1.6x slower for vgg at 256x256 (H100,
        benchmarks/results/nvidia-h100-80gb-hbm3-tune.md)."""
        if in0.requires_grad != in1.requires_grad:
            # a loop, not `yield from zip(...)`: dynamo of torch 2.6 and 2.8 cannot send into a
            # zip (torch.compile(fullgraph=True) broke the graph there)
            for pair in zip(self.features(in0), self.features(in1)):
                yield pair
            return
        n0 = in0.shape[0]
        for f in self.features(torch.cat([in0, in1])):
            yield f[:n0], f[n0:]

    def _streaming_heads(self, in0, in1, want_map):
        """Each layer's head, run before the next slice. Where `_heads_fusable`, a layer whose
        tap no max-pool follows takes its head from its last conv's epilogue
        (Backbone.taps_and_heads), the others run `_layer` on the tap's halves."""
        if not self._heads_fusable(in0, in1):
            return [self._layer(k, f0, f1, want_map)
                    for k, (f0, f1) in enumerate(self._features(in0, in1))]
        weights = [lin.weight for lin in self.lins] if self.lpips else [None] * self.L
        x, context = self._backbone_input(torch.cat([in0, in1]))
        n0, heads = in0.shape[0], []
        for k, (tap, head) in enumerate(self.net.taps_and_heads(x, weights, want_map, context)):
            heads.append(head if head is not None else self._layer(k, tap[:n0], tap[n0:],
                                                                    want_map))
        return heads

    def _heads_fusable(self, in0, in1):
        """Backbone impl "fused-head" with the fused ops taken, the compiled head (not the
        reference), one backbone pass over two equal batches (as `_features` runs it) and no
        dropout: the head may be taken from a conv's epilogue (Backbone.taps_and_heads)."""
        from . import _ops
        return (in0.requires_grad == in1.requires_grad and in0.shape[0] == in1.shape[0]
                and not self._dropout_active() and not recording_graph()
                and self._head is _ops.head and self.net.heads_fusable(in0))

    def _one_launch(self, in0, in1):
        """All layers' heads in one op when the features are alive anyway (autograd keeps
        them) or small (training-size images), where launch overhead dominates; streaming
        per layer otherwise, to free each layer's features as soon as it is consumed."""
        if self._dropout_active():
            return False
        if recording_graph():
            # No branch on the image size in a recorded graph: torch.export would keep it as
            # a guard (H * W <= 256 * 256), and its program would refuse larger images. The
            # streaming order frees each layer's features after its head in any runtime.
            return False
        recording = torch.is_grad_enabled() and (
            in0.requires_grad or in1.requires_grad or any(p.requires_grad for p in self.parameters()))
        return recording or in0.shape[2] * in0.shape[3] <= ONE_LAUNCH_MAX_PIXELS

    def _layer(self, k, f0, f1, want_map):
        """One layer's head: (per-sample value N, map N x 1 x h x w or None)."""
        weight = self.lins[k].weight if self.lpips else None
        if self._dropout_active():
            # Dropout acts on the squared differences before the 1x1 conv: upstream's order,
            # on an NCHW tensor so its random mask is drawn in upstream's element order. In
            # float32 like the other heads, also under an enclosing autocast.
            if f0.dtype in (torch.float16, torch.bfloat16):
                f0, f1 = f0.float(), f1.float()
            with _autocast(f0.device.type, enabled=False):
                d = self.lins[k](((reference.normalize(f0) - reference.normalize(f1)) ** 2)
                                 .contiguous())
            return d.mean(dim=(1, 2, 3)), d
        head = reference.head if recording_graph() else self._head
        return head(f0, f1, weight, return_map=want_map)

    def _dropout_active(self):
        """Dropout acts only in train mode on lin layers that train: a frozen LPIPS (the
        default) inside a parent module in train() stays deterministic."""
        return (self.training and self.lpips and self.use_dropout
                and any(p.requires_grad for p in self.lins.parameters()))

    def embed(self, x, normalize=False):
        """Per-layer sqrt(w)-scaled normalized features of images x: LPIPS between two
        images is the distance of their embeddings (see `lpips_fast.embed`)."""
        from .embed import embed
        return embed(self, x, normalize=normalize)

    # --- exact tiling (tiling.py: the geometry and the tiled forward) ------------------------

    def _tile(self, in0, in1):
        """The tile core size for these inputs, or None to run untiled."""
        return tiling.tile_for(self, in0, in1, recording_graph)

    def _warn_if_out_of_range(self, in0, in1, normalize):
        """One warning per model when the first call's inputs are very likely in the wrong
        range. Only the first call is looked at: the look costs a device sync. Never while
        compiling, recording a graph (export, trace), under torch.func transforms (vmap
        cannot read values) or capturing a CUDA graph."""
        if (torch.compiler.is_compiling() or self._range_checked or recording_graph()
                or _torch_hooks.functorch_active()):
            return
        if in0.device.type == "meta" or 0 in (in0.numel(), in1.numel()) or (
                in0.is_cuda and torch.cuda.is_current_stream_capturing()):
            return
        self._range_checked = True
        checks.warn_if_out_of_range(in0, in1, normalize)

    def _check_inputs(self, in0, in1, names=("in0", "in1")):
        """`checks.check_pair` for this model: every message names the inputs as the caller
        calls them (`names`: forward's in0, in1; the metric's img0, img1; embed's x twice)."""
        checks.check_pair(in0, in1, names, next(self.net.parameters()).device, self.pnet_type)


# The functional API's names, also imported from here (their home before functional.py). At
# the end: functional.py imports LPIPS from this module.
from .functional import REDUCTIONS, _cache, lpips  # noqa: E402,F401
