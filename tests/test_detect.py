"""The runtime end to end: Detector API, cinemae-detect and cinemae-export as commands, bad
inputs mixed with good ones, determinism, and a runtime that never imports torch."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cinemae.runtime import Detector
from cinemae.runtime.cli import main as detect_main


def jpeg(seed: int, size: tuple[int, int] = (40, 36)) -> bytes:
    a = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    for i in range(5):
        (d / f"ok{i}.jpg").write_bytes(jpeg(i))
    (d / "sub" / "ok5.png").write_bytes(jpeg(5))  # a JPEG named .png: content decides
    (d / "empty.jpg").write_bytes(b"")
    (d / "trunc.jpg").write_bytes(jpeg(9, (256, 256))[:900])
    (d / "notes.txt").write_text("not an image")  # not picked up from a folder
    (d / "fake.png").write_bytes(b"plain text pretending")
    return d


def test_detector_api(tiny_bundle: Path) -> None:
    det = Detector(tiny_bundle)
    assert det.backend_name in ("openvino", "onnxruntime-cpu") and det.k == 2  # openvino when installed
    r = det.detect(jpeg(1))
    assert r.ok and 0 <= r.score <= 1 and r.verdict in ("ai", "real", "uncertain")
    assert len(r.stats) == 3 and r.stats[0] > 0 and r.timings["decoder"] > 0
    arr = np.asarray(Image.open(io.BytesIO(jpeg(1))))
    assert det.detect(arr).score == pytest.approx(r.score, abs=1e-7)


def test_bad_items_do_not_affect_good_ones(tiny_bundle: Path) -> None:
    det = Detector(tiny_bundle)
    good = [jpeg(i) for i in range(3)]
    alone = [det.detect(g).logit for g in good]
    mixed = det.detect_batch([good[0], b"", good[1], b"junk", np.zeros((2, 2, 7)), good[2]])
    assert [r.ok for r in mixed] == [True, False, True, False, False, True]
    assert [r.error_code for r in mixed if not r.ok] == ["empty", "unsupported", "bad_array"]
    np.testing.assert_allclose([mixed[i].logit for i in (0, 2, 5)], alone, atol=1e-6)


def test_batching_does_not_change_scores(tiny_bundle: Path) -> None:
    det = Detector(tiny_bundle, batch_size=3)
    items = [jpeg(i) for i in range(7)]
    streamed = [r.logit for r in det.detect_many(items)]
    single = [det.detect(x).logit for x in items]
    np.testing.assert_allclose(streamed, single, atol=1e-6)


def test_k_zero_is_global_only(tiny_bundle: Path) -> None:
    r = Detector(tiny_bundle, k=0).detect(jpeg(3))
    assert r.ok and r.stats == (0.0, 0.0, 0.0)


def test_cli_json_errors_and_exit_code(tiny_bundle: Path, folder: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code = detect_main([str(tiny_bundle), str(folder), "--json", "--no-progress"])
    assert code == 1
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    by = {Path(r["source"]).name: r for r in rows}
    assert set(by) == {"ok0.jpg", "ok1.jpg", "ok2.jpg", "ok3.jpg", "ok4.jpg", "ok5.png",
                       "empty.jpg", "trunc.jpg", "fake.png"}
    assert by["empty.jpg"]["error_code"] == "empty"
    assert by["trunc.jpg"]["error_code"] == "truncated"
    assert by["fake.png"]["error_code"] == "unsupported"
    assert all(by[f"ok{i}.jpg"]["score"] is not None for i in range(5))


def test_result_record_names_the_model_and_carries_lcas(tiny_bundle: Path) -> None:
    from cinemae.runtime import Bundle

    det = Detector(tiny_bundle)
    b = Bundle(tiny_bundle)
    want = {**b.fingerprint(), "backend": det.backend_name, "precision": "fp32", "k": 2,
            "threshold": b.threshold}
    assert det.model == want and len(want["manifest_sha256"]) == 64
    plain, mapped = det.detect(jpeg(2)), det.detect(jpeg(2), want_lcas=True)
    assert plain.lcas is None and "lcas" not in plain.to_record()
    big_l = b.backbone.num_patches
    assert mapped.lcas.shape == (2, big_l) and mapped.lcas.dtype == np.float32
    # the map is the one the statistics were computed from: s2 = mean over masked entries
    masked = ~np.isnan(mapped.lcas)
    assert masked.sum() == 2 * (big_l - int(big_l * (1 - b.mask_ratio)))
    assert mapped.stats[1] == pytest.approx(float(mapped.lcas[masked].mean()), rel=1e-5)
    rec = json.loads(json.dumps(mapped.to_record(extra_field=1), allow_nan=False))  # strict JSON
    g = int(round(big_l ** 0.5))
    assert rec["lcas"]["grid"] == [g, g] and len(rec["lcas"]["runs"]) == 2
    assert sum(v is None for row in rec["lcas"]["runs"] for v in row) == int((~masked).sum())
    assert rec["model"] == want and rec["extra_field"] == 1 and rec["score"] == mapped.score
    with pytest.raises(ValueError, match="score"):
        mapped.to_record(score=0.5)  # an output adds fields, it never rewrites the result's
    bad = det.detect(b"")  # an input that failed still names the model that refused it
    assert bad.to_record()["model"] == want and bad.to_record()["score"] is None
    assert Detector(tiny_bundle, k=0).detect(jpeg(2), want_lcas=True).lcas.shape == (0, big_l)


def test_cli_json_names_the_model(tiny_bundle: Path, folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert detect_main([str(tiny_bundle), str(folder / "ok0.jpg"), "--json", "--lcas", "--no-progress"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["model"] == Detector(tiny_bundle).model and rec["lcas"]["grid"][0] > 0


def test_cli_is_deterministic_and_table(tiny_bundle: Path, folder: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    good = [str(folder / f"ok{i}.jpg") for i in range(5)]
    assert detect_main([str(tiny_bundle), *good, "--no-progress"]) == 0
    first = capsys.readouterr().out
    assert detect_main([str(tiny_bundle), *good, "--no-progress", "--batch-size", "2"]) == 0
    assert capsys.readouterr().out == first
    assert first.splitlines()[0].split()[:2] == ["verdict", "score"] and len(first.splitlines()) == 6


def test_cli_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert detect_main([]) == 2
    assert detect_main(["--bundle", str(tmp_path), str(tmp_path)]) == 2
    assert "no cinemae.json" in capsys.readouterr().err


def test_export_command_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    from cinemae.export.checkpoint import save_facebookresearch
    from cinemae.export.cli import main as export_main
    from cinemae.export.model import MaskedAutoencoderViT, preset

    torch.manual_seed(0)
    ckpt = tmp_path / "mae_visualize_vit_tiny.pth"
    save_facebookresearch(MaskedAutoencoderViT(preset("tiny")), ckpt)
    imgs = tmp_path / "real"
    imgs.mkdir()
    for i in range(3):
        (imgs / f"{i}.jpg").write_bytes(jpeg(i, (64, 48)))
    out = tmp_path / "bundle"
    assert export_main(["--checkpoint", str(ckpt), "--out", str(out), "--crop-ratio", "1.0",
                        "--parity-images", str(imgs)]) == 0
    text = capsys.readouterr().out
    assert "real" in text and "next: cinemae-detect" in text
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and {r["inputs"] for r in report["rows"]} == {"random", "synthetic",
                                                                          "real"}
    assert export_main(["--checkpoint", str(tmp_path / "missing.pth"), "--out",
                        str(tmp_path / "x")]) == 2


def test_runtime_never_imports_torch(tiny_bundle: Path, tmp_path: Path) -> None:
    img = tmp_path / "a.jpg"
    img.write_bytes(jpeg(0))
    code = (
        "import sys\n"
        "from cinemae.runtime import Detector\n"
        "from cinemae.runtime.cli import main\n"
        "import cinemae.runtime.backends, cinemae.runtime.lcas, cinemae.kernels\n"
        f"r = Detector({str(tiny_bundle)!r}).detect({str(img)!r})\n"
        "assert r.ok, r\n"
        "assert 'torch' not in sys.modules, 'the runtime imported torch'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
