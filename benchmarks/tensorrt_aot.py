"""TensorRT engines built ahead of time, without a GPU: build times, sizes and the layer-precision
check, as a committed result.

    python -m cinemae.benchmarks.tensorrt_aot --bundle BUNDLE --targets sm80,sm86,sm89 \\
        --precision fp16 --out benchmarks/results/ --name tensorrt_rtx_aot_vit-large_fp16

For each engine ``cinemae-export --bundle`` would build (TensorRT-RTX, ``set_compute_capability``)
it records seconds and bytes, and checks the builder's layer table (printed at VERBOSE after a
build with DETAILED profiling verbosity) against the graph itself: every ONNX MatMul/Gemm whose
inputs are float16 in the strongly typed graph must sit in an engine layer computing in Half, and
every float32 one in a Float layer. Writes NAME.json and NAME.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any


def graph_matmul_types(path: Path) -> dict[str, str]:
    """{ONNX MatMul/Gemm node name: "fp16" | "fp32" | "mixed"} from the graph's own input types."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    names = {onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.FLOAT: "fp32"}
    out = {}
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm"):
            got = {names.get(types.get(i, 0), "other") for i in n.input[:2]}
            out[n.name] = got.pop() if len(got) == 1 else "mixed"
    return out


def check_precisions(graph: dict[str, str], engine: dict[str, Any]) -> dict[str, Any]:
    """Compare the graph's matmul types with the engine layer summary (``layer_precisions``).

    ``engine["matmul_not_fp16"]`` names (up to 16 of) the matmuls the engine does not compute in
    fp16, so for an fp16 graph the check is exact: none of the graph's fp16 matmuls may be there
    and the engine's fp16 count must equal the graph's."""
    want16 = sorted(k for k, v in graph.items() if v == "fp16")
    not16 = engine.get("matmul_not_fp16", {})
    wrong = [k for k in want16 if k in not16]
    ok = not wrong and engine.get("matmul_fp16") == len(want16) and engine.get("matmul_nodes") == len(graph)
    return {"graph_matmuls": len(graph), "graph_fp16": len(want16), "engine_matmuls": engine.get("matmul_nodes"),
            "engine_fp16": engine.get("matmul_fp16"), "engine_fp32": engine.get("matmul_fp32"),
            "engine_mixed": engine.get("matmul_mixed"), "fp16_in_graph_not_fp16_in_engine": wrong, "ok": ok}


def run(bundle_dir: Path, targets: list[str], precision: str, max_batch: int, log: Any = print) -> dict[str, Any]:
    """Build (or keep) the engines and return the result record."""
    from ..export.tensorrt_build import build_bundle_engines
    from ..runtime.backends.tensorrt_engine import import_tensorrt
    from ..runtime.bundle import Bundle
    from .environment import cpu_name, load_average

    trt = import_tensorrt()
    load0 = load_average()
    t0 = time.perf_counter()
    entries = build_bundle_engines(bundle_dir, [precision], max_batch=max_batch, targets=targets, required=True,
                                   log=log)
    wall = time.perf_counter() - t0
    bundle = Bundle(bundle_dir)
    graph_types = {role: graph_matmul_types(bundle.graph(role, precision)) for role in ("encoder", "decoder", "head")}
    rows = []
    for e in entries:
        k = e["key"]
        rows.append({"role": k["role"], "target": "sm" + k["target"].replace(".", ""), "precision": k["precision"],
                     "file": e["file"], "MB": round(e["bytes"] / 1e6, 1), "build_s": e["build_s"],
                     "build_cpu_s": e.get("build_cpu_s"),
                     "graph_MB": round((bundle.root / e["graph"]).stat().st_size / 1e6, 1),
                     "layers": e["layers"].get("layers"), "layer_types": e["layers"].get("by_type"),
                     "precision_check": check_precisions(graph_types[k["role"]], e["layers"])})
    bb = bundle.manifest["backbone"]
    return {"format": "cinemae-tensorrt-aot/1",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": f"{platform.machine()} {os.cpu_count()}-core {cpu_name()}, shared, no GPU",
            "loadavg_start": load0, "loadavg_end": load_average(),
            "tensorrt": str(trt), "module": trt.name, "targets": targets, "precision": precision,
            "max_batch": max_batch, "k": bundle.k,
            "bundle": {"model_id": bundle.model_id, "img_size": bb.get("img_size"), "patch_size": bb.get("patch_size"),
                       "embed_dim": bb.get("embed_dim"), "depth": bb.get("depth"),
                       "decoder": f"{bb.get('decoder_embed_dim')}x{bb.get('decoder_depth')}"},
            "wall_s": round(wall, 1), "engines": rows,
            "all_precision_checks_ok": all(r["precision_check"]["ok"] for r in rows)}


