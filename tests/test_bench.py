"""cinemae-bench on the tiny preset: rows, outputs, error rows, FLOPs, metrics, perturbations."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from cinemae.benchmarks.accuracy import accuracy, metrics, roc_auc, tpr_at_fpr
from cinemae.benchmarks.datasets import LabeledItem, load_labeled
from cinemae.benchmarks.perturb import parse_perturbation, parse_perturbations

FAST = ["--warmup", "1", "--iters", "2", "--min-iters", "1", "--row-time", "0.05", "--peak-tflops", "0.1",
        "--quiet"]


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private cache (the tiny --arch bundle is built there once for this module)."""
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("bench-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("CINEMAE_CACHE", str(root))
    yield root
    mp.undo()


def _jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _pictures(n: int, seed: int, size: int = 40) -> list[bytes]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        a, b = rng.random(2) * 6
        img = np.stack([np.sin(a * xx), np.cos(b * yy), xx * yy], -1) * 0.4 + 0.5
        img = img + rng.normal(0, 0.05 + 0.1 * seed, img.shape)
        out.append(_jpeg((np.clip(img, 0, 1) * 255).astype(np.uint8)))
    return out


# ---------------------------------------------------------------------------------------------
def test_flop_formula_matches_torch_flop_counter() -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode

    from cinemae.benchmarks.flops import flops_per_image
    from cinemae.export.head import CinemaeHead, HeadConfig
    from cinemae.export.model import MaskedAutoencoderViT, preset
    from cinemae.export.reference import TorchReference
    from cinemae.runtime.masks import make_masks, n_keep_for

    torch.manual_seed(0)
    for arch, fusion, ks in (("tiny", "add", (0, 3)), ("tiny-p8", "gate", (1,)), ("tiny", "concat", (2,))):
        cfg = preset(arch)
        ref = TorchReference(MaskedAutoencoderViT(cfg), CinemaeHead(HeadConfig(cfg.embed_dim, fusion=fusion)))
        for k in ks:
            x = np.random.default_rng(k).standard_normal((2, 3, cfg.img_size, cfg.img_size)).astype(np.float32)
            with FlopCounterMode(display=False) as fc:
                ref.run(x, make_masks(cfg.num_patches, k))
            f = flops_per_image(cfg.to_dict(), k, n_keep_for(cfg.num_patches, 0.75), fusion)
            assert fc.get_total_flops() == 2 * f["total"], (arch, fusion, k)
            assert (f["decoder"] == 0) == (k == 0)


def test_flops_vit_large_known_value() -> None:
    from cinemae.benchmarks.flops import encoder_flops, flops_per_image

    vit_l = {"img_size": 224, "patch_size": 16, "embed_dim": 1024, "depth": 24, "decoder_embed_dim": 512,
             "decoder_depth": 8, "mlp_ratio": 4.0}
    # ViT-L/16 at 224 px is the well-known ~61.6 GMAC forward (197 tokens)
    assert abs(encoder_flops(vit_l, 196) / 2e9 - 61.6) < 0.1
    f = flops_per_image(vit_l, 2, 49)
    assert f["total"] == sum(f[s] for s in ("global_encoder", "masked_encoder", "decoder", "lcas", "head"))
    assert f["masked_encoder"] == 2 * encoder_flops(vit_l, 49)


# ---------------------------------------------------------------------------------------------
def test_auc_and_tpr_hand_computed() -> None:
    # fakes (label 1): 0.9, 0.8, 0.4 ; reals: 0.7, 0.3, 0.2, 0.1
    scores = [0.9, 0.8, 0.4, 0.7, 0.3, 0.2, 0.1]
    labels = [1, 1, 1, 0, 0, 0, 0]
    # pairs (fake > real): 0.9 beats 4, 0.8 beats 4, 0.4 beats 3 -> 11 of 12
    assert roc_auc(scores, labels) == pytest.approx(11 / 12)
    # ties count one half: fake 0.5 vs real 0.5
    assert roc_auc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)
    # FPR 5% of 4 reals allows 0 false positives -> threshold just above 0.7 -> TPR 2/3
    tpr, t = tpr_at_fpr(scores, labels, 0.05)
    assert tpr == pytest.approx(2 / 3) and t == pytest.approx(0.7)
    # FPR 25% allows one real above the threshold -> t = 0.3 -> all fakes
    assert tpr_at_fpr(scores, labels, 0.25)[0] == pytest.approx(1.0)
    # accuracy at 0.5: fakes 0.9, 0.8 right, 0.4 wrong; reals: 0.7 wrong, three right -> 5/7
    assert accuracy(scores, labels, 0.5) == pytest.approx(5 / 7)
    m = metrics(np.asarray(scores), np.asarray(labels), 0.5)
    assert m["n_real"] == 4 and m["n_fake"] == 3
    assert np.isnan(roc_auc([0.1, 0.2], [1, 1]))


