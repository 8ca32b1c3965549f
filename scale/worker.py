"""The Ray Data stages of a cluster scan.

``read_batch`` (a task stage) turns rows ``{source, chunk}`` into ``{source, chunk, data,
error, error_code}``: the input's bytes, or the one-sentence reason it could not be read (empty
strings stand for "none": a column of Nones would reach the next stage as float NaNs).
:class:`ScoreActor` (an actor stage, one :class:`~cinemae.runtime.detector.Detector` per actor)
turns those rows into ``{source, chunk, record}``: the scan record as a JSON string, with the
same fields as a ``cinemae-detect --out`` record. A bad input is an error record, never an
exception: nothing an input contains can fail the job.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from typing import Any

import numpy as np

from .inputs import has_scheme, read_input


def _column(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def read_batch(batch: dict[str, np.ndarray], max_bytes: int, base: str) -> dict[str, np.ndarray]:
    """Read the bytes of every input of a batch of rows ``{source [n], chunk [n]}``. A relative
    local path is read from ``base`` (the driver's working directory: workers run elsewhere)
    and keeps its name as given."""
    from cinemae.runtime.preprocess import InputError

    data: list[bytes] = []
    errors: list[str] = []
    codes: list[str] = []
    for src in batch["source"]:
        name = str(src)
        path = name if has_scheme(name) or os.path.isabs(name) else os.path.join(base, name)
        try:
            data.append(read_input(path, max_bytes))
            errors.append("")
            codes.append("")
        except InputError as e:
            data.append(b"")
            errors.append(str(e).replace(path, name))  # name the input as the records do
            codes.append(e.code)
        except Exception as e:  # noqa: BLE001 - one unreadable input never fails the job
            data.append(b"")
            errors.append(f"{type(e).__name__}: {e}")
            codes.append("internal")
    return {"source": batch["source"], "chunk": batch["chunk"], "data": _column(data),
            "error": _column(errors), "error_code": _column(codes)}


def scan_record(result: Any, sha256: str | None, size: int | None) -> dict[str, Any]:
    """The record of one input: ``Result.to_record()`` (scores, verdict, stats or error, the
    model fingerprint, provenance) plus ``sha256`` and ``bytes`` of the input, as
    ``cinemae-detect --out`` writes it."""
    return result.to_record(sha256=sha256, bytes=size)


class ScoreActor:
    """One Detector per actor; called on batches of read rows, returns one record per row.

    The constructor's keyword arguments go to ``Detector`` (bundle, backend, device, precision,
    k, batch_size, threads, max_pixels); ``threads`` should equal the actor's ``num_cpus``.
    """

    def __init__(self, **detector_kwargs: Any) -> None:
        from cinemae.runtime.detector import Detector

        t = time.perf_counter()
        self.det = Detector(**detector_kwargs)
        self.startup_s = time.perf_counter() - t

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from cinemae.runtime.detector import Result
        from cinemae.runtime.preprocess import InputError

        t = time.perf_counter()
        results, arrays, hashes, sizes = [], [], [], []
        for src, data, err, code in zip(batch["source"], batch["data"], batch["error"],
                                        batch["error_code"], strict=True):
            r = Result(source=str(src), error=str(err) or None, error_code=str(code) or None)
            a = sha = size = None
            if r.error is None:
                data = bytes(data)
                sha, size = hashlib.sha256(data).hexdigest(), len(data)
                try:
                    a = self.det.prepare(data, r)  # provenance first, then pixels, as cinemae-detect
                except InputError as e:
                    r.error, r.error_code = str(e), e.code
                except Exception as e:  # noqa: BLE001 - one bad input never fails the job
                    r.error, r.error_code = f"{type(e).__name__}: {e}", "internal"
            results.append(r)
            arrays.append(a)
            hashes.append(sha)
            sizes.append(size)
        self.det.score_prepared(results, arrays, time.perf_counter() - t)
        records = [json.dumps(scan_record(r, h, s), separators=(",", ":"))
                   for r, h, s in zip(results, hashes, sizes, strict=True)]
        return {"source": batch["source"], "chunk": batch["chunk"], "record": _column(records)}

    def info(self) -> dict[str, float]:
        """Start-up seconds (Detector load) and peak resident memory (MiB) of this actor."""
        return {"startup_s": self.startup_s,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