def markdown(rec: dict[str, Any]) -> str:
    b = rec["bundle"]
    lines = [f"# TensorRT engines built ahead of time without a GPU ({rec['tensorrt']})", "",
             *([f"Note: {rec['note']}", ""] if rec.get("note") else []),
             f"{rec['machine']}; {rec['created']}. Bundle `{b['model_id']}` ({b['img_size']} px, patch "
             f"{b['patch_size']}, D={b['embed_dim']} x{b['depth']}, decoder {b['decoder']}), K={rec['k']}, "
             f"{rec['precision']} graphs, profiles up to batch {rec['max_batch']} (B*K rows for the masked pass "
             f"and decoder). Built with `config.set_compute_capability` (module `{rec['module']}`), "
             f"{rec['wall_s']} s in all.", "",
             "| engine | target | build s (wall) | engine MB | graph MB | layers | matmuls fp16 (engine / graph) "
             "| check |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rec["engines"]:
        c = r["precision_check"]
        lines.append(f"| {r['role']} | {r['target']} | {r['build_s']} | {r['MB']} | {r['graph_MB']} | {r['layers']} | "
                     f"{c['engine_fp16']}/{c['engine_matmuls']} / {c['graph_fp16']}/{c['graph_matmuls']} | "
                     f"{'ok' if c['ok'] else 'MISMATCH ' + ', '.join(c['fp16_in_graph_not_fp16_in_engine'][:3])} |")
    lines += ["", "Layer-precision check: the builder's layer table (VERBOSE log, DETAILED profiling verbosity) "
              "gives each engine layer's input and weight data types and the ONNX nodes it implements; an ONNX "
              "MatMul/Gemm counts as fp16 when the layer computing it has Half weights (or Half inputs when it has "
              "no weights, as fused attention does). 'check' compares this with the graph's own types: every "
              "matmul that is float16 in the strongly typed graph is fp16 in the engine. Without a GPU the engine "
              "cannot be deserialized (`Runtime.deserialize_cuda_engine` returns None), so TensorRT's "
              "`EngineInspector` is not usable here; the build log is.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cinemae.benchmarks.tensorrt_aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--targets", default="sm80,sm86,sm89")
    ap.add_argument("--precision", default="fp16", choices=["fp32", "fp16"])
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default=None, help="file stem (default tensorrt_rtx_aot_<model id>_<precision>)")
    args = ap.parse_args(argv)
    from ..runtime.backends.base import BackendUnavailable

    try:
        rec = run(Path(args.bundle), [t for t in args.targets.split(",") if t], args.precision, args.max_batch,
                  log=lambda m: print(m, file=sys.stderr, flush=True))
    except (BackendUnavailable, ValueError) as e:
        print(f"tensorrt_aot: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"tensorrt_rtx_aot_{rec['bundle']['model_id']}_{args.precision}"
    (out / f"{stem}.json").write_text(json.dumps(rec, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(rec))
    print(markdown(rec))
    return 0 if rec["all_precision_checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
