"""atomic_write / atomic_path: the file is the old one or the whole new one, and a failed write
leaves no temporary file behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from cinemae.runtime.atomic import atomic_path, atomic_write


def test_bytes_text_and_writer(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "a.bin"  # the folder is created
    atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01" and oct(p.stat().st_mode & 0o777) == "0o644"
    atomic_write(p, "é\n")
    assert p.read_bytes() == "é\n".encode()
    atomic_write(tmp_path / "x.npz", lambda f: np.savez(f, a=np.arange(3)))
    with np.load(tmp_path / "x.npz") as z:
        assert z["a"].tolist() == [0, 1, 2]
    assert sorted(x.name for x in (tmp_path / "sub").iterdir()) == ["a.bin"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    p = tmp_path / "m.json"
    atomic_write(p, json.dumps({"v": 1}))

    def boom(f) -> None:
        f.write(b'{"v": 2, "half')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(p, boom)
    assert json.loads(p.read_text()) == {"v": 1}
    with pytest.raises(RuntimeError), atomic_path(p) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("the tool failed")
    assert json.loads(p.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["m.json"]  # no temporary file left


def test_atomic_path_for_tools_that_want_a_name(tmp_path: Path) -> None:
    p = tmp_path / "g.onnx"
    with atomic_path(p) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".tmp") and not p.exists()
        tmp.write_bytes(b"graph")
    assert p.read_bytes() == b"graph" and os.listdir(tmp_path) == ["g.onnx"]
