"""Batches of image pairs for `dirs` (folders.plan_pairs orders them, one scoring size per
batch): each image is decoded straight into its slot of the batch's tensor, channels_last as
the model runs (no float image per file, no stacking copy), pinned for a CUDA device.

Who decodes (`workers`, `prefetch`; "auto" picks from the cores and the device, see
`choose`): a pool of threads (Pillow and numpy release the GIL while they decode and convert,
so threads decode in parallel without the start-up and the copies of worker processes); a
batch is also finished there (its transfer and its device decode), so that the CPU part of a
GPU decode overlaps the forward of the batch before it.
With `prefetch` K > 0 the pool decodes the next K batches while a batch is scored; with K = 0
it decodes a batch, on every thread, only when the scorer asks for it, never competing with
torch's own threads (the CPU default on a machine of 2 cores or fewer, where a loader running
beside the forward slowed the whole job: docs/performance.md).

`decoder`: "pillow" decodes every file with Pillow, as `pair` and the Python API do (the
values agree exactly); "torchvision" decodes baseline JPEG files with torchvision's
`decode_jpeg` on the run's device (on a GPU nvJPEG, in one call per batch; on the CPU its
libjpeg-turbo, the same code path), every other file with Pillow; "auto" is "torchvision" on
a CUDA device that torchvision can decode on, else "pillow". A GPU-decoded JPEG can differ
from Pillow's decode by the IDCT's and the chroma upsampling's rounding (docs/performance.md
states the measured difference).
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .io import ImageError, read_into, resize

DECODERS = ("auto", "pillow", "torchvision")
JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif"}


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def choose(workers, prefetch, device) -> tuple[int, int]:
    """(threads, batches decoded ahead) for "auto" values: on a GPU the CPU only decodes, so
    every core up to 8 decodes ahead; on a CPU of 2 cores or fewer every core decodes between
    the forwards (no prefetch); on a larger CPU a quarter of the cores decode ahead."""
    n = cores()
    gpu = torch.device(device).type == "cuda"
    if workers == "auto":
        workers = min(8, n) if gpu or n <= 2 else max(1, n // 4)
    if prefetch == "auto":
        prefetch = 2 if gpu or n > 2 else 0
    return int(workers), int(prefetch)


def resolve_decoder(decoder: str, device) -> str:
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if decoder == "auto":
        return "torchvision" if torch.device(device).type == "cuda" and _gpu_jpeg() else "pillow"
    return decoder


def _gpu_jpeg() -> bool:
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        return False
    return True


class BatchLoader:
    """Iterates (indices of the loaded pairs, x0, x1, [(index, error)], [paths with alpha]) for
    each batch (a list of indices into `ordered`, [(Pair, (H, W))]), in order. A file that
    cannot be read fails its pair only (its error, naming the file, comes back)."""

    def __init__(self, ordered, batches, *, device, workers=0, prefetch=0,
                 resample="bicubic", decoder="pillow"):
        self.ordered, self.batches = ordered, iter(batches)
        self.device = torch.device(device)
        self.ahead, self.resample = prefetch, resample
        self.decoder = resolve_decoder(decoder, self.device)
        self.pool = ThreadPoolExecutor(workers, "lpips-load") if workers else None
        self.pending: deque = deque()
        self.free: list = []   # CPU (pinned) buffers whose batch has been scored, for reuse
        self.last = None

    def __iter__(self):
        return self

    def __next__(self):
        if self.last is not None:  # scored by now (score_batch waits for its values)
            self.free.append(self.last)
            self.last = None
        while len(self.pending) <= self.ahead:
            b = next(self.batches, None)
            if b is None:
                break
            self.pending.append(self._start(b))
        if not self.pending:
            raise StopIteration
        x, finished = self.pending.popleft()
        loaded = finished.result()
        if x.device.type == "cpu":
            self.last = x
        return loaded

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()

    def _buffer(self, shape, on_device: bool):
        if on_device:  # every image is decoded there: nothing to pin or transfer
            return torch.empty(shape, device=self.device, memory_format=torch.channels_last)
        for k, x in enumerate(self.free):
            if x.shape == shape:
                return self.free.pop(k)
        return torch.empty(shape, memory_format=torch.channels_last,
                           pin_memory=self.device.type == "cuda")

    def _start(self, batch):
        """Allocate the batch's tensor and start decoding its images (on the pool, if any)."""
        n, size = len(batch), self.ordered[batch[0]][1]
        paths = [self.ordered[i][0].path0 for i in batch] + [self.ordered[i][0].path1
                                                              for i in batch]
        on_device = (self.decoder == "torchvision" and self.device.type != "cpu"
                     and all(p.suffix.lower() in JPEG_SUFFIXES for p in paths))
        x = self._buffer((2 * n, 3, *size), on_device)
        jobs = [(x, j, path, size) for j, path in enumerate(paths)]
        if self.pool is None:
            return x, _done(self._finish, (batch, x, [_done(self._fill, job) for job in jobs]))
        # The batch is finished on the pool too (after its images: the queue is FIFO), so that
        # a device decode's CPU stage (nvJPEG's Huffman decoding) overlaps the forward; its
        # kernels go to the same stream as the forward's, in order.
        images = [self.pool.submit(self._fill, *job) for job in jobs]
        return x, self.pool.submit(self._finish, batch, x, images)

    def _fill(self, x, j, path, size):
        """Decode one file into slot j of x (a CPU tensor): its alpha flag. For the device's
        decoder: a plain JPEG's bytes; for a tensor on the device: the image, 3 x H x W."""
        if self.decoder == "torchvision" and path.suffix.lower() in JPEG_SUFFIXES:
            data = path.read_bytes()
            if plain_jpeg(data):
                return data
        if x.device.type != "cpu":  # a batch of JPEG names holding another file
            x = torch.empty((1, 3, *size)).contiguous(memory_format=torch.channels_last)
            return self._pillow(x, 0, path, size), x[0]
        return self._pillow(x, j, path, size)

    def _pillow(self, x, j, path, size):
        """Decode one file with Pillow into slot j of x (on the CPU), resized if need be."""
        done, got = read_into(path, x[j].permute(1, 2, 0).numpy())
        if done:
            return got
        a, alpha = got
        x[j].copy_(resize(torch.from_numpy(a).permute(2, 0, 1), size, self.resample))
        return alpha

    def _finish(self, batch, x, futures):
        n = len(batch)
        results = []
        for f in futures:
            try:
                results.append(f.result())
            except ImageError as e:
                results.append(e)
        x = x.to(self.device, non_blocking=True)
        for j, r in enumerate(results):
            if isinstance(r, tuple):  # decoded on the CPU for a batch on the device
                x[j].copy_(r[1], non_blocking=True)
                results[j] = r[0]
        self._device_jpegs(x, batch, results)
        failed, alphas, good = [], [], []
        for k, i in enumerate(batch):
            errors = [r for r in (results[k], results[n + k]) if isinstance(r, ImageError)]
            if errors:
                failed.append((i, str(errors[0])))
                continue
            good.append(k)
            pair = self.ordered[i][0]
            alpha = (pair.path0 if results[k] is True else
                     pair.path1 if results[n + k] is True else None)
            if alpha is not None:
                alphas.append(alpha)
        idx = [batch[k] for k in good]
        if len(good) < n:  # rare: copy the good pairs out
            keep = torch.tensor(good, device=x.device)
            x0, x1 = x[:n].index_select(0, keep), x[n:].index_select(0, keep)
        else:
            x0, x1 = x[:n], x[n:]
        return idx, x0, x1, failed, alphas

    def _device_jpegs(self, x, batch, results) -> None:
        """Decode the JPEG files of the batch (bytes in `results`) with torchvision on x's
        device, in one call, into their slots; a file it refuses is decoded by Pillow instead
        (which names the problem if there is one). Their results become alpha flags (False)."""
        slots = [j for j, r in enumerate(results) if isinstance(r, bytes)]
        if not slots:
            return
        from torchvision.io import ImageReadMode, decode_jpeg
        n = len(batch)
        data = [torch.frombuffer(bytearray(results[j]), dtype=torch.uint8) for j in slots]
        try:
            imgs = decode_jpeg(data, mode=ImageReadMode.RGB, device=x.device)
        except RuntimeError:  # one file it cannot decode fails the call: one by one
            imgs = [_one_jpeg(d, x.device) for d in data]
        for j, img in zip(slots, imgs):
            results[j] = False
            slot = x[j]
            if img is not None and tuple(img.shape[1:]) == tuple(slot.shape[1:]):
                to_unit_range(img, slot)
                continue
            pair = self.ordered[batch[j % n]][0]
            path = pair.path0 if j < n else pair.path1
            cpu = torch.empty((1, *slot.shape)).contiguous(memory_format=torch.channels_last)
            try:  # refused, or another size (--resize): Pillow's decode and resize
                results[j] = self._pillow(cpu, 0, path, tuple(slot.shape[1:]))
            except ImageError as e:
                results[j] = e
            slot.copy_(cpu[0])


