"""The CPU fast path: INT8 export and its gate, the OpenVINO backend (parity with ONNX Runtime fp32
at every precision, the bf16 refusal, the compiled-model cache keys).

OpenVINO tests skip without the ``openvino`` package (``pip install -e '.[openvino]'``)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cinemae.runtime.backends.base import BackendUnavailable
from cinemae.runtime.backends.openvino import cache_dir_for, check_bf16, device_id
from cinemae.runtime.bundle import Bundle
from cinemae.runtime.masks import make_masks


def _photo_like_jpegs(folder: Path, n: int, size: int = 48, seed: int = 0) -> list[Path]:
    """``n`` JPEG files of smooth scenes with discs and a little noise (stand-ins for photos)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for i in range(n):
        img = np.stack([np.sin(3 * xx + i) * 0.5 + 0.5, yy, np.cos(2 * yy - i) * 0.5 + 0.5], -1)
        for _ in range(3):
            cy, cx, r = rng.random(3) * [size, size, size / 3]
            img[(np.mgrid[0:size, 0:size][0] - cy) ** 2 + (np.mgrid[0:size, 0:size][1] - cx) ** 2 < r * r] = \
                rng.random(3)
        img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
        buf = io.BytesIO()
        Image.fromarray((img * 255).astype(np.uint8)).save(buf, "JPEG", quality=92)
        p = folder / f"img{i:03d}.jpg"
        p.write_bytes(buf.getvalue())
        out.append(p)
    return out


def _export_int8(out: Path, images: Path, tolerances: dict[str, float] | None = None) -> Path:
    torch = pytest.importorskip("torch")
    from cinemae.export.bundle import ExportOptions, export_bundle
    from cinemae.export.head import CinemaeHead, HeadConfig
    from cinemae.export.model import MaskedAutoencoderViT, preset

    torch.manual_seed(0)
    cfg = preset("tiny")
    model = MaskedAutoencoderViT(cfg).eval()
    head = CinemaeHead(HeadConfig(cfg.embed_dim, k=2)).eval()
    files = sorted(images.glob("*.jpg"))
    opts = ExportOptions(k=2, crop_ratio=1.0, parity_random=2, model_id="test-int8", precisions=("fp32", "int8"),
                         parity_images=files[:4], calibration_images=files[1::2], int8_gate_images=files[0::2],
                         int8_tolerances=tolerances)
    export_bundle(model, head, out, opts, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def jpeg_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("photos")
    _photo_like_jpegs(d, 24)
    return d


@pytest.fixture(scope="session")
def int8_bundle(tmp_path_factory: pytest.TempPathFactory, jpeg_dir: Path) -> Bundle:
    return Bundle(_export_int8(tmp_path_factory.mktemp("b") / "tiny-int8", jpeg_dir))


@pytest.fixture(scope="session")
def batch(int8_bundle: Bundle, jpeg_dir: Path) -> np.ndarray:
    from cinemae.runtime.preprocess import preprocess

    s = int8_bundle.backbone.img_size
    return np.stack([preprocess(p, s, int8_bundle.crop_ratio) for p in sorted(jpeg_dir.glob("*.jpg"))[:8]])


def _masks(bundle: Bundle):  # noqa: ANN202
    return make_masks(bundle.backbone.num_patches, bundle.k, bundle.mask_ratio, bundle.mask_seed)


def _p(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z.astype(np.float64)))


# ---------------------------------------------------------------------------------------------
# INT8 export and its gate


