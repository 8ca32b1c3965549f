"""The Ray Data stages of a cluster scan.

Rows carry ``source`` (the input's name as listed, as ``cinemae-detect`` names it), ``path``
(its identity: the normalised absolute file name, or the URI) and ``chunk``; names travel as
bytes (``os.fsencode``) so that file names that are not UTF-8 cross Arrow unchanged.

``read_batch`` (a task stage) adds ``data`` (the input's bytes) or ``error``/``error_code``
(the one-sentence reason it could not be read; empty strings stand for "none": a column of
Nones would reach the next stage as float NaNs). :class:`ScoreActor` (an actor stage, one
:class:`~cinemae.runtime.detector.Detector` per actor) turns the rows into ``{path, chunk,
record}``: the scan record as one JSON line, built by the local scan's own
:func:`cinemae.runtime.scan.worker.score_batch`, so it has exactly the fields of a
``cinemae-detect --out`` record. A bad input is an error record, never an exception: nothing
an input contains can fail the job.
"""

from __future__ import annotations

import hashlib
import os
import resource
import time
from typing import Any

import numpy as np

from .inputs import read_input


def _column(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def read_batch(batch: dict[str, np.ndarray], max_bytes: int) -> dict[str, np.ndarray]:
    """Read the bytes of every input of a batch of rows ``{source, path, chunk}`` [n]."""
    from cinemae.runtime.preprocess import InputError

    data: list[bytes] = []
    errors: list[str] = []
    codes: list[str] = []
    for src, path in zip(batch["source"], batch["path"], strict=True):
        name, path = os.fsdecode(bytes(src)), os.fsdecode(bytes(path))
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
    return {**batch, "data": _column(data), "error": _column(errors), "error_code": _column(codes)}


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
        from cinemae.runtime.inputs import text_and_bytes
        from cinemae.runtime.preprocess import InputError
        from cinemae.runtime.scan.results import encode_records
        from cinemae.runtime.scan.worker import Prepared, score_batch

        prepared = []
        for src, data, err, code in zip(batch["source"], batch["data"], batch["error"], batch["error_code"],
                                        strict=True):
            t = time.perf_counter()
            p = Prepared(os.fsdecode(bytes(src)))
            if err:
                p.error, p.code = str(err), str(code)
            else:
                data = bytes(data)
                p.sha256, p.size = hashlib.sha256(data).hexdigest(), len(data)
                try:  # provenance from the same bytes, then the pixels, as cinemae-detect does
                    p.array = self.det.prepare(data, p.result)
                except InputError as e:
                    p.error, p.code = str(e), e.code
                except Exception as e:  # noqa: BLE001 - one bad input never fails the job
                    p.error, p.code = f"{type(e).__name__}: {e}", "internal"
            p.seconds = time.perf_counter() - t
            prepared.append(p)
        records = score_batch(self.det, prepared)
        lines = []
        for rec, path in zip(records, batch["path"], strict=True):
            # the identity planned by the driver (workers run in another directory, or machine)
            text, raw = text_and_bytes(os.fsdecode(bytes(path)))
            rec["path"] = text
            rec.pop("path_bytes_b64", None)
            if raw is not None:
                rec["path_bytes_b64"] = raw
            lines.append(encode_records([rec]).decode("ascii"))
        return {"path": batch["path"], "chunk": batch["chunk"], "record": _column(lines)}

    def info(self) -> dict[str, float]:
        """Start-up seconds (Detector load) and peak resident memory (MiB) of this actor."""
        return {"startup_s": self.startup_s,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
