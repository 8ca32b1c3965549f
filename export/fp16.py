"""FP16 graphs: strongly typed float16 versions of the three bundle graphs (DESIGN.md section 2).

The conversion is written here with ``onnx`` (no converter dependency) so that every decision is
explicit and checked:

* graph inputs and outputs stay float32; Cast nodes sit at the boundary;
* every tensor has one definite type (fp16 or fp32), checked by ``onnx.shape_inference`` in
  strict mode and ``onnx.checker`` (full check), so TensorRT 10/11 and TensorRT-RTX build the
  graph as a strongly typed network without any precision flag;
* weights of the fp16 region (MatMul, Conv, Gemm, biases) are stored in float16;
* a static block list runs in float32: ``LayerNormalization``, ``Softmax`` (and the reductions of
  a decomposed norm), plus the residual stream: an ``Add`` of two activations (the skip
  connections ``x + attn(...)`` / ``x + mlp(...)``) runs in fp32, so the stream that grows
  through the depth never lives in fp16;
* a data-driven rule on top: the fp32 graph is run on real activations (the parity images, or
  any calibration batch) with every intermediate tensor exposed, the per-tensor max |value| is
  recorded, and any node whose output exceeds ``safe_max`` (default 4096, 16x below the fp16
  limit 65504) is forced to fp32 as well. The measured maxima go to ``fp16_report.json`` and
  the manifest.

Data-movement ops (Reshape, Transpose, Gather, Concat, Slice, ...) carry whatever precision their
input has, so they add no casts.

Why the range rule works from the fp32 activations and not from an fp16 run: ONNX Runtime on the
CPU executes fp16 ops that have no CPU kernel in fp32 (and removes the cast pairs around them), so
an fp16 overflow would not show in the CPU parity check; on a GPU (TensorRT, ONNX Runtime CUDA)
it would. The measured maxima therefore decide, independently of the executor.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_logger = logging.getLogger(__name__)

FP16_MAX = 65504.0
DEFAULT_SAFE_MAX = 4096.0

# ops that always run in float32
BLOCK_OPS = frozenset({
    "LayerNormalization", "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceSumSquare",
    "ReduceL2", "Pow", "Sqrt", "Exp", "Log", "InstanceNormalization", "GroupNormalization",
    "BatchNormalization", "RMSNormalization", "Reciprocal", "Range", "CumSum",
})
# ops that only move or select data: they keep the precision of their (first float) input
PASS_OPS = frozenset({
    "Reshape", "Transpose", "Gather", "GatherElements", "GatherND", "Concat", "Slice", "Squeeze",
    "Unsqueeze", "Expand", "Split", "Identity", "Flatten", "Where", "Tile", "Pad", "Shape",
    "Size", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "ScatterElements",
    "ScatterND", "Max", "Min", "Abs", "Neg", "Relu", "MaxPool", "Dropout",
})
FLOAT, FLOAT16 = 1, 10


@dataclass
class GraphReport:
    """What the conversion of one graph did, and the activations that justify it."""

    graph: str
    nodes: int = 0
    fp32_nodes: dict[str, int] = field(default_factory=dict)  # reason -> count
    forced_by_range: list[str] = field(default_factory=list)
    casts: int = 0
    fp16_initializers: int = 0
    fp32_initializers: int = 0
    max_abs_all: float = 0.0  # over every float tensor of the fp32 graph (calibration inputs)
    max_abs_all_tensor: str = ""
    max_abs_fp16: float = 0.0  # over the tensors that the fp16 graph computes in fp16
    max_abs_fp16_tensor: str = ""
    max_abs_residual: float = 0.0  # over the outputs of the fp32 residual adds
    output_abs_err: float = 0.0  # fp16 graph vs fp32 graph on the calibration inputs
    output_rel_err: float = 0.0
    calibration_batches: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------------------------
# graph preparation


def _normalise(model: Any) -> Any:
    """Constant nodes with a tensor value -> initializers; Identity of an initializer -> a copy
    of the initializer (torch shares equal weights through Identity)."""
    import onnx
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    keep = []
    for n in g.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            g.initializer.append(t)
            inits[t.name] = t
            continue
        if n.op_type == "Identity" and n.input[0] in inits:
            arr = numpy_helper.to_array(inits[n.input[0]])
            t = numpy_helper.from_array(arr, n.output[0])
            g.initializer.append(t)
            inits[t.name] = t
            continue
        keep.append(n)
    for n in g.node:
        for a in n.attribute:
            if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise ValueError(f"node {n.name} ({n.op_type}) has a subgraph; the fp16 "
                                 "conversion handles flat graphs only")
    del g.node[:]
    g.node.extend(keep)
    # drop initializers nothing reads any more
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    live = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(live)
    return model


def _elem_types(model: Any) -> dict[str, int]:
    import onnx

    if model.ByteSize() > 1_800_000_000:  # over protobuf's 2 GiB limit: infer through files
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "m.onnx", Path(tmp) / "inferred.onnx"
            big = onnx.ModelProto()
            big.CopyFrom(model)
            onnx.save_model(big, str(src), save_as_external_data=True, location="m.onnx.data")
            onnx.shape_inference.infer_shapes_path(str(src), str(dst), strict_mode=True)
            inferred = onnx.load(str(dst), load_external_data=False)
    else:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types: dict[str, int] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    for i in model.graph.initializer:
        types[i.name] = i.data_type
    return types


def _load(path: Path) -> Any:
    import onnx

    return onnx.load(str(path), load_external_data=True)


def _save(model: Any, path: Path) -> None:
    import onnx

    from ..runtime.atomic import atomic_path

    with atomic_path(path) as tmp:
        if model.ByteSize() > 1_800_000_000:
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data")
        else:
            onnx.save_model(model, str(tmp))


# --------------------------------------------------------------------------------------------
# activations


def activation_ranges(model: Any, feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Run the fp32 ``model`` (normalised) on each feed with every float tensor exposed as an
    output and return {tensor: max |value|} over all feeds. Feeds: {input name: array}."""
    import onnx
    import onnxruntime as ort

    types = _elem_types(model)
    inits = {i.name for i in model.graph.initializer}
    graph_outputs = {o.name for o in model.graph.output}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = []
    for n in probe.graph.node:
        for o in n.output:
            if o and types.get(o) == FLOAT and o not in inits and o not in graph_outputs:
                names.append(o)
                probe.graph.output.append(onnx.helper.make_tensor_value_info(o, FLOAT, None))
    names += sorted(graph_outputs)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    if probe.ByteSize() > 1_800_000_000:  # protobuf's 2 GiB limit (ViT-H): go through a file
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "probe.onnx"
            onnx.save_model(probe, str(path), save_as_external_data=True, location="probe.onnx.data")
            sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    else:
        sess = ort.InferenceSession(probe.SerializeToString(), sess_options=so,
                                    providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs() if o.name in set(names)]
    ranges: dict[str, float] = {}
    for feed in feeds:
        vals = sess.run(out_names, feed)
        for name, v in zip(out_names, vals, strict=True):
            m = float(np.max(np.abs(v))) if v.size else 0.0
            if not np.isfinite(m):
                m = float("inf")
            ranges[name] = max(ranges.get(name, 0.0), m)
    return ranges


