"""Resumable bulk scan: ``cinemae-detect BUNDLE DIR --out results.jsonl [--resume]``.

For back-filling a content-management system: millions of files, runs that get killed.

* Streaming with bounded memory: files are read, hashed and preprocessed a few batches ahead on
  two threads; nothing but the list of paths and the set of finished keys is held.
* Every record is one JSON line: the :class:`~cinemae.runtime.detector.Result` fields plus
  ``sha256`` (of the file content; null when the file could not be read), ``bytes`` and
  ``model_id`` / ``model_version``. Inputs that fail are recorded too (``error``,
  ``error_code``), so every input appears in the file exactly once.
* Durability: each batch is appended with one ``write`` on an ``O_APPEND`` descriptor, then
  ``fsync``. A kill can lose at most the batch being scored and leave at most one torn last
  line, which the next ``--resume`` cuts off (truncating the file to its last complete line).
* Resume: an input is skipped when a record with the same (content sha256, path) is in the file
  (for an unreadable input, which has no hash: the same path with an error). A file whose
  content changed since is scored again; two paths with identical content each get a record.
* An exclusive ``flock`` on the output file keeps two scans from writing into it at once.
* Without ``--resume`` an existing non-empty output file is refused (exit 2) rather than
  appended to, so a forgotten flag cannot duplicate records.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .cli import format_row


class ScanError(RuntimeError):
    """The output file cannot be used (locked by another scan, unreadable, not JSON lines)."""


def record_key(sha256: str | None, path: str) -> bytes:
    """The resume key of one record: a 16-byte digest of (content sha256, path), the sha256
    being empty for an unreadable input. Digests keep the resume set small (~80 bytes a record)."""
    return hashlib.blake2b(f"{sha256 or ''}\0{path}".encode("utf-8", "surrogateescape"), digest_size=16).digest()


def load_done(out: str | os.PathLike[str], repair: bool = True) -> tuple[set[bytes], int]:
    """Read an existing results file: the set of finished keys and the number of records.

    A last line without its newline (a write torn by a kill) is cut off when ``repair`` is set;
    an unparsable line anywhere else is an error (the file is not ours, or was edited).
    """
    p = Path(out)
    done: set[bytes] = set()
    if not p.exists():
        return done, 0
    n = 0
    good_end = 0
    with open(p, "rb") as f:
        data_end = os.fstat(f.fileno()).st_size
        lineno = 0
        for raw in f:
            lineno += 1
            if not raw.endswith(b"\n"):  # torn last line
                break
            try:
                rec = json.loads(raw)
                key = record_key(rec.get("sha256"), rec["source"])
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                if raw.strip() == b"":
                    good_end += len(raw)
                    continue
                raise ScanError(f"{p}:{lineno}: not a cinemae result record ({e})") from None
            done.add(key)
            n += 1
            good_end += len(raw)
    if good_end < data_end:
        if not repair:
            raise ScanError(f"{p}: the last line is incomplete")
        with open(p, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
        print(f"# {p}: cut off an incomplete last line ({data_end - good_end} bytes, from an "
              "interrupted write)", file=sys.stderr)
    return done, n


class _Prepped:
    __slots__ = ("path", "sha256", "size", "array", "error", "code", "seconds", "skip")

    def __init__(self, path: str) -> None:
        self.path = path
        self.sha256: str | None = None
        self.size: int | None = None
        self.array: np.ndarray | None = None
        self.error: str | None = None
        self.code: str | None = None
        self.seconds = 0.0
        self.skip = False


def _prep(det: Any, path: str, done: set[bytes]) -> _Prepped:
    """Read, hash, and (unless already done) preprocess one file -> [3, S, S]."""
    from .preprocess import InputError, read_bytes

    t = time.perf_counter()
    r = _Prepped(path)
    try:
        data = read_bytes(path, det.max_bytes)
    except InputError as e:
        r.error, r.code = str(e), e.code
        r.skip = record_key(None, path) in done
        r.seconds = time.perf_counter() - t
        return r
    r.sha256 = hashlib.sha256(data).hexdigest()
    r.size = len(data)
    if record_key(r.sha256, path) in done:
        r.skip = True
        return r
    try:
        r.array = det.preprocess(data)
    except InputError as e:
        r.error, r.code = str(e), e.code
    except Exception as e:  # noqa: BLE001 - one bad input never stops the scan
        r.error, r.code = f"{type(e).__name__}: {e}", "internal"
    r.seconds = time.perf_counter() - t
    return r


def _prepped(det: Any, inputs: Sequence[str], done: set[bytes], window: int,
             workers: int) -> Iterator[_Prepped]:
    """Prepare inputs in order, at most ``window`` ahead of the consumer."""
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="cinemae-scan") as pool:
        pending: list[Future] = []
        it = iter(inputs)
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < window:
                    try:
                        pending.append(pool.submit(_prep, det, next(it), done))
                    except StopIteration:
                        exhausted = True
                if not pending:
                    return
                yield pending.pop(0).result()
        finally:
            for f in pending:
                f.cancel()


def _score(det: Any, batch: list[_Prepped], want_lcas: bool = False) -> list[dict[str, Any]]:
    """One backend call for the decodable inputs of ``batch``; one record per input."""
    from .detector import Result

    results = [Result(source=p.path, error=p.error, error_code=p.code) for p in batch]
    det.score_prepared(results, [p.array for p in batch], sum(p.seconds for p in batch),
                       want_lcas=want_lcas)
    return [r.to_record(sha256=p.sha256, bytes=p.size) for p, r in zip(batch, results, strict=True)]


def _append(fd: int, records: list[dict[str, Any]]) -> None:
    """All records of a batch in one write, then fsync."""
    data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
    view = memoryview(data)
    while view:  # a regular-file write is complete unless the disk is full; loop to be sure
        n = os.write(fd, view)
        view = view[n:]
    os.fsync(fd)


def scan(det: Any, inputs: Sequence[str], out: str | os.PathLike[str], *, resume: bool = False,
         as_json: bool = False, progress: bool = True, batch_size: int | None = None,
         workers: int = 2, want_lcas: bool = False) -> int:
    """Score ``inputs`` (file paths) with ``det`` and append one record per input to ``out``.

    Prints each new result (a table row, or the JSON record with ``as_json``) to stdout and a
    progress bar to stderr. Returns the exit code: 0 when every input of this run was scored,
    1 when any failed, 2 when the output file cannot be used, 130 when interrupted (everything
    appended before the interruption is on disk; rerun with ``--resume``).
    """
    import fcntl

    from tqdm import tqdm

    out = Path(out)
    bs = max(1, int(batch_size or det.batch_size))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        print(f"cinemae-detect: cannot open {out} ({e.strerror or e})", file=sys.stderr)
        return 2
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"cinemae-detect: {out} is locked by another scan", file=sys.stderr)
            return 2
        if resume:
            try:
                done, n_before = load_done(out)
            except (ScanError, OSError) as e:
                print(f"cinemae-detect: {e}", file=sys.stderr)
                return 2
        else:
            if os.fstat(fd).st_size > 0:
                print(f"cinemae-detect: {out} already holds results; pass --resume to continue "
                      "that scan, or choose another --out file", file=sys.stderr)
                return 2
            done, n_before = set(), 0
        if n_before:
            print(f"# resuming: {n_before} records already in {out}", file=sys.stderr)
        seen = set(done)
        counts = {"scored": 0, "failed": 0, "skipped": 0}
        bar = tqdm(total=len(inputs), unit="img", file=sys.stderr, disable=True if not progress else None,
                   dynamic_ncols=True)

        def emit(batch: list[_Prepped]) -> None:
            recs = _score(det, batch, want_lcas)
            _append(fd, recs)  # durable before it is reported
            for p, d in zip(batch, recs, strict=True):
                seen.add(record_key(p.sha256, p.path))
                counts["failed" if d["error"] else "scored"] += 1
                line = json.dumps(d) if as_json else format_row(d)
                if bar.disable:
                    print(line, flush=True)
                else:
                    bar.write(line, file=sys.stdout)
            bar.update(len(batch))
            bar.set_postfix(counts, refresh=False)

        batch: list[_Prepped] = []
        keys: set[bytes] = set()
        try:
            for p in _prepped(det, inputs, done, window=2 * bs, workers=workers):
                key = record_key(p.sha256, p.path)
                if p.skip or key in seen or key in keys:  # done before, or listed twice
                    counts["skipped"] += 1
                    bar.update(1)
                    continue
                batch.append(p)
                keys.add(key)
                if len(batch) >= bs:
                    emit(batch)
                    batch, keys = [], set()
            if batch:
                emit(batch)
        except KeyboardInterrupt:
            bar.close()
            print(f"# interrupted: {counts['scored'] + counts['failed']} records written this run "
                  f"are in {out}; rerun with --resume to continue", file=sys.stderr)
            return 130
        except BrokenPipeError:  # `... | head`: the records are still written
            sys.stderr.close()
            return 0
        finally:
            bar.close()
        print(f"# {counts['scored']} scored, {counts['failed']} failed, {counts['skipped']} already "
              f"done; {n_before + counts['scored'] + counts['failed']} records in {out}", file=sys.stderr)
        return 1 if counts["failed"] else 0
    finally:
        os.close(fd)
