"""Photo-crop MAE pretraining on a lent GPU machine, as one prepared command (train/RECIPE.md 16).

Issue 19's better version of the photo backbone's pretraining: the same recipe as the CPU stages
(real photo crops only, re-shipped copies, ``train/pretrain_mae.py``) for a ViT-Tiny-class encoder
(``vit-tiny-64``: 192 wide x 12 blocks on 64-px crops in 8-px patches, the window and token size that
steadied the CPU backbones in RECIPE section 21, at ViT-Tiny's width for the separation they lacked) on
the device for a few minutes, crops cut on the GPU (``--crops-on device``). Three steps, build / run /
bring back, each a subcommand:

    # here: the training reals, minus the sources held out of the head's evaluation, as a folder to carry
    python -m cinemae.train.device_pretrain pack --images ../shared/data/photos-train --out runs/device-carry
    # there (device tool, carry ["runs/device-carry"]), from the repository root; stdlib only until the
    # project is linked onto a temporary site path:
    python3 train/device_pretrain.py run --data runs/device-carry/photos-train --minutes 6 --out "$OUT"
    # here, with the files that came back: verified against their sha256, then a normal run folder
    python -m cinemae.train.device_pretrain join --parts /work/.device/... --out runs/mae_gpu_tiny
    # anywhere (CI): the same three steps on the CPU, tiny backbone, seconds
    python -m cinemae.train.device_pretrain selftest

``run`` writes, under ``--out``, at most 8 files (the device tool's limit): ``manifest.json`` (what
ran, on what, for how long, and each part's sha256), ``summary.json`` (pretrain_mae's),
``pretrain.log``, and ``mae.pth`` cut into parts of at most 15 MiB (``mae.pth.part-000``, ...: a
ViT-Tiny MAE checkpoint is about 23 MB, over the tool's 16 MiB per file). The training's time
budget is ``--minutes``; the command ends by about ``--minutes`` + 2 (CUDA start, decoding, the last
evaluation, the split), or at ``--minutes`` + 4 it is stopped and says so.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PART_BYTES = 15 * 1024 * 1024
MANIFEST = "manifest.json"
PACKED = "PACKED.json"


def recipe(dry_run: bool) -> list[str]:
    """pretrain_mae arguments of the device run (RECIPE 16); the dry run keeps the recipe's shape on a
    tiny backbone and a CPU-sized batch."""
    if dry_run:
        return ["--arch", "tiny", "--device", "cpu", "--crops-on", "device", "--batch", "64",
                "--crops-per-epoch", "1024", "--epochs", "1000", "--lr", "1e-3", "--warmup-steps", "4",
                "--holdout-frac", "0.1", "--reship", "0.5", "--max-side", "512", "--autocast", "bf16",
                "--threads", "2", "--log-every", "8", "--seed", "0"]
    # batch 1024 at lr 1e-3 (MAE's 1.5e-4 per 256, raised for a small model trained briefly); an epoch
    # is 1,048,576 crops so that each epoch's re-shipping of the pictures on the CPU stays a small share
    # vit-tiny-64, not the first recipe's vit-tiny-32: RECIPE sections 21-22 found the steadiness and the
    # lift on unseen generators in 8-px tokens and their missing separation in capacity, not in the window
    return ["--arch", "vit-tiny-64", "--device", "cuda", "--crops-on", "device", "--batch", "1024",
            "--crops-per-epoch", "1048576", "--epochs", "1000", "--lr", "1e-3", "--warmup-steps", "300",
            "--holdout-frac", "0.1", "--reship", "0.5", "--max-side", "512", "--autocast", "bf16",
            "--threads", str(min(16, os.cpu_count() or 2)), "--log-every", "200", "--seed", "0"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_file(path: Path, dest: Path, part_bytes: int = PART_BYTES) -> list[dict[str, Any]]:
    """``path`` -> ``dest/NAME.part-000``, ... of at most ``part_bytes`` each; [{name, bytes, sha256}]."""
    parts = []
    with path.open("rb") as f:
        for i in range(10**4):
            block = f.read(part_bytes)
            if not block:
                break
            p = dest / f"{path.name}.part-{i:03d}"
            p.write_bytes(block)
            parts.append({"name": p.name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
    return parts


def gpu_name() -> str | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        p = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                           timeout=30)
        return p.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------------------------
# there


def run(args: argparse.Namespace) -> int:
    """On the device: link the project, pretrain, cut mae.pth into parts, write the manifest."""
    if not args.minutes > 0:
        print(f"--minutes is the training time budget, more than 0 (not {args.minutes})", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    t0 = time.time()
    manifest: dict[str, Any] = {
        "format": "cinemae-device-pretrain/1", "dry_run": bool(args.dry_run), "data": str(data),
        "packed": json.loads((data / PACKED).read_text()) if (data / PACKED).is_file() else None,
        "minutes": args.minutes, "machine": {"host": platform.node(), "python": platform.python_version(),
                                             "cpus": os.cpu_count(), "gpu": gpu_name()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "ok": False}

    def save() -> None:
        manifest["seconds"] = round(time.time() - t0, 1)
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    if not (data / "labels.csv").is_file():
        manifest["error"] = f"{data}: no labels.csv (run `pack` here and carry its folder)"
        save()
        print(manifest["error"], file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="cinemae-pretrain-") as tmp:
        site = Path(tmp) / "site"
        site.mkdir()
        (site / "cinemae").symlink_to(REPO, target_is_directory=True)  # the checkout is the package
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "cinemae.train.pretrain_mae", "--images", str(data.resolve()),
               "--out", str(run_dir), "--time-budget-min", str(args.minutes), *recipe(args.dry_run), *args.extra]
        manifest["command"] = cmd[1:]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
               "PYTHONUNBUFFERED": "1"}
        save()
        limit = args.minutes * 60 + args.grace
        with (out / "pretrain.log").open("w") as log:
            try:
                code = subprocess.run(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=limit).returncode
            except subprocess.TimeoutExpired:
                code = 124
        manifest["exit_code"] = code
        tail = (out / "pretrain.log").read_text(errors="replace")[-2000:]
        mae = run_dir / "mae.pth"
        if code != 0 or not mae.is_file():
            manifest["error"] = (f"pretrain_mae stopped after {limit:.0f} s" if code == 124 else
                                 f"pretrain_mae exited {code}") + ("" if mae.is_file() else ", no mae.pth")
            manifest["log_tail"] = tail
            save()
            print(manifest["error"], file=sys.stderr)
            return 1
        summary = json.loads((run_dir / "summary.json").read_text())
        shutil.copyfile(run_dir / "summary.json", out / "summary.json")
        manifest["mae"] = {"name": "mae.pth", "bytes": mae.stat().st_size, "sha256": sha256(mae),
                           "parts": split_file(mae, out, args.part_bytes)}
        manifest["result"] = {k: summary.get(k) for k in (
            "arch", "params", "steps", "train_seconds", "crops_per_second", "device_name", "crops_on",
            "final_val_recon_loss", "final_val_recon_loss_reshipped", "train_images", "holdout_images")}
    manifest["ok"] = True
    save()
    r = manifest["result"]
    print(f"pretrained {r['arch']} ({r['params']} parameters) on {r['device_name']}: {r['steps']} steps, "
          f"{r['crops_per_second']} crops/s, held-out reconstruction loss {r['final_val_recon_loss']}; "
          f"mae.pth in {len(manifest['mae']['parts'])} part(s) under {out}")
    return 0


# ------------------------------------------------------------------------------------------------
# here


def pack(images: Path, out: Path, exclude: list[str]) -> Path:
    """The real rows of ``images``/labels.csv minus ``exclude`` sources -> ``out``/photos-train (files
    copied, a labels.csv of those rows, PACKED.json saying what was left out). Returns the folder."""
    import csv

    dest = out / images.name
    src, dst = images.resolve(), dest.resolve()
    if dst == src or dst in src.parents or src in dst.parents:
        raise SystemExit(f"pack: --out {out} would put the copy over or inside {images}; choose another folder")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with open(images / "labels.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        rows = [r for r in reader if r["label"].strip().lower() == "real"]
    kept = [r for r in rows if not any(r.get("source", "").startswith(x) for x in exclude)]
    total = 0
    for r in kept:
        src, dst = images / r["path"], dest / r["path"]
        if Path(r["path"]).is_absolute() or ".." in Path(r["path"]).parts:
            raise SystemExit(f"{images}/labels.csv: {r['path']!r} is not a path inside the folder")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        total += dst.stat().st_size
    with open(dest / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(kept)
    (dest / PACKED).write_text(json.dumps({"from": str(images), "real_rows": len(rows), "kept": len(kept),
                                           "excluded_sources": exclude, "bytes": total}, indent=2) + "\n")
    return dest


def join(parts: Path, out: Path) -> dict[str, Any]:
    """Files ``run`` wrote (``parts``) -> ``out``/mae.pth (each part and the whole checked against the
    manifest's sha256), summary.json and manifest.json. Returns the manifest."""
    manifest = json.loads((parts / MANIFEST).read_text())
    if not manifest.get("ok"):
        raise SystemExit(f"{parts}: the device run did not finish: {manifest.get('error')}")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "mae.pth.tmp"
    with tmp.open("wb") as f:
        for p in manifest["mae"]["parts"]:
            block = (parts / p["name"]).read_bytes()
            if hashlib.sha256(block).hexdigest() != p["sha256"]:
                tmp.unlink()
                raise SystemExit(f"{parts / p['name']}: sha256 differs from the manifest's (damaged in transfer)")
            f.write(block)
    if sha256(tmp) != manifest["mae"]["sha256"]:
        tmp.unlink()
        raise SystemExit(f"{parts}: the joined mae.pth differs from the one written on the device")
    os.replace(tmp, out / "mae.pth")
    shutil.copyfile(parts / "summary.json", out / "summary.json")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def selftest(work: Path) -> int:
    """pack -> run --dry-run -> join on the CPU, on a few real photos of ../shared/data/photos-train when
    it is there (else synthetic ones), with parts small enough that there are several."""
    import numpy as np

    images = REPO.parent / "shared" / "data" / "photos-train"
    if not (images / "labels.csv").is_file():
        from PIL import Image

        images = work / "synthetic"
        (images / "real").mkdir(parents=True)
        rng = np.random.default_rng(0)
        rows = ["path,label,source"]
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (96, 120, 3), dtype=np.uint8)).save(images / "real" / f"{i}.jpg")
            rows.append(f"real/{i}.jpg,real,{'held' if i == 0 else 'kept'}/x")
        (images / "labels.csv").write_text("\n".join(rows) + "\n")
    from .photo_tiles import DEFAULT_HELDOUT

    data = pack(images, work / "carry", list(DEFAULT_HELDOUT) + ["held/"])
    code = run(build_parser().parse_args(["run", "--data", str(data), "--out", str(work / "out"), "--minutes", "0.15",
                                          "--dry-run", "--part-bytes", str(256 * 1024)]))
    if code != 0:
        return code
    m = join(work / "out", work / "run")
    print(f"selftest: {len(m['mae']['parts'])} parts joined into {work / 'run' / 'mae.pth'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="here: the training reals as a folder to carry")
    p.add_argument("--images", default="../shared/data/photos-train")
    p.add_argument("--out", default="runs/device-carry")
    p.add_argument("--exclude-source", action="append", default=None,
                   help="sources left out (default: photo_tiles.DEFAULT_HELDOUT, held out of the head's evaluation)")
    r = sub.add_parser("run", help="there: pretrain on the GPU and write the parts to bring back")
    r.add_argument("--data", default="runs/device-carry/photos-train")
    r.add_argument("--out", default=os.environ.get("OUT") or "device_pretrain_out")
    r.add_argument("--minutes", type=float, default=6.0, help="training time budget (pretrain_mae)")
    r.add_argument("--grace", type=float, default=240.0, help="seconds past --minutes before the run is stopped")
    r.add_argument("--part-bytes", type=int, default=PART_BYTES)
    r.add_argument("--dry-run", action="store_true", help="on the CPU, tiny backbone")
    r.add_argument("extra", nargs="*", help="after --: more pretrain_mae arguments (they override the recipe's)")
    j = sub.add_parser("join", help="here: the files that came back -> a run folder with mae.pth")
    j.add_argument("--parts", required=True)
    j.add_argument("--out", required=True)
    s = sub.add_parser("selftest", help="pack, run --dry-run and join on the CPU")
    s.add_argument("--work", default=None)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "run":
        return run(args)
    if args.cmd == "pack":
        if args.exclude_source is None:
            from .photo_tiles import DEFAULT_HELDOUT

            args.exclude_source = list(DEFAULT_HELDOUT)
        dest = pack(Path(args.images), Path(args.out), args.exclude_source)
        info = json.loads((dest / PACKED).read_text())
        print(f"{dest}: {info['kept']} of {info['real_rows']} real photos, {info['bytes'] / 2**20:.1f} MiB; "
              f"carry [\"{args.out}\"]")
        return 0
    if args.cmd == "join":
        m = join(Path(args.parts), Path(args.out))
        print(f"{args.out}/mae.pth: {m['mae']['bytes']} bytes, sha256 verified; {m['result']}")
        return 0
    if args.work:
        return selftest(Path(args.work))
    with tempfile.TemporaryDirectory(prefix="cinemae-device-pretrain-") as tmp:
        return selftest(Path(tmp))


if __name__ == "__main__":
    raise SystemExit(main())
