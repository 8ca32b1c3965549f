"""The bundle: a directory with ``cinemae.json`` and the ONNX graphs (DESIGN.md section 2).

Loading verifies the sha256 of every file the manifest lists; a mismatch is an error, never a
silent load. The manifest schema lives here because the runtime is its reader; the exporter and
the trainer write it through :func:`write_manifest`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST = "cinemae.json"
GRAPH_NAMES = ("encoder", "decoder", "head")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BundleError(ValueError):
    """A bundle that cannot be used as it is; the message says which file and why."""


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Backbone:
    """The MAE architecture as the runtime needs it."""

    img_size: int
    patch_size: int
    embed_dim: int
    norm_pix: bool
    config: dict[str, Any]

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * 3


class Bundle:
    """A loaded, verified bundle directory."""

    def __init__(self, root: str | os.PathLike[str], verify: bool = True) -> None:
        self.root = Path(root)
        mpath = self.root / MANIFEST
        if not self.root.is_dir():
            raise BundleError(f"{self.root}: not a bundle directory")
        if not mpath.is_file():
            raise BundleError(f"{self.root}: no {MANIFEST} (not a cinemae bundle)")
        raw = mpath.read_bytes()
        #: sha256 of the manifest's bytes as loaded: with the per-file hashes inside it, this
        #: names exactly which graphs, thresholds and masks produced a result.
        self.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        try:
            self.manifest: dict[str, Any] = json.loads(raw)
        except ValueError as e:
            raise BundleError(f"{mpath}: not valid JSON ({e})") from e
        fv = self.manifest.get("format_version")
        if fv != FORMAT_VERSION:
            raise BundleError(f"{mpath}: format_version {fv!r}, this runtime reads {FORMAT_VERSION}")
        if verify:
            self.verify()
        bb = self.manifest["backbone"]
        self.backbone = Backbone(img_size=int(bb["img_size"]), patch_size=int(bb["patch_size"]),
                                 embed_dim=int(bb["embed_dim"]),
                                 norm_pix=self.manifest["target"] == "norm_pix", config=bb)

    def verify(self) -> None:
        """Check the sha256 of every listed file; raise BundleError naming the first bad one."""
        files = self.manifest.get("files", {})
        if not files:
            raise BundleError(f"{self.root}: the manifest lists no files")
        for name, digest in files.items():
            p = self.root / name
            if not p.is_file():
                raise BundleError(f"{self.root}: {name} is listed in the manifest but missing")
            if sha256_file(p) != digest:
                raise BundleError(f"{self.root}: {name} does not match its sha256 in the manifest "
                                  "(corrupted or modified; re-export the bundle)")

    # manifest fields --------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def mask_ratio(self) -> float:
        return float(self.manifest["mask_ratio"])

    @property
    def mask_seed(self) -> int:
        return int(self.manifest["mask_seed"])

    @property
    def lam(self) -> float:
        return float(self.manifest["lambda"])

    @property
    def crop_ratio(self) -> float:
        return float(self.manifest.get("preprocess", {}).get("crop_ratio", 224 / 256))

    @property
    def threshold(self) -> float:
        return float(self.manifest["decision"]["threshold"])

    @property
    def abstain_band(self) -> tuple[float, float]:
        lo, hi = self.manifest["decision"].get("abstain_band", [self.threshold, self.threshold])
        return float(lo), float(hi)

    @property
    def model_id(self) -> str:
        return str(self.manifest.get("model_id", self.root.name))

    @property
    def model_version(self) -> str:
        return str(self.manifest.get("model_version", "0"))

    def fingerprint(self) -> dict[str, str]:
        """What every result names as its model: id, version and the manifest's sha256."""
        return {"id": self.model_id, "version": self.model_version,
                "manifest_sha256": self.manifest_sha256}

    @property
    def trained(self) -> bool:
        return bool(self.manifest.get("head", {}).get("trained", False))

    def precisions(self) -> list[str]:
        return sorted(self.manifest.get("graphs", {}))

    def graph(self, name: str, precision: str = "fp32") -> Path:
        """Path of ``encoder`` / ``decoder`` / ``head`` at a precision (fp16 falls back to fp32
        for a graph the bundle has only in fp32)."""
        graphs = self.manifest.get("graphs", {})
        if precision not in graphs:
            raise BundleError(f"{self.root}: no {precision} graphs (has {sorted(graphs)}); export "
                              f"with `cinemae-export --precision {precision}`")
        rel = graphs[precision].get(name) or graphs.get("fp32", {}).get(name)
        if rel is None:
            raise BundleError(f"{self.root}: no {name} graph")
        return self.root / rel

    def __repr__(self) -> str:
        return f"Bundle({str(self.root)!r}, k={self.k}, trained={self.trained})"


def write_manifest(root: str | os.PathLike[str], manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every graph/engine file under ``root`` into ``manifest['files']`` and write
    ``cinemae.json`` atomically. Returns the manifest written."""
    root = Path(root)
    manifest = dict(manifest)
    manifest["format_version"] = FORMAT_VERSION
    files: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp") \
                and p.suffix in (".onnx", ".data", ".engine", ".plan", ".json", ".cache", ".pt", ".pth"):
            files[p.relative_to(root).as_posix()] = sha256_file(p)
    manifest["files"] = files
    from .atomic import atomic_write

    atomic_write(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def default_bundle_path() -> Path | None:
    """The bundle shipped inside the package (None when this install has none)."""
    p = Path(__file__).resolve().parent / "bundles" / "cifake32"
    return p if (p / MANIFEST).is_file() else None


def resolve_bundle(path: str | os.PathLike[str] | None) -> Bundle:
    """A bundle path, or the embedded default when None."""
    if path is None:
        p = default_bundle_path()
        if p is None:
            raise BundleError("no bundle given and this install has no embedded default bundle; "
                              "pass a bundle directory written by `cinemae-export`")
        return Bundle(p)
    return Bundle(path)
