"""Labelled image sources for ``cinemae-train``: folders, a CSV of path,label, tar archives.

Every source becomes a list of :class:`Item` (a name, a label, and a way to read its bytes).
Labels: 1 = AI-generated ("fake", "ai", "1"), 0 = real ("real", "0").
"""

from __future__ import annotations

import csv
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
LABELS = {"real": 0, "0": 0, "fake": 1, "ai": 1, "generated": 1, "1": 1}


class DataError(ValueError):
    """A data source that cannot be used (missing, empty, bad CSV row)."""


@dataclass(frozen=True)
class Item:
    """One labelled image: ``source`` is a file path, or ``tar::member`` for an archive member.
    ``extra``: the other columns of its CSV row as (column, value) pairs, e.g. (("generator",
    "sd15"), ("source", "owner/repo@commit")); empty for folders and archives."""

    source: str
    label: int
    tar: str | None = None
    member: str | None = None
    extra: tuple[tuple[str, str], ...] = ()

    def column(self, name: str) -> str | None:
        """The value of CSV column ``name`` for this item (None when its CSV has no such column)."""
        for k, v in self.extra:
            if k == name:
                return v
        return None

    def read(self, max_bytes: int = 64 * 1024 * 1024) -> bytes:
        """The encoded bytes (raises the runtime's InputError for unreadable files)."""
        if self.tar is None:
            from ..runtime.preprocess import read_bytes

            return read_bytes(self.source, max_bytes)
        return _read_member(self.tar, self.member or "")


_TAR_CACHE: dict[str, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]] = {}


def _open_tar(path: str) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
    """An open archive and its member index (name -> TarInfo), opened once per process."""
    got = _TAR_CACHE.get(path)
    if got is None:
        tf = tarfile.open(path, "r:*")
        got = _TAR_CACHE[path] = (tf, {m.name: m for m in tf.getmembers()})
    return got


def _read_member(tar: str, member: str) -> bytes:
    from ..runtime.preprocess import InputError

    tf, index = _open_tar(tar)
    info = index.get(member)
    if info is None:
        raise InputError("not_found", f"{tar}: no member {member!r}")
    f = tf.extractfile(info)
    if f is None:
        raise InputError("unsupported", f"{tar}::{member} is not a regular file")
    return f.read()


def parse_label(value: str) -> int:
    v = str(value).strip().lower()
    if v not in LABELS:
        raise DataError(f"unknown label {value!r}; use real/fake (or 0/1)")
    return LABELS[v]


def iter_tar(path: str | os.PathLike[str]) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) for every image member, in archive order, without extracting."""
    with tarfile.open(path, "r:*") as tf:
        for m in tf:
            if m.isfile() and Path(m.name).suffix.lower() in IMAGE_EXTS:
                f = tf.extractfile(m)
                if f is not None:
                    yield m.name, f.read()


def from_dir(path: str | os.PathLike[str], label: int) -> list[Item]:
    """Every image file under ``path`` (recursive, sorted)."""
    p = Path(path)
    if not p.is_dir():
        raise DataError(f"{p}: not a directory")
    items = [Item(str(f), label) for f in sorted(p.rglob("*"))
             if f.is_file() and f.suffix.lower() in IMAGE_EXTS]
    if not items:
        raise DataError(f"{p}: no image files ({', '.join(sorted(IMAGE_EXTS))})")
    return items


def from_tar(path: str | os.PathLike[str], label: int) -> list[Item]:
    """Every image member of a tar archive (read lazily, never extracted)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such archive")
    try:
        with tarfile.open(p, "r:*") as tf:
            names = [m.name for m in tf if m.isfile() and Path(m.name).suffix.lower() in IMAGE_EXTS]
    except tarfile.TarError as e:
        raise DataError(f"{p}: not a readable tar archive ({e})") from None
    if not names:
        raise DataError(f"{p}: no image members")
    return [Item(f"{p}::{n}", label, tar=str(p), member=n) for n in names]


def from_path(path: str | os.PathLike[str], label: int) -> list[Item]:
    """A directory or a tar archive."""
    p = Path(path)
    if p.is_dir():
        return from_dir(p, label)
    if p.is_file() and (p.suffix.lower() in (".tar", ".gz", ".tgz", ".xz", ".bz2")
                        or tarfile.is_tarfile(p)):
        return from_tar(p, label)
    raise DataError(f"{p}: neither a directory nor a tar archive")


def from_csv(path: str | os.PathLike[str]) -> list[Item]:
    """A CSV with columns path,label (header optional; relative paths are relative to the CSV).
    With a header, the other columns (e.g. generator, source) are kept on each item
    (``Item.extra``, lower-case column names) for splits by group."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such CSV file")
    items: list[Item] = []
    with p.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise DataError(f"{p}: empty CSV")
    start = 0
    header = [c.strip().lower() for c in rows[0]]
    ip, il = 0, 1
    others: list[tuple[int, str]] = []
    if "path" in header and "label" in header:
        ip, il, start = header.index("path"), header.index("label"), 1
        others = [(j, c) for j, c in enumerate(header) if j not in (ip, il) and c]
    for n, row in enumerate(rows[start:], start=start + 1):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) <= max(ip, il):
            raise DataError(f"{p}:{n}: expected path,label, got {row!r}")
        try:
            label = parse_label(row[il])
        except DataError as e:
            raise DataError(f"{p}:{n}: {e}") from None
        fp = Path(row[ip].strip())
        if not fp.is_absolute():
            fp = p.parent / fp
        extra = tuple((c, row[j].strip() if j < len(row) else "") for j, c in others)
        items.append(Item(str(fp), label, extra=extra))
    if not items:
        raise DataError(f"{p}: no rows")
    return items


def csv_columns(path: str | os.PathLike[str]) -> list[str]:
    """The lower-case header of a CSV with a path,label header ([] without one)."""
    with Path(path).open(newline="") as f:
        header = [c.strip().lower() for c in next(csv.reader(f), [])]
    return header if "path" in header and "label" in header else []


def gather(real: list[str] | None = None, fake: list[str] | None = None,
           csv_files: list[str] | None = None) -> list[Item]:
    """All items from --real/--fake (dirs or tars) and --csv files, in the order given."""
    items: list[Item] = []
    for r in real or []:
        items += from_path(r, 0)
    for f in fake or []:
        items += from_path(f, 1)
    for c in csv_files or []:
        items += from_csv(c)
    if not items:
        raise DataError("no training data: give --real DIR --fake DIR, --csv FILE, or tar archives")
    return items
