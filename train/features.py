"""Feature extraction through the runtime, with an on-disk cache.

One extraction per image gives the pooled global feature g [D] and the per-patch LCAS map for
K_max masking runs [K_max, L] (NaN at visible patches) for each of its rows: one row for an
untiled bundle, one per crop (T rows, ``Detector.preprocess`` -> [T, 3, S, S]) for a tiled one
(the manifest's ``tiles`` entry, :mod:`cinemae.runtime.tiles`). The first k runs of a K_max mask set are
exactly the masks of K=k (``runtime.masks.make_masks`` draws them in sequence from one seeded
generator), so the statistics for every K <= K_max come from one extraction:
``runtime.lcas.stats_from_map(lcas[:, :k])``.

Cache: ``CACHE/<bundle key>/shard-*.npz``. The bundle key hashes what the numbers depend on
(the encoder and decoder graphs, preprocessing, the tile spec, mask ratio/seed, lambda, pooling,
K_max); an image is keyed by the sha256 of its bytes (its T rows stored together), so renamed or
moved files hit and edited ones miss.
Shards are written atomically every ``flush_every`` images: an interrupted run keeps what it
extracted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.atomic import atomic_write
from ..runtime.bundle import Bundle
from ..runtime.lcas import stats_from_map
from ..runtime.preprocess import InputError
from .data import Item

_logger = logging.getLogger(__name__)


@dataclass
class FeatureSet:
    """Extracted features of the images that could be read: N images, R rows.

    An untiled bundle gives one row per image (R = N, ``owner`` = arange(N)); a tiled one gives
    T_i rows per image i (its crops), consecutive, R = sum T_i.

    names:   [N] item sources;  labels: [N] int (1 = AI-generated);  hashes: [N] cache keys
    owner:   [R] int, the image (index into names) each row belongs to
    feature: [R, D] float32 pooled global feature (before standardisation)
    lcas:    [R, K_max, L] float32 LCAS map, NaN at visible patches
    errors:  (source, error code, message) for every item that could not be scored
    """

    names: list[str]
    labels: np.ndarray
    feature: np.ndarray
    lcas: np.ndarray
    hashes: list[str] = field(default_factory=list)
    errors: list[tuple[str, str, str]] = field(default_factory=list)
    cache_hits: int = 0
    extracted: int = 0
    seconds: float = 0.0
    owner: np.ndarray | None = None  # None: one row per image

    def __post_init__(self) -> None:
        if self.owner is None:
            self.owner = np.arange(len(self.names), dtype=np.int64)
        self.owner = np.asarray(self.owner, dtype=np.int64)
        if not len(self.owner) == len(self.feature) == len(self.lcas):
            raise ValueError(f"FeatureSet: {len(self.owner)} owners, {len(self.feature)} feature rows, "
                             f"{len(self.lcas)} LCAS rows")

    @property
    def k_max(self) -> int:
        return int(self.lcas.shape[1])

    @property
    def rows(self) -> int:
        return int(len(self.feature))

    @property
    def row_labels(self) -> np.ndarray:
        """[R] the label of each row's image."""
        return self.labels[self.owner] if len(self.owner) else np.zeros(0, np.int64)

    def stats(self, k: int) -> np.ndarray:
        """[R, 3] summary statistics per row for K=k (k <= K_max); zeros for K=0."""
        if k > self.k_max:
            raise ValueError(f"K={k} needs an extraction with K_max >= {k} (have {self.k_max})")
        return stats_from_map(self.lcas[:, :k])

    def image_logits(self, row_logits: np.ndarray) -> np.ndarray:
        """[R] row logits -> [N] image logits: the mean of each image's crop logits in float64,
        the runtime's rule (``runtime.tiles.reduce_logits``, ``mean_logit``); the row's own
        logit for an untiled set."""
        from ..runtime.tiles import mean_logit_by_image

        return mean_logit_by_image(row_logits, self.owner, len(self.names))

    def concat(self, other: FeatureSet) -> FeatureSet:
        """This set followed by ``other`` (same bundle and K_max)."""
        assert self.owner is not None and other.owner is not None
        return FeatureSet(self.names + other.names, np.concatenate([self.labels, other.labels]),
                          np.concatenate([self.feature, other.feature]),
                          np.concatenate([self.lcas, other.lcas]), self.hashes + other.hashes,
                          self.errors + other.errors, self.cache_hits + other.cache_hits,
                          self.extracted + other.extracted, self.seconds + other.seconds,
                          np.concatenate([self.owner, other.owner + len(self.names)]))

    def subset(self, idx: np.ndarray) -> FeatureSet:
        """The images ``idx`` (indices into ``names``, in that order) with all their rows."""
        assert self.owner is not None
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        order = np.argsort(self.owner, kind="stable")  # rows grouped by image, in row order
        starts = np.searchsorted(self.owner[order], np.arange(len(self.names) + 1))
        rows = [order[starts[i]:starts[i + 1]] for i in idx]
        sel = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        owner = np.repeat(np.arange(len(idx)), [len(r) for r in rows])
        return FeatureSet([self.names[i] for i in idx], self.labels[idx], self.feature[sel],
                          self.lcas[sel], [self.hashes[i] for i in idx] if self.hashes else [], owner=owner)


