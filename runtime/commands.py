"""What the commands (``cinemae-detect``, the scan, ``cinemae-serve``, ``cinemae-stream``) share
without being a command themselves: opening the Detector a command runs on, the re-shipping
ensemble's flags, and the table row.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .bundle import BundleError

if TYPE_CHECKING:
    from .detector import Detector

TABLE_HEADER = f"{'verdict':<9} {'score':>7} {'s1':>9} {'s2':>9} {'s3':>9}  path"


class _CurrentStream(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` / ``sys.stderr`` is at the time of each record (so a
    redirected or captured stream gets the lines)."""

    def __init__(self, which: str) -> None:
        super().__init__()
        self.which = which

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201 - logging's own attribute
        return getattr(sys, self.which)

    @stream.setter
    def stream(self, _value) -> None:  # noqa: ANN001
        pass


def configure_logging(stream: str = "stderr", level: int = logging.INFO) -> None:
    """What a command does first: the library's ``cinemae.*`` loggers print their messages as
    plain lines on ``stream`` ("stdout" or "stderr") from ``level`` up. Library code only logs;
    calling this again replaces the earlier setting."""
    root = logging.getLogger("cinemae")
    for h in list(root.handlers):
        if isinstance(h, _CurrentStream):
            root.removeHandler(h)
    handler = _CurrentStream(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level)


def add_reship_arguments(ap: argparse.ArgumentParser, what: str = "each image") -> None:
    """``--reship PRESET|VIEWS`` and ``--reship-on``, the opt-in re-shipping ensemble
    (``Detector(reship=..., reship_on=...)``), with the same choices and help in every command."""
    from .reship import ENSEMBLES, VIEWS_ON

    ap.add_argument("--reship", metavar="PRESET|VIEWS", default=None,
                    help=f"opt-in re-shipping ensemble: also score {what} as re-encodings of itself (one "
                         "backend call) and answer uncertain unless all agree; the score stays the original's, "
                         "records list each view's. A preset ("
                         + ", ".join(f"{k} = {','.join(v)}" for k, v in ENSEMBLES.items())
                         + ") or views such as jpeg:60,shrink:0.5 (jpeg:Q, shrink:S, upscale:S, crop:F, "
                           "letterbox:AxB). It costs about one more set of rows per view")
    ap.add_argument("--reship-on", default="picture", choices=VIEWS_ON,
                    help="with --reship and a tiled bundle: the views re-ship the picture its crops are cut from "
                         "(default; bars trimmed, shrunk to the bundle's max_side) or the image as delivered")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def open_detector(prog: str, bundle: str | None, *, say: Callable[[str], None] = _stderr,
                  **kwargs: Any) -> Detector | None:
    """The Detector a command runs on (``kwargs`` go to ``Detector``). Says the one-line
    reason (``say``, stderr by default) and returns None when it cannot start; otherwise says
    the header line (model, backend, and a warning for an untrained head)."""
    from .backends import BackendUnavailable
    from .detector import Detector

    try:
        det = Detector(bundle, **kwargs)
    except (BundleError, BackendUnavailable, ValueError) as e:
        say(f"{prog}: {e}")
        return None
    say(f"# {det.bundle.model_id}: {det.describe()}"
        + ("" if det.bundle.trained else " [UNTRAINED HEAD: scores are not meaningful]"))
    return det


def format_row(d: dict[str, Any]) -> str:
    """One table line (under :data:`TABLE_HEADER`) for a result record (``Result.to_record()``)."""
    if d["error"]:
        return (f"{'error':<9} {'':>7} {'':>9} {'':>9} {'':>9}  {d['source']}  "
                f"[{d['error_code']}] {d['error']}")
    s1, s2, s3 = d["stats"]
    verdict = d["verdict"] + ("[prov]" if d.get("reason") == "provenance" else "")
    return f"{verdict:<9} {d['score']:>7.4f} {s1:>9.4f} {s2:>9.4f} {s3:>9.4f}  {d['source']}"
