"""Calibration feeds: the real inputs of each graph, for the FP16 range rule (export/fp16.py) and
INT8 calibration.

The feeds come from running the fp32 graphs through the runtime's own pipeline
(:func:`cinemae.runtime.pipeline.run_pipeline`: global pass, masked pass, decoder, numpy LCAS,
head) on calibration images, recording every graph call on the way. So a graph is calibrated on
exactly what it receives at inference: the encoder on both passes (n = L and n = n_keep), the
decoder on the masked tokens, the head on the global tokens and the LCAS statistics.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from ..runtime.bundle import Bundle
from ..runtime.masks import MaskSet
from ..runtime.pipeline import GRAPH_OF, OUTPUT_OF, PipelineConfig, run_pipeline

Feeds = dict[str, np.ndarray]


def _batches(images: Iterable[np.ndarray] | np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """[N, 3, S, S] array or an iterable of [3, S, S] / [n, 3, S, S] arrays -> [<=batch_size, 3, S, S]."""
    pending: list[np.ndarray] = []
    for item in images:
        arr = np.asarray(item, dtype=np.float32)
        pending.extend(arr if arr.ndim == 4 else [arr])
        while len(pending) >= batch_size:
            yield np.stack(pending[:batch_size])
            pending = pending[batch_size:]
    if pending:
        yield np.stack(pending)


def iter_calibration_feeds(graphs: Mapping[str, str | Path], images: Iterable[np.ndarray] | np.ndarray,
                           masks: MaskSet, *, patch_size: int, lam: float = 1.0, norm_pix: bool = False,
                           batch_size: int = 1) -> Iterator[tuple[str, Feeds]]:
    """Yield (graph, feeds) for every graph call the runtime makes on ``images``.

    graphs:     {"encoder": path, "decoder": path, "head": path} of the fp32 ONNX graphs
    images:     normalised images, [N, 3, S, S] or an iterable of [3, S, S] arrays (read lazily)
    masks:      the bundle's MaskSet (K = 0: the encoder's global pass and the head only)
    batch_size: images per pipeline call (1: every feed holds one image's rows)

    Per batch, in order: ("encoder", {image [B,3,S,S], ids_keep [B,L]}), and when K > 0
    ("encoder", {image [B*K,3,S,S], ids_keep [B*K,n_keep]}), ("decoder", {tokens, ids_restore}),
    then ("head", {global_tokens [B,1+L,D], stats [B,3]}). Runs ONNX Runtime on the CPU.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sessions = {g: ort.InferenceSession(str(graphs[g]), so, providers=["CPUExecutionProvider"])
                for g in OUTPUT_OF}
    recorded: list[tuple[str, Feeds]] = []

    def run_graph(role: str, feeds: Feeds) -> np.ndarray:
        graph = GRAPH_OF[role]
        recorded.append((graph, feeds))
        return sessions[graph].run([OUTPUT_OF[graph]], feeds)[0]

    for batch in _batches(images, max(1, int(batch_size))):
        cfg = PipelineConfig(batch.shape[-1], patch_size, lam, norm_pix)
        run_pipeline(run_graph, batch, masks, cfg)
        yield from recorded
        recorded.clear()


def calibration_feeds(graphs: Mapping[str, str | Path], images: Iterable[np.ndarray] | np.ndarray,
                      masks: MaskSet, *, patch_size: int, lam: float = 1.0, norm_pix: bool = False,
                      batch_size: int = 1) -> dict[str, list[Feeds]]:
    """{"encoder": [feeds...], "decoder": [...], "head": [...]}: :func:`iter_calibration_feeds`
    collected per graph (decoder empty when K = 0)."""
    out: dict[str, list[Feeds]] = {g: [] for g in OUTPUT_OF}
    for graph, feeds in iter_calibration_feeds(graphs, images, masks, patch_size=patch_size, lam=lam,
                                               norm_pix=norm_pix, batch_size=batch_size):
        out[graph].append(feeds)
    return out


def bundle_calibration_feeds(bundle: Bundle, images: Iterable[np.ndarray] | np.ndarray, *, k: int | None = None,
                             batch_size: int = 1) -> dict[str, list[Feeds]]:
    """:func:`calibration_feeds` for a written bundle: its
    fp32 graphs, its masks (K runs, default the bundle's K), its patch size, lambda and target."""
    from ..runtime.masks import make_masks

    bb = bundle.backbone
    masks = make_masks(bb.num_patches, bundle.k if k is None else k, bundle.mask_ratio, bundle.mask_seed)
    graphs = {g: bundle.graph(g, "fp32") for g in OUTPUT_OF}
    return calibration_feeds(graphs, images, masks, patch_size=bb.patch_size, lam=bundle.lam,
                             norm_pix=bb.norm_pix, batch_size=batch_size)


__all__ = ["bundle_calibration_feeds", "calibration_feeds", "iter_calibration_feeds"]
