"""The scan's scoring worker: file paths -> result records, decoding ahead on threads.

Files are read, hashed and preprocessed a few batches ahead of the backend on ``workers``
threads; memory stays bounded by the window. An input whose resume key is in ``done`` is read
and hashed (the key needs the content) but not decoded or scored. Used by the local scan
(:mod:`.cli`) and by the Ray cluster scan (one call of :func:`score_paths` per Ray batch).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from ..inputs import normalise_path, text_and_bytes
from .results import record_key


class Prepared:
    """One input, read and (unless skipped) preprocessed: ``array`` [3, S, S] float32 or None;
    ``result`` holds what was read before the pixels (provenance)."""

    __slots__ = ("path", "key", "sha256", "size", "array", "error", "code", "seconds", "skip", "result")

    def __init__(self, path: str) -> None:
        from ..detector import Result

        self.path = path
        self.result = Result(source=path)
        self.key = b""
        self.sha256: str | None = None
        self.size: int | None = None
        self.array: np.ndarray | None = None
        self.error: str | None = None
        self.code: str | None = None
        self.seconds = 0.0
        self.skip = False


def prepare(det: Any, path: str, done: set[bytes] | frozenset[bytes] = frozenset()) -> Prepared:
    """Read, hash, and (unless its key is in ``done``) preprocess one file."""
    from ..preprocess import InputError, read_bytes

    t = time.perf_counter()
    r = Prepared(path)
    try:
        data = read_bytes(path, det.max_bytes)
    except InputError as e:
        r.error, r.code = str(e), e.code
        r.key = record_key(None, path)
        r.skip = r.key in done
        r.seconds = time.perf_counter() - t
        return r
    r.sha256 = hashlib.sha256(data).hexdigest()
    r.size = len(data)
    r.key = record_key(r.sha256, path)
    if r.key in done:
        r.skip = True
        return r
    try:  # provenance from the same bytes, then the pixels
        r.array = det.prepare(data, r.result)
    except InputError as e:
        r.error, r.code = str(e), e.code
    except Exception as e:  # noqa: BLE001 - one bad input never stops the scan
        r.error, r.code = f"{type(e).__name__}: {e}", "internal"
    r.seconds = time.perf_counter() - t
    return r


def iter_prepared(det: Any, paths: Sequence[str], done: set[bytes] | frozenset[bytes] = frozenset(), *,
                  window: int = 32, workers: int = 2) -> Iterator[Prepared]:
    """Prepare ``paths`` in order, at most ``window`` ahead of the consumer."""
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="cinemae-scan") as pool:
        pending: list[Future] = []
        it = iter(paths)
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < window:
                    try:
                        pending.append(pool.submit(prepare, det, next(it), done))
                    except StopIteration:
                        exhausted = True
                if not pending:
                    return
                yield pending.pop(0).result()
        finally:
            for f in pending:
                f.cancel()


def score_batch(det: Any, batch: list[Prepared], want_lcas: bool = False) -> list[dict[str, Any]]:
    """One backend call for the decodable inputs of ``batch``; one record per input
    (``Result.to_record()`` + sha256, bytes, path[, path_bytes_b64])."""
    results = [p.result for p in batch]
    for p, r in zip(batch, results, strict=True):
        r.error, r.error_code = p.error, p.code
    det.score_prepared(results, [p.array for p in batch], sum(p.seconds for p in batch), want_lcas=want_lcas)
    recs = []
    for p, r in zip(batch, results, strict=True):
        path, raw = text_and_bytes(normalise_path(p.path))
        extra: dict[str, Any] = {"sha256": p.sha256, "bytes": p.size, "path": path}
        if raw is not None:
            extra["path_bytes_b64"] = raw
        recs.append(r.to_record(**extra))
    return recs


def iter_batches(det: Any, paths: Sequence[str], done: set[bytes] | frozenset[bytes] = frozenset(), *,
                 batch_size: int | None = None, want_lcas: bool = False, workers: int = 2
                 ) -> Iterator[tuple[list[dict[str, Any]], int]]:
    """Score ``paths`` batch by batch: yields (records of one batch, inputs skipped since the last
    yield). Skipped: a key in ``done``, or a key already met in this run (a path listed twice).
    The caller adds each batch's keys to ``done`` only once it has stored them."""
    bs = max(1, int(batch_size or det.batch_size))
    batch: list[Prepared] = []
    seen: set[bytes] = set()
    skipped = 0
    for p in iter_prepared(det, paths, done, window=2 * bs, workers=workers):
        if p.skip or p.key in seen:
            skipped += 1
            continue
        seen.add(p.key)
        batch.append(p)
        if len(batch) >= bs:
            yield score_batch(det, batch, want_lcas), skipped
            batch, skipped = [], 0
    if batch or skipped:
        yield (score_batch(det, batch, want_lcas) if batch else []), skipped


def score_paths(det: Any, paths: Sequence[str], *, done: set[bytes] | frozenset[bytes] = frozenset(),
                want_lcas: bool = False, workers: int = 2) -> list[dict[str, Any]]:
    """Records for ``paths`` (in order; keys in ``done`` and repeats left out), in batches of
    ``det.batch_size``. A bad input gives an error record and never stops the others."""
    return [rec for recs, _ in iter_batches(det, paths, done, want_lcas=want_lcas, workers=workers) for rec in recs]
