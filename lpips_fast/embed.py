"""LPIPS as a distance between embeddings.

Every released set of lin weights is non-negative, so for each layer l with channel-normalized
features n (n = f / (||f|| + eps) per pixel, exactly as the head computes them)

    sum_c w_c (n0_c - n1_c)^2 = || sqrt(w) * n0 - sqrt(w) * n1 ||^2      (per pixel),

and LPIPS(x0, x1) = sum_l (1 / P_l) || E_l(x0) - E_l(x1) ||^2 with E_l = sqrt(w) * n flattened
over channels and the P_l = h_l * w_l pixels of layer l. `embed` computes the E_l of a batch once;
`distance` evaluates LPIPS from two embeddings without another backbone pass, and
`lpips_fast.pairwise` turns whole sets of embeddings into distance matrices.

lpips=False models (the "baseline" unweighted channel sum) use w = 1.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch

from . import reference
from .weights import load_tensors

FORMAT = "lpips_fast.Embedding"
FORMAT_VERSION = 1


def sqrt_weights(model) -> list[torch.Tensor | None]:
    """sqrt(w) per layer as 1 x C x 1 x 1 tensors (None for lpips=False: w = 1).

    Raises ValueError if a lin weight is negative: LPIPS is then not a squared Euclidean
    distance of any embedding (no released weight set has one).
    """
    if not model.lpips:
        return [None] * model.L
    weights = [lin.weight for lin in model.lins]
    if bool(torch.cat([w.flatten() for w in weights]).lt(0).any()):  # one host sync, not L
        k = next(k for k, w in enumerate(weights) if bool((w < 0).any()))
        raise ValueError(
            f"lin{k} has negative channel weights (min {weights[k].min().item():.4g}): LPIPS "
            "with negative weights is not a distance between embeddings, so embed/pairwise "
            "cannot compute it. Every released weight set is >= 0; use the forward pass "
            "for these weights.")
    return [w.reshape(1, -1, 1, 1).sqrt() for w in weights]


@dataclass
class Embedding:
    """Per-layer sqrt(w)-scaled normalized features of N images.

    layers[l] is N x C_l x h_l x w_l, float32 (float64 for a float64 model) whatever the
    backbone's precision, as the head computes in float32. `net`, `version`, `lpips` and
    `size` (the images' H, W) are checked before two embeddings are compared.
    """
    layers: list
    net: str
    version: str
    lpips: bool
    size: tuple
    meta: dict = field(default_factory=dict)

    # --- container ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.layers[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.layers[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].dtype

    @property
    def pixels(self) -> list[int]:
        """P_l = h_l * w_l per layer: the spatial mean's divisor."""
        return [t.shape[2] * t.shape[3] for t in self.layers]

    @property
    def dims(self) -> list[int]:
        """C_l * h_l * w_l per layer: the length of one image's flattened layer embedding."""
        return [t[0].numel() for t in self.layers]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers)

    def _like(self, layers) -> "Embedding":
        return Embedding(list(layers), self.net, self.version, self.lpips, tuple(self.size),
                         dict(self.meta))

    def __getitem__(self, index) -> "Embedding":
        """Images by index: an int (also a NumPy or 0-d tensor integer) keeps a batch of 1 and
        must be in range, as a list's; slices, lists and 1-D tensors select as in torch.
        Anything that would index inside the images (a tuple, None, a bool) is refused."""
        n = len(self)
        i = None
        if index is None or isinstance(index, (bool, str, bytes, float, tuple)):
            raise TypeError(f"Embedding indexes images only (an int, a slice, a list or a 1-D "
                            f"tensor of indices or mask), got {_describe(index)}")
        if not isinstance(index, (slice, list)) and not (
                isinstance(index, torch.Tensor) and index.dim() != 0):
            try:
                i = operator.index(index)
            except TypeError:
                i = None
        if i is not None:
            if not -n <= i < n:
                raise IndexError(f"Embedding index {i} is out of range for {n} images")
            index = slice(i % n, i % n + 1)
        try:
            layers = [t[index] for t in self.layers]
        except (IndexError, TypeError, ValueError) as e:
            raise type(e)(f"Embedding of {n} images: bad index {_describe(index)}: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if layers[0].dim() != 4:
            raise TypeError(f"Embedding indexes images only (an int, a slice, a list or a 1-D "
                            f"tensor of indices or mask), got {_describe(index)}")
        return self._like(layers)

    def to(self, *args, **kwargs) -> "Embedding":
        """As Tensor.to (device and/or dtype) for every layer."""
        return self._like(t.to(*args, **kwargs) for t in self.layers)

    def detach(self) -> "Embedding":
        return self._like(t.detach() for t in self.layers)

    def flat(self, k: int) -> torch.Tensor:
        """Layer k as an N x (C h w) matrix."""
        t = self.layers[k]
        return t.reshape(t.shape[0], -1)

    def sq_norms(self, dtype=torch.float64) -> list[torch.Tensor]:
        """||E_l||^2 per layer (N each), accumulated in `dtype`."""
        return [self.flat(k).to(dtype).pow(2).sum(1) for k in range(len(self.layers))]

    @staticmethod
    def cat(embeddings) -> "Embedding":
        """Concatenate embeddings of compatible models and image sizes along the images."""
        embeddings = list(embeddings)
        if not embeddings:
            raise ValueError("Embedding.cat needs at least one embedding")
        for k, e in enumerate(embeddings):
            if not isinstance(e, Embedding):
                raise TypeError(f"Embedding.cat: item {k} is a {type(e).__name__}, not an "
                                "Embedding")
        first = embeddings[0]
        for e in embeddings[1:]:
            check_compatible(first, e)
        return first._like(torch.cat([e.layers[k] for e in embeddings])
                           for k in range(len(first.layers)))

    # --- files -------------------------------------------------------------------------------

    def save(self, path) -> None:
        """Plain tensors and strings/ints only: `load` reads it with weights_only=True."""
        torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, "net": self.net,
                    "version": self.version, "lpips": bool(self.lpips),
                    "size": [int(s) for s in self.size],
                    "layers": [t.detach().cpu().contiguous() for t in self.layers]}, path)

    @classmethod
    def load(cls, path, map_location="cpu", mmap: bool = False) -> "Embedding":
        """Read a file written by `save` (weights_only=True: plain tensors and strings only).
        A missing file raises FileNotFoundError; a file that is truncated, corrupted, of
        another kind, or whose fields do not fit together raises ValueError naming it."""
        kwargs = {"mmap": True} if mmap else {}
        data = load_tensors(path, "lpips_fast.Embedding file", map_location, **kwargs)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a saved lpips_fast.Embedding")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: Embedding format version {data.get('format_version')} "
                             f"is not supported (this version reads {FORMAT_VERSION})")
        problem = _file_problem(data)
        if problem:
            raise ValueError(f"{path}: corrupted lpips_fast.Embedding file: {problem}")
        return cls(list(data["layers"]), data["net"], data["version"], bool(data["lpips"]),
                   tuple(data["size"]))


