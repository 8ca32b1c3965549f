"""Shared fixtures: tiny bundles exported once per session, the shared data folder, GPU skips."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests that give no bundle (and the commands they start, which inherit the environment) run on
# the small untiled CIFAKE model, whichever embedded bundle is the shipped default: its numbers are
# what they check, and it is the cheapest. Tests of the default itself delete the variable.
os.environ["CINEMAE_BUNDLE"] = "cifake32"


def has_gpu() -> bool:
    """True when a CUDA driver answers with at least one device (no torch needed)."""
    try:
        from cuda.bindings import driver
    except ImportError:
        return False
    try:
        (err,) = driver.cuInit(0)
        if int(err) != 0:
            return False
        err, n = driver.cuDeviceGetCount()
        return int(err) == 0 and n > 0
    except Exception:  # noqa: BLE001
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (a fresh clone has no ../shared)")
    return SHARED_DATA


def _export_tiny(out: Path, arch: str = "tiny", k: int = 2, crop_ratio: float = 1.0, **kw) -> Path:
    torch = pytest.importorskip("torch")
    from cinemae.export.bundle import ExportOptions, export_bundle
    from cinemae.export.head import CinemaeHead, HeadConfig
    from cinemae.export.model import MaskedAutoencoderViT, preset

    torch.manual_seed(0)
    cfg = preset(arch)
    model = MaskedAutoencoderViT(cfg).eval()
    head = CinemaeHead(HeadConfig(cfg.embed_dim, k=k, **kw)).eval()
    opts = ExportOptions(k=k, crop_ratio=crop_ratio, parity_random=2, model_id=f"test-{arch}")
    export_bundle(model, head, out, opts, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight bundle of the 'tiny' preset (32 px, patch 4, D=64), K=2, crop ratio 1."""
    return _export_tiny(tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture()
def tiny_bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny bundle that a test may modify."""
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst
