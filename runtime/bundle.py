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


SIGNATURE = "cinemae.json.sig"  # Ed25519 signature over the manifest's bytes
REQUIRE_SIGNATURE_ENV = "CINEMAE_REQUIRE_SIGNATURE"  # path of a public key: every load must verify


class BundleError(ValueError):
    """A bundle that cannot be used as it is; the message says which file and why."""


def _inside(root: Path, rel: str, what: str) -> Path:
    """``root / rel`` for a relative path that stays inside ``root`` after resolving symlinks;
    BundleError otherwise (a manifest must not point outside its bundle)."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise BundleError(f"{root / MANIFEST}: {what} {rel!r} is not a relative path inside the bundle")
    p = root / rel
    base = root.resolve()
    if not p.resolve().is_relative_to(base):
        raise BundleError(f"{root / MANIFEST}: {what} {rel!r} resolves outside the bundle "
                          f"({p.resolve()})")
    return p


def load_public_key(path: str | os.PathLike[str]):  # noqa: ANN201 - an Ed25519PublicKey
    """An Ed25519 public key from a PEM file (BundleError when unreadable)."""
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
    except ImportError:  # pragma: no cover - cryptography is a runtime dependency here
        raise BundleError("verifying bundle signatures needs `pip install cryptography`") from None
    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: not a readable PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{path}: not an Ed25519 public key")
    return key


def verify_signature(root: Path, raw: bytes, public_key: str | os.PathLike[str]) -> None:
    """Check ``cinemae.json.sig`` (64 raw bytes, Ed25519) over the manifest bytes ``raw``."""
    from cryptography.exceptions import InvalidSignature

    key = load_public_key(public_key)
    sig_path = root / SIGNATURE
    if not sig_path.is_file():
        raise BundleError(f"{root}: no {SIGNATURE}, and a signed bundle is required (signed with "
                          "`cinemae-export --sign KEY`)")
    try:
        key.verify(sig_path.read_bytes(), raw)
    except InvalidSignature:
        raise BundleError(f"{sig_path}: the signature does not match {MANIFEST} under "
                          f"{public_key} (the manifest was modified or signed by another key)") from None


def sign_manifest(root: str | os.PathLike[str], private_key: str | os.PathLike[str]) -> Path:
    """Write ``cinemae.json.sig``: an Ed25519 signature (PEM private key, unencrypted) over the
    bytes of ``root/cinemae.json``. Returns the signature's path."""
    key = load_private_key(private_key)
    root = Path(root)
    out = root / SIGNATURE
    out.write_bytes(key.sign((root / MANIFEST).read_bytes()))
    return out


