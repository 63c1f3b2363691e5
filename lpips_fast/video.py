"""Two videos scored frame by frame (decoded with PyAV, i.e. FFmpeg's libraries)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .folders import UsageError
from .io import check_min_size, mismatch_message, resize, target_size


def _av():
    try:
        import av
    except ImportError:
        raise UsageError("the video command needs PyAV: pip install av") from None
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


def frames(path, container, stream) -> Iterator[tuple[float, torch.Tensor]]:
    """(time in seconds, 3 x H x W float32 in [-1, 1]) per decoded frame."""
    av = _av()
    deep = _deep(stream)
    try:
        for frame in container.decode(stream):
            if deep:
                a = frame.to_ndarray(format="rgb48le").astype(np.float32) / np.float32(32767.5) - 1
            else:
                a = frame.to_ndarray(format="rgb24").astype(np.float32) / np.float32(127.5) - 1
            t = float(frame.pts * stream.time_base) if frame.pts is not None else float("nan")
            yield t, torch.from_numpy(a).permute(2, 0, 1)
    except av.FFmpegError as e:
        raise UsageError(f"{path}: decoding failed ({e})") from None


def score_video(ref, dist, model, *, device, batch_size=32, resize_policy="none",
                resample="bicubic") -> Iterator[list[tuple[int, float, float]]]:
    """(frame index, time, LPIPS) rows, a batch at a time. A frame-count or size mismatch is a
    UsageError (raised before any work where the containers know their frame counts)."""
    c0, s0 = open_video(ref)
    try:
        c1, s1 = open_video(dist)
    except UsageError:
        c0.close()
        raise
    try:
        size0 = (s0.codec_context.height, s0.codec_context.width)
        size1 = (s1.codec_context.height, s1.codec_context.width)
        n0, n1 = s0.frames, s1.frames
        if n0 and n1 and n0 != n1:
            raise UsageError(f"{ref} has {n0} frames but {dist} has {n1}: "
                             "frame-by-frame scoring needs the same number")
        size = target_size(size0, size1, resize_policy)
        if size is None:
            raise UsageError(mismatch_message(ref, size0, dist, size1))
        check_min_size(ref, size0, model.pnet_type)
        check_min_size(dist, size1, model.pnet_type)
        it0, it1 = frames(ref, c0, s0), frames(dist, c1, s1)
        index, done = 0, False
        with torch.inference_mode():
            while not done:
                times, b0, b1 = [], [], []
                while len(b0) < batch_size:
                    f0, f1 = next(it0, None), next(it1, None)
                    if f0 is None or f1 is None:
                        if (f0 is None) != (f1 is None):
                            short, longer = (ref, dist) if f0 is None else (dist, ref)
                            more = 1 + sum(1 for _ in (it1 if f0 is None else it0))
                            raise UsageError(
                                f"{short} has {index + len(b0)} frames but {longer} has "
                                f"{index + len(b0) + more}: frame-by-frame scoring needs the "
                                "same number")
                        done = True
                        break
                    if tuple(f0[1].shape[1:]) != size0 or tuple(f1[1].shape[1:]) != size1:
                        raise UsageError(f"frame {index + len(b0)} changes size mid-stream")
                    times.append(f0[0])
                    b0.append(resize(f0[1], size, resample))
                    b1.append(resize(f1[1], size, resample))
                if b0:
                    d = model(torch.stack(b0).to(device), torch.stack(b1).to(device))
                    vals = d.flatten().float().cpu().tolist()
                    yield [(index + k, times[k], vals[k]) for k in range(len(vals))]
                    index += len(vals)
        if index == 0:
            raise UsageError(f"{ref}: no frames decoded")
    finally:
        c0.close()
        c1.close()