def _describe(index) -> str:
    """An index on one line, for an error message."""
    if isinstance(index, torch.Tensor):
        return (f"a {index.dim()}-D {index.dtype} tensor of shape {tuple(index.shape)}"
                if index.numel() > 8 or index.dim() > 1 else f"tensor({index.tolist()})")
    text = repr(index)
    return text if len(text) <= 80 else text[:77] + "..."


def _file_problem(data: dict) -> str | None:
    """Why a loaded Embedding file's fields do not describe an embedding, or None. Shapes only
    (a memory-mapped file is not read): the net's layer count, channels and feature sizes for
    the stored image size, one image count."""
    from .backbones import NETS, feature_sizes
    net, version, size, layers = (data.get(k) for k in ("net", "version", "size", "layers"))
    if net not in NETS:
        return f"net {net!r} is not one of {sorted(NETS)}"
    if version not in ("0.1", "0.0") or not isinstance(data.get("lpips"), bool):
        return f"version {version!r} / lpips {data.get('lpips')!r} are not a model's"
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(s, int) and s > 0 for s in size)):
        return f"size {size!r} is not an image size [H, W]"
    if not isinstance(layers, (list, tuple)) or not all(
            isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point()
            for t in layers):
        return "layers are not a list of floating-point N x C x h x w tensors"
    channels = NETS[net][2]
    want = [(c, h, w) for c, h, w in zip(channels, feature_sizes(net, size[0]),
                                         feature_sizes(net, size[1]))]
    got = [tuple(t.shape[1:]) for t in layers]
    if got != want:
        return f"layer shapes {got} are not {net}'s for {size[0]}x{size[1]} images {want}"
    if len({t.shape[0] for t in layers}) != 1:
        return f"layers hold different numbers of images {[t.shape[0] for t in layers]}"
    return None


