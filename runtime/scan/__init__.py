"""Resumable bulk scan: the results file (:mod:`.results`, no printing), the scoring worker
(:mod:`.worker`) and the command that drives them (:mod:`.cli`). The Ray cluster scan reuses
the first two."""

from __future__ import annotations

from .cli import EXIT_WRITE_FAILED, scan
from .results import (
    ModelMismatch,
    ResultsExist,
    ResultsFile,
    ResultsLocked,
    ResultsWriteError,
    ScanError,
    load_done,
    read_records,
    record_identity,
    record_key,
    write_records,
)
from .worker import iter_batches, score_batch, score_paths

__all__ = ["EXIT_WRITE_FAILED", "ModelMismatch", "ResultsExist", "ResultsFile", "ResultsLocked",
           "ResultsWriteError", "ScanError", "iter_batches", "load_done", "read_records", "record_identity",
           "record_key", "scan", "score_batch", "score_paths", "write_records"]
