"""The borderline fp32 recheck (issue 14): at a reduced precision, an image whose p lies within the
margin of a decision edge is scored again at fp32 by the same backend, and the fp32 verdict is
the answer. One family over the reduced forms (OpenVINO bf16, ONNX Runtime int8), on the embedded
CIFAKE bundle and a copy of it with INT8 graphs; real backends throughout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cinemae.runtime.backends import BackendUnavailable
from cinemae.runtime.bundle import Bundle, default_bundle_path, write_manifest
from cinemae.runtime.detector import Detector
from cinemae.runtime.precision import RECHECK_SAFETY, edge_distance, head_sha256, recheck_margin

from .test_openvino import _photo_like_jpegs

FORMS = [("openvino", "bf16"), ("onnxruntime-cpu", "int8")]
LOOSE = {"p_abs_max": 1.0, "decision_agreement_decisive": 0.0}  # the gate is not what is tested here


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return _photo_like_jpegs(tmp_path_factory.mktemp("photos"), 24, size=40, seed=3)


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory: pytest.TempPathFactory, jpegs: list[Path]) -> Path:
    """The embedded bundle plus INT8 graphs (add_int8_graphs: calibrated, gated, margins recorded)."""
    from cinemae.export.int8 import add_int8_graphs

    src = default_bundle_path()
    if src is None:
        pytest.skip("this install has no embedded bundle")
    return add_int8_graphs(src, tmp_path_factory.mktemp("b") / "cifake32-int8", jpegs[:8], jpegs[8:16], LOOSE)


def _detector(bundle: Path | Bundle, backend: str, precision: str, **kw) -> Detector:
    try:
        return Detector(bundle, backend=backend, device="cpu", precision=precision, provenance=False, **kw)
    except BackendUnavailable as e:
        pytest.skip(f"{backend}/{precision} cannot run here: {e}")


def _with_decision(src: Path, dst: Path, threshold: float) -> Path:
    """A copy of ``src`` whose threshold is ``threshold`` and whose abstain band is empty."""
    shutil.copytree(src, dst)
    m = {k: v for k, v in json.loads((dst / "cinemae.json").read_text()).items() if k != "files"}
    m["decision"] = {**m["decision"], "threshold": threshold, "abstain_band": [threshold, threshold]}
    write_manifest(dst, m)
    return dst


@pytest.mark.parametrize("form", FORMS, ids=["/".join(f) for f in FORMS])
def test_borderline_image_takes_the_fp32_verdict(form: tuple[str, str], int8_bundle: Path, jpegs: list[Path],
                                                 tmp_path: Path) -> None:
    """A threshold put between an image's reduced-precision p and its fp32 p flips its verdict
    without the recheck; with it the image is rechecked and gets fp32's verdict, score and LCAS
    map, while an image far from the threshold is not rechecked and keeps its reduced score."""
    name, prec = form
    imgs = jpegs[16:]
    with _detector(int8_bundle, name, "fp32") as d32, _detector(int8_bundle, name, prec, recheck=False) as dq:
        ref, low = d32.detect_batch(imgs, want_lcas=True), dq.detect_batch(imgs)
    p32, pq = np.array([r.score for r in ref]), np.array([r.score for r in low])
    i = int(np.argmax(np.abs(pq - p32)))
    assert pq[i] != p32[i], "the reduced precision really ran"
    thr = float((pq[i] + p32[i]) / 2)
    bundle = _with_decision(int8_bundle, tmp_path / "b", thr)
    margin = 1.01 * abs(pq[i] - thr)
    far = [j for j in range(len(imgs)) if abs(pq[j] - thr) > margin]
    assert far, "some image lies outside the margin"

    with _detector(bundle, name, prec, recheck=False) as off:
        plain = off.detect_batch(imgs)
        assert "rechecked" not in plain[i].to_record() and "recheck_margin" not in off.model
    with _detector(bundle, name, prec, recheck=margin) as det:
        got = det.detect_batch(imgs, want_lcas=True)
        assert det.model["recheck_margin"] == pytest.approx(margin)
    verdict32 = "ai" if p32[i] >= thr else "real"
    assert plain[i].verdict != verdict32  # a real flip without the recheck
    assert got[i].rechecked is True and got[i].to_record()["rechecked"] is True
    assert got[i].verdict == verdict32
    assert got[i].score == pytest.approx(p32[i], abs=1e-5)
    assert np.allclose(got[i].lcas, ref[i].lcas, atol=1e-4, equal_nan=True)
    assert "recheck" in got[i].timings
    for j in far:
        assert got[j].rechecked is False and got[j].to_record()["rechecked"] is False
        assert got[j].score == plain[j].score  # untouched: the reduced-precision score of the same call


@pytest.mark.parametrize("form", FORMS, ids=["/".join(f) for f in FORMS])
def test_fp32_and_opt_out_never_recheck(form: tuple[str, str], int8_bundle: Path, jpegs: list[Path]) -> None:
    """fp32 has nothing to recheck (even with a margin given); ``recheck=False`` turns it off even
    where every image would be borderline; a margin below 0 is refused in one sentence."""
    name, prec = form
    with _detector(int8_bundle, name, "fp32", recheck=1.0) as d32:
        assert d32.recheck is None and d32.detect(jpegs[0]).rechecked is None
    with _detector(int8_bundle, name, prec, recheck=False) as off:
        assert off.recheck is None and off.detect(jpegs[0]).rechecked is None
    with _detector(int8_bundle, name, prec, recheck=1.0) as every:  # every p is within 1 of an edge
        assert all(r.rechecked for r in every.detect_batch(jpegs[:3]))
    with pytest.raises(ValueError, match="recheck margin"):
        _detector(int8_bundle, name, prec, recheck=-0.1)


def test_int8_export_records_margins_and_a_new_head_makes_them_stale(int8_bundle: Path, jpegs: list[Path],
                                                                     tmp_path: Path) -> None:
    """add_int8_graphs records RECHECK_SAFETY x the gate's max |Δp| per INT8 form with the head's
    sha256, the detector takes it by default; a replaced head turns it off until write_margins
    measures again."""
    import onnx
    from onnx import numpy_helper

    from cinemae.export.recheck import write_margins

    b = Bundle(int8_bundle)
    entry = b.manifest["recheck"]
    gate = b.manifest["int8"]["gate"]["onnxruntime-cpu/int8"]
    row = entry["forms"]["onnxruntime-cpu/int8"]
    assert entry["head_sha256"] == head_sha256(b.manifest) == b.manifest["files"]["head.onnx"]
    assert row["p_abs_max"] == pytest.approx(gate["p_abs_max"], abs=1e-6)
    assert row["margin"] == pytest.approx(RECHECK_SAFETY * gate["p_abs_max"], abs=2e-6)
    with _detector(b, "onnxruntime-cpu", "int8") as det:
        assert det.recheck is not None and det.recheck.margin == row["margin"]
        assert det.detect(jpegs[0]).rechecked in (True, False)

    # another head (its last bias moved): the margin was measured with the old one
    root = tmp_path / "retrained"
    shutil.copytree(int8_bundle, root)
    head = onnx.load(str(root / "head.onnx"))
    last = head.graph.initializer[-1]
    last.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(last) + 0.5, last.name))
    onnx.save(head, str(root / "head.onnx"))
    write_manifest(root, {k: v for k, v in json.loads((root / "cinemae.json").read_text()).items() if k != "files"})
    assert recheck_margin(Bundle(root).manifest, "onnxruntime-cpu/int8") is None
    with _detector(root, "onnxruntime-cpu", "int8") as det:
        assert det.recheck is None and det.detect(jpegs[0]).rechecked is None

    new = write_margins(root, jpegs[8:16], forms=[("onnxruntime-cpu", "int8")])
    assert new["head_sha256"] == Bundle(root).manifest["files"]["head.onnx"] != entry["head_sha256"]
    m = new["forms"]["onnxruntime-cpu/int8"]
    assert m["images"] == 8 and m["p_abs_max"] > 0
    assert m["margin"] == pytest.approx(RECHECK_SAFETY * m["p_abs_max"], abs=2e-6)
    with _detector(root, "onnxruntime-cpu", "int8") as det:
        assert det.recheck is not None and det.recheck.margin == m["margin"]


def test_edge_distance() -> None:
    """Distance to the nearest of threshold and band edges."""
    d = edge_distance(np.array([0.5, 0.62, 0.9, 0.1]), 0.6, (0.55, 0.7))
    assert np.allclose(d, [0.05, 0.02, 0.2, 0.45])


def test_detect_cli_recheck_flags(int8_bundle: Path, jpegs: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    """cinemae-detect: the bundle's margin by default (records say ``rechecked``), --recheck-margin
    replaces it (1.0: every image), --no-recheck turns it off (no field)."""
    from cinemae.runtime.cli import main as detect_main

    args = [str(int8_bundle), *map(str, jpegs[:3]), "--backend", "onnxruntime-cpu", "--device", "cpu",
            "--precision", "int8", "--json", "--no-progress", "--no-provenance"]

    def records(*extra: str) -> list[dict]:
        capsys.readouterr()
        assert detect_main(args + list(extra)) == 0
        out = capsys.readouterr()
        return [json.loads(line) for line in out.out.splitlines() if line.strip()]

    default = records()
    assert all(isinstance(r["rechecked"], bool) for r in default)
    assert default[0]["model"]["recheck_margin"] == Bundle(int8_bundle).manifest["recheck"]["forms"][
        "onnxruntime-cpu/int8"]["margin"]
    assert all(r["rechecked"] is True for r in records("--recheck-margin", "1"))
    off = records("--no-recheck")
    assert all("rechecked" not in r and "recheck_margin" not in r["model"] for r in off)


def test_recheck_with_the_reshipping_ensemble(int8_bundle: Path, jpegs: list[Path]) -> None:
    """With the re-shipping ensemble, a rechecked image has all its rows (original and views) at
    fp32: its score and per-view scores are the fp32 detector's."""
    with _detector(int8_bundle, "onnxruntime-cpu", "fp32", reship="jpeg:60") as d32, \
            _detector(int8_bundle, "onnxruntime-cpu", "int8", reship="jpeg:60", recheck=1.0) as dq:
        ref, got = d32.detect_batch(jpegs[:3]), dq.detect_batch(jpegs[:3])
    for r, g in zip(ref, got, strict=True):
        assert g.rechecked is True and g.score == pytest.approx(r.score, abs=1e-6)
        assert [v["score"] for v in g.reship] == pytest.approx([v["score"] for v in r.reship], abs=1e-6)
        assert g.pixel_verdict == r.pixel_verdict
