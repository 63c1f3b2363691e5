"""Writing a file whole or not at all (job summaries, the weight cache)."""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable


def write_atomically(path, data: bytes, check: Callable[[Path], object] | None = None) -> None:
    """`path` gets `data` whole or not at all: written to a temporary file beside it, read
    back by `check(tmp)` if given, then renamed over `path`; removed on any failure.

    The temporary file is new (O_EXCL) and of a random name: a fixed NAME.tmp overwrote a
    user's file of that name, and NAME.tmp<pid> was shared by same-pid processes (containers)
    writing one folder. Its mode is 0o666 less the umask, as a plain open gives (mkstemp's
    0o600 would make a shared cache private). Python's own write reports a full disk as an
    OSError ("No space left on device"), which torch.save's writer did not."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after the rename
