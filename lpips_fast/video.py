"""Two videos scored frame by frame (decoded with PyAV, i.e. FFmpeg's libraries)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import UsageError
from .io import check_scoring_size, mismatch_message, note_once, resize, target_size


def _av():
    try:
        import av
    except ImportError:
        raise UsageError("the video command needs PyAV (FFmpeg), which is not installed: "
                         "pip install 'lpips_fast[video]' (or pip install av)") from None
    return av


def open_video(path):
    """(container, first video stream); every failure is a one-line UsageError."""
    av = _av()
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory, not a video")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise UsageError(f"{path}: not a video PyAV can read ({e})") from None
    if not container.streams.video:
        container.close()
        raise UsageError(f"{path}: has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream


def _deep(stream) -> bool:
    """Whether the stream has more than 8 bits per component (then decoded as 16-bit RGB)."""
    try:
        return max(c.bits for c in stream.codec_context.format.components) > 8
    except Exception:  # noqa: BLE001 - unknown format: 8-bit
        return False


class VideoPairs:
    """Both videos opened and checked, read frame by frame in order, in any number of
    processes: `read(lo, hi)` returns frames lo..hi-1 of both (decoding and skipping the frames
    before lo without converting them), so each rank of a sharded run scores its own batches
    while decoding the streams itself.

    `count` is the number of frame pairs, known before any scoring: from the containers, or, where
    a container does not store it, by decoding that video once. A count mismatch, a size
    mismatch, a frame that changes size, or a decoding failure is a UsageError.
    """

    def __init__(self, ref, dist, net: str, resize_policy="none", resample="bicubic"):
        self.ref, self.dist, self.resample = ref, dist, resample
        self._open()
        s0, s1 = self._s0, self._s1
        self.size0 = (s0.codec_context.height, s0.codec_context.width)
        self.size1 = (s1.codec_context.height, s1.codec_context.width)
        try:
            size = target_size(self.size0, self.size1, resize_policy)
            if size is None:
                raise UsageError(mismatch_message(ref, self.size0, dist, self.size1))
            self.size = size
            check_scoring_size(ref, self.size0, dist, self.size1, size, net)
            n0 = s0.frames or self._count(ref)
            n1 = s1.frames or self._count(dist)
            if n0 != n1:
                raise UsageError(f"{ref} has {n0} frames but {dist} has {n1}: "
                                 "frame-by-frame scoring needs the same number")
            if n0 == 0:
                raise UsageError(f"{ref}: no frames decoded")
            self.count = n0
            r0, r1 = s0.average_rate, s1.average_rate
            if r0 and r1 and r0 != r1:  # same count, other rates: likely not the same clip
                note_once("rates", f"{ref} runs at {float(r0):g} frames/s but {dist} at "
                                   f"{float(r1):g}: frames are paired by index (frame i with "
                                   "frame i), not by time")
        except BaseException:
            self.close()
            raise

    def _open(self):
        self._c0, self._s0 = open_video(self.ref)
        try:
            self._c1, self._s1 = open_video(self.dist)
        except UsageError:
            self._c0.close()
            raise
        self._it0 = self._raw(self.ref, self._c0, self._s0)
        self._it1 = self._raw(self.dist, self._c1, self._s1)
        self._pos = 0
        self._last = None  # (time, ref, dist) of frame _pos - 1

    @staticmethod
    def _raw(path, container, stream):
        av = _av()
        try:
            yield from container.decode(stream)
        except av.FFmpegError as e:
            raise UsageError(f"{path}: decoding failed ({e})") from None

    @staticmethod
    def _count(path) -> int:
        c, s = open_video(path)
        try:
            return sum(1 for _ in VideoPairs._raw(path, c, s))
        finally:
            c.close()

    def _tensor(self, frame, stream):
        if _deep(stream):
            a = frame.to_ndarray(format="rgb48le").astype(np.float32) / np.float32(32767.5) - 1
        else:
            a = frame.to_ndarray(format="rgb24").astype(np.float32) / np.float32(127.5) - 1
        return torch.from_numpy(a).permute(2, 0, 1)

    def _next(self):
        f0, f1 = next(self._it0, None), next(self._it1, None)
        if f0 is None or f1 is None:
            if f0 is None and f1 is None:
                raise UsageError(f"{self.ref} and {self.dist} end after {self._pos} frames, "
                                 f"but their containers say {self.count}")
            short, longer = (self.ref, self.dist) if f0 is None else (self.dist, self.ref)
            more = 1 + sum(1 for _ in (self._it1 if f0 is None else self._it0))
            raise UsageError(f"{short} has {self._pos} frames but {longer} has "
                             f"{self._pos + more}: frame-by-frame scoring needs the same number")
        if (f0.height, f0.width) != self.size0 or (f1.height, f1.width) != self.size1:
            raise UsageError(f"frame {self._pos} changes size mid-stream")
        self._pos += 1
        return f0, f1

    def read(self, lo: int, hi: int):
        """(times, ref batch, dist batch) of frames lo..hi-1 (N x 3 x H x W at the scoring
        size). Calls must not go backwards, except that the last frame read is kept and can
        be read again (a temporal score's chunk starts with its previous frame)."""
        hi = min(hi, self.count)
        frames = []
        if self._last is not None and lo == self._pos - 1 < hi:
            frames.append(self._last)
            lo += 1
        if lo < self._pos:
            raise ValueError(f"frames are read in order: {lo} was already passed")
        while self._pos < lo:
            self._next()
        while self._pos < hi:
            f0, f1 = self._next()
            time = float(f0.pts * self._s0.time_base) if f0.pts is not None else float("nan")
            frames.append((time, resize(self._tensor(f0, self._s0), self.size, self.resample),
                           resize(self._tensor(f1, self._s1), self.size, self.resample)))
        if frames:
            self._last = frames[-1]
        if hi == self.count:  # the last frames: both streams must end here
            extra0 = sum(1 for _ in self._it0)
            extra1 = sum(1 for _ in self._it1)
            if extra0 != extra1:
                raise UsageError(f"{self.ref} has {hi + extra0} frames but {self.dist} has "
                                 f"{hi + extra1}: frame-by-frame scoring needs the same number")
        times, b0, b1 = zip(*frames)
        return list(times), torch.stack(b0), torch.stack(b1)

    def close(self):
        for c in (getattr(self, "_c0", None), getattr(self, "_c1", None)):
            if c is not None:
                c.close()
