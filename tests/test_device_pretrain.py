"""train/device_pretrain.py: pack here, run there, join here. The GPU run itself is unverified
until a device is lent; here the same three steps run on the CPU with a tiny backbone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_pack_run_join_on_the_cpu(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from cinemae.train.device_pretrain import join, main

    assert main(["selftest", "--work", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["ok"] and m["dry_run"] and m["exit_code"] == 0 and len(m["mae"]["parts"]) >= 2
    packed = m["packed"]
    assert packed["kept"] < packed["real_rows"] and "held/" in packed["excluded_sources"]
    # only reals travel, and none of an excluded source
    rows = (tmp_path / "carry").rglob("labels.csv")
    for f in rows:
        lines = f.read_text().splitlines()[1:]
        assert lines and all(",real," in ln for ln in lines)
        assert not any(any(x in ln for x in packed["excluded_sources"]) for ln in lines)
    # at most 8 files come back from the device tool, each under its 16 MiB limit
    back = list((tmp_path / "out").iterdir())
    assert len(back) <= 8 and all(p.stat().st_size < 16 * 2**20 for p in back)
    ck = torch.load(tmp_path / "run" / "mae.pth", weights_only=False)
    assert ck["config"]["embed_dim"] == 64 and ck["summary"]["crops_on"] == "device"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final_val_recon_loss"] > 0
    # a part damaged in transfer is refused, and no mae.pth is written
    part = tmp_path / "out" / m["mae"]["parts"][0]["name"]
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="damaged in transfer"):
        join(tmp_path / "out", tmp_path / "again")
    assert not (tmp_path / "again" / "mae.pth").exists()


def test_run_is_stdlib_only_and_reports_missing_data(tmp_path: Path) -> None:
    """On the device the project is not installed: `run` as a plain script (isolated mode, so no
    cinemae on the path) must start, and a missing data folder is a manifest with the reason."""
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-I", str(REPO / "train" / "device_pretrain.py"), "run",
                        "--data", str(tmp_path / "nothing"), "--out", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "no labels.csv" in p.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["ok"] is False and "run `pack` here" in m["error"]
    from cinemae.train.device_pretrain import join, pack

    with pytest.raises(SystemExit, match="did not finish"):
        join(out, tmp_path / "j")
    # pack never writes its copy over (or around) the folder it reads
    src = tmp_path / "photos"
    src.mkdir()
    (src / "labels.csv").write_text("path,label,source\n")
    for bad in (tmp_path, src):
        with pytest.raises(SystemExit, match="over or inside"):
            pack(src, bad, [])
    assert (src / "labels.csv").is_file()
