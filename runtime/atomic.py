"""``atomic_write``: a file appears whole or not at all (temporary file in the same folder,
fsync, rename). The one implementation for the runtime, export, train and the benchmarks."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *, mode: int = 0o644,
                 fsync: bool = True) -> Path:
    """Write ``data`` (str is UTF-8 encoded) to ``path`` atomically: readers see the old file or
    the new one, never a part; a crash leaves at most a ``*.tmp`` file beside it. The folder must
    exist. Returns the path."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if fsync:  # the rename itself is durable once the folder is synced
        try:
            dfd = os.open(path.parent, os.O_RDONLY)
        except OSError:
            return path
        try:
            os.fsync(dfd)
        except OSError:
            pass
        finally:
            os.close(dfd)
    return path
