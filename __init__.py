"""cinemae: an edge runtime for CINEMAE (arXiv 2511.06325), a detector of AI-generated images
built on a frozen masked autoencoder.

    from cinemae import Detector
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Detector", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Detector":
        from .runtime.detector import Detector

        return Detector
    raise AttributeError(name)