# Training-time augmentations, applied to the preprocessed image [3, S, S]. A spec is one step or
# several joined by "+", applied left to right:
#   hflip           mirrored left-right
#   shift:DY:DX     moved DY rows down and DX columns right (|DY|, |DX| < S/2); the uncovered
#                   border is filled by reflecting the image (numpy "reflect" padding)
# e.g. "hflip+shift:-2:2". A transformed image is cached under "<sha256>:<spec>" and named
# "<source>#<spec>". For a tiled bundle the transform is applied to each crop [3, S, S] on its
# own (the crops stay where they are; each is mirrored or moved inside its own box).


def _shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    s = x.shape[-1]
    p = max(abs(dy), abs(dx))
    padded = np.pad(x, ((0, 0), (p, p), (p, p)), mode="reflect")
    return np.ascontiguousarray(padded[:, p - dy:p - dy + s, p - dx:p - dx + s])


def parse_augmentation(spec: str) -> Callable[[np.ndarray], np.ndarray]:
    """An augmentation spec (see above) -> a function [3, S, S] -> [3, S, S]; ValueError if unknown."""
    steps: list[Callable[[np.ndarray], np.ndarray]] = []
    for part in spec.split("+"):
        fields = part.strip().split(":")
        if fields == ["hflip"]:
            steps.append(lambda x: np.ascontiguousarray(x[..., ::-1]))
        elif fields[0] == "shift" and len(fields) == 3:
            try:
                dy, dx = int(fields[1]), int(fields[2])
            except ValueError:
                raise ValueError(f"unknown augmentation {spec!r}: shift needs integers, e.g. shift:2:-2") from None

            def step(x: np.ndarray, dy: int = dy, dx: int = dx) -> np.ndarray:
                if 2 * max(abs(dy), abs(dx)) >= x.shape[-1]:
                    raise ValueError(f"augmentation {spec!r}: shift must be under half the image size")
                return _shift(x, dy, dx)

            steps.append(step)
        else:
            raise ValueError(f"unknown augmentation {spec!r}; known steps: hflip, shift:DY:DX (joined by +)")

    def apply(x: np.ndarray) -> np.ndarray:
        for f in steps:
            x = f(x)
        return x

    return apply


def bundle_key(bundle: Bundle, k_max: int, precision: str = "fp32") -> str:
    """A short hash of everything an extracted feature depends on."""
    m = bundle.manifest
    files = m.get("files", {})
    graphs = m.get("graphs", {}).get(precision, {})
    parts = {
        "encoder": files.get(graphs.get("encoder", "encoder.onnx")),
        "decoder": files.get(graphs.get("decoder", "decoder.onnx")),
        "preprocess": m.get("preprocess"),
        "mask_ratio": m.get("mask_ratio"), "mask_seed": m.get("mask_seed"),
        "lambda": m.get("lambda"), "pooling": m.get("head", {}).get("pooling", "cls"),
        "k_max": int(k_max), "precision": precision,
    }
    if m.get("tiles") is not None:  # which crops an image gives (absent: the untiled key stays as it was)
        from ..runtime.tiles import TileSpec

        parts["tiles"] = TileSpec.from_manifest(m).to_manifest()  # type: ignore[union-attr]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