def load_private_key(private_key: str | os.PathLike[str]):  # noqa: ANN201 - an Ed25519PrivateKey
    """An unencrypted PEM Ed25519 private key (BundleError when unreadable)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(Path(private_key).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise BundleError(f"{private_key}: not a readable unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{private_key}: not an Ed25519 private key")
    return key


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

    def __init__(self, root: str | os.PathLike[str], verify: bool = True,
                 require_signature: str | os.PathLike[str] | bool | None = None) -> None:
        """Load and verify ``root``. ``require_signature``: a PEM Ed25519 public key that must
        have signed the manifest (None: the ``CINEMAE_REQUIRE_SIGNATURE`` environment variable,
        when set; False: none, for the exporter's own staging directory)."""
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
            raise BundleError(f"{mpath}: not valid JSON ({e})") from None
        if not isinstance(self.manifest, dict):
            raise BundleError(f"{mpath}: expected a JSON object, got {type(self.manifest).__name__}")
        fv = self.manifest.get("format_version")
        if fv != FORMAT_VERSION:
            raise BundleError(f"{mpath}: format_version {fv!r}, this runtime reads {FORMAT_VERSION}")
        key = os.environ.get(REQUIRE_SIGNATURE_ENV) if require_signature is None else require_signature
        if key:
            verify_signature(self.root, raw, key)
        if verify:
            self.verify()
        try:
            bb = self.manifest["backbone"]
            self.backbone = Backbone(img_size=int(bb["img_size"]), patch_size=int(bb["patch_size"]),
                                     embed_dim=int(bb["embed_dim"]),
                                     norm_pix=self.manifest["target"] == "norm_pix", config=bb)
            # every field a run reads, read once here so a bad manifest fails at load, naming it
            _ = (self.k, self.mask_ratio, self.mask_seed, self.lam, self.crop_ratio,
                 self.threshold, self.abstain_band)
            graphs = self.manifest["graphs"]
            if not isinstance(graphs, dict) or not all(isinstance(g, dict) for g in graphs.values()):
                raise TypeError("'graphs' must map precisions to {name: file}")
        except KeyError as e:
            raise BundleError(f"{mpath}: missing field {e}") from None
        except (TypeError, ValueError) as e:
            raise BundleError(f"{mpath}: a field has the wrong type ({e})") from None
        files = self.manifest.get("files", {})
        for precision, names in graphs.items():
            for name, rel in names.items():
                _inside(self.root, rel, f"{precision} {name} graph")
                if rel not in files:
                    raise BundleError(f"{mpath}: the {precision} {name} graph {rel!r} has no sha256 "
                                      "in 'files' (an unverified graph is never loaded)")

    def verify(self) -> None:
        """Check the sha256 of every listed file; raise BundleError naming the first bad one."""
        files = self.manifest.get("files", {})
        if not files or not isinstance(files, dict):
            raise BundleError(f"{self.root}: the manifest lists no files")
        for name, digest in files.items():
            p = _inside(self.root, name, "file")
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
        if rel not in self.manifest.get("files", {}):
            raise BundleError(f"{self.root / MANIFEST}: the {name} graph {rel!r} has no sha256 in 'files'")
        return _inside(self.root, rel, f"{name} graph")

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


EMBEDDED_DIR = Path(__file__).resolve().parent / "bundles"
#: the embedded bundle used when none is given
DEFAULT_BUNDLE = "photo32"


def embedded_bundles() -> list[str]:
    """Names of the bundles shipped inside the package (``--bundle NAME`` picks one)."""
    if not EMBEDDED_DIR.is_dir():
        return []
    return sorted(p.name for p in EMBEDDED_DIR.iterdir() if (p / MANIFEST).is_file())


def embedded_bundle_path(name: str) -> Path | None:
    """The embedded bundle called ``name`` (None when this install has none by that name)."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    p = EMBEDDED_DIR / name
    return p if (p / MANIFEST).is_file() else None


#: environment variable naming the bundle used when none is given (a folder or an embedded name)
BUNDLE_ENV = "CINEMAE_BUNDLE"


def default_bundle_path() -> Path | None:
    """The bundle used when none is given: ``$CINEMAE_BUNDLE`` when set (a bundle folder, or the
    name of an embedded bundle), else the embedded :data:`DEFAULT_BUNDLE` (None when this install
    has none). A ``CINEMAE_BUNDLE`` that names nothing is a BundleError, never a silent fallback."""
    chosen = os.environ.get(BUNDLE_ENV, "").strip()
    if not chosen:
        return embedded_bundle_path(DEFAULT_BUNDLE)
    if os.path.isdir(chosen):
        return Path(chosen)
    named = embedded_bundle_path(chosen)
    if named is None:
        raise BundleError(f"{BUNDLE_ENV}={chosen!r} is neither a bundle folder nor the name of an embedded bundle "
                          f"({', '.join(embedded_bundles()) or 'this install has none'})")
    return named


def resolve_bundle(path: str | os.PathLike[str] | None,
                   require_signature: str | os.PathLike[str] | None = None) -> Bundle:
    """A bundle path, the name of an embedded bundle (:func:`embedded_bundles`; a folder of that
    name in the working directory wins), or the embedded default when None."""
    if path is None:
        p = default_bundle_path()
        if p is None:
            raise BundleError("no bundle given and this install has no embedded default bundle; "
                              "pass a bundle directory written by `cinemae-export`")
        return Bundle(p, require_signature=require_signature)
    if not os.path.exists(path):  # not a folder here: an embedded bundle's name (e.g. "cifake32")?
        named = embedded_bundle_path(os.fspath(path))
        if named is not None:
            return Bundle(named, require_signature=require_signature)
        raise BundleError(f"{os.fspath(path)}: no such bundle directory, and not the name of an embedded bundle "
                          f"({', '.join(embedded_bundles()) or 'this install has none'})")
    return Bundle(path, require_signature=require_signature)
