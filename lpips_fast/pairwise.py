"""All-pairs LPIPS: N + M backbone passes and matrix products instead of N * M forwards.

With E_l(x) = sqrt(w) * n_l(x) flattened (see `lpips_fast.embed`),

    LPIPS(x_i, y_j) = sum_l (a_il + b_jl - 2 E_l(x_i) . E_l(y_j)) / P_l,
    a_il = ||E_l(x_i)||^2, b_jl = ||E_l(y_j)||^2, P_l = pixels of layer l,

so a block of the matrix is one Gram product per layer.

Memory (B = block, D_l = C_l h_l w_l, D = sum_l D_l, 4-byte floats):
- the column set's embeddings, M * D * 4 bytes, are computed once and kept in memory up to
  `max_memory` (default 2 GiB); beyond that they are spilled block by block to a temporary
  directory (`spill_dir`) and read back memory-mapped, so memory stays bounded for any M;
- row embeddings are computed one block at a time (B * D * 4 bytes) and dropped after their
  row block (for y=None the rows are the stored column blocks: no second pass);
- the Gram products run per layer on float64 copies of two blocks: 2 * B * max_l D_l * 8 bytes,
  plus a B x B float64 accumulator;
- `pairwise` returns the N x M float32 matrix on the CPU (N * M * 4 bytes);
  `pairwise_rows` yields it one row block at a time instead, for files of any size.
Alex at 64x64 has D = 31,872 (~125 KiB per image); at 256x256, D = 640,128 (2.4 MiB).

Precision. The embeddings are float32 (the head's precision); the products are formed in
float64. A float32 x float32 product is exact in float64 (24 + 24 bits <= 53), so the only
error of a Gram entry is the float64 summation of K = D_l terms: |err| <= K u ||E_i|| ||E_j||
with u = 2^-53 (classic dot-product bound; blocked BLAS sums only do better). Because each
normalized pixel vector has norm <= 1, ||E_il||^2 = sum_p sum_c w_c n_c^2 <= P_l max_c w_c,
so the cancellation a + b - 2g, divided by P_l, is off by at most 4 K u max(w) per layer:
for alex at 64x64 (K = 14,400, max w = 1.33) 8.5e-12, and even a 4096x4096 VGG layer
(K ~ 1.1e9) stays below 1e-6, well inside the 1e-5 absolute target. The same bound with
float32 sums (u = 2^-24) is 4.6e-3 at 64x64: that is why the products are not float32 (and
TF32, which GPUs may use for float32 matmuls, is worse). The float32 embedding itself is
not exact either: if each entry carries a relative error r (a few roundings: norm, division,
sqrt(w) product, r ~ 3 * 2^-24), a layer's value moves by at most 8 r max(w) (using
||E_i - E_j||^2 / P <= 4 max(w)); summed over alex v0.1's layers (sum of max w = 4.0) that
worst case is 5.7e-6, with every rounding aligned against the difference vector. The forward's
own float32 head carries the same kind of error; on random and real images the observed
difference to model(x_i, y_j) is ~5e-8 (tests/test_pairwise.py, benchmarks/bench_allpairs.py).
Each layer's value is clamped at 0 (its exact value is
a squared norm: anything below 0 is rounding), so the result is never negative. For x against
itself (y=None, or y the same images) the diagonal is set to exactly 0 and the lower triangle is
the transpose of the upper one, computed once: exactly symmetric.
"""
from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import torch

from .embed import Embedding, embed

_models: dict = {}


# --- inputs -----------------------------------------------------------------------------------

def _check_no_grad(t: torch.Tensor, name: str) -> None:
    """pairwise and diversity run without autograd: a result without the gradient the caller
    asked for would only fail later, far from here."""
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad, but pairwise and diversity compute no "
                         "gradients: detach the images (or call under torch.no_grad()), or use "
                         "LPIPS.embed with lpips_fast.embedding_distance, which are differentiable")


