"""The results file of a scan: JSON lines, one record per input, safe to kill and resume.

No printing: what happened is returned or raised (:class:`ScanError` and its kinds); the command
that drives the scan says it. The Ray cluster scan writes its shards with the same records.

* A record is ``Result.to_record()`` plus ``sha256`` (of the file content; null when the file
  could not be read), ``bytes``, ``path`` (the normalised absolute file name, valid UTF-8) and
  ``path_bytes_b64`` (the exact bytes, only when the name is not UTF-8). Every record carries
  the ``model`` that produced it (bundle id, version, manifest sha256, backend, precision, K,
  threshold).
* Resume key: (content sha256, normalised absolute path): ``small``, ``/abs/small`` and
  ``/abs//small`` are one input; a file whose content changed is scored again; two paths with
  identical content each get a record.
* One model per file: resuming with another bundle, K, precision or re-shipping ensemble is refused (the backend may
  differ: the same graphs give the same scores within the parity tolerance).
* Durability: each batch is appended with one ``write`` on an ``O_APPEND`` descriptor, then
  ``fsync``. A kill loses at most the batch being written and leaves at most one torn last line,
  which the next resume cuts off. A failed write (disk full) is cut back to the last whole record
  and raised as :class:`ResultsWriteError`.
* An exclusive ``flock`` keeps two scans from writing into one file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..atomic import atomic_write
from ..inputs import normalise_path, path_from_record, valid_text


class ScanError(RuntimeError):
    """The results file cannot be used (locked, unreadable, not ours, another model's)."""


class ResultsLocked(ScanError):
    """Another scan holds the file's lock."""


class ResultsExist(ScanError):
    """The file already holds records and this scan was not asked to resume it."""


class ModelMismatch(ScanError):
    """The file holds records of another model (bundle, K, precision or ensemble)."""


class ResultsWriteError(ScanError):
    """Appending failed (disk full, quota, file-size limit, I/O error); ``errno`` says which.
    The file still ends with a whole record, so a resume continues from it."""

    def __init__(self, message: str, errno_: int | None) -> None:
        super().__init__(message)
        self.errno = errno_

    @property
    def disk_full(self) -> bool:
        return self.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def record_key(sha256: str | None, path: str | bytes) -> bytes:
    """The resume key of one input: a 16-byte digest of (content sha256, normalised absolute
    path), the sha256 being empty for an unreadable input. ``path`` is a name as given (str) or
    exact file-name bytes; both are normalised. Digests keep the resume set small (~80 bytes a
    record)."""
    raw = os.fsencode(normalise_path(os.fsdecode(path)))
    return hashlib.blake2b((sha256 or "").encode("ascii") + b"\0" + raw, digest_size=16).digest()


def record_identity(rec: dict[str, Any]) -> bytes:
    """The resume key of a record read back from a results file."""
    return record_key(rec.get("sha256"), path_from_record(rec["path"], rec.get("path_bytes_b64")))


def model_key(model: dict[str, Any]) -> tuple[str, int, str, str]:
    """What must match for records to share a file: manifest sha256, K, precision and the
    re-shipping ensemble (its views and mode, or none: it turns verdicts into ``uncertain``)."""
    ens = model.get("reship")
    return (str(model["manifest_sha256"]), int(model["k"]), str(model["precision"]),
            json.dumps(ens, sort_keys=True) if ens else "")


def describe_model(model: dict[str, Any]) -> str:
    ens = model.get("reship")
    views = f", ensemble {','.join(ens.get('views', []))} on the {ens.get('on')}" if isinstance(ens, dict) else ""
    return (f"{model.get('id')} {model.get('version')} (manifest {str(model.get('manifest_sha256'))[:12]}, "
            f"K={model.get('k')}, {model.get('precision')}{views})")


def encode_records(records: Iterable[dict[str, Any]]) -> bytes:
    """JSON lines (ASCII, strict JSON: no NaN) for ``records``."""
    return "".join(json.dumps(r, separators=(",", ":"), allow_nan=False) + "\n" for r in records).encode("ascii")


def write_records(path: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> Path:
    """Write a whole shard of records atomically (it appears complete or not at all)."""
    return atomic_write(path, encode_records(records))


def read_records(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The records of a results file or shard (a torn last line is ignored)."""
    with open(path, "rb") as f:
        for raw in f:
            if raw.endswith(b"\n") and raw.strip():
                yield json.loads(raw)


class ResultsFile:
    """An append-only results file held by one scan.

        with ResultsFile(out, model=det.model).open(resume=True) as rf:
            done = rf.done                      # resume keys already in the file
            rf.append(records)                  # one write + fsync per batch

    ``model``: the model this scan runs (``Detector.model``); records of another are refused.
    After :meth:`open`: ``records`` (how many the file held), ``done`` (their keys) and
    ``repaired_bytes`` (the size of a torn last line that was cut off, 0 when none).
    """

    def __init__(self, path: str | os.PathLike[str], model: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.model = model
        self.fd: int | None = None
        self.records = 0
        self.done: set[bytes] = set()
        self.repaired_bytes = 0

    @property
    def name(self) -> str:
        return valid_text(str(self.path))

    def open(self, *, resume: bool) -> ResultsFile:
        """Create or open the file, take its lock, and (``resume``) read what it holds. Without
        ``resume`` a file that already holds records is refused (:class:`ResultsExist`)."""
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise ScanError(f"cannot open {self.name} ({e.strerror or e})") from None
        try:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise ResultsLocked(f"{self.name} is locked by another scan") from None
            if resume:
                self.load()
            elif os.fstat(self.fd).st_size > 0:
                raise ResultsExist(f"{self.name} already holds results")
        except BaseException:
            self.close()
            raise
        return self

    def load(self) -> None:
        """Read the records in the file into :attr:`done` and check their model. A last line
        without its newline (a write torn by a kill) is cut off; an unparsable line anywhere
        else is an error (the file is not ours, or was edited)."""
        want = None if self.model is None else model_key(self.model)
        good_end = 0
        try:
            with open(self.path, "rb") as f:
                data_end = os.fstat(f.fileno()).st_size
                for lineno, raw in enumerate(f, 1):
                    if not raw.endswith(b"\n"):  # torn last line
                        break
                    if raw.strip() == b"":
                        good_end += len(raw)
                        continue
                    try:
                        rec = json.loads(raw)
                    except ValueError as e:
                        raise ScanError(f"{self.name}:{lineno}: not a cinemae result record ({e})") from None
                    if not isinstance(rec, dict) or "path" not in rec:
                        why = ("a record without 'path' (written by an older cinemae); start a new results file"
                               if isinstance(rec, dict) and "source" in rec else "not a cinemae result record")
                        raise ScanError(f"{self.name}:{lineno}: {why}")
                    try:
                        key = record_identity(rec)
                    except (ValueError, TypeError) as e:
                        raise ScanError(f"{self.name}:{lineno}: not a cinemae result record ({e})") from None
                    got = rec.get("model")
                    if want is not None:
                        if not isinstance(got, dict) or "manifest_sha256" not in got:
                            raise ModelMismatch(f"{self.name}:{lineno}: the record names no model fingerprint "
                                                "(written by an older cinemae); start a new results file")
                        if model_key(got) != want:
                            raise ModelMismatch(
                                f"{self.name}:{lineno}: scored by {describe_model(got)}, but this scan runs "
                                f"{describe_model(self.model)}; one results file holds one model's records: "
                                "resume with the same bundle, K and precision, or write to another file")
                    self.done.add(key)
                    self.records += 1
                    good_end += len(raw)
        except OSError as e:
            raise ScanError(f"cannot read {self.name} ({e.strerror or e})") from None
        if good_end < data_end:
            os.ftruncate(self.fd, good_end)  # type: ignore[arg-type]
            os.fsync(self.fd)  # type: ignore[arg-type]
            self.repaired_bytes = data_end - good_end

    def append(self, records: list[dict[str, Any]]) -> None:
        """All ``records`` in one write, then fsync. On failure the file is cut back to where it
        was (whole records only) and :class:`ResultsWriteError` is raised."""
        if self.fd is None:
            raise ScanError("the results file is not open")
        data = encode_records(records)
        start = os.fstat(self.fd).st_size
        view = memoryview(data)
        try:
            while view:  # a regular-file write is complete unless the disk is full; loop to be sure
                n = os.write(self.fd, view)
                view = view[n:]
            os.fsync(self.fd)
        except OSError as e:
            try:
                os.ftruncate(self.fd, start)
                os.fsync(self.fd)
            except OSError:
                pass  # a torn last line is cut off by the next resume
            raise ResultsWriteError(f"cannot write to {self.name} ({e.strerror or e})", e.errno) from None
        self.records += len(records)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_done(out: str | os.PathLike[str], model: dict[str, Any] | None = None) -> tuple[set[bytes], int]:
    """The resume keys and the number of records in ``out`` (a torn last line is cut off)."""
    rf = ResultsFile(out, model)
    if not rf.path.exists():
        return set(), 0
    rf.fd = os.open(rf.path, os.O_WRONLY | os.O_APPEND)
    try:
        rf.load()
    finally:
        rf.close()
    return rf.done, rf.records
