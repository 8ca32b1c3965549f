"""The one cache folder: compiled kernels, TensorRT engines built at first use, the bench's
random-weight bundles, training features.

``$CINEMAE_CACHE`` if set, else ``$XDG_CACHE_HOME/cinemae``, else ``~/.cache/cinemae``. The
older ``$CINEMAE_CACHE_DIR`` (which only the kernel loader read) is still honoured when
``$CINEMAE_CACHE`` is unset, with a warning; it will be removed.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

log = logging.getLogger(__name__)
_warned = False


def cache_root() -> Path:
    """The cache folder (not created here)."""
    global _warned
    root = os.environ.get("CINEMAE_CACHE")
    if root:
        return Path(root).expanduser()
    old = os.environ.get("CINEMAE_CACHE_DIR")
    if old:
        if not _warned:
            _warned = True
            msg = "CINEMAE_CACHE_DIR is deprecated: set CINEMAE_CACHE instead (the same folder)"
            warnings.warn(msg, FutureWarning, stacklevel=2)
            log.warning(msg)
        return Path(old).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "cinemae"


def cache_dir(*parts: str) -> Path:
    """A folder under :func:`cache_root` (``cache_dir("engines")``); not created here."""
    return cache_root().joinpath(*parts)
