"""Recheck margins: how far each reduced-precision form moves p, measured with the bundle's head.

The runtime re-scores at fp32 every image whose reduced-precision p lies within the form's margin
of a decision edge (:class:`cinemae.runtime.recheck.Recheck`). A verdict can only differ from
fp32's when |p - edge| <= |Δp|, so a margin at least the image's |Δp| catches every flip. The
margin is ``RECHECK_SAFETY`` x the largest |Δp| over real images, measured here against the fp32
graphs in ONNX Runtime CPU (the gate's reference) and written into the manifest's ``recheck``
entry with the sha256 of the head it was measured with: a retrained head makes it stale, and the
runtime then does not use it (``cinemae-train`` measures it again after writing a head).

Measure, compare, record: the same shape as the INT8 gate (:mod:`cinemae.export.int8`), without
a pass/fail (the gate already decided whether the form ships).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.evaluation import probabilities

_logger = logging.getLogger(__name__)

#: images a margin is measured on when a folder is given (spread over the sorted files)
MARGIN_IMAGES = 64


def run_batches(backend: Any, images: np.ndarray, masks: Any, batch: int = 8) -> Any:
    """The backend on ``images`` [N, 3, H, W] in batches; one BatchOutput (logit [N], stats [N, 3])."""
    from ..runtime.backends.base import BatchOutput

    outs = [backend.run(images[i:i + batch], masks) for i in range(0, len(images), batch)]
    return BatchOutput(logit=np.concatenate([o.logit for o in outs]),
                       stats=np.concatenate([o.stats for o in outs]))


def reduced_forms(bundle: Any) -> list[tuple[str, str]]:
    """(backend, precision) of every registered CPU backend and reduced precision it declares and
    the bundle can feed (int8 needs int8 graphs, fp16 fp16 graphs; bf16 runs the fp32 graphs)."""
    from ..runtime.backends.registry import specs

    have = set(bundle.precisions())
    out = []
    for s in specs():
        if "cpu" not in s.devices:
            continue
        for prec in s.precisions:
            if prec != "fp32" and (prec == "bf16" or prec in have):
                out.append((s.name, prec))
    return out


def measure_margins(bundle: Any, images: np.ndarray, masks: Any, forms: Sequence[tuple[str, str]] | None = None,
                    safety: float | None = None, threads: int | None = None,
                    log: Callable[[str], None] = _logger.info, owner: np.ndarray | None = None) -> dict[str, Any]:
    """The manifest's ``recheck`` entry for ``bundle`` (a loaded Bundle): each form of ``forms``
    (default :func:`reduced_forms`) that can run here against the fp32 graphs in ONNX Runtime CPU
    on ``images`` [N, 3, H, W]. A form that cannot run here is left out (and said).

    owner: for a tiled bundle, the image [N] each row (crop) belongs to; |Δp| is then taken on the
    image's p (the mean crop logit, the runtime's rule), which is what the recheck compares."""
    from ..runtime.backends.base import BackendUnavailable
    from ..runtime.backends.registry import create_backend
    from ..runtime.bundle import BundleError
    from ..runtime.precision import RECHECK_SAFETY, head_sha256
    from ..runtime.tiles import mean_logit_by_image

    safety = RECHECK_SAFETY if safety is None else float(safety)
    def image_p(logit: np.ndarray) -> np.ndarray:
        if owner is None:
            return probabilities(logit)
        return probabilities(mean_logit_by_image(logit, owner, int(owner.max()) + 1))

    ref_be, _ = create_backend(bundle, "onnxruntime-cpu", "cpu", "fp32", threads)
    p_ref = image_p(run_batches(ref_be, images, masks).logit)
    ref_be.close()
    rows: dict[str, Any] = {}
    for name, prec in (reduced_forms(bundle) if forms is None else forms):
        try:
            be, _ = create_backend(bundle, name, "cpu", prec, threads)
        except (BackendUnavailable, BundleError, ImportError) as e:
            log(f"recheck margin: {name}/{prec} cannot run here ({e}); no margin")
            continue
        dp = np.abs(image_p(run_batches(be, images, masks).logit) - p_ref)
        be.close()
        rows[f"{name}/{prec}"] = form_row(float(dp.max()), float(dp.mean()), len(dp), safety)
        log(f"recheck margin: {name}/{prec}: max |dp| {dp.max():.2e} over {len(dp)} images -> margin "
            f"{safety * dp.max():.2e}")
    return {"reference": "the bundle's fp32 graphs in ONNX Runtime CPU", "safety_factor": safety,
            "head_sha256": head_sha256(bundle.manifest), "forms": rows}


def form_row(p_abs_max: float, p_abs_mean: float, images: int, safety: float) -> dict[str, Any]:
    """One form's entry: the measured |Δp| (max, mean), on how many images, and the margin."""
    return {"p_abs_max": round(p_abs_max, 6), "p_abs_mean": round(p_abs_mean, 6), "images": int(images),
            "margin": math.ceil(safety * p_abs_max * 1e6) / 1e6}  # rounded up, never below