class FeatureCache:
    """content sha256 -> (feature [T, D], lcas [T, K_max, L]) for one bundle key (T = 1 for an
    untiled bundle). A shard holds ``hashes`` [N], ``counts`` [N] (rows per image; absent in
    shards written before tiles, meaning 1) and the rows ``feature`` [R, D], ``lcas`` [R, K_max, L]."""

    def __init__(self, root: str | os.PathLike[str] | None, key: str) -> None:
        self.dir = Path(root) / key if root else None
        self.data: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._pending: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if self.dir and self.dir.is_dir():
            for shard in sorted(self.dir.glob("shard-*.npz")):
                try:
                    with np.load(shard) as z:
                        hashes, feat, lcas = z["hashes"], z["feature"], z["lcas"]
                        counts = z["counts"] if "counts" in z.files else np.ones(len(hashes), np.int64)
                        if int(counts.sum()) != len(feat) or len(feat) != len(lcas) or len(counts) != len(hashes):
                            raise ValueError("row counts do not add up")
                        bounds = np.concatenate([[0], np.cumsum(counts)])
                        for j, h in enumerate(hashes):
                            a, b = int(bounds[j]), int(bounds[j + 1])
                            self.data[str(h)] = (feat[a:b], lcas[a:b])
                except Exception as e:  # noqa: BLE001 - a damaged shard is skipped, not fatal
                    warnings.warn(f"feature cache: skipping unreadable {shard} ({e})", stacklevel=2)

    def get(self, h: str) -> tuple[np.ndarray, np.ndarray] | None:
        return self.data.get(h)

    def put(self, h: str, feature: np.ndarray, lcas: np.ndarray) -> None:
        """feature [T, D], lcas [T, K_max, L]: one image's rows."""
        self.data[h] = (feature, lcas)
        self._pending[h] = (feature, lcas)

    def flush(self) -> None:
        if not self.dir or not self._pending:
            self._pending.clear()
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        hashes = list(self._pending)
        counts = np.array([len(self._pending[h][0]) for h in hashes], np.int64)
        feat = np.concatenate([self._pending[h][0] for h in hashes])
        lcas = np.concatenate([self._pending[h][1] for h in hashes])
        name = f"shard-{time.time_ns():020d}-{os.getpid()}.npz"
        atomic_write(self.dir / name, lambda f: np.savez(f, hashes=np.array(hashes), counts=counts, feature=feat,
                                                        lcas=lcas))
        self._pending.clear()


