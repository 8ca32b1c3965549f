"""``cinemae-bench``: latency, throughput and accuracy sweeps, side by side with the torch reference.

    cinemae-bench                         # default bundle (or a tiny random one), K 0,1,2,4
    cinemae-bench --k 2                   # one K
    cinemae-bench --arch vit-large --k 2 --batch 4 --out results/   # ViT-L/16, random weights
    cinemae-bench --data ../shared/data/photos --perturb jpeg:50,jpeg:75,resize:0.5,blur:1.0
    cinemae-bench --data ../shared/data/photos --perturb reship --reship default   # verdict flips

Exit status: 0 when every requested row ran, 1 when some row is an error row, 2 on a usage
error, 130 when interrupted (the rows measured so far are still printed and written).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from .runners import all_backends, cpu_reduced, runs_on

DEFAULT_KS = "0,1,2,4"


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("empty list")
    return vals


def build_parser() -> argparse.ArgumentParser:
    from ..runtime.reship import VIEWS_ON

    ap = argparse.ArgumentParser(
        prog="cinemae-bench",
        description="Latency (p50/p95), throughput, per-stage time, FLOPs against the device peak and, "
                    "with --data, accuracy/AUC sweeps over K, batch size, precision and backend, side by "
                    "side with the torch reference in one run.")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--bundle", help="bundle directory (default: the embedded bundle, or a tiny "
                     "random-weight bundle when this install has none)")
    src.add_argument("--arch", help="build (once, cached) a random-weight bundle of a preset for "
                     "realistic latency: vit-large = ViT-L/16 224 px, vit-base, tiny, ...")
    ap.add_argument("--checkpoint", help="MAE checkpoint for the torch reference rows of --bundle")
    ap.add_argument("--head", help="head file (cinemae-train) for the torch reference rows "
                    "(default: read from head.onnx)")
    ap.add_argument("--init-seed", type=int, default=0, help="seed of --arch random weights")
    ap.add_argument("--k", type=_int_list, default=None, metavar="K[,K...]",
                    help=f"masking runs to sweep (default {DEFAULT_KS})")
    ap.add_argument("--batch", type=_int_list, default=None, metavar="B[,B...]",
                    help="batch sizes (default 1,8; 1 for ViT-base and larger)")
    ap.add_argument("--precision", default=None, metavar="P[,P...]",
                    help="fp32, fp16 (GPU), bf16 and int8 (CPU: torch bf16 autocast, ONNX Runtime int8, "
                         "OpenVINO bf16/int8); default fp32 on the CPU, fp32,fp16 with a GPU")
    ap.add_argument("--backends", default=None, metavar="NAME[,NAME...]|all",
                    help=f"of {', '.join(all_backends())}; 'all' asks for every one (unavailable ones "
                         "become error rows). Default: every backend available here")
    ap.add_argument("--device", default=None, help="cpu, cuda[:N] or all (default: all with a GPU, "
                    "else cpu)")
    ap.add_argument("--no-torch", action="store_true", help="leave out the torch reference rows")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for ONNX Runtime and torch (default: each library's default)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed batches per row")
    ap.add_argument("--iters", type=int, default=20, help="at most this many timed batches per row")
    ap.add_argument("--min-iters", type=int, default=3, help="at least this many timed batches per row")
    ap.add_argument("--row-time", type=float, default=3.0,
                    help="stop timing a row after this many seconds once it has --min-iters")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="device peak in TFLOP/s (default: measured at the start of the run on the CPU, "
                         "data sheet on a known GPU)")
    ap.add_argument("--inputs", nargs="*", default=None,
                    help="image files/folders to time (default: synthetic JPEGs at 1.5x input size)")
    ap.add_argument("--data", help="labelled set for accuracy: folder with real/ and fake/, a CSV "
                    "(path,label[,generator]), or REAL.tar,FAKE.tar")
    ap.add_argument("--limit", type=int, default=200, help="images per class from --data (seeded subset)")
    ap.add_argument("--perturb", default=None,
                    help="robustness sweep, e.g. jpeg:50,jpeg:75,resize:0.5,blur:1.0 (both classes alike); "
                         "re-shippings that change the size: shrink:S, upscale:S, crop:F, letterbox:AxB; "
                         "'reship' = upscale:2,crop:0.6,letterbox:16x9,jpeg:40,jpeg:60,jpeg:75,jpeg:95,shrink:0.5. "
                         "Reports accuracy and the verdicts' flip rates against the clean images")
    ap.add_argument("--reship", default=None, metavar="PRESET|VIEWS",
                    help="with --data: also score every image with the re-shipping ensemble "
                         "(cinemae-detect --reship: a preset such as default, or views like jpeg:60,shrink:0.5) "
                         "and report its verdicts' flip rates, accuracy, share uncertain and cost")
    ap.add_argument("--reship-on", default="picture", choices=VIEWS_ON,
                    help="with --reship and a tiled bundle: the views re-ship the picture its crops are cut from "
                         "(default; bars trimmed, shrunk to max_side) or the image as delivered")
    ap.add_argument("--reship-cost-rounds", type=int, default=3, metavar="N",
                    help="with --reship: rounds of the ensemble's side-by-side cost measurement over --data "
                         "(0: not measured, e.g. for one part of a set run in parts, benchmarks/merge_flips)")
    ap.add_argument("--fpr", type=float, default=0.05, help="false-positive rate for the TPR column")
    ap.add_argument("--out", help="folder for bench.json, bench.md and bench.png")
    ap.add_argument("--json", dest="json_path", help="write the JSON record here ('-' for stdout)")
    ap.add_argument("--markdown", help="write the markdown table here")
    ap.add_argument("--plot", help="write the PNG plot here")
    ap.add_argument("--explain", action="store_true",
                    help="also measure heatmaps and provenance: the verdict alone vs with the per-patch map, "
                         "with --explain-k runs, the overlay PNG and reading provenance (CPU, ONNX Runtime)")
    ap.add_argument("--explain-k", type=int, default=8, help="runs of the explain-k row (default 8)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    return ap


def _gpu() -> bool:
    from .environment import gpu_available

    return gpu_available()


def plan_specs(backends: str | None, device: str | None, precision: str | None, no_torch: bool,
               has_gpu: bool) -> list[Any]:
    """Which (backend, device, precision) rows to run.

    Default: every backend available here (ONNX Runtime CPU + torch eager CPU without a GPU;
    TensorRT, ONNX Runtime CUDA and torch on the GPU as well with one). Asking for a GPU backend
    or device on a machine without one gives error rows, as asked."""
    from .sweep import RunnerSpec

    if device is None:
        devices = ["cpu", "cuda"] if has_gpu else ["cpu"]
    elif device == "all":
        devices = ["cpu", "cuda"]
    else:
        devices = [device]
    if backends is None or backends == "all":
        names = list(all_backends())
        if backends is None and importlib.util.find_spec("openvino") is None and "openvino" in names:
            names.remove("openvino")  # "available here": an optional extra that is not installed
        if backends == "all" and device is None:
            devices = ["cpu", "cuda"]
    else:
        names = [b.strip() for b in backends.split(",") if b.strip()]
        bad = [b for b in names if b not in all_backends()]
        if bad:
            raise ValueError(f"unknown backend(s) {bad}; choose from {', '.join(all_backends())} or all")
        if device is None and any(not runs_on(b, "cpu") for b in names):
            devices = ["cpu", "cuda"]
    if precision is None:
        precs = None  # fp32 on the CPU, fp32 and fp16 on a GPU
    else:
        precs = [p.strip() for p in precision.split(",") if p.strip()]
        from ..runtime.precision import PRECISIONS

        if any(p not in PRECISIONS for p in precs):
            raise ValueError(f"--precision takes {', '.join(PRECISIONS)}, got {precision!r}")
    if no_torch:
        names = [n for n in names if n != "torch"]
    specs = []
    for dev in devices:
        on_gpu = dev.startswith("cuda")
        for name in names:
            if not runs_on(name, dev):
                continue  # a CPU backend on a GPU device or the reverse: not a combination
            for p in precs or (["fp32", "fp16"] if on_gpu else ["fp32"]):
                if name == "torch" and p == "fp16" and not on_gpu:
                    continue  # autocast fp16 is the GPU configuration (see the README)
                if p in ("bf16", "int8") and (on_gpu or p not in cpu_reduced(name)):
                    continue  # bf16 / int8 are CPU precisions of the runners that have them
                if name == "openvino" and p == "fp16":
                    continue  # OpenVINO is a CPU row here: fp32, bf16, int8
                specs.append(RunnerSpec(name, dev, p))
    return specs


def main(argv: list[str] | None = None) -> int:
    import logging

    from ..runtime.commands import configure_logging

    args = build_parser().parse_args(argv)
    configure_logging("stderr", logging.WARNING if args.quiet else logging.INFO)
    log = (lambda *_: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    started = time.perf_counter()

    from ..runtime.bundle import BundleError
    from . import report
    from .accuracy import evaluate
    from .bundles import resolve_target
    from .datasets import DataError, load_labeled
    from .environment import cpu_matmul_peak, cpu_peak, environment, gpu_peak
    from .perturb import parse_perturbations
    from .sweep import SweepOptions, prepare_pool, run_sweep, synthetic_inputs

    try:
        has_gpu = _gpu()
        specs = plan_specs(args.backends, args.device, args.precision, args.no_torch, has_gpu)
        perts = parse_perturbations(args.perturb)
        if args.perturb and not args.data:
            raise ValueError("--perturb needs --data (labelled images)")
        from ..runtime.reship import ReshipEnsemble

        views = ReshipEnsemble.parse(args.reship, args.reship_on)
        if views is not None and not args.data:
            raise ValueError("--reship needs --data (labelled images)")
        if args.reship_cost_rounds < 0:
            raise ValueError(f"--reship-cost-rounds is a count of rounds, 0 or more (not {args.reship_cost_rounds})")
    except ValueError as e:
        print(f"cinemae-bench: {e}", file=sys.stderr)
        return 2
    ks = args.k or _int_list(DEFAULT_KS)
    if any(not 0 <= k <= 8 for k in ks):
        print(f"cinemae-bench: K must be in 0..8, got {ks}", file=sys.stderr)
        return 2
    want_fp16 = any(s.precision == "fp16" and s.backend != "torch" for s in specs)
    try:
        target = resolve_target(args.bundle, args.arch, args.checkpoint, args.head,
                                k=2 if 2 in ks or not ks else max(ks), seed=args.init_seed,
                                fp16=want_fp16 and bool(args.arch), log=log)
    except (BundleError, ValueError, OSError) as e:
        print(f"cinemae-bench: {e}", file=sys.stderr)
        return 2
    bundle = target.bundle
    bb = bundle.backbone
    batches = args.batch or ([1] if bb.embed_dim >= 768 else [1, 8])

    env = environment()
    peaks: dict[str, dict[str, Any]] = {}
    if any(s.device == "cpu" for s in specs):
        peaks["cpu"] = ({"tflops": args.peak_tflops, "source": "given (--peak-tflops)"}
                        if args.peak_tflops else cpu_peak(args.threads))
        for p in ("bf16", "int8"):  # measured in this run too, so each row has its own ceiling
            if any(s.device == "cpu" and s.precision == p for s in specs) and not args.peak_tflops:
                peaks[f"cpu:{p}"] = cpu_matmul_peak(p, args.threads)
    for p in ("fp32", "fp16"):
        if any(s.device.startswith("cuda") and s.precision == p for s in specs):
            if args.peak_tflops:
                peaks[f"cuda:{p}"] = {"tflops": args.peak_tflops, "source": "given (--peak-tflops)"}
            elif env["gpus"] and (g := gpu_peak(env["gpus"][0], p)):
                peaks[f"cuda:{p}"] = g

    # inputs: synthetic JPEGs (or the user's files), decoded and preprocessed by the runtime
    n_pool = max(batches)
    if args.inputs:
        from ..runtime.inputs import iter_inputs

        sources: list[Any] = list(iter_inputs(args.inputs))[: max(n_pool, 16)]
        desc = f"{len(sources)} files from {' '.join(args.inputs)}"
    else:
        sources = synthetic_inputs(max(n_pool, 8), bb.img_size, bundle.crop_ratio)
        desc = f"{len(sources)} synthetic JPEGs (q95, smooth and textured) at 1.5x the resize target"
    try:
        pool, pre_ms, input_errors = prepare_pool(sources, n_pool, bb.img_size, bundle.crop_ratio)
    except ValueError as e:
        print(f"cinemae-bench: {e}", file=sys.stderr)
        return 2

    command = "cinemae-bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    result: dict[str, Any] = {
        "format": "cinemae-bench/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command.strip(),
        "environment": env,
        "bundle": {"path": str(bundle.root), "model_id": bundle.model_id, "origin": target.origin,
                   "note": target.note, "backbone": bundle.manifest["backbone"], "bundle_k": bundle.k,
                   "n_keep": bundle.manifest.get("n_keep"), "precisions": bundle.precisions()},
        "peaks": peaks,
        "inputs": {"description": desc, "decode_preprocess_ms": pre_ms, "errors": input_errors},
        "protocol": (f"warm-up {args.warmup} batch(es), then {args.min_iters}..{args.iters} timed batches per "
                     f"row (stop after {args.row_time:g} s), runners interleaved round-robin; p50/p95 of "
                     "wall time per batch; img/s = B / p50; e2e adds decode+preprocess serially; FLOPs = "
                     "2 x MACs of matmuls/convolutions (benchmarks/flops.py)"),
        "rows": [],
        "accuracy": [],
        "interrupted": False,
    }
    outputs = _outputs(args)

    def save(final: bool = False) -> None:
        if outputs["json"] and outputs["json"] != "-":
            report.write_json(outputs["json"], result)
        if final and outputs["markdown"]:
            md = report.markdown(result)
            if result.get("explain"):
                from .explain_cost import format_rows

                md += ("\n## Explain cost (heatmaps and provenance; ONNX Runtime CPU, interleaved)\n\n```\n"
                       + format_rows(result["explain"]) + "\n```\n")
            report.write_atomic(outputs["markdown"], md)

    def on_row(row: Any) -> None:
        result["rows"].append(row.to_dict())
        save()

    tiles = bundle.manifest.get("tiles")
    tiled = (f"; tiled: an image is up to {tiles.get('n')} crops, so the latency rows' img/s count crops"
             if isinstance(tiles, dict) else "")
    log(f"bundle {bundle.root} ({target.origin}; {bb.img_size} px, D={bb.embed_dim}, "
        f"L={bb.num_patches}{tiled}){' - ' + target.note if target.note else ''}")
    log(f"decode+preprocess {pre_ms:.3f} ms/img; peaks: "
        + ", ".join(f"{k} {v['tflops']} TFLOP/s ({v['source']})" for k, v in peaks.items()))
    rows: list[Any] = []
    status = 0
    try:
        opts = SweepOptions(warmup=args.warmup, iters=args.iters, min_iters=args.min_iters,
                            row_time=args.row_time, threads=args.threads, peaks=peaks)
        rows = run_sweep(target, specs, ks, batches, pool, pre_ms, opts, log, on_row)
        if args.explain:
            result["explain"] = _explain_cost(args, bundle, pool, sources, batches, log)
            save()
        if args.data:
            acc_rows, acc_info = _accuracy(args, target, ks, perts, rows, log, evaluate, load_labeled, views)
            result["accuracy"] = [a.to_dict() for a in acc_rows]
            result["accuracy_info"] = acc_info
            if views is not None and args.reship_cost_rounds > 0:
                from .reship_cost import measure_cost

                result["reship_cost"] = measure_cost(bundle, args.data, args.limit, args.reship, args.threads, log,
                                                     rounds=args.reship_cost_rounds, on=args.reship_on)
            save()
    except KeyboardInterrupt:
        result["interrupted"] = True
        status = 130
        log("interrupted: writing the rows measured so far")
    except DataError as e:
        print(f"cinemae-bench: {e}", file=sys.stderr)
        result["accuracy_info"] = {"error": str(e)}
        status = 2
    from .sweep import Row

    rows = [Row(**{k: v for k, v in r.items() if k != "label"}) for r in result["rows"]]
    result["ratios"] = report.ratio_lines(rows)
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    from .environment import load_average

    result["environment"]["loadavg_end"] = load_average()
    busy = max((env.get("loadavg_start") or [0])[0], (result["environment"]["loadavg_end"] or [0])[0])
    if busy > 0.75 * (env.get("cpu_count") or 1):
        result["warning"] = (f"the machine was busy (1-min load average up to {busy:.1f} on {env.get('cpu_count')} "
                             "CPUs): absolute times include contention with other jobs; the interleaved ratios "
                             "are the figures to compare")
        if any(r.backend == "torch" and r.device == "cpu" for r in rows) and \
                os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
            result["warning"] += ("; torch's OpenMP threads spin-wait at every operator on a busy machine, "
                                  "which can slow small models by 10-100x: run with OMP_WAIT_POLICY=PASSIVE "
                                  "to time torch without that")
    if outputs["plot"]:
        why = report.plot(result, outputs["plot"])
        if why:
            log(why)
            result["plot"] = None
        else:
            result["plot"] = str(outputs["plot"])
    save(final=True)

    print(f"cinemae-bench: {bundle.model_id} ({target.origin}), {env['machine']}; CPU {env['cpu']}")
    if target.note:
        print(f"NOTE: {target.note}")
    if result.get("warning"):
        print(f"WARNING: {result['warning']}")
    print(report.format_table(rows))
    if result["ratios"]:
        print()
        print("\n".join(result["ratios"]))
    print("\nper-stage ms per image (decode+prep is the runtime's CPU preprocessing, shared by all rows):")
    print(report.format_stages(rows))
    if result["accuracy"]:
        print(f"\naccuracy ({result['accuracy_info']['data']}; threshold logit "
              f"{result['accuracy_info']['threshold_logit']:.3f}; TPR at {args.fpr:.0%} FPR):")
        print(report.format_accuracy(result["accuracy"]))
        print("\n" + report.format_flips(result["accuracy"]))
    if result.get("reship_cost"):
        print("\n" + report.format_reship_cost(result["reship_cost"]))
    if result.get("explain"):
        from .explain_cost import format_rows

        print("\n" + format_rows(result["explain"]))
    if outputs["json"] == "-":
        import json

        print(json.dumps(result, indent=2, default=str))
    written = [str(v) for k, v in outputs.items() if v and v != "-" and (k != "plot" or result.get("plot"))]
    if written:
        print("\nwrote " + ", ".join(written))
    print(f"({result['elapsed_s']} s)")
    if status == 0 and any(r.status == "error" for r in rows):
        status = 1
    return status


def _explain_cost(args: argparse.Namespace, bundle: Any, pool: Any, sources: list[Any], batches: list[int],
                  log: Any) -> list[dict[str, Any]]:
    """The explain-cost rows (benchmarks/explain_cost.py) on ONNX Runtime CPU; an error is a row."""
    from ..runtime.detector import Detector
    from .explain_cost import measure

    try:
        files = [s if isinstance(s, bytes) else Path(s).read_bytes() for s in sources]
        with Detector(bundle, backend="onnxruntime", device="cpu", threads=args.threads) as det:
            rows = measure(det, pool, files, batches, explain_k=args.explain_k,
                           iters=max(args.min_iters, min(args.iters, 10)), warmup=args.warmup, log=log)
            if args.out:  # the overlay of a picture the project makes itself (the README's example)
                from .explain_cost import example_figure

                Path(args.out).mkdir(parents=True, exist_ok=True)
                fig = example_figure(det, str(Path(args.out) / "explain_example.png"), args.explain_k)
                rows.append({"row": "example figure", "batch": 1, "file": "explain_example.png", **fig})
            return rows
    except Exception as e:  # noqa: BLE001 - a failing measurement is a row with its error
        return [{"row": "explain", "batch": 0, "error": f"{type(e).__name__}: {e}"}]


def _outputs(args: argparse.Namespace) -> dict[str, str | None]:
    out = {"json": args.json_path, "markdown": args.markdown, "plot": args.plot}
    if args.out:
        d = Path(args.out)
        out["json"] = out["json"] or str(d / "bench.json")
        out["markdown"] = out["markdown"] or str(d / "bench.md")
        out["plot"] = out["plot"] or str(d / "bench.png")
    return out


def _accuracy(args: argparse.Namespace, target: Any, ks: list[int], perts: list[Any], rows: list[Any],
              log: Any, evaluate: Any, load_labeled: Any, views: Any = None) -> tuple[list[Any], dict[str, Any]]:
    """Accuracy, verdicts and flip rates per K (and perturbation) through every runtime
    (backend, precision) that ran; a tiled bundle's images are scored as its tiles."""
    import math

    from ..runtime.masks import make_masks
    from ..runtime.tiles import TileSpec
    from .sweep import RunnerSpec, make_runner

    # every precision that ran: each runtime (backend, precision) row once, fp32 first
    seen: list[tuple[str, str, str]] = []
    for r in sorted((r for r in rows if r.status == "ok" and r.backend != "torch"),
                    key=lambda r: (r.precision != "fp32",)):
        if (r.backend, r.device, r.precision) not in seen:
            seen.append((r.backend, r.device, r.precision))
    specs = [RunnerSpec(*x) for x in seen] or [RunnerSpec("onnxruntime-cpu", "cpu", "fp32")]
    items = load_labeled(args.data, args.limit)
    bundle = target.bundle
    bb = bundle.backbone
    p = min(max(bundle.threshold, 1e-7), 1 - 1e-7)
    thr = math.log(p / (1 - p))
    tiles = TileSpec.from_manifest(bundle.manifest)
    acc_rows: list[Any] = []
    errors: list[Any] = []
    for spec in specs:
        runner = make_runner(spec, target, args.threads)
        log(f"accuracy on {len(items)} images from {args.data} with {spec.label}")

        def run_logits(images: Any, k: int, runner: Any = runner) -> Any:
            import numpy as np

            masks = make_masks(bb.num_patches, k, bundle.mask_ratio, bundle.mask_seed)
            out = []
            for i in range(0, len(images), 32):
                out.append(runner.run(images[i:i + 32], masks)[0])
            return np.concatenate(out)

        try:
            got, errors = evaluate(items, run_logits, ks, perts, bb.img_size, bundle.crop_ratio, thr,
                                   args.fpr, log, tiles=tiles, abstain_band=tuple(bundle.abstain_band),
                                   views=views)
        finally:
            runner.close()
        for a in got:
            a.backend = spec.label
        acc_rows += got
    notes = []
    if target.note:
        notes.append(target.note)
    for a in acc_rows:
        if a.k != bundle.k and bundle.trained:
            a.note = f"head trained for K={bundle.k}: scores at K={a.k} are not calibrated"
    info = {"data": args.data, "backend": ", ".join(s.label for s in specs), "n_items": len(items), "errors": errors,
            "threshold_logit": thr, "limit_per_class": args.limit, "note": "; ".join(notes),
            "items": [it.name for it in items],  # which images, so records of parts can be merged (merge_flips)
            "perturbations": [p.name for p in perts], "threshold": bundle.threshold,
            "abstain_band": list(bundle.abstain_band), "tiles": None if tiles is None else tiles.to_manifest(),
            "reship": None if views is None else views.names,
            "reship_on": None if views is None else views.on,
            "flip_rule": "an image's verdict (ai / real / uncertain, the bundle's threshold and abstain band) "
                         "differs from its verdict on the clean image at the same K; hard = ai <-> real"}
    return acc_rows, info


if __name__ == "__main__":
    sys.exit(main())
