"""GPU backends (issue 3 parts 3-5): TensorRT, ONNX Runtime CUDA, the engine cache and the
``auto`` choice.

On a machine without a GPU (CI): the GPU backends must refuse with one sentence, ``auto`` must
fall back to ONNX Runtime CPU and say why, ``--device cuda`` must exit 2 with one line, and the
engine cache's keying must rebuild on any mismatch. Tests marked ``gpu`` run each GPU backend end
to end against the CPU backend; they are skipped without a GPU (and skip themselves when the
GPU machine lacks TensorRT or onnxruntime-gpu).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cinemae.runtime.backends import BackendUnavailable, create_backend
from cinemae.runtime.backends.cuda_memory import gpu_count
from cinemae.runtime.bundle import Bundle

NO_GPU = gpu_count() == 0
needs_no_gpu = pytest.mark.skipif(not NO_GPU, reason="checks the behaviour without a GPU")


def _no_gpu_reason(msg: str) -> bool:
    """The sentence a GPU backend gives here: no GPU, or no cuda-python to look for one."""
    return msg.startswith("no CUDA GPU found") or msg.startswith("cuda-python is not installed")


def _one_sentence(msg: str) -> None:
    assert msg and "\n" not in msg and "Traceback" not in msg and len(msg) < 300, msg


@pytest.fixture(scope="module")
def bundle16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny bundle (32 px, patch 4, D=64, K=2) with fp32 and fp16 graphs."""
    torch = pytest.importorskip("torch")
    from cinemae.export.bundle import ExportOptions, export_bundle
    from cinemae.export.head import CinemaeHead, HeadConfig
    from cinemae.export.model import MaskedAutoencoderViT, preset

    torch.manual_seed(0)
    cfg = preset("tiny")
    model = MaskedAutoencoderViT(cfg).eval()
    head = CinemaeHead(HeadConfig(cfg.embed_dim, k=2)).eval()
    out = tmp_path_factory.mktemp("gpu") / "tiny16"
    opts = ExportOptions(k=2, crop_ratio=1.0, parity_random=2, precisions=("fp32", "fp16"),
                         model_id="test-gpu")
    export_bundle(model, head, out, opts, log=lambda *_: None)
    return out


# ------------------------------------------------------------------------------------------------
# without a GPU


@needs_no_gpu
@pytest.mark.parametrize("which", ["tensorrt", "onnxruntime-cuda"])
def test_gpu_backends_refuse_with_one_sentence(bundle16, which):
    b = Bundle(bundle16)
    if which == "tensorrt":
        from cinemae.runtime.backends.tensorrt import TensorRTBackend as cls
    else:
        from cinemae.runtime.backends.onnxruntime_cuda import OnnxRuntimeCUDA as cls
    with pytest.raises(BackendUnavailable) as ei:
        cls(b, "fp32", 0)
    _one_sentence(str(ei.value))
    assert _no_gpu_reason(str(ei.value))


@needs_no_gpu
def test_auto_falls_back_to_cpu_and_says_why(bundle16):
    backend, skipped = create_backend(Bundle(bundle16), "auto", "auto", "fp16")
    assert backend.name == "onnxruntime-cpu" and backend.precision == "fp16"
    assert [s.split(":")[0] for s in skipped] == ["tensorrt", "onnxruntime-cuda"]
    assert all(_no_gpu_reason(s.split(": ", 1)[1]) for s in skipped)
    backend.close()
    from cinemae.runtime.detector import Detector

    det = Detector(bundle16, device="auto")
    line = det.describe()
    # fp32 on the CPU: OpenVINO when installed (auto priority), else ONNX Runtime
    assert det.backend_name in ("openvino", "onnxruntime-cpu")
    assert line.startswith(f"backend {det.backend_name}") and "passed over: tensorrt: " in line


@needs_no_gpu
@pytest.mark.parametrize("backend", ["auto", "tensorrt", "onnxruntime"])
def test_device_cuda_without_gpu_is_one_sentence(bundle16, backend):
    from cinemae.runtime.detector import Detector

    with pytest.raises(BackendUnavailable) as ei:
        Detector(bundle16, backend=backend, device="cuda")
    _one_sentence(str(ei.value))
    assert _no_gpu_reason(str(ei.value))


