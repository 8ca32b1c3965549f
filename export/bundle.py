"""Writing a bundle: graphs, manifest, and the parity report that gates it.

The bundle is assembled in a staging directory beside ``out``; only when every parity row
passes is it moved into place. A failed export leaves ``OUT.rejected/`` for inspection and
never a bundle that looks valid.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.bundle import IMAGENET_MEAN, IMAGENET_STD, Bundle, write_manifest
from ..runtime.masks import make_masks, n_keep_for
from ..runtime.preprocess import InputError, preprocess
from .head import CinemaeHead
from .model import MaskedAutoencoderViT
from .onnx_export import OPSET, export_decoder, export_encoder, export_head
from .parity import ParityRow, compare, format_rows, tolerances_for
from .reference import TorchReference
from .staging import publish_staged

_logger = logging.getLogger(__name__)


class ParityError(RuntimeError):
    """An exported form differs from the torch reference by more than its tolerance."""


@dataclass
class ExportOptions:
    k: int = 2
    mask_ratio: float = 0.75
    mask_seed: int = 0
    lam: float = 1.0
    crop_ratio: float = 224 / 256
    precisions: tuple[str, ...] = ("fp32",)
    parity_images: list[Path] = field(default_factory=list)
    calibration_images: list[Path] = field(default_factory=list)  # INT8 activation ranges
    int8_gate_images: list[Path] = field(default_factory=list)  # INT8 gate (default: parity images)
    int8_tolerances: dict[str, float] | None = None
    parity_random: int = 4
    tolerances: dict[str, float] | None = None
    model_id: str = "cinemae"
    model_version: str = "0"
    provenance: dict[str, Any] = field(default_factory=dict)
    head_record: dict[str, Any] = field(default_factory=dict)  # training/calibration summary


def parity_inputs(opts: ExportOptions, img_size: int) -> list[tuple[str, np.ndarray]]:
    """(name, images [N, 3, S, S]) sets: random normal images, smooth synthetic images, and
    the real files given (decoded and preprocessed by the runtime)."""
    rng = np.random.default_rng(1234)
    sets = [("random", rng.standard_normal((opts.parity_random, 3, img_size, img_size))
             .astype(np.float32))]
    yy, xx = np.mgrid[0:img_size, 0:img_size] / img_size
    smooth = np.stack([np.stack([np.sin(3 * xx + i), np.cos(2 * yy - i), xx * yy], 0)
                       for i in range(2)]).astype(np.float32) * 1.5
    sets.append(("synthetic", smooth))
    real = []
    for p in opts.parity_images:
        try:
            real.append(preprocess(p, img_size, opts.crop_ratio))
        except InputError:
            continue
    if real:
        sets.append(("real", np.stack(real)))
    return sets


def _manifest(model: MaskedAutoencoderViT, head: CinemaeHead, opts: ExportOptions,
              graphs: dict[str, dict[str, str]], trained: bool) -> dict[str, Any]:
    cfg = model.cfg
    rec = opts.head_record
    decision = rec.get("decision") or {"threshold": 0.5, "abstain_band": [0.5, 0.5],
                                       "calibration": None}
    return {
        "format_version": 1,
        "model_id": opts.model_id,
        "model_version": opts.model_version,
        "backbone": cfg.to_dict(),
        "target": "norm_pix" if cfg.norm_pix else "pixel",
        "preprocess": {"img_size": cfg.img_size, "crop_ratio": opts.crop_ratio,
                       "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                       "resize": "shorter side to round(H/crop_ratio): area down, bicubic up"},
        "k": opts.k,
        "mask_ratio": opts.mask_ratio,
        "n_keep": n_keep_for(cfg.num_patches, opts.mask_ratio),
        "mask_seed": opts.mask_seed,
        "lambda": opts.lam,
        "head": {**head.cfg.to_dict(), "trained": trained,
                 **({"note": "untrained head (random initialisation): scores are meaningless "
                     "until `cinemae-train` writes a trained head"} if not trained else {}),
                 **{k: v for k, v in rec.items() if k not in ("decision",)}},
        "decision": decision,
        "graphs": graphs,
        "opset": OPSET,
        "provenance": {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       "python": platform.python_version(), **_versions(), **opts.provenance},
    }


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("torch", "onnx", "onnxruntime", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return out


def _images(paths: list[Path], img_size: int, crop_ratio: float) -> np.ndarray:
    """Decoded, preprocessed images [N, 3, S, S] (undecodable files are left out)."""
    out = []
    for p in paths:
        try:
            out.append(preprocess(p, img_size, crop_ratio))
        except InputError:
            continue
    return np.stack(out) if out else np.zeros((0, 3, img_size, img_size), np.float32)


def _add_int8(stage: Path, bundle: Bundle, model: MaskedAutoencoderViT, opts: ExportOptions,
              manifest: dict[str, Any], graphs: dict[str, dict[str, str]], masks: Any,
              log: Callable[[str], None]) -> bool:
    """INT8 graphs calibrated on ``opts.calibration_images``, gated on the gate images against
    the fp32 graphs (cinemae.export.int8); the figures go into the manifest. True when passed."""
    from .int8 import convert_graphs_int8, format_gate, int8_gate, write_report

    size = model.cfg.img_size
    calib = _images(opts.calibration_images or opts.parity_images, size, opts.crop_ratio)
    gate = _images(opts.int8_gate_images or opts.parity_images, size, opts.crop_ratio)
    if not len(calib) or not len(gate):
        raise ValueError("--precision int8 needs real images to calibrate on and to gate with "
                         "(--calibration-images / --parity-images)")
    graphs["int8"], conversion = convert_graphs_int8(stage, graphs["fp32"], model, calib, masks, opts.lam, log)
    write_manifest(stage, manifest)
    rows = int8_gate(Bundle(stage, require_signature=False), gate, masks, opts.int8_tolerances, log=log)
    manifest["int8"] = write_report(stage, conversion, rows, len(gate))
    write_manifest(stage, manifest)
    log("int8 gate (INT8 forms vs the fp32 graphs, real images):")
    log(format_gate(rows))
    return manifest["int8"]["passed"]


def export_bundle(model: MaskedAutoencoderViT, head: CinemaeHead, out: str | os.PathLike[str],
                  opts: ExportOptions, trained: bool = False, log: Callable[[str], None] = _logger.info
                  ) -> tuple[Path, list[ParityRow]]:
    """Export the three graphs (and FP16 variants when asked), check parity, and move the
    bundle into ``out``. Raises ParityError (bundle left at ``OUT.rejected``) on failure."""
    from ..runtime.backends.onnxruntime_cpu import OnnxRuntimeCPU

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "cinemae.json").is_file():
        raise FileExistsError(f"{out} exists and is not a bundle; choose an empty or new --out")
    stage = out.with_name(out.name + ".staging")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        cfg = model.cfg
        model.eval()
        head.eval()
        n_keep = n_keep_for(cfg.num_patches, opts.mask_ratio)
        log(f"exporting {cfg.embed_dim}x{cfg.depth} encoder, {cfg.decoder_embed_dim}x"
            f"{cfg.decoder_depth} decoder, head ({head.cfg.fusion}) to {out}")
        export_encoder(model, stage / "encoder.onnx")
        export_decoder(model, stage / "decoder.onnx", n_keep)
        export_head(head, cfg.num_patches, stage / "head.onnx")
        graphs = {"fp32": {"encoder": "encoder.onnx", "decoder": "decoder.onnx", "head": "head.onnx"}}
        if "fp16" in opts.precisions:
            from .fp16 import convert_graphs_fp16, fp16_summary  # noqa: PLC0415

            calib = np.concatenate([imgs for _, imgs in parity_inputs(opts, cfg.img_size)])
            graphs["fp16"] = convert_graphs_fp16(
                stage, graphs["fp32"], model, log=log, calibration=calib, lam=opts.lam,
                masks=make_masks(cfg.num_patches, opts.k, opts.mask_ratio, opts.mask_seed))
        manifest = _manifest(model, head, opts, graphs, trained)
        if "fp16" in graphs:
            manifest["fp16"] = fp16_summary(stage)
        write_manifest(stage, manifest)

        bundle = Bundle(stage, require_signature=False)  # signed after, if asked
        masks = make_masks(cfg.num_patches, opts.k, opts.mask_ratio, opts.mask_seed)
        ref = TorchReference(model, head, opts.lam)
        rows: list[ParityRow] = []
        for precision in graphs:
            tol = dict(opts.tolerances or tolerances_for(precision))
            backend = OnnxRuntimeCPU(bundle, precision)
            for name, images in parity_inputs(opts, cfg.img_size):
                rows.append(compare(ref, backend, images, masks, name, tol, bundle.threshold))
            backend.close()
        report = {"passed": all(r.passed for r in rows), "rows": [r.to_dict() for r in rows],
                  "reference": "torch eager fp32 (cinemae.export.reference)"}
        (stage / "parity.json").write_text(json.dumps(report, indent=2) + "\n")
        manifest["parity"] = {"passed": report["passed"],
                              "max_logit_abs": {p: max(r.metrics["logit_abs"] for r in rows
                                                       if r.form.endswith(p)) for p in graphs}}
        write_manifest(stage, manifest)
        log("parity (torch reference vs ONNX Runtime CPU):")
        log(format_rows(rows))
        if report["passed"] and "int8" in opts.precisions:  # the INT8 forms have their own gate
            report["passed"] = _add_int8(stage, bundle, model, opts, manifest, graphs, masks, log)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)  # a failed export leaves nothing behind
        raise
    publish_staged(stage, out, report["passed"],
                   lambda rejected: ParityError(f"parity failed; the bundle was not written (inspect {rejected})"))
    return out, rows

