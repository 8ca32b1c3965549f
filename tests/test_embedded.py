"""The embedded default bundle (runtime/bundles/cifake32): it loads with verified hashes, says
what it is, carries its measured metrics, and actually separates CIFAKE test images when run
through the public API with no bundle given."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cinemae.runtime.bundle import default_bundle_path, resolve_bundle

REPO = Path(__file__).resolve().parents[1]


def test_embedded_bundle_is_trained_verified_and_torch_free() -> None:
    p = default_bundle_path()
    assert p is not None, "the package ships no embedded bundle"
    b = resolve_bundle(None)  # verifies every file's sha256 against the manifest
    m = b.manifest
    hp = m["head_parity"]
    assert b.trained and hp["passed"] and hp["max_logit_abs"] <= hp["tolerance"]
    assert m["backbone"]["img_size"] == 32 and m["backbone"]["patch_size"] == 4 and b.k == 2
    # the runtime package holds what the runtime reads, every file hashed, and nothing for torch
    on_disk = sorted(f.name for f in p.iterdir())
    assert on_disk == sorted([*m["files"], "cinemae.json"]) == ["cinemae.json", "decoder.onnx", "encoder.onnx",
                                                                "head.onnx", "parity.json"]
    assert sum(f.stat().st_size for f in p.iterdir()) < 7_000_000
    assert 0.0 < b.threshold < 1.0 and m["decision"]["calibration"]
    ev = m["evaluation"]["cifake_test"]
    assert (ev["n_real"], ev["n_fake"]) == (4979, 4973)
    # the manifest's numbers are the committed report's numbers
    rep = json.loads((REPO / "benchmarks" / "results" / "cifake32_report.json").read_text())
    assert rep["bundle_manifest_evaluation"]["cifake_test"] == ev
    assert abs(rep["train"]["per_k"]["2"]["test"]["at_threshold"]["accuracy"] - ev["accuracy_at_threshold"]) < 1e-12


def test_embedded_bundle_separates_cifake_test_images(shared_data: Path) -> None:
    """399 CIFAKE test images (every 25th of each class: 200 real, 199 fake) through Detector() with no bundle given."""
    from cinemae.runtime import Detector
    from cinemae.train.calibrate import metrics
    from cinemae.train.data import from_tar

    real = from_tar(shared_data / "cifake" / "test-real.tar", 0)[::25]
    fake = from_tar(shared_data / "cifake" / "test-fake.tar", 1)[::25]
    items = real + fake
    with Detector() as det:
        results = det.detect_batch([it.read() for it in items])
        thr = det.bundle.threshold
    assert all(r.error is None for r in results)
    y = np.array([it.label for it in items])
    p = np.array([r.score for r in results])
    acc = metrics(y, p, thr)["at_threshold"]["accuracy"]  # as the report computes it
    # the full test split gives 0.951 (benchmarks/results/cifake32_report.md); 399 images
    # vary by about +-1.1 points (one standard error), so 0.90 only fails on a broken model
    assert acc >= 0.90, f"accuracy {acc:.3f} on {len(items)} CIFAKE test images"
    assert p[y == 1].mean() - p[y == 0].mean() > 0.5


def test_source_weights_outside_the_runtime_reproduce_the_embedded_graphs() -> None:
    """mae.pth and head.pt live in cinemae/export/weights/, are found for the embedded bundle by
    its graph hashes, and the torch pipeline on them gives the graphs' logits (they really are the
    weights the bundle was exported from)."""
    import pytest

    pytest.importorskip("torch")
    from cinemae.export.checkpoint import load_checkpoint
    from cinemae.export.head import load_head
    from cinemae.export.reference import TorchReference
    from cinemae.export.source_weights import find_source_weights
    from cinemae.runtime import Detector

    with Detector(device="cpu") as det:
        found = find_source_weights(det.bundle)
        assert found is not None and "runtime" not in found[0].parts and found[0].parent.name == "cifake32"
        model, _ = load_checkpoint(found[0], norm_pix=det.bundle.backbone.norm_pix)
        head = load_head(str(found[1]))[0]
        rng = np.random.default_rng(0)
        imgs = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
        batch = np.stack([det.preprocess(x) for x in imgs])
        onnx_logit = det.run_arrays(batch).logit
        ref = TorchReference(model.eval(), head.eval(), det.bundle.lam).run(batch, det.masks)
    np.testing.assert_allclose(ref.logit, onnx_logit, atol=1e-4)
    # weights are paired by graph hash: another bundle's graphs do not get them
    from cinemae.runtime.bundle import Bundle

    other = Bundle(det.bundle.root)
    other.manifest = {**other.manifest, "files": {**other.manifest["files"], "head.onnx": "0" * 64}}
    assert find_source_weights(other) is None