class ImageSet:
    """The images of one side of a pairwise call, all of one size and all RGB or all grey,
    each checked as `LPIPS.forward` checks its inputs (`lpips_fast.checks.check_images`):
    - a tensor N x 3 x H x W or N x 1 x H x W (grey; a 3-D tensor is one image);
    - a list or tuple of C x H x W (or 1 x C x H x W) tensors (all checked up front);
    - any other sequence (`len` and integer indexing, e.g. a Dataset that loads files): items
      are loaded lazily, a block at a time, and checked as they come (a wrong size then raises
      when its block is reached). Lets a folder of any size be scored without holding it.
    A set may be empty (N = 0): its pairwise matrix then has no rows (or columns).
    """
    channels = None

    def __init__(self, images, name: str = "x"):
        from .checks import check_images
        self.name, self.lazy, self.size = name, False, None
        if isinstance(images, torch.Tensor):
            if images.dim() == 3:
                images = images[None]
            check_images(images, name)
            _check_no_grad(images, name)
            self.tensor, self.items = images, None
            self.size, self.channels = tuple(images.shape[2:]), images.shape[1]
        else:
            self.tensor = None
            if isinstance(images, (list, tuple)):
                self.items = list(images)
            elif hasattr(images, "__len__") and hasattr(images, "__getitem__"):
                self.items, self.lazy = images, True
            else:
                self.items = list(images)
            if len(self.items):
                first = self._item(0)
                self.size, self.channels = tuple(first.shape[2:]), first.shape[1]
                if not self.lazy:
                    self.items = [first] + [self._item(i) for i in range(1, len(self.items))]

    def _item(self, i: int) -> torch.Tensor:
        from .checks import check_images
        t, name = self.items[i], self.name
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if not (t.dim() == 3 or t.dim() == 4 and t.shape[0] == 1):
            raise ValueError(f"{name}[{i}] must be one image, C x H x W or 1 x C x H x W (C = 3 "
                             f"for RGB, 1 for grey), got shape {tuple(t.shape)}")
        t = t if t.dim() == 4 else t[None]
        check_images(t, f"{name}[{i}]")
        _check_no_grad(t, f"{name}[{i}]")
        if self.channels is not None and t.shape[1] != self.channels:
            raise ValueError(f"images of one set must be all RGB or all grey: {name}[0] has "
                             f"{self.channels} channel(s) but {name}[{i}] has {t.shape[1]}")
        if self.size is not None and tuple(t.shape[2:]) != self.size:
            raise ValueError(
                f"images of one pairwise call must share one size: {name}[0] is "
                f"{self.size[0]}x{self.size[1]} (HxW) but {name}[{i}] is "
                f"{t.shape[2]}x{t.shape[3]}; resize them first")
        return t

    def __len__(self) -> int:
        return self.tensor.shape[0] if self.items is None else len(self.items)

    def batch(self, lo: int, hi: int) -> torch.Tensor:
        if self.tensor is not None:
            return self.tensor[lo:hi]
        if self.lazy:
            return torch.cat([self._item(i) for i in range(lo, hi)])
        return torch.cat(self.items[lo:hi])

    def same_as(self, other: "ImageSet") -> bool:
        """True when both hold the same images (then the result is a symmetric matrix).
        Lazy sequences count as the same only when they are the same object."""
        if self.lazy or other.lazy:
            return self.items is other.items
        if len(self) != len(other) or self.size != other.size:
            return False
        if self.tensor is not None and other.tensor is not None:
            return self.tensor is other.tensor or (
                self.tensor.dtype == other.tensor.dtype
                and self.tensor.device == other.tensor.device
                and torch.equal(self.tensor, other.tensor))
        return all(a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
                   for a, b in zip((self.batch(i, i + 1) for i in range(len(self))),
                                   (other.batch(i, i + 1) for i in range(len(other)))))


def _resolve_model(model, net, version, device):
    if model is None:
        device = torch.device(device) if device is not None else torch.device("cpu")
        key = (net, version, device)
        if key not in _models:
            from .model import LPIPS
            _models[key] = LPIPS(net=net, version=version, verbose=False).to(device).eval()
        return _models[key], device
    p = next(model.parameters(), None)
    here = p.device if p is not None else torch.device("cpu")
    if device is not None and torch.device(device) != here:
        raise ValueError(f"device={device!r} but the model is on {here}: move the model "
                         "(model.to(device)) or leave device out")
    return model, here