def plain_jpeg(data: bytes) -> bool:
    """Whether a file's bytes are a JPEG that torchvision decodes as Pillow does: 8-bit RGB
    (YCbCr) or grey, baseline, upright (no EXIF rotation: nvJPEG would not apply it), ending in
    its end-of-image marker (libjpeg fills a truncated file with grey where Pillow refuses it;
    trailing bytes after the marker send a file to Pillow too)."""
    from io import BytesIO

    from PIL import Image
    if data[:3] != JPEG_MAGIC or data[-2:] != b"\xff\xd9":
        return False
    try:
        with Image.open(BytesIO(data)) as img:
            return (img.format == "JPEG" and img.mode in ("RGB", "L")
                    and not img.info.get("progressive") and not img.info.get("progression")
                    and img.getexif().get(0x0112, 1) == 1)
    except Exception:  # noqa: BLE001 - Pillow's own decode will say what is wrong
        return False


def to_unit_range(u8: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """8-bit values into `out` as v / 127.5 - 1 in float32: the same two correctly rounded
    operations as io.pil_into, so the same floats for the same bytes (tested for all 256)."""
    return out.copy_(u8).div_(127.5).sub_(1)


def _one_jpeg(data, device):
    from torchvision.io import ImageReadMode, decode_jpeg
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


class _done:
    """The result of fn(*job) computed now, with a Future's result() (an ImageError is kept
    and raised by result(), as a Future does)."""

    def __init__(self, fn, job):
        try:
            self.value, self.error = fn(*job), None
        except ImageError as e:
            self.value, self.error = None, e

    def result(self):
        if self.error is not None:
            raise self.error
        return self.value
