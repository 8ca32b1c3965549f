"""Labelled images for ``cinemae-bench --data``.

Accepted forms (label 1 = fake / AI-generated, 0 = real):

- a folder with ``real/`` and ``fake/`` sub-folders (walked recursively); a ``labels.csv``
  beside them (columns ``path``, ``label`` and ``generator`` or ``source``) names generators;
- a CSV file with columns ``path`` and ``label`` (real|fake, 0|1, or ai|generated), optional
  ``generator`` / ``source``; paths relative to the CSV's folder;
- tar pairs: ``REAL.tar,FAKE.tar`` (the one whose name says "real" is the real class), or a folder
  holding ``*real*.tar`` / ``*fake*.tar`` pairs (the ``test`` pair when there is one).

``limit`` takes a seeded random subset of each class, so a large set gives a quick estimate.
"""

from __future__ import annotations

import csv
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = frozenset((".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"))
_FAKE = {"fake", "1", "ai", "generated", "synthetic", "true"}
_REAL = {"real", "0", "false", "photo", "natural"}


class DataError(ValueError):
    """The ``--data`` argument cannot be read as a labelled set."""


@dataclass
class LabeledItem:
    """One image: a name, the label (1 fake, 0 real), the generator where named, and its bytes."""

    name: str
    label: int
    generator: str | None
    read: Callable[[], bytes]


def _parse_label(value: str, where: str) -> int:
    v = value.strip().lower()
    if v in _FAKE:
        return 1
    if v in _REAL:
        return 0
    raise DataError(f"{where}: label {value!r} is neither real nor fake")


def _file_reader(path: Path) -> Callable[[], bytes]:
    return lambda: path.read_bytes()


def _walk(root: Path) -> list[Path]:
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        out.extend(Path(dirpath) / f for f in sorted(files) if Path(f).suffix.lower() in IMAGE_SUFFIXES)
    return out


def _from_csv(path: Path) -> list[LabeledItem]:
    items = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        cols = {c.lower(): c for c in (reader.fieldnames or [])}
        if "path" not in cols or "label" not in cols:
            raise DataError(f"{path}: needs columns 'path' and 'label' (has {reader.fieldnames})")
        gen_col = cols.get("generator") or cols.get("source")
        for i, row in enumerate(reader, start=2):
            p = path.parent / row[cols["path"]]
            label = _parse_label(row[cols["label"]], f"{path}:{i}")
            gen = ((row.get(gen_col) or "").strip() or None) if gen_col else None
            items.append(LabeledItem(str(p), label, gen if label == 1 else None, _file_reader(p)))
    return items


def _from_folders(root: Path) -> list[LabeledItem]:
    gens: dict[str, str] = {}
    labels_csv = root / "labels.csv"
    if labels_csv.is_file():
        try:
            for it in _from_csv(labels_csv):
                if it.generator:
                    gens[os.path.normpath(it.name)] = it.generator
        except DataError:
            gens = {}
    items = []
    for sub, label in (("real", 0), ("fake", 1)):
        for p in _walk(root / sub):
            items.append(LabeledItem(str(p), label, gens.get(os.path.normpath(str(p))) if label else None,
                                     _file_reader(p)))
    return items


def _from_tars(real: Path, fake: Path, limit: int | None, seed: int) -> list[LabeledItem]:
    items = []
    for path, label in ((real, 0), (fake, 1)):
        with tarfile.open(path) as tf:
            members = sorted((m for m in tf.getmembers() if m.isfile()
                              and Path(m.name).suffix.lower() in IMAGE_SUFFIXES), key=lambda m: m.name)
            members = _subset(members, limit, seed + label)
            for m in members:
                f = tf.extractfile(m)
                data = f.read() if f is not None else b""
                items.append(LabeledItem(f"{path.name}:{m.name}", label, None,
                                         (lambda d=data: d)))
    return items


def _tar_pair(root: Path) -> tuple[Path, Path]:
    tars = sorted(root.glob("*.tar"))
    reals = [t for t in tars if "real" in t.name.lower()]
    fakes = [t for t in tars if "fake" in t.name.lower()]
    if not reals or not fakes:
        raise DataError(f"{root}: no real/ and fake/ folders, labels.csv or *real*.tar/*fake*.tar pair")
    pick = [t for t in reals if t.name.lower().startswith("test")] or reals
    real = pick[0]
    fake_name = real.name.lower().replace("real", "fake")
    fake = next((t for t in fakes if t.name.lower() == fake_name), fakes[0])
    return real, fake


def _subset(seq: list, limit: int | None, seed: int) -> list:
    if limit is None or len(seq) <= limit:
        return list(seq)
    idx = np.sort(np.random.default_rng(seed).choice(len(seq), size=limit, replace=False))
    return [seq[i] for i in idx]


def load_labeled(spec: str, limit: int | None = None, seed: int = 0) -> list[LabeledItem]:
    """``--data`` -> items, at most ``limit`` per class (seeded subset); DataError when unusable."""
    parts = [p for p in spec.split(",") if p]
    if len(parts) == 2 and all(p.endswith(".tar") for p in parts):
        a, b = Path(parts[0]), Path(parts[1])
        for p in (a, b):
            if not p.is_file():
                raise DataError(f"{p}: no such tar file")
        real, fake = (b, a) if "real" in b.name.lower() or "fake" in a.name.lower() else (a, b)
        return _from_tars(real, fake, limit, seed)
    root = Path(spec)
    if root.is_file() and root.suffix.lower() == ".csv":
        items = _from_csv(root)
    elif root.is_dir() and ((root / "real").is_dir() or (root / "fake").is_dir()):
        items = _from_folders(root)
    elif root.is_dir() and (root / "labels.csv").is_file():
        items = _from_csv(root / "labels.csv")
    elif root.is_dir():
        real, fake = _tar_pair(root)
        return _from_tars(real, fake, limit, seed)
    else:
        raise DataError(f"{spec}: not a folder, a CSV file or a REAL.tar,FAKE.tar pair")
    real_items = _subset([i for i in items if i.label == 0], limit, seed)
    fake_items = _subset([i for i in items if i.label == 1], limit, seed + 1)
    if not real_items or not fake_items:
        raise DataError(f"{spec}: needs images of both classes (found {len(real_items)} real, "
                        f"{len(fake_items)} fake)")
    return real_items + fake_items