@needs_no_gpu
def test_detect_cli_device_cuda_exits_2_with_one_line(bundle16, tmp_path):
    img = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    p = subprocess.run([sys.executable, "-m", "cinemae.runtime.cli", str(bundle16), str(img),
                        "--device", "cuda", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("cinemae-detect: ")
    assert _no_gpu_reason(err[0].removeprefix("cinemae-detect: "))
    assert "Traceback" not in p.stderr and p.stdout == ""


def test_bad_device_string(bundle16):
    with pytest.raises(ValueError, match="bad device"):
        create_backend(Bundle(bundle16), "auto", "gpu0")


def test_tensorrt_needs_cuda_device(bundle16):
    with pytest.raises(BackendUnavailable, match="needs --device cuda"):
        create_backend(Bundle(bundle16), "tensorrt", "cpu")


def test_import_tensorrt_message():
    from cinemae.runtime.backends.tensorrt_engine import import_tensorrt

    try:
        import_tensorrt()
    except BackendUnavailable as e:
        _one_sentence(str(e))
        assert "TensorRT" in str(e)
    else:  # installed here: nothing to check
        pytest.skip("TensorRT is installed on this machine")


def test_gpu_modules_do_not_import_torch():
    code = ("import sys\n"
            "import cinemae.runtime.backends.tensorrt, cinemae.runtime.backends.tensorrt_engine\n"
            "import cinemae.runtime.backends.onnxruntime_cuda, cinemae.runtime.backends.cuda_memory\n"
            "import cinemae.export.tensorrt_build\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


# ------------------------------------------------------------------------------------------------
# engine cache keying (no TensorRT needed: the cache is plain files)


def _key(**over):
    from cinemae.runtime.backends.tensorrt_engine import make_key

    kw = dict(role="encoder", precision="fp16", target="9.0", gpu="NVIDIA H100 80GB HBM3",
              flavour="tensorrt", trt_version="10.13.0", graph_sha256="ab" * 32,
              profiles=[{"image": ((1, 3, 32, 32), (8, 3, 32, 32), (16, 3, 32, 32))}])
    kw.update(over)
    return make_key(kw["role"], kw["precision"], kw["target"], kw["gpu"], kw["flavour"], kw["trt_version"],
                    kw["graph_sha256"], kw["profiles"])


def test_engine_cache_hits_only_on_an_exact_key(tmp_path):
    from cinemae.runtime.backends.tensorrt_engine import EngineCache

    cache = EngineCache(tmp_path)
    builds = []

    def build(tag: bytes):
        def f() -> bytes:
            builds.append(tag)
            return b"ENGINE-" + tag
        return f

    k0 = _key()
    assert k0.filename.startswith("encoder.fp16.tensorrt-10.13.0.sm90.nvidia-h100-80gb-hbm3.gabababababab.p")
    data, built = cache.load_or_build(k0, build(b"0"), log=lambda *_: None)
    assert built and data == b"ENGINE-0"
    data, built = cache.load_or_build(k0, build(b"x"), log=lambda *_: None)
    assert not built and data == b"ENGINE-0"
    side = json.loads((tmp_path / (k0.filename + ".json")).read_text())
    assert side["key"]["trt_version"] == "10.13.0" and side["key"]["target"] == "9.0"
    # each part of the key, changed, is another engine (another file name): built, never loaded
    for over in ({"trt_version": "11.0.0"}, {"flavour": "tensorrt-rtx"}, {"graph_sha256": "cd" * 32},
                 {"profiles": [{"image": ((1, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32))}]},
                 {"gpu": "NVIDIA GeForce RTX 4090", "target": "8.9"}, {"precision": "fp32"}):
        k = _key(**over)
        assert k.filename != k0.filename
        got, why = cache.lookup(k)
        assert got is None and why == "no engine built yet"
        data, built = cache.load_or_build(k, build(b"1"), log=lambda *_: None)
        assert built and data == b"ENGINE-1"
    # a sidecar whose key differs (the file renamed or edited by hand) is not trusted
    side_path = tmp_path / (k0.filename + ".json")
    meta = json.loads(side_path.read_text())
    meta["key"]["trt_version"] = "0.0.0-other"
    side_path.write_text(json.dumps(meta))
    got, why = cache.lookup(k0)
    assert got is None and why == "key mismatch (trt_version)"
    cache.load_or_build(k0, build(b"0"), log=lambda *_: None)  # rebuilt
    # a corrupted engine is rebuilt, never loaded
    (tmp_path / k0.filename).write_bytes(b"garbage")
    got, why = cache.lookup(k0)
    assert got is None and "sha256" in why


def test_bundle_profiles_shapes(bundle16):
    from cinemae.runtime.backends.tensorrt_engine import bundle_profiles

    b = Bundle(bundle16)
    p = bundle_profiles(b, max_batch=16)
    big_l, nk, d = 64, 16, 64
    g, m = p["encoder"]
    assert g["image"][2] == (16, 3, 32, 32) and g["ids_keep"] == ((1, big_l), (8, big_l), (16, big_l))
    assert m["image"][2] == (32, 3, 32, 32) and m["ids_keep"][2] == (32, nk)
    assert p["decoder"][0]["tokens"] == ((1, 1 + nk, d), (16, 1 + nk, d), (32, 1 + nk, d))
    assert p["decoder"][0]["ids_restore"][2] == (32, big_l)
    assert p["head"][0]["global_tokens"][2] == (16, 1 + big_l, d) and p["head"][0]["stats"][2] == (16, 3)
    assert len(bundle_profiles(b, 4, k=0)["encoder"]) == 1


def test_first_use_engines_are_cached_outside_the_bundle(bundle16, tmp_path, monkeypatch):
    """The bundle holds only the ahead-of-time engines its manifest lists; engines built at first
    use go to a per-bundle cache folder keyed by the graphs (adding engines to the bundle, which
    rewrites the manifest, keeps the same folder)."""
    import shutil

    from cinemae.runtime.backends.tensorrt_engine import engine_dir

    monkeypatch.setenv("CINEMAE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "b"
    shutil.copytree(bundle16, root)
    d = engine_dir(Bundle(root))
    assert d.parent == tmp_path / "cache" / "engines" and d.name.startswith("test-gpu-")
    m = json.loads((root / "cinemae.json").read_text())
    m["engines"] = []
    (root / "cinemae.json").write_text(json.dumps(m))
    assert engine_dir(Bundle(root)) == d


# ------------------------------------------------------------------------------------------------
# with a GPU: each backend end to end against ONNX Runtime CPU


def _gpu_backend(which: str, bundle: Bundle, precision: str):
    try:
        if which == "tensorrt":
            from cinemae.runtime.backends.tensorrt import TensorRTBackend

            return TensorRTBackend(bundle, precision, 0)
        from cinemae.runtime.backends.onnxruntime_cuda import OnnxRuntimeCUDA

        return OnnxRuntimeCUDA(bundle, precision, 0)
    except BackendUnavailable as e:
        pytest.skip(f"{which}: {e}")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("which", ["tensorrt", "onnxruntime-cuda"])
def test_gpu_backend_matches_cpu(bundle16, tmp_path, which, precision):
    import shutil

    from cinemae.runtime.backends.onnxruntime_cpu import OnnxRuntimeCPU
    from cinemae.runtime.masks import make_masks

    root = tmp_path / "b"
    shutil.copytree(bundle16, root)  # engines are written into the bundle
    b = Bundle(root)
    masks = make_masks(b.backbone.num_patches, b.k, b.mask_ratio, b.mask_seed)
    x = np.random.default_rng(3).standard_normal((5, 3, 32, 32)).astype(np.float32)
    ref = OnnxRuntimeCPU(b, "fp32").run(x, masks, want_feature=True, want_lcas=True)
    gpu = _gpu_backend(which, b, precision)
    try:
        tol = 2e-3 if precision == "fp32" else 5e-2
        for _ in range(3):  # eager, then (TensorRT) CUDA-graph replays
            out = gpu.run(x, masks, want_feature=True, want_lcas=True)
            assert out.logit.shape == (5,) and out.stats.shape == (5, 3)
            assert np.max(np.abs(out.logit - ref.logit)) < tol
            assert np.max(np.abs(out.stats - ref.stats) / np.maximum(np.abs(ref.stats), 1e-3)) < tol
            assert np.max(np.abs(out.feature - ref.feature)) < tol * 10
            assert out.lcas.shape == ref.lcas.shape
            assert np.array_equal(np.isnan(out.lcas), np.isnan(ref.lcas))
        small = gpu.run(x[:2], masks)  # another batch size
        assert np.max(np.abs(small.logit - ref.logit[:2])) < tol
        k0 = gpu.run(x, masks.head(0)) if which == "onnxruntime-cuda" else None
        if k0 is not None:
            assert np.all(k0.stats == 0)
    finally:
        gpu.close()


@pytest.mark.gpu
def test_auto_on_gpu_takes_a_gpu_backend(bundle16):
    backend, skipped = create_backend(Bundle(bundle16), "auto", "cuda", "fp32")
    try:
        assert backend.name in ("tensorrt", "onnxruntime-cuda")
        assert backend.name == "tensorrt" or skipped[0].startswith("tensorrt:")
    finally:
        backend.close()


@pytest.mark.gpu
def test_engine_cache_rebuilds_on_mismatch(bundle16, tmp_path):
    import shutil

    from cinemae.runtime.backends.tensorrt_engine import ensure_engines

    root = tmp_path / "b"
    shutil.copytree(bundle16, root)
    b = Bundle(root)
    cache = tmp_path / "cache"
    try:
        first = ensure_engines(b, "fp16", 0, max_batch=4, log=lambda *_: None, cache_root=cache)
    except BackendUnavailable as e:
        pytest.skip(str(e))
    assert all(e.built for e in first.values()) and set(first) == {"encoder", "decoder", "head"}
    again = ensure_engines(b, "fp16", 0, max_batch=4, log=lambda *_: None, cache_root=cache)
    assert not any(e.built for e in again.values())
    side = first["decoder"].path.with_name(first["decoder"].path.name + ".json")
    meta = json.loads(side.read_text())
    meta["sha256"] = "0" * 64  # as if the engine file were corrupted
    side.write_text(json.dumps(meta))
    third = ensure_engines(b, "fp16", 0, max_batch=4, log=lambda *_: None, cache_root=cache)
    assert third["decoder"].built and not third["encoder"].built
    other = ensure_engines(b, "fp16", 0, max_batch=8, log=lambda *_: None, cache_root=cache)  # new profiles
    assert all(e.built for e in other.values())
