"""ONNX export: the graph contract of DESIGN.md section 2 and parity with the torch reference
over several configs, fusions, poolings and K."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from cinemae.export.bundle import ExportOptions, ParityError, export_bundle  # noqa: E402
from cinemae.export.head import CinemaeHead, HeadConfig  # noqa: E402
from cinemae.export.model import MaskedAutoencoderViT, preset  # noqa: E402
from cinemae.runtime.bundle import Bundle, BundleError  # noqa: E402

INT32 = onnx.TensorProto.INT32
FLOAT = onnx.TensorProto.FLOAT


def io_spec(path: Path) -> tuple[dict, dict, int]:
    m = onnx.load(str(path))

    def spec(values) -> dict:  # noqa: ANN001
        return {v.name: (v.type.tensor_type.elem_type,
                         [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
                for v in values}
    opset = max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    return spec(m.graph.input), spec(m.graph.output), opset


def test_graph_contract(tiny_bundle: Path) -> None:
    b = Bundle(tiny_bundle)
    L, D = 64, 64
    ins, outs, opset = io_spec(b.graph("encoder"))
    assert opset >= 17
    assert ins["image"][0] == FLOAT and ins["image"][1][1:] == [3, 32, 32]
    assert ins["ids_keep"][0] == INT32 and isinstance(ins["ids_keep"][1][0], str)
    assert outs["tokens"][0] == FLOAT and outs["tokens"][1][2] == D
    ins, outs, _ = io_spec(b.graph("decoder"))
    assert set(ins) == {"tokens", "ids_restore"} and ins["ids_restore"][0] == INT32
    assert ins["ids_restore"][1][1] == L and outs["pred"][1][1:] == [L, 48]
    ins, outs, _ = io_spec(b.graph("head"))
    assert ins["global_tokens"][1][1:] == [1 + L, D] and ins["stats"][1][1:] == [3]
    assert outs["logit"][1][1:] == [1]


def test_dynamic_batch_and_token_count(tiny_bundle: Path) -> None:
    import onnxruntime as ort

    b = Bundle(tiny_bundle)
    enc = ort.InferenceSession(str(b.graph("encoder")), providers=["CPUExecutionProvider"])
    for batch, n in ((1, 64), (5, 16), (7, 64)):
        x = np.zeros((batch, 3, 32, 32), np.float32)
        ids = np.tile(np.arange(n, dtype=np.int32), (batch, 1))
        assert enc.run(None, {"image": x, "ids_keep": ids})[0].shape == (batch, 1 + n, 64)


def test_manifest(tiny_bundle: Path) -> None:
    m = json.loads((tiny_bundle / "cinemae.json").read_text())
    assert m["format_version"] == 1 and m["target"] == "pixel"
    assert (m["k"], m["mask_ratio"], m["mask_seed"], m["lambda"]) == (2, 0.75, 0, 1.0)
    assert m["head"]["trained"] is False and "untrained" in m["head"]["note"]
    assert set(m["files"]) >= {"encoder.onnx", "decoder.onnx", "head.onnx", "parity.json"}
    assert m["parity"]["passed"] is True and m["parity"]["max_logit_abs"]["fp32"] <= 1e-4


@pytest.mark.parametrize("arch,k,fusion,pooling", [
    ("tiny", 0, "add", "cls"),
    ("tiny", 1, "concat", "mean"),
    ("tiny-p8", 3, "gate", "cls"),
    ("tiny-224", 2, "add", "mean"),
])
def test_parity_over_configs(tmp_path: Path, arch: str, k: int, fusion: str, pooling: str) -> None:
    torch.manual_seed(0)
    cfg = preset(arch).with_(norm_pix=(arch == "tiny-p8"))
    model = MaskedAutoencoderViT(cfg).eval()
    head = CinemaeHead(HeadConfig(cfg.embed_dim, fusion=fusion, pooling=pooling, k=k)).eval()
    out, rows = export_bundle(model, head, tmp_path / "b", ExportOptions(k=k, parity_random=2),
                              log=lambda *_: None)
    assert all(r.passed for r in rows) and {r.inputs for r in rows} == {"random", "synthetic"}
    assert max(r.metrics["logit_abs"] for r in rows) <= 1e-4
    assert Bundle(out).k == k


def test_parity_failure_rejects_the_bundle(tmp_path: Path) -> None:
    model = MaskedAutoencoderViT(preset("tiny")).eval()
    head = CinemaeHead(HeadConfig(64)).eval()
    opts = ExportOptions(parity_random=1, tolerances={"logit_abs": -1.0})  # impossible
    with pytest.raises(ParityError, match="parity failed"):
        export_bundle(model, head, tmp_path / "b", opts, log=lambda *_: None)
    assert not (tmp_path / "b").exists() and (tmp_path / "b.rejected" / "parity.json").is_file()


def test_refuses_to_overwrite_a_non_bundle(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        export_bundle(MaskedAutoencoderViT(preset("tiny")), CinemaeHead(HeadConfig(64)), tmp_path,
                      ExportOptions(parity_random=1), log=lambda *_: None)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_tampered_bundle_is_refused(tiny_bundle_copy: Path) -> None:
    with open(tiny_bundle_copy / "head.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="head.onnx does not match its sha256"):
        Bundle(tiny_bundle_copy)
    (tiny_bundle_copy / "head.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        Bundle(tiny_bundle_copy)
