"""Device helpers: `resolve_device` turns a --device name into a device that exists here."""
from __future__ import annotations

import torch

from .errors import UsageError


def resolve_device(name) -> torch.device:
    """--device: auto (CUDA, else MPS, else CPU) or a device that exists here, else UsageError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"--device {name}: not a device ({e})") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "meta":
        raise UsageError(f"--device {name}: the meta device holds no values; use cpu or cuda")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        ok, count = mps is not None and mps.is_available(), 1
    else:
        module = getattr(torch, dev.type, None)
        ok = bool(module is not None and getattr(module, "is_available", lambda: False)())
        count = module.device_count() if ok else 0
    if not ok:
        raise UsageError(f"--device {name}: {dev.type.upper()} is not available here "
                         "(use --device cpu)")
    if dev.index is not None and dev.index >= count:
        raise UsageError(f"--device {name}: there {'is' if count == 1 else 'are'} only {count} "
                         f"{dev.type} device{'' if count == 1 else 's'} here "
                         f"({dev.type}:0{f' .. {dev.type}:{count - 1}' if count > 1 else ''})")
    return dev
