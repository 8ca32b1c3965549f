"""TensorRT engines built here without a GPU (issue 15): TensorRT-RTX ahead of time, engines in the
bundle keyed by flavour/version/compute capability/precision/graph/profile, the pure engine choice
for a running GPU, and parser/builder failures that carry TensorRT's own message.

The build tests need the TensorRT-RTX wheels (``pip install 'cinemae[tensorrt-rtx]'``) and skip
with that reason without them; the selection tests need nothing but the manifest's JSON.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import pytest

from cinemae.runtime.backends.base import BackendUnavailable
from cinemae.runtime.backends.tensorrt_engine import (
    EngineBuildError,
    import_tensorrt,
    make_key,
    parse_target,
    select_engine,
)
from cinemae.runtime.bundle import Bundle

HAS_RTX = importlib.util.find_spec("tensorrt_rtx_bindings") is not None or \
    importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="TensorRT-RTX is not installed "
                               "(pip install 'cinemae[tensorrt-rtx]': tensorrt-rtx-cu13-bindings + -libs)")
TARGETS = ("sm80", "sm86")


def _rtx():
    """The TensorRT module to build with here: TensorRT-RTX (ahead of time needs it)."""
    trt = import_tensorrt(("tensorrt_rtx", "tensorrt_rtx_bindings"))
    assert trt.flavour == "tensorrt-rtx" and "8.6" in trt.aot_targets
    return trt


# ------------------------------------------------------------------------------------------------
# the module: import order, flavour, version


def test_import_order_prefers_tensorrt_then_rtx(monkeypatch):
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.13.0"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    got = import_tensorrt()
    assert (got.name, got.flavour, got.version) == ("tensorrt", "tensorrt", "10.13.0")
    assert got.aot_targets == ()  # TensorRT proper builds only for the GPU it runs on
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # "not installed"
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    if importlib.util.find_spec("tensorrt_rtx_bindings") is not None:
        got = import_tensorrt()
        assert got.name == "tensorrt_rtx_bindings" and got.flavour == "tensorrt-rtx"
        assert got.version == got.module.__version__ and got.version.count(".") >= 2
        assert {"7.5", "8.0", "8.6", "8.9"} <= set(got.aot_targets) and "9.0" not in got.aot_targets
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", None)
    with pytest.raises(BackendUnavailable) as ei:
        import_tensorrt()
    assert str(ei.value).startswith("TensorRT is not installed (module tensorrt, tensorrt_rtx or tensorrt_rtx_bindings")
    assert "\n" not in str(ei.value)


def test_rtx_bindings_find_their_libraries():
    """The standalone bindings load libtensorrt_rtx.so.1 from the tensorrt_rtx_libs wheel."""
    if importlib.util.find_spec("tensorrt_rtx_bindings") is None:
        pytest.skip("tensorrt_rtx_bindings is not installed (pip install 'cinemae[tensorrt-rtx]')")
    trt = import_tensorrt(("tensorrt_rtx_bindings",))
    import tensorrt_rtx_libs

    libs = Path(tensorrt_rtx_libs.__file__).parent
    assert (libs / "libtensorrt_rtx.so.1").is_file() and (libs / "libtensorrt_onnxparser_rtx.so.1").is_file()
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").is_file() else ""
    if maps:
        assert str(libs / "libtensorrt_rtx.so.1") in maps
    assert trt.module.Builder(trt.module.Logger(trt.module.Logger.WARNING)) is not None


def test_parse_target():
    assert [parse_target(t) for t in ("sm86", "SM_80", "89", "8.9", "sm120", "12.1")] == \
        ["8.6", "8.0", "8.9", "8.9", "12.0", "12.1"]
    with pytest.raises(ValueError, match="sm86 or 8.6"):
        parse_target("ampere")


# ------------------------------------------------------------------------------------------------
# the engine choice for a running GPU (pure: a manifest's engine list + the running key)

PROF = [{"image": ((1, 3, 32, 32), (8, 3, 32, 32), (16, 3, 32, 32))}]


def _key(target="8.6", flavour="tensorrt-rtx", version="1.7.1.116", gpu="", graph="ab" * 32, prof=None,
         role="encoder", precision="fp16"):
    return make_key(role, precision, target, gpu, flavour, version, graph, prof or PROF)


def _entries(*keys):
    return [{"file": f"engines/{k.filename}", "key": k.to_dict(), "sha256": "0" * 64} for k in keys]


@pytest.mark.parametrize("running, expect", [
    (dict(target="8.6"), "sm86"),
    (dict(target="8.0"), "sm80"),
    (dict(target="8.9"), "sm89"),
])
def test_select_engine_picks_the_running_compute_capability(running, expect):
    listed = _entries(_key("8.0"), _key("8.6"), _key("8.9"), _key("8.6", precision="fp32"),
                      _key("8.6", role="decoder"))
    got, why = select_engine(listed, _key(**running))
    assert why == "" and f".{expect}." in got["file"] and got["key"]["precision"] == "fp16"
    assert got["key"]["role"] == "encoder"


@pytest.mark.parametrize("running, reason", [
    (dict(target="9.0"), "no fp16 encoder engine for sm90 (it has sm80, sm86, sm89 for tensorrt-rtx 1.7.1.116)"),
    (dict(version="1.8.0.1"), "engines are for tensorrt-rtx 1.7.1.116, this is tensorrt-rtx 1.8.0.1"),
    (dict(flavour="tensorrt", version="10.13.0", gpu="NVIDIA H200"),
     "engines are for tensorrt-rtx 1.7.1.116, this is tensorrt 10.13.0"),
    (dict(graph="cd" * 32), "was built from another graph"),
    (dict(prof=[{"image": ((1, 3, 32, 32), (8, 3, 32, 32), (64, 3, 32, 32))}]),
     "other batch profiles (largest batch 16; this run wants 64)"),
    (dict(precision="fp32"), "the bundle has no fp32 encoder engine"),
])
def test_select_engine_says_why_none_fits(running, reason):
    listed = _entries(_key("8.0"), _key("8.6"), _key("8.9"))
    got, why = select_engine(listed, _key(**running))
    assert got is None and reason in why and "\n" not in why
    assert select_engine([], _key())[1] == "the bundle has no ahead-of-time TensorRT engines"


def test_select_engine_gpu_bound_engines():
    """TensorRT (not -RTX) engines are tied to the GPU model they were built on."""
    listed = _entries(_key("9.0", flavour="tensorrt", version="10.13.0", gpu="NVIDIA H100 80GB HBM3"))
    got, why = select_engine(listed, _key("9.0", flavour="tensorrt", version="10.13.0", gpu="NVIDIA H200"))
    assert got is None and "built on NVIDIA H100 80GB HBM3" in why
    got, _ = select_engine(listed, _key("9.0", flavour="tensorrt", version="10.13.0", gpu="NVIDIA H100 80GB HBM3"))
    assert got is not None


def test_engine_filename_names_the_key():
    k = _key("8.6")
    assert k.filename.startswith("encoder.fp16.tensorrt-rtx-1.7.1.116.sm86.gabababababab.p")
    names = {_key(t).filename for t in ("8.0", "8.6")} | {_key(graph="cd" * 32).filename,
                                                          _key(version="1.8").filename,
                                                          _key(prof=[{"image": ((1, 3, 32, 32),) * 3}]).filename}
    assert len(names) == 5  # every part of the key shows in the name


# ------------------------------------------------------------------------------------------------
# ahead-of-time builds (TensorRT-RTX, no GPU)


@pytest.fixture(scope="module")
def aot_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle (fp32 + fp16 graphs) with engines for sm80 and sm86 added by the CLI."""
    if not HAS_RTX:
        pytest.skip("TensorRT-RTX is not installed (pip install 'cinemae[tensorrt-rtx]')")
    from cinemae.export.cli import main

    root = tmp_path_factory.mktemp("aot") / "tiny"
    _export_tiny_fp16(root)
    assert main(["--bundle", str(root), "--tensorrt", "require", "--trt-targets", ",".join(TARGETS),
                 "--trt-max-batch", "8"]) == 0
    return root


