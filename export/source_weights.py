"""The torch weights a bundle's graphs were exported from, kept outside the torch-free runtime.

A bundle holds ONNX graphs only; the torch reference rows of ``cinemae-bench`` and a re-export
need the source weights (``mae.pth`` in the facebookresearch format, ``head.pt``). They may lie
in the bundle folder itself (a user's bundle), or in ``export/weights/NAME/`` of this package
(the embedded default bundle's), where ``weights.json`` names the graphs they belong to by
sha256, so weights are only ever paired with the exact graphs they produced.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..runtime.atomic import atomic_write
from ..runtime.bundle import Bundle, sha256_file

WEIGHTS_ROOT = Path(__file__).resolve().parent / "weights"
MAE, HEAD, RECORD = "mae.pth", "head.pt", "weights.json"
GRAPHS = ("encoder.onnx", "decoder.onnx", "head.onnx")


def graph_hashes(bundle: Bundle) -> dict[str, str]:
    """The sha256 of the bundle's fp32 graphs, as its manifest lists them."""
    files = bundle.manifest.get("files", {})
    return {g: files[g] for g in GRAPHS if g in files}


def find_source_weights(bundle: Bundle, root: Path = WEIGHTS_ROOT) -> tuple[Path, Path] | None:
    """(mae.pth, head.pt) for ``bundle``: from the bundle folder when it has both, else from a
    ``root/NAME/`` whose ``weights.json`` lists exactly this bundle's graph hashes (and whose
    files still match their own hashes); None when there are none."""
    if (bundle.root / MAE).is_file() and (bundle.root / HEAD).is_file():
        return bundle.root / MAE, bundle.root / HEAD
    want = graph_hashes(bundle)
    if not want or not root.is_dir():
        return None
    for rec_path in sorted(root.glob(f"*/{RECORD}")):
        try:
            rec = json.loads(rec_path.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("graphs") != want:
            continue
        folder = rec_path.parent
        if all((folder / n).is_file() and sha256_file(folder / n) == rec.get("files", {}).get(n) for n in (MAE, HEAD)):
            return folder / MAE, folder / HEAD
    return None


def install_source_weights(bundle_dir: str | os.PathLike[str], mae: str | os.PathLike[str],
                           head: str | os.PathLike[str], name: str, root: Path = WEIGHTS_ROOT,
                           note: str = "") -> Path:
    """Store ``mae`` and ``head`` as the source weights of the bundle in ``bundle_dir`` under
    ``root/name/`` with a ``weights.json`` naming its graphs. Returns the folder."""
    bundle = Bundle(bundle_dir)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for src, dst in ((mae, MAE), (head, HEAD)):
        data = Path(src).read_bytes()
        atomic_write(folder / dst, data)
    rec: dict[str, Any] = {"model_id": bundle.model_id, "graphs": graph_hashes(bundle),
                           "files": {n: sha256_file(folder / n) for n in (MAE, HEAD)}, "note": note}
    atomic_write(folder / RECORD, json.dumps(rec, indent=2) + "\n")
    return folder
