"""Atomic file writes: a file appears whole or not at all (a temporary file in the same folder,
fsync, rename). The one implementation for the runtime, kernels, export, train and the
benchmarks.

    atomic_write(path, b"bytes" or "text")          # data in hand
    atomic_write(path, lambda f: np.savez(f, ...))  # a writer that takes a binary file
    with atomic_path(path) as tmp:                  # a tool that wants a file name
        onnx.save_model(model, str(tmp))
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some filesystems refuse)."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _tmp_name(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, mode: int = 0o644, fsync: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` for a tool to write; renamed onto ``path`` when the block
    ends without an exception, removed otherwise. The folder is created if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike[str], data: bytes | str | Callable[[BinaryIO], object], *,
                 mode: int = 0o644, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically: readers see the old file or the new one, never a
    part; a crash leaves at most a hidden ``.NAME.*.tmp`` beside it. ``data`` is bytes, text
    (UTF-8) or a function that writes to the open binary file. The folder is created if
    missing. Returns the path."""
    path = Path(path)
    with atomic_path(path, mode=mode, fsync=False) as tmp:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    if fsync:
        _fsync_dir(path.parent)
    return path