# --------------------------------------------------------------------------------------------
# conversion


def convert_model_fp16(model: Any, ranges: dict[str, float] | None = None,
                       safe_max: float = DEFAULT_SAFE_MAX, keep_residual_fp32: bool = True,
                       name: str = "graph") -> tuple[Any, GraphReport]:
    """Strongly typed fp16 copy of an fp32 ONNX ``model`` (float32 inputs/outputs kept).

    ranges: per-tensor max |activation| of the fp32 graph (from :func:`activation_ranges`);
    nodes with an output above ``safe_max`` run in fp32.
    """
    import onnx
    from onnx import helper, numpy_helper

    src = onnx.ModelProto()
    src.CopyFrom(model)
    src = _normalise(src)
    g = src.graph
    types = _elem_types(src)
    ranges = ranges or {}
    rep = GraphReport(graph=name, nodes=len(g.node))
    inits = {i.name: i for i in g.initializer}
    float_inits = {n for n, t in inits.items() if t.data_type == FLOAT}
    input_names = {i.name for i in g.input}

    def is_float(t: str) -> bool:
        return bool(t) and types.get(t) == FLOAT

    def is_activation(t: str) -> bool:
        return is_float(t) and t not in inits

    # 1. precision of every node
    cur: dict[str, int] = {i.name: FLOAT for i in g.input if is_float(i.name)}  # tensor -> type now
    plan: list[tuple[Any, int | None]] = []
    for n in g.node:
        f_in = [t for t in n.input if is_float(t)]
        f_out = [t for t in n.output if is_float(t)]
        if not f_in and not f_out:
            plan.append((n, None))
            continue
        reason = None
        if n.op_type in BLOCK_OPS:
            reason = n.op_type
        elif (keep_residual_fp32 and n.op_type in ("Add", "Sum") and len(f_in) >= 2
              and sum(is_activation(t) for t in f_in) >= 2):
            reason = "residual add"
        elif any(ranges.get(t, 0.0) > safe_max for t in f_out):
            reason = "range"
            rep.forced_by_range.append(f"{n.name or n.op_type} max|out| "
                                       f"{max(ranges.get(t, 0.0) for t in f_out):.4g}")
        if reason:
            prec = FLOAT
            rep.fp32_nodes[reason] = rep.fp32_nodes.get(reason, 0) + 1
        elif n.op_type in PASS_OPS:
            acts = [cur[t] for t in f_in if t in cur]
            prec = acts[0] if acts else FLOAT16
        else:
            prec = FLOAT16
        if prec == FLOAT16 and f_out:
            for t in f_out:
                v = ranges.get(t, 0.0)
                if v > rep.max_abs_fp16:
                    rep.max_abs_fp16, rep.max_abs_fp16_tensor = v, t
        if reason == "residual add":
            rep.max_abs_residual = max([rep.max_abs_residual] + [ranges.get(t, 0.0) for t in f_out])
        for t in f_out:
            cur[t] = prec
        plan.append((n, prec))
    if ranges:
        top = max(ranges.items(), key=lambda kv: kv[1])
        rep.max_abs_all, rep.max_abs_all_tensor = top[1], top[0]

    # 2. which precisions each float initializer is read in
    need: dict[str, set[int]] = {}
    for n, prec in plan:
        if prec is None:
            continue
        for t in n.input:
            if t in float_inits:
                need.setdefault(t, set()).add(prec)
    new_inits = []
    init_name: dict[tuple[str, int], str] = {}
    for i in g.initializer:
        if i.name not in float_inits:
            new_inits.append(i)
            continue
        wanted = need.get(i.name, {FLOAT})
        arr = numpy_helper.to_array(i)
        if FLOAT in wanted:
            new_inits.append(i)
            init_name[(i.name, FLOAT)] = i.name
            rep.fp32_initializers += 1
        if FLOAT16 in wanted:
            nm = i.name if FLOAT not in wanted else i.name + "__fp16"
            if np.max(np.abs(arr), initial=0.0) > FP16_MAX:
                raise ValueError(f"{name}: weight {i.name} exceeds the fp16 range "
                                 f"(max |w| = {np.max(np.abs(arr)):.4g})")
            new_inits.append(numpy_helper.from_array(arr.astype(np.float16), nm))
            init_name[(i.name, FLOAT16)] = nm
            rep.fp16_initializers += 1

    # 3. rewrite nodes, inserting casts where a float input's type differs from the node's
    nodes = []
    typed: dict[str, int] = {i.name: FLOAT for i in g.input if is_float(i.name)}
    cast_cache: dict[tuple[str, int], str] = {}
    out_rename: dict[str, str] = {}
    graph_outputs = {o.name for o in g.output}

    def as_type(t: str, want: int) -> str:
        if t in float_inits:
            return init_name[(t, want)]
        have = typed.get(t)
        if have is None or have == want:
            return t
        key = (t, want)
        if key not in cast_cache:
            nm = f"{t}__to_{'fp16' if want == FLOAT16 else 'fp32'}"
            nodes.append(helper.make_node("Cast", [t], [nm], to=want, name=nm + "_cast"))
            rep.casts += 1
            cast_cache[key] = nm
        return cast_cache[key]

    for n, prec in plan:
        if prec is None:
            nodes.append(n)
            continue
        new = onnx.NodeProto()
        new.CopyFrom(n)
        for j, t in enumerate(n.input):
            if is_float(t):
                new.input[j] = as_type(t, prec)
        if n.op_type == "Cast":
            to = next(a for a in new.attribute if a.name == "to")
            if to.i == FLOAT:
                to.i = prec
        if n.op_type == "ConstantOfShape":
            for a in new.attribute:
                if a.name == "value" and a.t.data_type == FLOAT:
                    a.t.CopyFrom(numpy_helper.from_array(
                        numpy_helper.to_array(a.t).astype(np.float16 if prec == FLOAT16 else np.float32)))
        for j, t in enumerate(n.output):
            if is_float(t):
                typed[t] = prec
                if t in graph_outputs and prec == FLOAT16:
                    inner = t + "__fp16"
                    new.output[j] = inner
                    out_rename[t] = inner
                    typed[inner] = FLOAT16
        nodes.append(new)
    # graph outputs consumed by later nodes under their old name: point them at the inner name
    if out_rename:
        for n in nodes:
            for j, t in enumerate(n.input):
                if t in out_rename:
                    n.input[j] = out_rename[t]
        for t, inner in out_rename.items():
            nodes.append(helper.make_node("Cast", [inner], [t], to=FLOAT, name=t + "_to_fp32_cast"))
            rep.casts += 1
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(new_inits)
    del g.value_info[:]
    for o in g.output:
        assert o.type.tensor_type.elem_type != FLOAT16
    for i in g.input:
        assert i.name in input_names

    out = onnx.shape_inference.infer_shapes(src, check_type=True, strict_mode=True)
    onnx.checker.check_model(out, full_check=True)
    _assert_strongly_typed(out)
    return out, rep