def test_perturbations_change_pixels_keep_size_and_are_deterministic() -> None:
    rgb = (np.clip(np.random.default_rng(0).random((48, 64, 3)) * 0.5
                   + np.linspace(0, 0.5, 64)[None, :, None], 0, 1)).astype(np.float32)
    perts = parse_perturbations("jpeg:50,jpeg:75,resize:0.5,blur:1.0")
    assert [p.name for p in perts] == ["none", "jpeg:50", "jpeg:75", "resize:0.5", "blur:1"]
    outs = {}
    for p in perts:
        a = p.apply(rgb)
        assert a.shape == rgb.shape and a.dtype == np.float32
        assert 0.0 <= a.min() and a.max() <= 1.0
        np.testing.assert_array_equal(a, p.apply(rgb))  # deterministic
        outs[p.name] = a
    np.testing.assert_array_equal(outs["none"], rgb)
    for name in ("jpeg:50", "jpeg:75", "resize:0.5", "blur:1"):
        assert np.abs(outs[name] - rgb).mean() > 1e-3, name
    assert np.abs(outs["jpeg:50"] - rgb).mean() > np.abs(outs["jpeg:75"] - rgb).mean()
    for bad in ("jpeg:0", "resize:2", "blur:-1", "sharpen:1", "jpeg"):
        with pytest.raises(ValueError):
            parse_perturbation(bad)


def test_perturbation_applied_identically_to_both_classes() -> None:
    from cinemae.benchmarks.accuracy import prepare

    data = _pictures(1, seed=3)[0]
    items = [LabeledItem("a", 0, None, lambda: data), LabeledItem("b", 1, "gen", lambda: data)]
    clean, labels, gens, errors = prepare(items, parse_perturbation("none"), 32, 1.0)
    for spec in ("jpeg:50", "resize:0.5", "blur:1.0"):
        imgs, labels, gens, errors = prepare(items, parse_perturbation(spec), 32, 1.0)
        assert imgs.shape == (2, 3, 32, 32) and not errors
        np.testing.assert_array_equal(imgs[0], imgs[1])  # the same bytes, the same result per class
        assert not np.allclose(imgs[0], clean[0])
    assert list(labels) == [0, 1] and gens == [None, "gen"]