def test_int8_export_writes_gated_qdq_graphs(int8_bundle: Bundle) -> None:
    import onnx

    m = int8_bundle.manifest
    assert m["graphs"]["int8"] == {"encoder": "encoder.int8.onnx", "decoder": "decoder.int8.onnx"}
    assert int8_bundle.graph("head", "int8").name == "head.onnx"  # the head stays fp32
    for role in ("encoder", "decoder"):
        ops = {n.op_type for n in onnx.load(str(int8_bundle.graph(role, "int8"))).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    gate = m["int8"]
    assert gate["passed"] is True and gate["gate_images"] == 12 and gate["calibration_images"] == 12
    row = gate["gate"]["onnxruntime-cpu/int8"]
    assert row["passed"] and 0 <= row["p_abs_max"] <= gate["tolerances"]["p_abs_max"]
    assert 0.0 <= row["decision_agreement"] <= 1.0
    report = json.loads((int8_bundle.root / "int8_report.json").read_text())
    assert report["gate"]["passed"] and report["graphs"]["encoder"]["quantize_linear_nodes"] > 0


def test_int8_runs_in_onnxruntime_close_to_fp32(int8_bundle: Bundle, batch: np.ndarray) -> None:
    from cinemae.runtime.backends.onnxruntime_cpu import OnnxRuntimeCPU

    masks = _masks(int8_bundle)
    ref = OnnxRuntimeCPU(int8_bundle, "fp32").run(batch, masks)
    q = OnnxRuntimeCPU(int8_bundle, "int8").run(batch, masks)
    assert np.all(np.isfinite(q.logit)) and np.all(np.isfinite(q.stats))
    assert np.max(np.abs(_p(q.logit) - _p(ref.logit))) <= 0.05
    assert not np.array_equal(q.logit, ref.logit)  # the int8 graphs really ran


def test_int8_gate_rejects_the_export(tmp_path: Path, jpeg_dir: Path) -> None:
    from cinemae.export.bundle import ParityError

    out = tmp_path / "rejected-int8"
    with pytest.raises(ParityError):
        _export_int8(out, jpeg_dir, tolerances={"p_abs_max": -1.0, "decision_agreement_decisive": 0.99})
    assert not out.exists()
    rejected = tmp_path / "rejected-int8.rejected"
    report = json.loads((rejected / "int8_report.json").read_text())
    assert report["gate"]["passed"] is False
    assert any("p_abs_max" in f for r in report["gate"]["rows"] for f in r["failures"])
    assert json.loads((rejected / "cinemae.json").read_text())["int8"]["passed"] is False


def test_int8_gate_row_counts_decisions() -> None:
    from cinemae.export.int8 import gate_row
    from cinemae.runtime.backends.base import BatchOutput

    ref = BatchOutput(logit=np.array([-3.0, 3.0, 0.01, -4.0], np.float32), stats=np.ones((4, 3), np.float32))
    out = BatchOutput(logit=np.array([-3.0, -3.0, -0.01, -4.0], np.float32), stats=np.ones((4, 3), np.float32))
    row = gate_row("x/int8", ref, out, 0.5, {"p_abs_max": 0.05, "decision_agreement_decisive": 0.99})
    assert row.metrics["decision_agreement"] == 0.5  # items 1 and 2 flip
    assert row.metrics["n_decisive"] == 3 and row.metrics["decision_agreement_decisive"] == pytest.approx(2 / 3)
    assert not row.passed and len(row.failures) == 2


# ---------------------------------------------------------------------------------------------
# OpenVINO


def test_bf16_refused_without_native_bf16() -> None:
    with pytest.raises(BackendUnavailable, match="no native bf16"):
        check_bf16(["FP32", "FP16", "INT8", "BIN", "EXPORT_IMPORT"])
    check_bf16(["BF16", "FP32", "INT8"])  # a CPU with AVX512-BF16 / AMX-BF16 passes


def test_cache_dir_changes_with_every_key_part(tmp_path: Path) -> None:
    cfg = {"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": "1"}
    base = cache_dir_for(tmp_path, "2026.4.1", "cpu-a", "ab" * 32, cfg)
    others = [cache_dir_for(tmp_path, "2026.5.0", "cpu-a", "ab" * 32, cfg),
              cache_dir_for(tmp_path, "2026.4.1", "cpu-b", "ab" * 32, cfg),
              cache_dir_for(tmp_path, "2026.4.1", "cpu-a", "cd" * 32, cfg),
              cache_dir_for(tmp_path, "2026.4.1", "cpu-a", "ab" * 32, {**cfg, "INFERENCE_PRECISION_HINT": "bf16"})]
    assert base == cache_dir_for(tmp_path, "2026.4.1", "cpu-a", "ab" * 32, dict(reversed(cfg.items())))
    assert len({base, *others}) == 5
    assert device_id("Xeon", ["amx_bf16"]) != device_id("Xeon", ["avx2"])


@pytest.fixture(scope="module")
def ov() -> object:
    return pytest.importorskip("openvino", reason="openvino is not installed (pip install -e '.[openvino]')")


def test_openvino_fp32_matches_onnxruntime(ov: object, int8_bundle: Bundle, batch: np.ndarray,
                                           tmp_path: Path) -> None:
    from cinemae.runtime.backends.onnxruntime_cpu import OnnxRuntimeCPU
    from cinemae.runtime.backends.openvino import OpenVINOBackend

    masks = _masks(int8_bundle)
    ref = OnnxRuntimeCPU(int8_bundle, "fp32").run(batch, masks, want_feature=True)
    be = OpenVINOBackend(int8_bundle, "fp32", threads=2, cache_dir=tmp_path)
    for b in (1, 3, len(batch)):  # dynamic batch: one compiled model for every size
        out = be.run(batch[:b], masks, want_feature=True)
        np.testing.assert_allclose(out.logit, ref.logit[:b], atol=1e-4)
        np.testing.assert_allclose(out.stats, ref.stats[:b], rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(out.feature, ref.feature[:b], atol=1e-3)
    assert be.name == "openvino" and set(out.timings) >= {"global_encoder", "decoder", "lcas", "head"}


@pytest.mark.parametrize("precision,p_tol,stats_rel", [("bf16", 0.05, 0.05), ("int8", 0.05, 0.2)])
def test_openvino_reduced_precision_close_to_fp32(ov: object, int8_bundle: Bundle, batch: np.ndarray,
                                                  tmp_path: Path, precision: str, p_tol: float,
                                                  stats_rel: float) -> None:
    import openvino

    from cinemae.runtime.backends.onnxruntime_cpu import OnnxRuntimeCPU
    from cinemae.runtime.backends.openvino import OpenVINOBackend

    caps = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if precision == "bf16" and "BF16" not in caps:
        with pytest.raises(BackendUnavailable, match="no native bf16"):
            OpenVINOBackend(int8_bundle, "bf16", cache_dir=tmp_path)
        pytest.skip("this CPU has no native bf16 (the refusal was checked instead)")
    masks = _masks(int8_bundle)
    ref = OnnxRuntimeCPU(int8_bundle, "fp32").run(batch, masks)
    out = OpenVINOBackend(int8_bundle, precision, threads=2, cache_dir=tmp_path).run(batch, masks)
    assert np.all(np.isfinite(out.logit))
    assert np.max(np.abs(_p(out.logit) - _p(ref.logit))) <= p_tol
    assert np.max(np.abs(out.stats - ref.stats) / np.maximum(np.abs(ref.stats), 1e-3)) <= stats_rel
    assert not np.array_equal(out.logit, ref.logit)


def test_openvino_cache_never_loads_a_stale_blob(ov: object, int8_bundle: Bundle, batch: np.ndarray,
                                                 tmp_path: Path) -> None:
    """A second bundle whose encoder differs (other weights, same names and shapes) compiles into
    other cache directories, and its results are its own graph's, not the cached blob's."""
    from cinemae.runtime.backends.onnxruntime_cpu import OnnxRuntimeCPU
    from cinemae.runtime.backends.openvino import OpenVINOBackend

    cache = tmp_path / "cache"
    masks = _masks(int8_bundle)
    a = OpenVINOBackend(int8_bundle, "fp32", cache_dir=cache)
    assert any(a.cache_dirs["encoder"].iterdir())  # the blob was written
    out_a = a.run(batch, masks)
    again = OpenVINOBackend(int8_bundle, "fp32", cache_dir=cache)  # a cache hit: same directory
    assert again.cache_dirs == a.cache_dirs
    np.testing.assert_array_equal(again.run(batch, masks).logit, out_a.logit)

    other = _changed_encoder_copy(int8_bundle, tmp_path / "other")
    b = OpenVINOBackend(other, "fp32", cache_dir=cache)
    assert b.cache_dirs["encoder"] != a.cache_dirs["encoder"]
    assert b.cache_dirs["head"] == a.cache_dirs["head"]  # the unchanged head graph is shared
    out_b = b.run(batch, masks)
    ref_b = OnnxRuntimeCPU(other, "fp32").run(batch, masks)
    np.testing.assert_allclose(out_b.logit, ref_b.logit, atol=1e-4)
    assert np.max(np.abs(out_b.logit - out_a.logit)) > 1e-3
    # another precision of the same graph is another directory too (OpenVINO's own key missed it)
    if "BF16" in __import__("openvino").Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        c = OpenVINOBackend(int8_bundle, "bf16", cache_dir=cache)
        assert c.cache_dirs["encoder"] != a.cache_dirs["encoder"]
        assert np.all(np.isfinite(c.run(batch, masks).logit))


def _changed_encoder_copy(bundle: Bundle, out: Path) -> Bundle:
    """A copy of ``bundle`` whose encoder's largest weight is scaled by 1.5 (manifest rehashed)."""
    import onnx
    from onnx import numpy_helper

    from cinemae.runtime.bundle import write_manifest

    shutil.copytree(bundle.root, out)
    m = onnx.load(str(out / "encoder.onnx"))
    big = max(m.graph.initializer, key=lambda t: np.prod(t.dims))
    big.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(big) * 1.5, big.name))
    onnx.save(m, str(out / "encoder.onnx"))
    write_manifest(out, {k: v for k, v in bundle.manifest.items() if k != "files"})
    return Bundle(out)