def _assert_strongly_typed(model: Any) -> None:
    """Every tensor produced in the graph has a definite element type."""
    known = {vi.name for vi in list(model.graph.value_info) + list(model.graph.output)
             if vi.type.tensor_type.elem_type}
    missing = [o for n in model.graph.node for o in n.output if o and o not in known]
    if missing:
        raise ValueError(f"fp16 graph is not strongly typed: no type for {missing[:5]}")


def node_precisions(model: Any) -> dict[str, int]:
    """{node name or output: element type of its first output} for a converted graph (tests
    and inspection)."""
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(model.graph.value_info) + list(model.graph.output)}
    return {n.name or n.output[0]: types.get(n.output[0], 0) for n in model.graph.node}


# --------------------------------------------------------------------------------------------
# the bundle hook


def _calibration_feeds(stage: Path, fp32_graphs: dict[str, str], model: Any, images: np.ndarray, masks: Any,
                       lam: float) -> dict[str, list[dict[str, np.ndarray]]]:
    """The old signature of :func:`cinemae.export.calibration.calibration_feeds` (which it calls),
    kept for callers written against it; new code imports export.calibration."""
    from .calibration import calibration_feeds

    cfg = model.cfg
    return calibration_feeds({g: Path(stage) / p for g, p in fp32_graphs.items()}, images, masks,
                             patch_size=cfg.patch_size, lam=lam, norm_pix=cfg.norm_pix)


