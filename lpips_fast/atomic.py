"""Writing a file whole or not at all (job summaries, the weight cache)."""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable


def write_atomically(path, data: bytes, check: Callable[[Path], object] | None = None,
                     lock: bool = False) -> int | None:
    """`path` gets `data` whole or not at all: written to a temporary file beside it, read
    back by `check(tmp)` if given, then renamed over `path`; removed on any failure.

    lock=True: the new file is flock'ed before it is renamed into place and the open fd that
    holds the lock is returned (the caller closes it, which releases it; None where flock is
    missing or refused). A caller that also held the old file's lock until then leaves no
    moment when the name is unlocked (a job's summary, locked while its run writes it).

    The temporary file is new (O_EXCL) and of a random name: a fixed NAME.tmp overwrote a
    user's file of that name, and NAME.tmp<pid> was shared by same-pid processes (containers)
    writing one folder. Its mode is 0o666 less the umask, as a plain open gives (mkstemp's
    0o600 would make a shared cache private). Python's own write reports a full disk as an
    OSError ("No space left on device"), which torch.save's writer did not."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    held = _lock_new(fd) if lock else None  # a new file nobody else has open: cannot block
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException:
        if held is not None:
            os.close(held)
        raise
    finally:
        tmp.unlink(missing_ok=True)  # gone already after the rename
    return held


def _lock_new(fd: int) -> int | None:
    """A second fd on fd's open file, holding an exclusive flock (flock locks belong to the
    open file, so closing `fd` keeps it), or None without flock."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    held = os.dup(fd)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a file system without locks: unprotected, as the CSV
        os.close(held)
        return None
    return held
