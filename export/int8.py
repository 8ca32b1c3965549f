"""INT8 graphs: statically quantised (QDQ) encoder and decoder, calibrated on real images.

``cinemae-export --precision int8`` writes ``encoder.int8.onnx`` and ``decoder.int8.onnx`` beside
the fp32 graphs; the head stays fp32 (``Bundle.graph("head", "int8")`` falls back to it). The
graphs are ONNX QDQ (QuantizeLinear/DequantizeLinear around every MatMul/Gemm/Conv), made with
ONNX Runtime's ``quantize_static``: weights int8 symmetric per output channel, activations uint8
asymmetric with ranges from the fp32 graph's activations on real images (MinMax), the layout both
ONNX Runtime CPU (VNNI / AMX-INT8 kernels) and OpenVINO (it folds QDQ into int8 primitives) run.
The weight matmuls (qkv, attention projection, MLP fc1, decoder embedding/prediction) are int8;
layer norms, softmax, the residual stream and the sensitive layers of :func:`float_nodes` stay
float.

Reference, convert, check: the parity gate compares the INT8 forms with the fp32 graphs on real
photos (decision agreement at the bundle threshold and |Δp|, p = sigmoid(logit)); an INT8 form
outside :data:`INT8_TOLERANCES` rejects the export. The gate's figures go into the manifest
(``int8``) and ``int8_report.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.evaluation import probabilities as _p
from .recheck import run_batches as _run

_logger = logging.getLogger(__name__)

#: INT8 forms vs the fp32 graphs on real images. ``decision_agreement_decisive`` counts only the
#: items whose fp32 p lies farther than ``p_abs_max`` from the threshold (an untrained head puts
#: every p near 0.5, where an in-tolerance difference may flip the decision);
#: ``decision_agreement`` over all items is reported beside it.
INT8_TOLERANCES = {"p_abs_max": 0.05, "decision_agreement_decisive": 0.99}
QUANTIZED_OPS = ("MatMul", "Gemm")
ROLES = ("encoder", "decoder")
#: nodes left in float, by the name the exporter gives them: the MLP output projections, whose
#: input (the GELU output) has outlier channels that one per-tensor uint8 scale cannot hold
KEEP_FLOAT_NAMES = ("/mlp/fc2/",)


def float_nodes(model: Any) -> list[str]:
    """Nodes of an fp32 graph that stay float in the INT8 graph: every MatMul whose second
    operand is an activation (attention's q.k^T and attn.v: two dynamic ranges per product) and
    the MLP output projections (:data:`KEEP_FLOAT_NAMES`). The patch-embedding Conv is not
    quantised either (Conv is not in :data:`QUANTIZED_OPS`).

    Measured on the embedded CIFAKE bundle (200 test images, fp32 vs ORT int8 max |dp|):
    everything quantised 0.105 (OpenVINO 0.72, from the patch-embedding Conv), without the Conv
    0.13, also without attention's activation products 0.17, also without fc2 0.036."""
    inits = {i.name for i in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    out = []
    for n in model.graph.node:
        if n.op_type not in QUANTIZED_OPS:
            continue
        dynamic_b = len(n.input) > 1 and n.input[1] not in inits and n.input[1] not in consts
        if dynamic_b or any(k in n.name for k in KEEP_FLOAT_NAMES):
            out.append(n.name)
    return out


@dataclass
class GateRow:
    """The INT8 form of one runtime backend against the fp32 graphs on the gate images."""

    form: str  # "onnxruntime-cpu/int8", "openvino/int8"
    n: int
    metrics: dict[str, float]
    tolerances: dict[str, float]
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"form": self.form, "n": self.n, "metrics": self.metrics, "tolerances": self.tolerances,
                "passed": self.passed, "failures": self.failures}


class _Feeds:
    """onnxruntime.quantization.CalibrationDataReader over a list of feeds {input: array}, with
    the ``__len__`` / ``set_range`` that ``CalibStridedMinMax`` uses to calibrate a slice at a time."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self.feeds = list(feeds)
        self.it: Iterator[dict[str, np.ndarray]] = iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.it, None)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.it = iter(self.feeds[start_index:end_index])

    def rewind(self) -> None:
        self.it = iter(self.feeds)


def quantize_graph(src: Path, dst: Path, feeds: Sequence[dict[str, np.ndarray]],
                   per_channel: bool = True, options: dict[str, Any] | None = None,
                   exclude: Sequence[str] | None = None) -> dict[str, Any]:
    """Statically quantise the fp32 graph ``src`` into a QDQ graph ``dst``, activation ranges
    from ``feeds`` (the graph's inputs on real images); ``exclude``: node names left float
    (default :func:`float_nodes`). Returns what was done."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(_Feeds, CalibrationDataReader):
        pass

    if not feeds:
        raise ValueError(f"{src.name}: no calibration inputs")
    import onnx

    t = time.perf_counter()
    if exclude is None:
        exclude = float_nodes(onnx.load(str(src), load_external_data=False))
    tmp = dst.with_name(dst.name + ".tmp.onnx")
    quantize_static(str(src), str(tmp), Reader(feeds), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(QUANTIZED_OPS), per_channel=per_channel, reduce_range=False,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    # ranges one batch at a time, merged into a running min/max: memory bounded by one
                    # batch's activations (ViT-L). (CalibMaxIntermediateOutputs would be the option
                    # for this, but ONNX Runtime 1.32 drops the batches it collected when it fires.)
                    extra_options={"CalibStridedMinMax": 1, **(options or {})},
                    nodes_to_exclude=list(exclude) or None)
    tmp.replace(dst)
    m = onnx.load(str(dst), load_external_data=False)
    n_q = sum(n.op_type == "QuantizeLinear" for n in m.graph.node)
    n_ops = sum(n.op_type in QUANTIZED_OPS for n in m.graph.node)  # MatMul/Gemm, quantised or not
    return {"graph": dst.name, "source": src.name, "calibration_batches": len(feeds),
            "quantize_linear_nodes": n_q, "matmul_nodes": n_ops, "float_nodes": len(exclude),
            "seconds": round(time.perf_counter() - t, 2)}


def convert_graphs_int8(stage: Path, fp32_graphs: dict[str, str], model: Any, images: np.ndarray,
                        masks: Any, lam: float, log: Callable[[str], None] = _logger.info
                        ) -> tuple[dict[str, str], dict[str, Any]]:
    """Write ``encoder.int8.onnx`` and ``decoder.int8.onnx`` into ``stage``.

    images: [N, 3, H, W] normalised real images (the calibration set); masks: the bundle's
    MaskSet (the decoder is calibrated on the masked passes the runtime makes).
    Returns ({"encoder": ..., "decoder": ...} relative to ``stage``, the conversion report)."""
    from .fp16 import _calibration_feeds

    if images.shape[0] == 0:
        raise ValueError("INT8 calibration needs real images (--calibration-images or --parity-images)")
    feeds = _calibration_feeds(stage, fp32_graphs, model, images, masks, lam)
    out: dict[str, str] = {}
    graphs = {}
    for role in ROLES:
        if not feeds[role]:
            log(f"int8 {role}: no calibration inputs (K=0 has no decoder pass); {role} stays fp32")
            continue
        dst = stage / f"{role}.int8.onnx"
        graphs[role] = quantize_graph(stage / fp32_graphs[role], dst, feeds[role])
        out[role] = dst.name
        log(f"int8 {role}: {graphs[role]['quantize_linear_nodes']} QuantizeLinear nodes, "
            f"{graphs[role]['calibration_batches']} calibration batches, {graphs[role]['seconds']} s")
    report = {"method": "onnxruntime.quantization.quantize_static (QDQ, MinMax; weights int8 symmetric "
                        "per channel, activations uint8 asymmetric)",
              "quantized_ops": list(QUANTIZED_OPS), "float": "attention activation products, MLP fc2, "
              "patch-embedding Conv, norms, softmax, residual adds",
              "calibration_images": int(images.shape[0]),
              "head": "fp32", "graphs": graphs}
    return out, report


def gate_row(form: str, ref: Any, out: Any, threshold: float, tolerances: dict[str, float]) -> GateRow:
    """Compare one INT8 run ``out`` with the fp32 run ``ref`` (BatchOutputs of the same images)."""
    p_ref, p = _p(ref.logit), _p(out.logit)
    dp = np.abs(p - p_ref)
    same = (p >= threshold) == (p_ref >= threshold)
    decisive = np.abs(p_ref - threshold) > tolerances.get("p_abs_max", 0.0)
    denom = np.maximum(np.abs(ref.stats), 1e-6)
    metrics = {"p_abs_max": float(dp.max()), "p_abs_mean": float(dp.mean()),
               "logit_abs_max": float(np.max(np.abs(out.logit - ref.logit))),
               "stats_rel_max": float(np.max(np.abs(out.stats - ref.stats) / denom)) if ref.stats.size else 0.0,
               "decision_agreement": float(np.mean(same)),
               "decision_agreement_decisive": float(np.mean(same[decisive])) if decisive.any() else 1.0,
               "n_decisive": int(decisive.sum())}
    failures = []
    for key, tol in tolerances.items():
        v = metrics[key]
        bad = v < tol if key.startswith("decision_agreement") else not v <= tol
        if bad:
            failures.append(f"{key} = {v:.3g} (tolerance {tol:g})")
    return GateRow(form, int(len(ref.logit)), metrics, dict(tolerances), failures)


def int8_gate(bundle: Any, images: np.ndarray, masks: Any, tolerances: dict[str, float] | None = None,
              forms: Sequence[str] | None = None, log: Callable[[str], None] = _logger.info) -> list[GateRow]:
    """The INT8 form in each CPU backend of ``forms`` that can run here (default: every registered
    CPU backend that runs int8: ONNX Runtime CPU, OpenVINO) against the fp32 graphs in ONNX Runtime
    CPU, on ``images`` [N, 3, H, W] (real photos, not the calibration images)."""
    from ..runtime.backends.base import BackendUnavailable
    from ..runtime.backends.onnxruntime_cpu import OnnxRuntimeCPU
    from ..runtime.backends.registry import create_backend, specs

    if forms is None:
        forms = [s.name for s in specs() if "cpu" in s.devices and "int8" in s.precisions]

    tol = dict(tolerances or INT8_TOLERANCES)
    fp32 = OnnxRuntimeCPU(bundle, "fp32")
    ref = _run(fp32, images, masks)
    fp32.close()
    rows = []
    for form in forms:
        try:
            be, _ = create_backend(bundle, form, "cpu", "int8")
        except (BackendUnavailable, ImportError) as e:
            log(f"int8 gate: {form} cannot run here ({e}); not gated")
            continue
        rows.append(gate_row(f"{form}/int8", ref, _run(be, images, masks), bundle.threshold, tol))
        be.close()
    return rows


def format_gate(rows: Sequence[GateRow]) -> str:
    """A plain table of the gate rows."""
    lines = [f"{'form':<22} {'n':>4} {'max|dp|':>9} {'mean|dp|':>9} {'|dlogit|':>9} {'agree':>6} "
             f"{'decisive':>8}  result"]
    for r in rows:
        m = r.metrics
        lines.append(f"{r.form:<22} {r.n:>4} {m['p_abs_max']:>9.2e} {m['p_abs_mean']:>9.2e} "
                     f"{m['logit_abs_max']:>9.2e} {m['decision_agreement']:>6.3f} "
                     f"{m['decision_agreement_decisive']:>8.3f}  "
                     + ("ok" if r.passed else "FAIL: " + "; ".join(r.failures)))
    return "\n".join(lines)


def write_report(stage: Path, conversion: dict[str, Any], rows: Sequence[GateRow], images: int) -> dict[str, Any]:
    """``int8_report.json`` and the manifest's ``int8`` entry (returned)."""
    report = {**conversion, "gate": {"reference": "the bundle's fp32 graphs in ONNX Runtime CPU",
                                     "images": images, "rows": [r.to_dict() for r in rows],
                                     "passed": bool(rows) and all(r.passed for r in rows)}}
    (Path(stage) / "int8_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return {"report": "int8_report.json", "method": conversion["method"], "head": "fp32",
            "calibration_images": conversion["calibration_images"], "gate_images": images,
            "passed": report["gate"]["passed"],
            "gate": {r.form: {**{k: round(v, 6) if isinstance(v, float) else v for k, v in r.metrics.items()},
                              "passed": r.passed} for r in rows},
            "tolerances": rows[0].tolerances if rows else dict(INT8_TOLERANCES)}


__all__ = ["INT8_TOLERANCES", "GateRow", "add_int8_graphs", "convert_graphs_int8", "format_gate", "gate_row",
           "int8_gate", "quantize_graph", "write_report"]


def add_int8_graphs(src: str | Path, out: str | Path, calibration: Sequence[Any], gate: Sequence[Any],
                    tolerances: dict[str, float] | None = None, log: Callable[[str], None] = _logger.info) -> Path:
    """A copy of the bundle ``src`` at ``out`` with INT8 graphs added (no torch needed: the fp32
    graphs are the reference). ``calibration`` / ``gate``: image files or encoded bytes (real
    photos; disjoint). Gated like ``cinemae-export --precision int8``: on failure the copy is left
    at ``OUT.rejected`` and ValueError is raised."""
    import shutil
    from types import SimpleNamespace

    from ..runtime.bundle import Bundle, write_manifest
    from ..runtime.masks import make_masks
    from ..runtime.preprocess import InputError, preprocess
    from .recheck import with_gate_rows
    from .staging import publish_staged

    src, out = Path(src), Path(out)
    bundle = Bundle(src)
    bb = bundle.backbone

    def load(items: Sequence[Any]) -> np.ndarray:
        arrays = []
        for it in items:
            try:
                arrays.append(preprocess(it, bb.img_size, bundle.crop_ratio))
            except InputError:
                continue
        return np.stack(arrays) if arrays else np.zeros((0, 3, bb.img_size, bb.img_size), np.float32)

    calib, gate_x = load(calibration), load(gate)
    if not len(calib) or not len(gate_x):
        raise ValueError("INT8 graphs need real images to calibrate on and to gate with")
    stage = out.with_name(out.name + ".staging")
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(src, stage, ignore=shutil.ignore_patterns("*.int8.onnx", "int8_report.json"))
    manifest = {k: v for k, v in bundle.manifest.items() if k != "files"}
    masks = make_masks(bb.num_patches, bundle.k, bundle.mask_ratio, bundle.mask_seed)
    fp32 = {r: Path(bundle.graph(r, "fp32")).name for r in ("encoder", "decoder", "head")}
    model = SimpleNamespace(cfg=bb)  # the calibration feeds need only num_patches, patch_size, norm_pix
    manifest.setdefault("graphs", {})["int8"], conversion = convert_graphs_int8(
        stage, fp32, model, calib, masks, bundle.lam, log)
    write_manifest(stage, manifest)
    rows = int8_gate(Bundle(stage, require_signature=False), gate_x, masks, tolerances, log=log)
    manifest["int8"] = write_report(stage, conversion, rows, len(gate_x))
    write_manifest(stage, manifest)  # the files' hashes first: the recheck entry names the head's
    manifest["recheck"] = with_gate_rows(Bundle(stage, require_signature=False).manifest, rows)
    write_manifest(stage, manifest)
    log("int8 gate (INT8 forms vs the fp32 graphs, real images):")
    log(format_gate(rows))
    publish_staged(stage, out, manifest["int8"]["passed"],
                   lambda rejected: ValueError(f"the INT8 gate failed; no bundle written (inspect {rejected})"))
    return out