def test_openvino_refuses_unknown_device_and_missing_int8(ov: object, tmp_path: Path) -> None:
    from cinemae.runtime.backends.openvino import OpenVINOBackend
    from cinemae.runtime.bundle import resolve_bundle

    embedded = resolve_bundle(None)
    if "int8" not in embedded.precisions():
        with pytest.raises(BackendUnavailable, match="no int8 graphs"):
            OpenVINOBackend(embedded, "int8", cache_dir=tmp_path)
    with pytest.raises(BackendUnavailable, match="lists no NPU"):
        if "NPU" in __import__("openvino").Core().available_devices:
            pytest.skip("this machine has an NPU")
        OpenVINOBackend(embedded, "fp32", device="npu", cache_dir=tmp_path)
    with pytest.raises(BackendUnavailable, match="not fp16"):
        OpenVINOBackend(embedded, "fp16", cache_dir=tmp_path)


def test_bench_plans_the_cpu_precision_rows() -> None:
    """--precision fp32,bf16,int8 on the CPU: torch eager + bf16 autocast, ONNX Runtime fp32 + int8,
    OpenVINO fp32 + bf16 + int8; no combination a runner does not have."""
    from cinemae.benchmarks.cli import plan_specs

    rows = plan_specs("torch,onnxruntime-cpu,openvino", "cpu", "fp32,bf16,int8", False, has_gpu=False)
    assert {(s.backend, s.precision) for s in rows} == {
        ("torch", "fp32"), ("torch", "bf16"), ("onnxruntime-cpu", "fp32"), ("onnxruntime-cpu", "int8"),
        ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8")}
    assert next(s for s in rows if s.backend == "torch" and s.precision == "bf16").label == \
        "torch autocast bf16 (cpu)"