def _export_tiny_fp16(out: Path) -> None:
    """conftest's tiny preset (32 px, patch 4, D=64, K=2), with fp32 and fp16 graphs."""
    torch = pytest.importorskip("torch")
    from cinemae.export.bundle import ExportOptions, export_bundle
    from cinemae.export.head import CinemaeHead, HeadConfig
    from cinemae.export.model import MaskedAutoencoderViT, preset

    torch.manual_seed(0)
    cfg = preset("tiny")
    export_bundle(MaskedAutoencoderViT(cfg).eval(), CinemaeHead(HeadConfig(cfg.embed_dim, k=2)).eval(), out,
                  ExportOptions(k=2, crop_ratio=1.0, parity_random=2, precisions=("fp32", "fp16"),
                                model_id="test-aot"), log=lambda *_: None)


@needs_rtx
def test_aot_engines_for_two_targets_are_in_the_manifest(aot_bundle, capsys):
    b = Bundle(aot_bundle)  # verifies every listed file's sha256, engines included
    engines = b.manifest["engines"]
    trt = _rtx()
    assert len(engines) == 2 * 2 * 3  # targets x precisions x (encoder, decoder, head)
    seen = set()
    for e in engines:
        k = e["key"]
        seen.add((k["target"], k["precision"], k["role"]))
        path = aot_bundle / e["file"]
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == e["sha256"] == b.manifest["files"][e["file"]]
        assert len(data) == e["bytes"] > 100_000 and e["build_s"] > 0
        assert (k["flavour"], k["trt_version"], k["gpu"]) == ("tensorrt-rtx", trt.version, "")
        assert k["graph_sha256"] == hashlib.sha256((aot_bundle / e["graph"]).read_bytes()).hexdigest()
        assert e["built"] == "ahead of time, without that GPU" and e["max_batch"] == 8
        assert f".{k['precision']}.tensorrt-rtx-{trt.version}.sm{k['target'].replace('.', '')}." in path.name
        lp = e["layers"]
        assert lp["layers"] > 0 and lp["matmul_nodes"] > 0
        if k["precision"] == "fp16":  # the strongly typed fp16 graphs' matmuls stay fp16 in the engine
            assert lp["matmul_fp16"] == lp["matmul_nodes"], lp["matmul_not_fp16"]
        else:
            assert lp["matmul_fp32"] == lp["matmul_nodes"] and lp["matmul_fp16"] == 0
    assert seen == {(t, p, r) for t in ("8.0", "8.6") for p in ("fp32", "fp16") for r in ("encoder", "decoder", "head")}
    # the same request again keeps every engine (same key, same file) instead of rebuilding
    from cinemae.export.cli import main

    before = {e["file"]: e["sha256"] for e in engines}
    assert main(["--bundle", str(aot_bundle), "--tensorrt", "require", "--trt-targets", "sm86",
                 "--trt-max-batch", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("up to date") == 6 and "building" not in out
    assert {e["file"]: e["sha256"] for e in Bundle(aot_bundle).manifest["engines"]} == before


@needs_rtx
def test_runtime_selection_finds_the_aot_engines(aot_bundle):
    """What the TensorRT backend would load on an RTX 3090 (sm86) and on an H200 (sm90)."""
    from cinemae.runtime.backends.tensorrt_engine import bundle_keys

    b = Bundle(aot_bundle)
    trt = _rtx()
    for precision in ("fp32", "fp16"):
        keys = bundle_keys(b, precision, trt, "8.6", "", max_batch=8)
        for role, key in keys.items():
            got, why = select_engine(b.manifest["engines"], key)
            assert why == "" and got["key"]["role"] == role and ".sm86." in got["file"]
        h200 = bundle_keys(b, precision, trt, "9.0", "", max_batch=8)["encoder"]
        got, why = select_engine(b.manifest["engines"], h200)
        assert got is None and why.startswith(f"the bundle has no {precision} encoder engine for sm90")
        other_batch = bundle_keys(b, precision, trt, "8.6", "", max_batch=16)["head"]
        assert "other batch profiles (largest batch 8; this run wants 16)" in select_engine(
            b.manifest["engines"], other_batch)[1]


@needs_rtx
def test_export_cli_refuses_targets_it_cannot_build(aot_bundle, tmp_path, capsys):
    from cinemae.export.cli import main

    root = tmp_path / "b"
    shutil.copytree(aot_bundle, root)
    assert main(["--bundle", str(root), "--tensorrt", "require", "--trt-targets", "sm90"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("cinemae-export: tensorrt-rtx ") and "cannot build for sm90" in err
    assert "\n" not in err and "first use" in err
    from cinemae.runtime.backends.cuda_memory import gpu_count

    if gpu_count() == 0:  # no targets and no GPU: nothing to build for
        assert main(["--bundle", str(root), "--tensorrt", "require"]) == 1
        err = capsys.readouterr().err.strip()
        assert "no CUDA GPU here" in err and "--trt-targets" in err and "sm89" in err
        assert main(["--bundle", str(root), "--tensorrt", "auto"]) == 0
        assert "TensorRT engines not built: no CUDA GPU here" in capsys.readouterr().out
    assert json.loads((root / "cinemae.json").read_text())["engines"] == Bundle(aot_bundle).manifest["engines"]


# ------------------------------------------------------------------------------------------------
# graphs TensorRT rejects: the parser's / builder's own message


def _bad_graph(path: Path, kind: str) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    if kind == "unknown-op":  # an operator no importer knows
        node = helper.make_node("NotAnOnnxOperator", ["x"], ["y"], name="mystery", domain="")
    else:  # a valid graph that cannot be built: a dynamic batch with no optimization profile
        node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    model = helper.make_model(helper.make_graph([node], "bad", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@needs_rtx
def test_parser_rejection_carries_the_parser_message(tmp_path):
    from cinemae.runtime.backends.tensorrt_engine import build_engine

    trt = _rtx()
    g = _bad_graph(tmp_path / "unknown.onnx", "unknown-op")
    with pytest.raises(EngineBuildError) as ei:
        build_engine(trt.module, g, [], None, log=lambda *_: None, target="8.6")
    msg = str(ei.value)
    assert msg.startswith("TensorRT could not parse unknown.onnx: ")
    assert "NotAnOnnxOperator" in msg and "mystery" in msg  # the parser's words, naming the node


@needs_rtx
def test_build_failure_carries_the_builder_message(tmp_path):
    from cinemae.runtime.backends.tensorrt_engine import build_engine

    trt = _rtx()
    g = _bad_graph(tmp_path / "noprofile.onnx", "no-profile")
    with pytest.raises(EngineBuildError) as ei:
        build_engine(trt.module, g, [], None, log=lambda *_: None, target="8.6")
    msg = str(ei.value)
    assert msg.startswith("TensorRT could not build an engine from noprofile.onnx: ")
    assert "profile" in msg.lower()  # the builder's complaint: dynamic input, no optimization profile
    # and with a profile the same graph builds (the failure above is the profile, nothing else)
    data = build_engine(trt.module, g, [{"x": ((1, 4), (2, 4), (4, 4))}], None, log=lambda *_: None, target="8.6")
    assert len(data) > 1000


# ------------------------------------------------------------------------------------------------
# on a GPU: the bundle's engine where it has one for this GPU, else built at first use


@pytest.mark.gpu
@needs_rtx
def test_gpu_uses_the_bundle_engine_or_builds_at_first_use(aot_bundle, tmp_path, monkeypatch):
    from cinemae.runtime.backends.cuda_memory import require_gpu
    from cinemae.runtime.backends.tensorrt_engine import ensure_engines, sm_tag

    gpu = require_gpu(0)
    b = Bundle(aot_bundle)
    monkeypatch.setenv("CINEMAE_CACHE", str(tmp_path / "cache"))
    lines: list[str] = []
    if gpu.sm in ("8.0", "8.6"):  # the bundle has engines for this GPU: loaded, not built
        got = ensure_engines(b, "fp16", 0, max_batch=8, log=lines.append)
        assert {e.source for e in got.values()} == {"bundle"} and not any(e.built for e in got.values())
        return
    monkeypatch.setenv("CINEMAE_TRT_BUILD", "never")
    with pytest.raises(BackendUnavailable) as ei:
        ensure_engines(b, "fp16", 0, max_batch=8, log=lines.append)
    assert f"the bundle has no fp16 encoder engine for {sm_tag(gpu.sm)}" in str(ei.value)
    assert "CINEMAE_TRT_BUILD=never" in str(ei.value)
    monkeypatch.delenv("CINEMAE_TRT_BUILD")
    got = ensure_engines(b, "fp16", 0, max_batch=8, log=lines.append)
    assert {e.source for e in got.values()} == {"cache"} and all(e.built for e in got.values())
    assert all(str(e.path).startswith(str(tmp_path / "cache")) for e in got.values())
    assert any("building one for this GPU at first use" in x for x in lines)
    again = ensure_engines(b, "fp16", 0, max_batch=8, log=lines.append)
    assert not any(e.built for e in again.values())


# ------------------------------------------------------------------------------------------------
# ViT-L/16 (slow: export takes minutes and a few GB; CINEMAE_VITL_BUNDLE reuses an exported one)


@pytest.mark.slow
@needs_rtx
def test_vit_large_fp16_engines_ahead_of_time(tmp_path):
    """ViT-L/16 fp16 engines for sm86 without a GPU: sizes say the weights are fp16 (engine close to
    the fp16 graph's size, about half the fp32 one's) and every fp16 matmul of the graph is fp16 in
    the engine's layer table. Results committed: benchmarks/results/tensorrt_rtx_aot_vit-large_fp16.*"""
    import os

    from cinemae.benchmarks.tensorrt_aot import run

    src = os.environ.get("CINEMAE_VITL_BUNDLE")
    root = tmp_path / "vitl"
    if src:
        shutil.copytree(src, root, ignore=shutil.ignore_patterns("engines"))
        m = json.loads((root / "cinemae.json").read_text())
        m.pop("engines", None)
        from cinemae.runtime.bundle import write_manifest

        write_manifest(root, m)
    else:
        from cinemae.export.cli import main

        assert main(["--arch", "vit-large", "--precision", "fp16", "--k", "2", "--out", str(root),
                     "--tensorrt", "skip"]) == 0
    rec = run(root, ["sm86"], "fp16", 16, log=lambda *_: None)
    assert rec["all_precision_checks_ok"], [r["precision_check"] for r in rec["engines"]]
    enc = next(r for r in rec["engines"] if r["role"] == "encoder")
    fp32_mb = (root / "encoder.onnx").stat().st_size / 1e6
    assert 0.8 * enc["graph_MB"] < enc["MB"] < 1.3 * enc["graph_MB"] and enc["MB"] < 0.65 * fp32_mb
    assert enc["precision_check"]["graph_fp16"] == 24 * 6  # qkv, q.k, attn.v, proj, fc1, fc2 per block
