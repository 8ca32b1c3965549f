"""ViT-L/16 end to end (slow: ~5-10 min and ~6 GB on a 2-core CPU; run with ``pytest -m slow``).

A random ViT-L/16 checkpoint written in the official facebookresearch format goes through
``cinemae-export``; the parity report must hold |dlogit| <= 1e-4 in fp32, and the bundle scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_vit_large_official_checkpoint_export(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from cinemae.export.checkpoint import save_facebookresearch
    from cinemae.export.cli import main as export_main
    from cinemae.export.model import MaskedAutoencoderViT, preset
    from cinemae.runtime import Detector

    torch.manual_seed(0)
    ckpt = tmp_path / "mae_visualize_vit_large.pth"
    save_facebookresearch(MaskedAutoencoderViT(preset("vit-large")), ckpt)
    out = tmp_path / "bundle"
    photos = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "photos" / "real"
    args = ["--checkpoint", str(ckpt), "--out", str(out), "--tensorrt", "skip"]
    if photos.is_dir():
        args += ["--parity-images", str(photos)]
    assert export_main(args) == 0
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"]
    assert max(r["metrics"]["logit_abs"] for r in report["rows"]) <= 1e-4
    m = json.loads((out / "cinemae.json").read_text())
    assert m["backbone"]["embed_dim"] == 1024 and m["target"] == "pixel"
    import numpy as np

    r = Detector(out, device="cpu").detect(np.zeros((300, 400, 3), np.uint8))
    assert r.ok and len(r.stats) == 3