def _check_size(model, size, name):
    from .backbones import too_small
    problem = too_small(model.pnet_type, *size)
    if problem:
        raise ValueError(f"{name}: {problem}")


def auto_block(model, size, budget_bytes: float = 256 * 2**20) -> int:
    """A block size whose float64 copy of the largest layer stays within budget_bytes."""
    from .backbones import feature_sizes
    hs, ws = feature_sizes(model.pnet_type, size[0]), feature_sizes(model.pnet_type, size[1])
    largest = max(c * h * w for c, h, w in zip(model.chns, hs, ws))
    return int(min(1024, max(8, budget_bytes // (8 * largest))))


# --- the engine -------------------------------------------------------------------------------

class PairwisePlan:
    """Embeddings and Gram blocks for one pairwise job. Row block i covers rows
    [i * block, (i + 1) * block); `rows(i)` gives its B x M float64 distances. Every block's
    values depend only on (images, model, batch_size, block), never on which process or in
    what order blocks are computed: sharded runs reproduce single-process output bit for bit
    (on the same hardware, library versions and thread settings).
    """

    def __init__(self, x, y=None, model=None, net="alex", version="0.1", batch_size=32,
                 block=None, normalize=False, device=None, max_memory="2GiB", spill_dir=None):
        from .checks import parse_bytes
        self.model, self.device = _resolve_model(model, net, version, device)
        self.x = x if isinstance(x, ImageSet) else ImageSet(x, "x")
        ys = None if y is None else (y if isinstance(y, ImageSet) else ImageSet(y, "y"))
        self.symmetric = ys is None or ys is self.x or self.x.same_as(ys)
        self.y = self.x if self.symmetric else ys
        if None not in (self.x.size, self.y.size) and self.y.size != self.x.size:
            raise ValueError(f"images of one pairwise call must share one size: x is "
                             f"{self.x.size[0]}x{self.x.size[1]} (HxW) but y is "
                             f"{self.y.size[0]}x{self.y.size[1]}")
        size = self.x.size or self.y.size  # None: two empty lists
        if size is not None:
            _check_size(self.model, size, "x" if self.x.size else "y")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.block = (int(block) if block is not None
                      else auto_block(self.model, size) if size is not None else 1)
        if self.block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.normalize = normalize
        self.max_memory = parse_bytes(max_memory, "max_memory", minimum=0)
        self.spill_dir = spill_dir
        p = next(self.model.parameters(), None)  # the images are cast to it by embed
        self.out_dtype = torch.float64 if p is not None and p.dtype == torch.float64 \
            else torch.float32
        self.n, self.m = len(self.x), len(self.y)
        self.n_row_blocks = math.ceil(self.n / self.block)
        self.n_col_blocks = math.ceil(self.m / self.block)
        self._cols = None      # per column block: (Embedding or file path, norms)
        self._tmp = None
        self._stored = 0

    # embeddings

    def _embed_block(self, images: ImageSet, j: int):
        """Block j's embedding (CPU-independent of everything but the block) and its float64
        squared norms per layer. An image whose embedding is not finite raises: its row and
        column would be NaN, and the symmetric path's exact 0 diagonal would hide it there."""
        lo, hi = j * self.block, min((j + 1) * self.block, len(images))
        parts = []
        with torch.inference_mode():
            for b in range(lo, hi, self.batch_size):
                # embed casts to the model's dtype, as the forward does (LPIPS.preprocess)
                x = images.batch(b, min(b + self.batch_size, hi)).to(self.device)
                parts.append(embed(self.model, x, normalize=self.normalize))
        e = Embedding.cat(parts)
        norms = e.sq_norms(torch.float64)
        bad = ~torch.isfinite(torch.stack(norms).sum(0))
        if bool(bad.any()):
            i = lo + int(bad.nonzero()[0, 0])
            raise ValueError(f"{images.name}[{i}] has a non-finite LPIPS embedding (NaN or inf "
                             "in the image, or an overflow in the model's precision): its "
                             "distances are undefined")
        return e, norms

    def _build_columns(self):
        self._cols = []
        for j in range(self.n_col_blocks):
            e, norms = self._embed_block(self.y, j)
            if self.max_memory is not None and self._stored + e.nbytes() > self.max_memory:
                if self._tmp is None:
                    self._tmp = tempfile.mkdtemp(prefix="lpips_fast_pairwise_",
                                                 dir=self.spill_dir)
                path = Path(self._tmp) / f"block{j:06d}.pt"
                e.save(path)
                self._cols.append((str(path), norms))
            else:
                self._stored += e.nbytes()
                self._cols.append((e, norms))

    def column(self, j: int):
        if self._cols is None:
            self._build_columns()
        e, norms = self._cols[j]
        if isinstance(e, str):
            e = Embedding.load(e, mmap=True).to(self.device)
        return e, norms

    def row(self, i: int):
        return self.column(i) if self.symmetric else self._embed_block(self.x, i)

    def close(self):
        """Delete spilled blocks (also done when the plan is garbage collected)."""
        if getattr(self, "_tmp", None) is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __del__(self):
        self.close()

    # Gram blocks

    @staticmethod
    def distances(ea: Embedding, na, eb: Embedding, nb) -> torch.Tensor:
        """The |a| x |b| float64 LPIPS block of two embedded blocks (see the module docstring
        for why float64 products keep the error far below 1e-5)."""
        out = None
        with torch.inference_mode():
            for k, P in enumerate(ea.pixels):
                A = ea.flat(k).to(torch.float64)
                B = eb.flat(k).to(torch.float64)
                d = (na[k][:, None] + nb[k][None, :] - 2 * (A @ B.T)) / P
                d.clamp_(min=0)  # a squared norm: a negative value is rounding only
                out = d if out is None else out.add_(d)
            _zero_identical(out, ea, na, eb, nb)
        return out

    def block_distances(self, i: int, j: int, row=None) -> torch.Tensor:
        """Rows of block i against columns of block j, float64, on the compute device."""
        if not self.symmetric:
            ea, na = row if row is not None else self.row(i)
            eb, nb = self.column(j)
            return self.distances(ea, na, eb, nb)
        if i > j:  # the transpose of the block computed for (j, i): exactly symmetric
            return self.block_distances(j, i).T
        ea, na = self.column(i)
        if i == j:
            d = self.distances(ea, na, ea, na)
            d = torch.triu(d, diagonal=1)
            return d + d.T  # zero diagonal, lower triangle = upper transposed
        eb, nb = self.column(j)
        return self.distances(ea, na, eb, nb)

    def rows(self, i: int) -> torch.Tensor:
        """Row block i against all columns: B x M float64 on the compute device."""
        if self.n_col_blocks == 0:  # M = 0: empty rows, nothing to embed
            r0, r1 = self.row_range(i)
            return torch.empty(r1 - r0, 0, dtype=torch.float64, device=self.device)
        row = None if self.symmetric else self.row(i)
        return torch.cat([self.block_distances(i, j, row) for j in range(self.n_col_blocks)],
                         dim=1)

    def row_range(self, i: int) -> tuple[int, int]:
        return i * self.block, min((i + 1) * self.block, self.n)


def _zero_identical(d: torch.Tensor, ea: Embedding, na, eb: Embedding, nb) -> None:
    """Set d[r, c] to exactly 0 where row r's and column c's embeddings are equal (the same
    image twice, e.g. two copies of a file): the forward scores such a pair exactly 0, the Gram
    form leaves the rounding of its dot products. Equal squared norms in every layer pick the
    candidates (cheap, and rare for different images); equal embeddings confirm them."""
    same = None
    for a, b in zip(na, nb):
        eq = a[:, None] == b[None, :]
        same = eq if same is None else same & eq
    for r, c in same.nonzero().tolist():
        if all(torch.equal(ea.flat(k)[r], eb.flat(k)[c]) for k in range(len(na))):
            d[r, c] = 0


# --- public API -------------------------------------------------------------------------------

def pairwise(x, y=None, model=None, net="alex", version="0.1", batch_size=32, block=None,
             normalize=False, device=None, max_memory="2GiB", spill_dir=None) -> torch.Tensor:
    """The LPIPS matrix D[i, j] = LPIPS(x_i, y_j) (y=None: x against itself, N x N).

    x, y: N x 3 x H x W tensors or lists of 3 x H x W tensors, in [-1, 1] (normalize=True:
    [0, 1]); grey N x 1 x H x W (1 x H x W) images count as three equal channels, as in
    `LPIPS.forward`, whose checks, range warning and preprocessing they go through; inputs
    of another float dtype are cast to the model's. All images of a call share one size;
    an empty set (N = 0) gives an empty matrix. model: an `lpips_fast.LPIPS` (its net,
    version, lpips flag, weights, precision and device are used); without it one is built
    from net and version on `device` (default CPU). batch_size: images per backbone pass.
    block: images per Gram block (default: sized so a float64 block of the largest layer is
    ~256 MiB). max_memory: bytes (or '2GiB') of column embeddings kept in memory; the rest
    is spilled to spill_dir (default: the system's temp dir). See the module docstring for
    memory and precision.

    Returns an N x M float32 tensor (float64 for a float64 model) on the CPU: never negative,
    within 1e-5 absolute of model(x_i, y_j); for x against itself the diagonal is exactly 0
    and the matrix exactly symmetric. No gradients: inputs that require grad are refused
    while grad mode is on (use `LPIPS.embed` and `lpips_fast.embed.distance` for a
    differentiable version). An image with NaN or inf raises, naming it.
    """
    plan = PairwisePlan(x, y, model, net, version, batch_size, block, normalize, device,
                        max_memory, spill_dir)
    try:
        out = torch.empty(plan.n, plan.m, dtype=plan.out_dtype)
        if plan.symmetric:  # compute the upper block triangle once, mirror the rest
            for i in range(plan.n_row_blocks):
                r0, r1 = plan.row_range(i)
                for j in range(i, plan.n_col_blocks):
                    c0, c1 = plan.row_range(j)
                    d = plan.block_distances(i, j).to("cpu", plan.out_dtype)
                    out[r0:r1, c0:c1] = d
                    if j != i:
                        out[c0:c1, r0:r1] = d.T
        else:
            for i, r in pairwise_rows_of(plan):
                r0, r1 = plan.row_range(i)
                out[r0:r1] = r
        return out
    finally:
        plan.close()


def pairwise_rows_of(plan: PairwisePlan, blocks=None):
    """Yield (row block index, its rows as an N_i x M CPU tensor) for the given row blocks
    (default all, in order). Values are bit-identical to `pairwise`'s."""
    for i in (range(plan.n_row_blocks) if blocks is None else blocks):
        yield i, plan.rows(i).to("cpu", plan.out_dtype)


def pairwise_rows(x, y=None, **kwargs):
    """`pairwise` one row block at a time: yields (first row index, rows tensor) so a matrix of
    any size can be written out without being held. Same keywords as `pairwise`."""
    plan = PairwisePlan(x, y, **kwargs)
    try:
        for i, r in pairwise_rows_of(plan):
            yield plan.row_range(i)[0], r
    finally:
        plan.close()


def diversity(x, model=None, net="alex", version="0.1", batch_size=32, block=None,
              normalize=False, device=None, max_memory="2GiB", spill_dir=None) -> float:
    """Mean LPIPS over the N (N - 1) / 2 unordered pairs i < j of a set of images (the
    diversity score used to evaluate generators' samples). Streams rows: holds no N x N
    matrix. Accumulates in float64."""
    plan = PairwisePlan(x, None, model, net, version, batch_size, block, normalize, device,
                        max_memory, spill_dir)
    if plan.n < 2:
        raise ValueError(f"diversity needs at least 2 images, got {plan.n}")
    try:
        total = 0.0
        for i in range(plan.n_row_blocks):
            for j in range(i, plan.n_col_blocks):
                d = plan.block_distances(i, j)
                total += float((torch.triu(d, diagonal=1) if i == j else d).sum())
        return total / (plan.n * (plan.n - 1) / 2)
    finally:
        plan.close()
