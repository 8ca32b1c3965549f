"""cinemae runtime: bundle loading, preprocessing, masks, backends, LCAS statistics and the
``Detector``. Never imports torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .bundle import Bundle, BundleError
    from .detector import Detector, Result
    from .preprocess import InputError

__all__ = ["Bundle", "BundleError", "Detector", "InputError", "Result"]


def __getattr__(name: str) -> Any:  # lazy: importing the package stays cheap
    if name in ("Detector", "Result"):
        from . import detector

        return getattr(detector, name)
    if name in ("Bundle", "BundleError"):
        from . import bundle

        return getattr(bundle, name)
    if name == "InputError":
        from .preprocess import InputError

        return InputError
    raise AttributeError(name)