def check_compatible(e0: Embedding, e1: Embedding) -> None:
    """Raise ValueError unless e0 and e1 come from the same kind of model and image size, on
    one device."""
    for e in (e0, e1):
        if not isinstance(e, Embedding):
            raise TypeError(f"expected an Embedding, got {type(e).__name__}")
    for name in ("net", "version", "lpips"):
        if getattr(e0, name) != getattr(e1, name):
            raise ValueError(f"embeddings differ in {name}: {getattr(e0, name)!r} vs "
                             f"{getattr(e1, name)!r}")
    if tuple(e0.size) != tuple(e1.size):
        raise ValueError(f"embeddings are of images of different sizes: {tuple(e0.size)} vs "
                         f"{tuple(e1.size)} (LPIPS compares images of one size)")
    if len(e0.layers) != len(e1.layers):
        raise ValueError(f"embeddings have {len(e0.layers)} and {len(e1.layers)} layers")
    if e0.device != e1.device:
        raise ValueError(f"embeddings on different devices: {e0.device} vs {e1.device} "
                         "(move one with .to(device))")


def embed(model, x: torch.Tensor, normalize: bool = False) -> Embedding:
    """Embed images x (N x 3 x H x W or grey N x 1 x H x W, in [-1, 1]; [0, 1] with
    normalize=True) with `model`. The inputs are checked, looked at for a likely wrong range
    and preprocessed by the forward's own code (`LPIPS._prepare`).

    Runs the backbone once on x with the model's precision (autocast) and streaming; the
    result keeps autograd history when x or the model's parameters need gradients.
    Tiling (tile_size / memory_budget) is not applied: the embedding of an image holds all its
    features anyway. The lin layers' dropout (train mode) is not applied either: distances of
    embeddings are the eval-mode LPIPS.
    """
    (prepared,) = model._prepare(x, normalize=normalize, names=("x", "x"))
    roots = sqrt_weights(model)
    size = tuple(x.shape[2:])
    layers = []
    for k, f in enumerate(model.features(prepared)):
        if f.dtype != torch.float64:
            f = f.float()  # the head's accumulation dtype
        n = reference.normalize(f)
        layers.append(n if roots[k] is None else n * roots[k].to(n.dtype))
    return Embedding(layers, model.pnet_type, model.version, bool(model.lpips), size)


def distance(e0: Embedding, e1: Embedding, per_layer: bool = False):
    """LPIPS from two embeddings: N x 1 x 1 x 1 like `LPIPS.forward` (N vs N, or 1 vs N).

    Computed as a difference (not the Gram expansion pairwise uses), accumulated in the
    embedding's dtype like the forward's head. per_layer=True also returns the per-layer
    values (a list of N x 1 x 1 x 1), as forward's retPerLayer.
    """
    check_compatible(e0, e1)
    n0, n1 = len(e0), len(e1)
    if n0 != n1 and 1 not in (n0, n1):
        raise ValueError(f"embedding batch sizes {n0} and {n1} do not broadcast "
                         "(they must be equal, or one of them 1)")
    res = []
    for a, b in zip(e0.layers, e1.layers):
        d = (a - b.to(a.dtype)).pow(2).sum(dim=1, keepdim=True)   # N x 1 x h x w, as the head
        res.append(d.mean(dim=(2, 3), keepdim=True))
    val = sum(res)
    return (val, res) if per_layer else val


embedding_distance = distance
