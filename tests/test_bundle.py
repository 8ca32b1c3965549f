"""Bundle integrity (issue 16 items 6 and 13): a manifest never points outside its bundle or at
an unhashed graph, manifest errors are one line naming the file, and signed bundles are refused
when the manifest was edited or signed by another key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cinemae.runtime.bundle import MANIFEST, Bundle, BundleError, default_bundle_path, sha256_file, sign_manifest

EMBEDDED = default_bundle_path()
pytestmark = pytest.mark.skipif(EMBEDDED is None, reason="this install has no embedded bundle")


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    out = tmp_path / "b"
    shutil.copytree(EMBEDDED, out)
    return out


def edit(root: Path, fn) -> None:  # noqa: ANN001 - a callable editing the manifest dict
    m = json.loads((root / MANIFEST).read_text())
    fn(m)
    (root / MANIFEST).write_text(json.dumps(m, indent=2))


def detect_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cinemae.runtime.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)


def test_graph_outside_the_bundle_is_refused(bundle: Path) -> None:
    outside = bundle.parent / "outside.onnx"
    shutil.copy(bundle / "encoder.onnx", outside)

    def to_outside(m: dict) -> None:
        m["graphs"]["fp32"]["encoder"] = "../outside.onnx"
        m["files"]["../outside.onnx"] = sha256_file(outside)
    edit(bundle, to_outside)
    with pytest.raises(BundleError, match=r"'\.\./outside\.onnx' is not a relative path inside"):
        Bundle(bundle)
    edit(bundle, lambda m: m["graphs"]["fp32"].update(encoder=str(outside)))
    with pytest.raises(BundleError, match="not a relative path inside the bundle"):
        Bundle(bundle)


def test_symlink_escaping_the_bundle_is_refused(bundle: Path) -> None:
    outside = bundle.parent / "outside.onnx"
    shutil.copy(bundle / "encoder.onnx", outside)
    (bundle / "link.onnx").symlink_to(outside)

    def to_link(m: dict) -> None:
        m["graphs"]["fp32"]["encoder"] = "link.onnx"
        m["files"]["link.onnx"] = sha256_file(outside)
    edit(bundle, to_link)
    with pytest.raises(BundleError, match="resolves outside the bundle"):
        Bundle(bundle)


def test_graph_without_a_hash_is_refused(bundle: Path) -> None:
    edit(bundle, lambda m: m["files"].pop("encoder.onnx"))
    (bundle / "encoder.onnx").write_bytes(b"tampered")  # no longer covered by any hash
    with pytest.raises(BundleError, match="encoder graph 'encoder.onnx' has no sha256"):
        Bundle(bundle)


def test_unparsable_graph_is_a_one_line_error(bundle: Path) -> None:
    (bundle / "bad.onnx").write_bytes(b"not an onnx graph")

    def to_bad(m: dict, listed: bool) -> None:
        m["graphs"]["fp32"]["encoder"] = "bad.onnx"
        if listed:
            m["files"]["bad.onnx"] = sha256_file(bundle / "bad.onnx")
    edit(bundle, lambda m: to_bad(m, False))
    with pytest.raises(BundleError, match="has no sha256"):
        Bundle(bundle)
    edit(bundle, lambda m: to_bad(m, True))
    from cinemae.runtime import Detector

    with pytest.raises(BundleError, match="bad.onnx: ONNX Runtime cannot load this graph"):
        Detector(bundle, device="cpu")
    r = detect_cli(str(bundle), str(bundle / "bad.onnx"), "--device", "cpu")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "bad.onnx: ONNX Runtime cannot load this graph" in r.stderr


def test_graph_openvino_cannot_read_passes_to_the_next_backend(bundle: Path) -> None:
    """`auto` on a CPU takes OpenVINO first; a graph it cannot compile is a one-sentence reason
    to pass it over (ONNX Runtime then names the broken graph), and asking for OpenVINO by name
    gives that sentence, not an OpenVINO C++ traceback."""
    pytest.importorskip("openvino")
    from cinemae.runtime import Detector
    from cinemae.runtime.backends import BackendUnavailable

    (bundle / "bad.onnx").write_bytes(b"not an onnx graph")

    def to_bad(m: dict) -> None:
        m["graphs"]["fp32"]["encoder"] = "bad.onnx"
        m["files"]["bad.onnx"] = sha256_file(bundle / "bad.onnx")
    edit(bundle, to_bad)
    with pytest.raises(BackendUnavailable, match=r"OpenVINO cannot compile bad\.onnx \(") as e:
        Detector(bundle, backend="openvino", device="cpu")
    assert "\n" not in str(e.value) and "Exception from" not in str(e.value)
    with pytest.raises(BundleError, match="bad.onnx: ONNX Runtime cannot load this graph"):
        Detector(bundle, device="cpu")


@pytest.mark.parametrize("change,match", [
    (lambda m: m.pop("backbone"), "missing field 'backbone'"),
    (lambda m: m.update(k="two"), "wrong type"),
    (lambda m: m.update(decision=[]), "wrong type"),
    (lambda m: m["backbone"].pop("img_size"), "missing field 'img_size'"),
])
def test_manifest_errors_name_the_file(bundle: Path, change, match: str) -> None:  # noqa: ANN001
    edit(bundle, change)
    with pytest.raises(BundleError, match=match) as e:
        Bundle(bundle)
    assert str(bundle / MANIFEST) in str(e.value) and "\n" not in str(e.value)


def test_cli_manifest_error_exits_2_without_traceback(bundle: Path, tmp_path: Path) -> None:
    edit(bundle, lambda m: m.pop("backbone"))
    img = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(img)
    r = detect_cli("--bundle", str(bundle), str(img))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "missing field 'backbone'" in r.stderr


def keypair(tmp_path: Path, name: str) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    priv, pub = tmp_path / f"{name}.pem", tmp_path / f"{name}.pub.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def test_signed_bundle(bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    priv, pub = keypair(tmp_path, "fleet")
    _, other = keypair(tmp_path, "other")
    with pytest.raises(BundleError, match="no cinemae.json.sig"):
        Bundle(bundle, require_signature=pub)
    sign_manifest(bundle, priv)
    assert Bundle(bundle, require_signature=pub).k == Bundle(bundle).k
    with pytest.raises(BundleError, match="signature does not match"):
        Bundle(bundle, require_signature=other)
    # the edits the attack made: threshold, mask seed, K, mask ratio
    for field, value in (("mask_seed", 7), ("k", 4), ("mask_ratio", 0.5)):
        saved = (bundle / MANIFEST).read_bytes()
        edit(bundle, lambda m, f=field, v=value: m.update({f: v}))
        Bundle(bundle)  # still loads when no signature is required
        with pytest.raises(BundleError, match="signature does not match"):
            Bundle(bundle, require_signature=pub)
        (bundle / MANIFEST).write_bytes(saved)
    edit(bundle, lambda m: m["decision"].update(threshold=0.99))
    monkeypatch.setenv("CINEMAE_REQUIRE_SIGNATURE", str(pub))
    with pytest.raises(BundleError, match="signature does not match"):
        Bundle(bundle)
    r = detect_cli("--bundle", str(bundle), str(bundle / "x.png"), "--require-signature", str(pub))
    assert r.returncode == 2 and "signature does not match" in r.stderr and "Traceback" not in r.stderr


def test_export_sign_and_require(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    from cinemae.export.cli import main as export_main

    priv, pub = keypair(tmp_path, "k")
    monkeypatch.setenv("CINEMAE_REQUIRE_SIGNATURE", str(pub))  # the exporter's staging is exempt
    out = tmp_path / "signed"
    assert export_main(["--arch", "tiny", "--out", str(out), "--sign", str(priv), "--tensorrt", "skip",
                        "--k", "1"]) == 0
    assert (out / "cinemae.json.sig").is_file()
    Bundle(out, require_signature=pub)
    assert export_main(["--arch", "tiny", "--out", str(tmp_path / "x"), "--sign", str(pub)]) == 2
    assert not (tmp_path / "x").exists()


def test_embedded_bundle_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cinemae.runtime.bundle import DEFAULT_BUNDLE, embedded_bundle_path, embedded_bundles, resolve_bundle

    if EMBEDDED is None:
        pytest.skip("this install has no embedded bundle")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CINEMAE_BUNDLE", raising=False)
    assert DEFAULT_BUNDLE in embedded_bundles()
    # the default by name is the default
    assert resolve_bundle(DEFAULT_BUNDLE).root == resolve_bundle(None).root == embedded_bundle_path(DEFAULT_BUNDLE)
    # an unknown name says which names exist
    with pytest.raises(BundleError, match=f"not the name of an embedded bundle.*{DEFAULT_BUNDLE}"):
        resolve_bundle("no-such-model")
    # names never reach outside the bundles folder
    with pytest.raises(BundleError):
        resolve_bundle("../bundles/" + DEFAULT_BUNDLE + "/..")
    # a folder of that name in the working directory wins over the embedded bundle
    (tmp_path / DEFAULT_BUNDLE).mkdir()
    with pytest.raises(BundleError, match="no cinemae.json"):
        resolve_bundle(DEFAULT_BUNDLE)


def test_cinemae_bundle_variable_chooses_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     bundle: Path) -> None:
    from cinemae.runtime.bundle import resolve_bundle

    if EMBEDDED is None:
        pytest.skip("this install has no embedded bundle")
    monkeypatch.setenv("CINEMAE_BUNDLE", str(bundle))  # a folder
    assert resolve_bundle(None).root == bundle
    monkeypatch.setenv("CINEMAE_BUNDLE", "cifake32")  # an embedded name
    assert resolve_bundle(None).root.name == "cifake32"
    monkeypatch.setenv("CINEMAE_BUNDLE", str(tmp_path / "missing"))  # nothing: an error, never a fallback
    with pytest.raises(BundleError, match="CINEMAE_BUNDLE=.*neither a bundle folder nor the name"):
        resolve_bundle(None)
    # a command says it in one line (exit 2), it does not fall back to another model
    r = subprocess.run([sys.executable, "-m", "cinemae.runtime.cli", str(tmp_path)], capture_output=True, text=True,
                       env={**os.environ, "CINEMAE_BUNDLE": "no-such-model"})
    assert r.returncode == 2 and "neither a bundle folder nor the name" in r.stderr
