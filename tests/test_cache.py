"""One cache folder for every part (kernels, engines, the bench's bundles, training features)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cinemae.runtime import cache


def every_cache(tiny_bundle: Path) -> dict[str, Path]:
    from cinemae import kernels
    from cinemae.benchmarks.environment import cache_dir as bench_cache
    from cinemae.runtime.backends.tensorrt_engine import engine_dir
    from cinemae.runtime.bundle import Bundle
    from cinemae.train.cli import default_cache_dir

    return {"kernels": kernels.cache_dir(), "engines": engine_dir(Bundle(tiny_bundle)).parent,
            "bench": bench_cache(), "features": default_cache_dir()}


def test_every_part_uses_cinemae_cache(tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CINEMAE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("CINEMAE_CACHE", str(tmp_path / "c"))
    assert every_cache(tiny_bundle) == {"kernels": tmp_path / "c" / "kernels", "engines": tmp_path / "c" / "engines",
                                        "bench": tmp_path / "c", "features": tmp_path / "c" / "features"}
    monkeypatch.delenv("CINEMAE_CACHE")
    assert every_cache(tiny_bundle)["kernels"] == tmp_path / "xdg" / "cinemae" / "kernels"
    assert every_cache(tiny_bundle)["engines"] == tmp_path / "xdg" / "cinemae" / "engines"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache.cache_root() == Path.home() / ".cache" / "cinemae"


def test_old_variable_still_works_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CINEMAE_CACHE", raising=False)
    monkeypatch.setenv("CINEMAE_CACHE_DIR", str(tmp_path / "old"))
    monkeypatch.setattr(cache, "_warned", False)
    with pytest.warns(FutureWarning, match="CINEMAE_CACHE_DIR is deprecated"):
        assert cache.cache_dir("kernels") == tmp_path / "old" / "kernels"
    monkeypatch.setenv("CINEMAE_CACHE", str(tmp_path / "new"))  # the new one wins
    assert cache.cache_root() == tmp_path / "new"