def with_gate_rows(manifest: dict[str, Any], rows: Sequence[Any], safety: float | None = None) -> dict[str, Any]:
    """The manifest's ``recheck`` entry with the INT8 gate's rows (GateRow: form, n, metrics) as
    margins, kept beside the entry's other forms when those were measured with the same head."""
    from ..runtime.precision import RECHECK_SAFETY, head_sha256

    safety = RECHECK_SAFETY if safety is None else float(safety)
    head = head_sha256(manifest)
    old = manifest.get("recheck")
    keep = old.get("forms", {}) if isinstance(old, dict) and old.get("head_sha256") == head else {}
    forms = {**keep, **{r.form: form_row(r.metrics["p_abs_max"], r.metrics["p_abs_mean"], r.n, safety)
                        for r in rows}}
    return {"reference": "the bundle's fp32 graphs in ONNX Runtime CPU", "safety_factor": safety,
            "head_sha256": head, "forms": forms}


def image_files(folders: Sequence[str | Path], n: int = MARGIN_IMAGES) -> list[Path]:
    """``n`` image files spread over the sorted files of ``folders`` (each folder its share)."""
    from ..runtime.inputs import IMAGE_SUFFIXES

    per = max(1, n // max(1, len(folders)))
    out: list[Path] = []
    for f in folders:
        files = sorted(p for p in Path(f).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        out += files if len(files) <= per else [files[i * len(files) // per] for i in range(per)]
    return out


def write_margins(root: str | Path, sources: Sequence[Any], forms: Sequence[tuple[str, str]] | None = None,
                  safety: float | None = None, threads: int | None = None,
                  log: Callable[[str], None] = _logger.info) -> dict[str, Any]:
    """Measure the margins of the bundle at ``root`` on ``sources`` (image files or bytes; those
    that do not decode are skipped) and write them into its manifest (``recheck``). Returns the
    entry. ValueError when no source decodes."""
    from ..runtime.bundle import Bundle, write_manifest
    from ..runtime.masks import make_masks
    from ..runtime.preprocess import InputError, load_image, preprocess
    from ..runtime.tiles import TileSpec, tile_views

    bundle = Bundle(root)
    bb = bundle.backbone
    tiles = TileSpec.from_manifest(bundle.manifest)
    arrays, owner = [], []
    for s in sources:
        try:
            if tiles is None:
                arrays.append(preprocess(s, bb.img_size, bundle.crop_ratio)[None])
            else:  # every crop the runtime scores, tagged with its image
                arrays.append(tile_views(load_image(s), bb.img_size, tiles)[0])
        except InputError:
            continue
        owner += [len(arrays) - 1] * len(arrays[-1])
    if not arrays:
        raise ValueError("recheck margins need images that decode")
    masks = make_masks(bb.num_patches, bundle.k, bundle.mask_ratio, bundle.mask_seed)
    entry = measure_margins(bundle, np.concatenate(arrays), masks, forms, safety, threads, log,
                            owner=None if tiles is None else np.asarray(owner))
    manifest = {k: v for k, v in bundle.manifest.items() if k != "files"}
    manifest["recheck"] = entry
    write_manifest(bundle.root, manifest)
    return entry


def margins_after_training(root: str | Path, sources: Sequence[str | Path], threads: int | None = None,
                           log: Callable[[str], None] = _logger.info) -> dict[str, Any] | None:
    """``cinemae-train``'s step after writing a head: measure the margins again with the new head
    on :data:`MARGIN_IMAGES` images spread over the training folders ``sources`` (archives and
    CSVs are not read here). None, said in one line, when the bundle has no reduced-precision form
    that runs here or no folder was given."""
    from ..runtime.bundle import Bundle

    folders = [f for f in sources if Path(f).is_dir()]
    if not reduced_forms(Bundle(root)):
        return None
    if not folders:
        log("recheck margins: not measured (the training images are not in folders); reduced precisions "
            "run without the fp32 recheck until `cinemae.export.recheck.write_margins` measures them")
        return None
    entry = write_margins(root, image_files(folders), threads=threads, log=log)
    if not entry["forms"]:
        log("recheck margins: no reduced-precision form runs here; none recorded")
    return entry


__all__ = ["MARGIN_IMAGES", "form_row", "image_files", "margins_after_training", "measure_margins",
           "reduced_forms", "run_batches", "with_gate_rows", "write_margins"]