# ---------------------------------------------------------------------------------------------
def test_load_labeled_forms(tmp_path: Path) -> None:
    import tarfile

    root = tmp_path / "set"
    for sub, seed in (("real", 0), ("fake", 1)):
        (root / sub).mkdir(parents=True)
        for i, b in enumerate(_pictures(3, seed)):
            (root / sub / f"{i}.jpg").write_bytes(b)
    with (root / "labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "source"])
        for i in range(3):
            w.writerow([f"real/{i}.jpg", "real", "camera"])
            w.writerow([f"fake/{i}.jpg", "fake", "gen-a" if i < 2 else "gen-b"])
    items = load_labeled(str(root))
    assert sorted(i.label for i in items) == [0, 0, 0, 1, 1, 1]
    assert sorted(i.generator for i in items if i.label) == ["gen-a", "gen-a", "gen-b"]
    assert all(i.generator is None for i in items if i.label == 0)
    assert len(load_labeled(str(root / "labels.csv"), limit=2)) == 4
    tars = []
    for name, sub in (("x-real.tar", "real"), ("x-fake.tar", "fake")):
        with tarfile.open(tmp_path / name, "w") as tf:
            for p in sorted((root / sub).iterdir()):
                tf.add(p, arcname=p.name)
        tars.append(str(tmp_path / name))
    items = load_labeled(f"{tars[1]},{tars[0]}")  # order does not matter: names say the class
    assert [i.label for i in items] == [0, 0, 0, 1, 1, 1] and items[0].read()[:2] == b"\xff\xd8"
    assert len(load_labeled(str(tmp_path), limit=1)) == 2  # a folder holding a tar pair
    from cinemae.benchmarks.datasets import DataError

    with pytest.raises(DataError):
        load_labeled(str(tmp_path / "nope"))


# ---------------------------------------------------------------------------------------------
def test_bench_tiny_end_to_end(bench_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cinemae.benchmarks.cli import main

    out = tmp_path / "out"
    rc = main(["--arch", "tiny", "--k", "0,2", "--batch", "1,2", "--out", str(out), *FAST])
    assert rc == 0
    res = json.loads((out / "bench.json").read_text())
    rows = res["rows"]
    import importlib.util

    default = ("onnxruntime-cpu", "torch") + (("openvino",) if importlib.util.find_spec("openvino") else ())
    assert {(r["backend"], r["k"], r["batch"]) for r in rows} == {
        (b, k, n) for b in default for k in (0, 2) for n in (1, 2)}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["p50_ms"] > 0 and r["p95_ms"] >= r["p50_ms"] and r["img_per_s"] > 0
        assert r["note"].startswith("random weights: latency only")
        assert r["gflops_per_img"] > 0 and r["achieved_tflops"] > 0 and r["pct_of_peak"] > 0
        assert r["peak_rss_mb"] and r["peak_rss_mb"] > 0
        assert r["max_dlogit_vs_torch"] is not None and r["max_dlogit_vs_torch"] < 1e-4
        stages = set(r["stages_ms"])
        assert {"decode_preprocess", "global_encoder", "head"} <= stages
        assert ({"masked_encoder", "decoder", "lcas"} <= stages) == (r["k"] > 0)
        assert r["slowest_stage"] in stages
    k2 = {r["backend"]: r["gflops_per_img"] for r in rows if r["k"] == 2}
    k0 = {r["backend"]: r["gflops_per_img"] for r in rows if r["k"] == 0}
    assert k2["torch"] == k2["onnxruntime-cpu"] > k0["torch"]
    env = res["environment"]
    assert env["cpu"] and "onnxruntime" in env["libraries"] and "numpy" in env["libraries"]
    md = (out / "bench.md").read_text()
    assert "| onnxruntime-cpu fp32 |" in md and "torch eager fp32 (cpu)" in md
    assert "random weights: latency only" in md
    printed = capsys.readouterr().out
    assert "p50 ms" in printed and "vs torch eager fp32" in printed
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert res["plot"] is None
    else:
        png = (out / "bench.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_bench_failing_backends_are_error_rows(tiny_bundle: Path, tmp_path: Path) -> None:
    from cinemae.benchmarks.cli import main

    out = tmp_path / "bench.json"
    # no GPU here: the GPU backends and torch-on-cuda must be rows with their error; the fixture
    # bundle has no fp16 graphs and no recorded random-init seed (torch rows need --checkpoint)
    rc = main(["--bundle", str(tiny_bundle), "--device", "all", "--backends", "all", "--precision", "fp32,fp16",
               "--k", "1", "--batch", "1", "--json", str(out), *FAST])
    assert rc == 1
    rows = json.loads(out.read_text())["rows"]
    by = {(r["backend"], r["device"], r["precision"]): r for r in rows}
    assert by[("onnxruntime-cpu", "cpu", "fp32")]["status"] == "ok"
    fp16 = by[("onnxruntime-cpu", "cpu", "fp16")]
    assert fp16["status"] == "error" and "fp16" in fp16["error"]
    for key in (("tensorrt", "cuda", "fp32"), ("onnxruntime-cuda", "cuda", "fp16"), ("torch", "cuda", "fp32")):
        assert by[key]["status"] == "error" and by[key]["error"], key
    no_weights = by[("torch", "cpu", "fp32")]
    assert no_weights["status"] == "skipped" and "--checkpoint" in no_weights["error"]


def test_bench_accuracy_with_data_and_perturbations(bench_cache: Path, tmp_path: Path) -> None:
    from cinemae.benchmarks.cli import main

    root = tmp_path / "data"
    for sub, seed in (("real", 0), ("fake", 1)):
        (root / sub).mkdir(parents=True)
        for i, b in enumerate(_pictures(6, seed)):
            (root / sub / f"{i}.jpg").write_bytes(b)
    (root / "fake" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with (root / "labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "generator"])
        for i in range(6):
            w.writerow([f"fake/{i}.jpg", "fake", "gen-a" if i % 2 else "gen-b"])
    out = tmp_path / "out"
    rc = main(["--arch", "tiny", "--k", "0,2", "--batch", "2", "--no-torch", "--data", str(root),
               "--perturb", "jpeg:50,blur:1.0", "--out", str(out), *FAST])
    assert rc == 0
    res = json.loads((out / "bench.json").read_text())
    acc = res["accuracy"]
    assert {(a["perturbation"], a["k"]) for a in acc} == {(p, k) for p in ("none", "jpeg:50", "blur:1")
                                                          for k in (0, 2)}
    for a in acc:
        assert a["n_real"] == 6 and a["n_fake"] == 6
        assert 0.0 <= a["auc"] <= 1.0 and 0.0 <= a["tpr_at_fpr"] <= 1.0 and 0.0 <= a["accuracy"] <= 1.0
        assert set(a["per_generator"]) == {"gen-a", "gen-b"}
    errs = res["accuracy_info"]["errors"]
    assert len(errs) == 1 and errs[0]["item"].endswith("broken.jpg") and errs[0]["code"]
    clean = {a["k"]: a["auc"] for a in acc if a["perturbation"] == "none"}
    assert set(clean) == {0, 2}
    assert "accuracy" in (out / "bench.md").read_text().lower()


def test_bench_usage_errors(capsys: pytest.CaptureFixture) -> None:
    from cinemae.benchmarks.cli import main

    assert main(["--backends", "nonsense"]) == 2
    assert main(["--k", "9"]) == 2
    assert main(["--perturb", "jpeg:50"]) == 2  # needs --data
    assert "cinemae-bench:" in capsys.readouterr().err


def test_bench_interrupted_keeps_measured_rows(bench_cache: Path, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from cinemae.benchmarks.bundles import build_arch_target

    build_arch_target("tiny", 2, 0, log=lambda m: None)  # cached: the subprocess starts measuring at once
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-c", "import sys; from cinemae.benchmarks.cli import main; sys.exit(main())",
           "--arch", "tiny", "--no-torch", "--k", "0,1,2,3,4,5,6,7,8", "--batch", "1,2,4,8", "--json", str(out),
           # every row runs for 2 s whatever the machine's speed (36 rows: over a minute), so the
           # interrupt lands mid-run on a quiet machine too (a fixed 50 batches of the tiny model
           # finished the whole run before it there)
           "--warmup", "1", "--min-iters", "3", "--iters", "1000000", "--row-time", "2", "--peak-tflops", "0.1"]
    # SIGINT back to its default in the child: a job started in the background by a non-interactive
    # shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen(cmd, env={**os.environ, "CINEMAE_CACHE": str(bench_cache)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(out.read_text())["rows"]:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=240)  # writing the report and plot is slow on a loaded machine
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    res = json.loads(out.read_text())
    assert res["interrupted"] is True
    assert 1 <= len(res["rows"]) < 36 and all(r["status"] == "ok" for r in res["rows"])
    assert "p50 ms" in stdout  # the table of what was measured is still printed


def test_bundle_cost_compares_bundles_side_by_side(tiny_bundle: Path, tmp_path: Path) -> None:
    """benchmarks/bundle_cost on the same files: a row per bundle with its ratio to the first (the
    first's is 1), a bundle that cannot load is a row with its error and the others still run, and
    the CLI writes a record naming the machine and each bundle."""
    from cinemae.benchmarks.bundle_cost import main, measure

    files = _pictures(4, seed=3)
    rows = measure([str(tiny_bundle), str(tmp_path / "missing"), str(tiny_bundle)], files, "onnxruntime",
                   1, lambda s: None, rounds=2, batch=2)
    first = rows[str(tiny_bundle)]
    assert first["ratio_to_first"] == 1.0 and first["ms_per_image"] > 0 and len(first["rounds_ms"]) == 2
    assert "error" in rows[str(tmp_path / "missing")]
    # several precisions: a row per bundle and precision, interleaved; one the bundle lacks is an error row
    rows = measure([str(tiny_bundle)], files, "onnxruntime", 1, lambda s: None, rounds=1, batch=2,
                   precisions=("fp32", "int4"))
    assert rows[f"{tiny_bundle} @ fp32"]["ratio_to_first"] == 1.0 and "error" in rows[f"{tiny_bundle} @ int4"]

    data = tmp_path / "data"
    for cls in ("real", "fake"):
        (data / cls).mkdir(parents=True)
        for i, b in enumerate(_pictures(2, seed=7 if cls == "real" else 8)):
            (data / cls / f"{i}.jpg").write_bytes(b)
    out = tmp_path / "cost.json"
    assert main(["--bundles", str(tiny_bundle), "cifake32", "--data", str(data), "--limit", "2",
                 "--backends", "onnxruntime", "--rounds", "1", "--batch", "2", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["images"] == 4 and rec["environment"] and rec["bundles"]["cifake32"]["model_id"]
    row = rec["backends"]["onnxruntime"]
    assert row[str(tiny_bundle)]["ratio_to_first"] == 1.0 and row["cifake32"]["ratio_to_first"] > 0
