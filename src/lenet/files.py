"""File writing shared by checkpoints and pictures; no torch, so a process that only
draws (lenet.plot_worker) does not import it."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, write) -> None:
    """Call write(file) on a temp file beside `path`, fsync it, then rename it over `path`,
    so a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # named after the file asked for, not the temp file's random name
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        if hasattr(os, "fchmod"):  # POSIX (Windows has it from Python 3.13, and no modes)
            # mkstemp's 0600 would hide run files from others
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