def _output_error(fp32_path: Path, fp16_model: Any, feeds: list[dict[str, np.ndarray]]
                  ) -> tuple[float, float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    a = ort.InferenceSession(str(fp32_path), so, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(fp16_model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    abs_err = rel_err = 0.0
    for f in feeds:
        ya = a.run(None, f)[0]
        yb = b.run(None, f)[0]
        if yb.dtype != np.float32:
            raise ValueError(f"fp16 graph output is {yb.dtype}, expected float32")
        if not np.all(np.isfinite(yb)):
            raise ValueError("fp16 graph produced non-finite values on the calibration inputs")
        d = float(np.max(np.abs(ya - yb)))
        abs_err = max(abs_err, d)
        rel_err = max(rel_err, d / max(float(np.max(np.abs(ya))), 1e-6))
    return abs_err, rel_err


def convert_graphs_fp16(stage: Path, fp32_graphs: dict[str, str], model: Any,
                        log: Callable[[str], None] = _logger.info, *,
                        calibration: np.ndarray | None = None, masks: Any = None,
                        lam: float = 1.0, safe_max: float = DEFAULT_SAFE_MAX,
                        keep_residual_fp32: bool = True) -> dict[str, str]:
    """Write ``encoder.fp16.onnx``, ``decoder.fp16.onnx``, ``head.fp16.onnx`` into ``stage``
    and ``fp16_report.json`` (the per-graph activation maxima and what stayed fp32).

    calibration: images [N, 3, H, W] (normalised) whose activations decide and justify which
                 nodes stay fp32; default: 4 seeded random-normal images (pass real images)
    masks:       the bundle's MaskSet (default: K=2 masks from seed 0 at ratio 0.75)
    Returns {"encoder": ..., "decoder": ..., "head": ...} (paths relative to ``stage``).
    """
    from ..runtime.masks import make_masks

    cfg = model.cfg
    t0 = time.perf_counter()
    if calibration is None:
        calibration = np.random.default_rng(0).standard_normal(
            (4, 3, cfg.img_size, cfg.img_size)).astype(np.float32)
    if masks is None or masks.k == 0:
        masks = make_masks(cfg.num_patches, masks.k if masks is not None else 2, 0.75, 0)
    feeds = _calibration_feeds(stage, fp32_graphs, model, calibration, masks, lam)
    out: dict[str, str] = {}
    reports = {}
    for name in ("encoder", "decoder", "head"):
        src = stage / fp32_graphs[name]
        fp32 = _normalise(_load(src))
        ranges = activation_ranges(fp32, feeds[name]) if feeds[name] else {}
        fp16, rep = convert_model_fp16(fp32, ranges, safe_max, keep_residual_fp32, name)
        rep.calibration_batches = len(feeds[name])
        if feeds[name]:
            rep.output_abs_err, rep.output_rel_err = _output_error(src, fp16, feeds[name])
        dst = stage / f"{name}.fp16.onnx"
        _save(fp16, dst)
        out[name] = dst.name
        reports[name] = rep.to_dict()
        log(f"fp16 {name}: {rep.fp16_initializers} fp16 / {rep.fp32_initializers} fp32 weights, "
            f"fp32 nodes {rep.fp32_nodes}, {rep.casts} casts; max|act| fp16 region "
            f"{rep.max_abs_fp16:.4g}, all {rep.max_abs_all:.4g} ({rep.max_abs_all_tensor}); "
            f"out err {rep.output_abs_err:.3g} abs / {rep.output_rel_err:.3g} rel")
    report = {"method": "cinemae.export.fp16 (onnx graph rewrite, strongly typed)",
              "fp16_max": FP16_MAX, "safe_max": safe_max, "keep_residual_fp32": keep_residual_fp32,
              "block_ops": sorted(BLOCK_OPS), "calibration_images": int(calibration.shape[0]),
              "graphs": reports, "seconds": round(time.perf_counter() - t0, 2)}
    (stage / "fp16_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return out


def fp16_summary(stage: Path) -> dict[str, Any] | None:
    """The manifest's ``fp16`` entry: per graph the measured max |activation| (all tensors and
    the fp16 region), nodes kept in fp32, and the graph-level output error."""
    p = Path(stage) / "fp16_report.json"
    if not p.is_file():
        return None
    r = json.loads(p.read_text())
    return {"report": p.name, "safe_max": r["safe_max"], "calibration_images": r["calibration_images"],
            "graphs": {k: {"max_abs_activation": v["max_abs_all"],
                           "max_abs_activation_fp16_region": v["max_abs_fp16"],
                           "max_abs_residual_stream": v["max_abs_residual"],
                           "fp32_nodes": v["fp32_nodes"], "forced_by_range": v["forced_by_range"],
                           "output_abs_err": v["output_abs_err"]}
                       for k, v in r["graphs"].items()}}


__all__ = ["BLOCK_OPS", "DEFAULT_SAFE_MAX", "FP16_MAX", "GraphReport", "activation_ranges",
           "convert_graphs_fp16", "convert_model_fp16", "fp16_summary", "node_precisions"]
