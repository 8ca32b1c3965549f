"""The output folder of a cluster scan: the plan, committed shards, atomic commits.

Layout of ``OUT/``::

    scan.json              the model fingerprint and scoring options of the first run
    part-<chunk id>.jsonl  committed shards: one JSON record per input, never rewritten
    .part-<...>.tmp        a shard being written (ignored, and removed by the next run)
    .lock                  flock held by the one driver that may commit here

Records are those of the local scan (:mod:`cinemae.runtime.scan`); an input's identity is its
record's ``path`` (the normalised absolute file name, or the URI).

Exactly once rests on three rules:

1. One committer. Only the driver writes shards, under an exclusive ``flock`` on ``.lock``;
   Ray workers only score and return records.
2. Atomic commits (:func:`cinemae.runtime.atomic.atomic_write`). A shard is written to a
   temporary name, fsynced, renamed to its final name and the folder fsynced; a reader sees a
   whole shard or none, and an input counts as done only once its shard is committed.
3. The plan subtracts what is committed. Each run lists the inputs, removes every input that
   appears in a committed shard, and cuts what is left (sorted) into chunks; a chunk's id is a
   digest of its input list, so a rerun of an unchanged remainder makes the same chunks.
   An input added between runs is simply part of the remainder: it never reopens a
   committed chunk.

A killed driver loses at most the chunks it had not committed; they are in the remainder of
the next run. A committed shard that cannot be parsed, or an input found in two shards, is
reported as an error (the folder was edited or shared by two drivers without the lock).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cinemae.runtime.atomic import atomic_write
from cinemae.runtime.inputs import path_from_record, valid_text

META = "scan.json"
LOCK = ".lock"
SHARD_PREFIX = "part-"
SHARD_SUFFIX = ".jsonl"
TMP_GLOB = ".*.tmp"  # atomic_write's temporaries


def identity_of(rec: dict[str, Any]) -> str:
    """The identity of a record's input: its ``path`` (exact bytes when the name is not UTF-8)."""
    return os.fsdecode(path_from_record(rec["path"], rec.get("path_bytes_b64")))


class ShardError(RuntimeError):
    """The output folder cannot be used (locked, written by another model, not our shards)."""


def chunk_id(sources: Sequence[str]) -> str:
    """A chunk's id: 20 hex digits of sha256 over its (sorted) input names."""
    h = hashlib.sha256()
    for s in sources:
        h.update(s.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()[:20]


def plan_chunks(remaining: Sequence[str], chunk_size: int) -> list[tuple[str, list[str]]]:
    """Cut the sorted remainder into chunks of ``chunk_size`` inputs -> [(chunk id, sources)]."""
    items = sorted(remaining)
    n = max(1, int(chunk_size))
    return [(chunk_id(items[i:i + n]), items[i:i + n]) for i in range(0, len(items), n)]


class ShardStore:
    """A scan's output folder (local or a POSIX shared filesystem the driver can reach)."""

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.out = Path(out)
        self._lock_fd: int | None = None

    # locking -----------------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the folder's exclusive lock (raises ShardError when another driver holds it)."""
        import fcntl

        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ShardError(f"cannot use {self.out} ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ShardError(f"{self.out} is in use by another scan (its .lock is held)") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # reading -----------------------------------------------------------------------------------
    def shards(self) -> list[Path]:
        """Committed shards, sorted by name."""
        if not self.out.is_dir():
            return []
        return sorted(p for p in self.out.iterdir()
                      if p.name.startswith(SHARD_PREFIX) and p.name.endswith(SHARD_SUFFIX))

    def remove_temporaries(self) -> int:
        """Delete shards left half-written by a killed driver; returns how many."""
        n = 0
        for p in self.out.glob(TMP_GLOB):
            p.unlink(missing_ok=True)
            n += 1
        return n

    @staticmethod
    def read_shard(path: Path) -> list[dict[str, Any]]:
        """All records of one committed shard, each with ``ident`` (its input's identity) added;
        raises ShardError when the shard is not ours."""
        recs = []
        with open(path, "rb") as f:
            for i, raw in enumerate(f, 1):
                try:
                    rec = json.loads(raw)
                    rec["ident"] = identity_of(rec)
                except (ValueError, KeyError, TypeError) as e:
                    raise ShardError(f"{path}:{i}: not a cinemae scan record ({e})") from None
                recs.append(rec)
        return recs

    def done(self) -> tuple[set[str], int]:
        """(the inputs recorded in committed shards, the number of shards). An input recorded
        twice is an error: it means two drivers wrote here without the lock."""
        seen: set[str] = set()
        shards = self.shards()
        for p in shards:
            for rec in self.read_shard(p):
                if rec["ident"] in seen:
                    raise ShardError(f"{valid_text(rec['ident'])} is recorded twice (again in {p.name}); "
                                     "was this folder written by two scans at once?")
                seen.add(rec["ident"])
        return seen, len(shards)

    def check_meta(self, meta: dict[str, Any]) -> None:
        """Record ``meta`` (model fingerprint, scoring options) on the first run; on a later run
        refuse to mix records of a different model or options into the same folder."""
        p = self.out / META
        if p.exists():
            old = json.loads(p.read_text())
            if old != meta:
                diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
                raise ShardError(f"{self.out} holds a scan with other settings ({', '.join(diff)}); "
                                 "use the same bundle and options, or another --out folder")
            return
        atomic_write(p, json.dumps(meta, indent=1, sort_keys=True) + "\n")

    # writing -----------------------------------------------------------------------------------
    def commit(self, chunk: str, lines: Sequence[str]) -> Path:
        """Write one chunk's records (JSON lines, each ending in a newline) as
        ``part-<chunk>.jsonl``, atomically."""
        final = self.out / f"{SHARD_PREFIX}{chunk}{SHARD_SUFFIX}"
        if final.exists():  # one committer holds the lock, so nothing can race this check
            raise ShardError(f"{final} is already committed")
        return atomic_write(final, "".join(lines))