def extract(bundle: str | os.PathLike[str] | Bundle, items: Sequence[Item], k_max: int = 4, *,
            cache_dir: str | os.PathLike[str] | None = None, batch_size: int = 64,
            threads: int | None = None, flush_every: int = 2048, progress: bool = True,
            log: Callable[[str], None] = _logger.info, augment: str | None = None) -> FeatureSet:
    """Run every item through the runtime (``Detector.run_arrays`` with K_max runs) or take it
    from the cache. Unreadable items are listed in ``errors`` and left out. A tiled bundle's
    image is its T crops (``Detector.preprocess`` -> [T, 3, S, S]), T rows of the result, each
    exactly what ``run_arrays`` gives for that crop; ``batch_size`` counts rows.

    augment: an augmentation spec (``parse_augmentation``); every item is then transformed after
    preprocessing (e.g. "hflip": mirrored left-right; for a tiled bundle each crop on its own)
    and extracted as that new image."""
    from tqdm import tqdm

    from ..runtime.detector import Detector

    transform = parse_augmentation(augment) if augment else None
    b = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # K_max differs from the K the bundle's head was trained for
        det = Detector(b, backend="onnxruntime", device="cpu", k=k_max, threads=threads)
    key = bundle_key(b, k_max)
    cache = FeatureCache(cache_dir, key)
    t0 = time.perf_counter()
    # One slot per item, filled when its features are known: a cache hit is known at once, an
    # extracted item only when its batch runs, so appending would put hits (e.g. a later copy of
    # an image already extracted in this run) ahead of pending items, and the row order (which the
    # seeded train/validation split indexes) would depend on what the cache held.
    slots: list[tuple[str, int, str, tuple[np.ndarray, np.ndarray]] | None] = [None] * len(items)
    errors: list[tuple[str, str, str]] = []
    hits = extracted = since_flush = 0
    todo: list[tuple[int, Item, str, np.ndarray]] = []  # x: [T, 3, S, S]
    suffix = f"#{augment}" if augment else ""

    def keep(i: int, it: Item, h: str, row: tuple[np.ndarray, np.ndarray]) -> None:
        slots[i] = (it.source + suffix, it.label, h, row)

    def run_todo() -> None:
        nonlocal extracted, since_flush
        if not todo:
            return
        batch = np.concatenate([t[3] for t in todo])
        out = det.run_arrays(batch, want_feature=True, want_lcas=True)
        lm = out.lcas if out.lcas is not None else np.zeros((len(batch), 0, b.backbone.num_patches),
                                                            np.float32)
        at = 0
        for i, it, h, x in todo:
            f = out.feature[at:at + len(x)].astype(np.float32)
            m = lm[at:at + len(x)].astype(np.float32)
            at += len(x)
            cache.put(h, f, m)
            keep(i, it, h, (f, m))
        extracted += len(todo)
        since_flush += len(todo)
        todo.clear()
        if since_flush >= flush_every:
            cache.flush()
            since_flush = 0

    desc = f"features ({augment})" if augment else "features"
    bar = tqdm(items, desc=desc, unit="img", disable=not progress, mininterval=2.0)
    pending_rows = 0
    try:
        for i, it in enumerate(bar):
            try:
                data = it.read(det.max_bytes)
                h = hashlib.sha256(data).hexdigest() + (f":{augment}" if augment else "")
                got = cache.get(h)
                if got is not None:
                    hits += 1
                    keep(i, it, h, got)
                    continue
                x = det.preprocess(data)
                x = x if x.ndim == 4 else x[None]  # [T, 3, S, S]; T = 1 untiled
                if transform:
                    x = np.stack([transform(c) for c in x])
                todo.append((i, it, h, x))
                pending_rows += len(x)
            except InputError as e:
                errors.append((it.source, e.code, str(e)))
                continue
            if pending_rows >= batch_size:
                run_todo()
                pending_rows = 0
        run_todo()
    finally:
        cache.flush()  # keep what was extracted, also when interrupted
        det.close()
    if errors:
        log(f"{len(errors)} item(s) could not be read and were left out, e.g. {errors[0][0]}: {errors[0][2]}")
    done = [sl for sl in slots if sl is not None]  # input order, unreadable items left out
    names = [sl[0] for sl in done]
    labels = [sl[1] for sl in done]
    hashes = [sl[2] for sl in done]
    rows = [sl[3] for sl in done]
    d = b.manifest["backbone"]["embed_dim"]
    feature = np.concatenate([r[0] for r in rows]) if rows else np.zeros((0, d), np.float32)
    lcas = np.concatenate([r[1] for r in rows]) if rows else np.zeros((0, k_max, b.backbone.num_patches),
                                                                      np.float32)
    owner = np.repeat(np.arange(len(rows)), [len(r[0]) for r in rows])
    return FeatureSet(names, np.asarray(labels, dtype=np.int64), feature, lcas, hashes, errors,
                      hits, extracted, time.perf_counter() - t0, owner)


def describe(fs: FeatureSet) -> dict[str, Any]:
    """Counts of a set (images per class; ``rows``: crops, equal to images when untiled)."""
    return {"images": len(fs.names), "real": int((fs.labels == 0).sum()), "fake": int((fs.labels == 1).sum()),
            "rows": fs.rows, "errors": len(fs.errors), "cache_hits": fs.cache_hits, "extracted": fs.extracted,
            "seconds": round(fs.seconds, 1)}
