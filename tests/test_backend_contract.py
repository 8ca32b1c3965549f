"""The backend contract (issue 20 section 1): every registered backend that can run here gives the
same scores as the reference within its precision's parity tolerance, and the same behaviour on
edge cases (B=1, B=0, K=0, bad shapes, repeated calls).

The backends come from the registry at collection time (``REGISTRY``), each on the device kinds it
declares and at the precisions it runs, so a backend added later (OpenVINO) is tested here with no
change to this file; one that cannot run on this machine (no GPU, library missing, no graphs of
that precision in the test bundle) is a skip that says why.

Also here, issue 16 item 16: a score must not depend on which images share its batch. For the
backends that say so (``batch_invariant = True``: the CPU numeric path) the same image scored
alone and inside batches of other compositions and positions gives a bit-identical score.
"""

from __future__ import annotations

import numpy as np
import pytest

from cinemae.runtime.backends import BackendUnavailable, create_backend
from cinemae.runtime.backends.registry import REGISTRY
from cinemae.runtime.bundle import Bundle, BundleError
from cinemae.runtime.masks import make_masks

CASES = [(name, kind, precision) for name, spec in REGISTRY.items() for kind in spec.devices
         for precision in spec.precisions]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """Tiny bundle (32 px, patch 4, D=64, K=2) with fp32 and fp16 graphs."""
    torch = pytest.importorskip("torch")
    from cinemae.export.bundle import ExportOptions, export_bundle
    from cinemae.export.head import CinemaeHead, HeadConfig
    from cinemae.export.model import MaskedAutoencoderViT, preset

    torch.manual_seed(0)
    cfg = preset("tiny")
    out = tmp_path_factory.mktemp("contract") / "tiny"
    export_bundle(MaskedAutoencoderViT(cfg).eval(), CinemaeHead(HeadConfig(cfg.embed_dim, k=2)).eval(), out,
                  ExportOptions(k=2, crop_ratio=1.0, parity_random=2, precisions=("fp32", "fp16"),
                                model_id="test-contract"), log=lambda *_: None)
    return Bundle(out)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Five [3, 32, 32] images: random normal and smooth."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, 3, 32, 32)).astype(np.float32)
    yy, xx = np.mgrid[0:32, 0:32] / 32
    x[3] = np.stack([np.sin(3 * xx), np.cos(2 * yy), xx * yy]) * 1.5
    return x


@pytest.fixture(scope="module")
def reference(bundle: Bundle, images: np.ndarray):
    """ONNX Runtime CPU fp32, the runtime's reference path, at K=2 and K=0."""
    ref, _ = create_backend(bundle, "onnxruntime-cpu", "cpu", "fp32")
    masks = make_masks(bundle.backbone.num_patches, 2, bundle.mask_ratio, bundle.mask_seed)
    out = {2: ref.run(images, masks, want_feature=True, want_lcas=True), 0: ref.run(images, masks.head(0))}
    ref.close()
    return out


def _open(bundle: Bundle, name: str, kind: str, precision: str):
    device = kind if kind != "cuda" else "cuda:0"
    try:
        backend, _ = create_backend(bundle, name, device, precision)
    except (BackendUnavailable, BundleError) as e:
        pytest.skip(f"{name} on {device} at {precision} cannot run here: {e}")
    return backend


def _tolerance(precision: str) -> dict[str, float]:
    from cinemae.export.parity import tolerances_for

    return tolerances_for(precision)


@pytest.mark.parametrize("name, kind, precision", CASES)
def test_same_scores_as_the_reference(bundle, images, reference, name, kind, precision) -> None:
    backend = _open(bundle, name, kind, precision)
    tol = _tolerance(precision)
    masks = make_masks(bundle.backbone.num_patches, 2, bundle.mask_ratio, bundle.mask_seed)
    try:
        out = backend.run(images, masks, want_feature=True, want_lcas=True)
        ref = reference[2]
        assert backend.name == name and backend.precision == precision
        assert out.logit.shape == (5,) and out.logit.dtype == np.float32
        assert out.stats.shape == (5, 3) and out.stats.dtype == np.float32
        assert out.feature.shape == ref.feature.shape
        assert out.lcas.shape == (5, 2, bundle.backbone.num_patches)
        assert np.array_equal(np.isnan(out.lcas), np.broadcast_to(masks.visible, out.lcas.shape))
        assert np.max(np.abs(out.logit - ref.logit)) <= tol["logit_abs"]
        assert np.max(np.abs(out.stats - ref.stats) / np.maximum(np.abs(ref.stats), 1e-6)) <= tol["stats_rel"]
        assert np.max(np.abs(out.feature - ref.feature)) <= tol["feature_abs"]
        # B=1: the first image alone, within the same tolerance
        one = backend.run(images[:1], masks)
        assert one.logit.shape == (1,) and abs(float(one.logit[0]) - float(ref.logit[0])) <= tol["logit_abs"]
        # a repeated call gives the same answer
        again = backend.run(images, masks)
        assert np.array_equal(again.logit, backend.run(images, masks).logit)
    finally:
        backend.close()


@pytest.mark.parametrize("name, kind, precision", CASES)
def test_k0_has_zero_statistics_and_the_global_only_score(bundle, images, reference, name, kind,
                                                          precision) -> None:
    backend = _open(bundle, name, kind, precision)
    masks = make_masks(bundle.backbone.num_patches, 2, bundle.mask_ratio, bundle.mask_seed).head(0)
    try:
        out = backend.run(images, masks)
        assert np.all(out.stats == 0) and out.stats.shape == (5, 3)
        assert np.max(np.abs(out.logit - reference[0].logit)) <= _tolerance(precision)["logit_abs"]
    finally:
        backend.close()


@pytest.mark.parametrize("name, kind, precision", CASES)
def test_same_error_behaviour(bundle, images, name, kind, precision) -> None:
    backend = _open(bundle, name, kind, precision)
    masks = make_masks(bundle.backbone.num_patches, 2, bundle.mask_ratio, bundle.mask_seed)
    other = make_masks(16, 2, 0.75, 0)  # masks over another patch grid
    try:
        for bad in (images[:, :, :31], images[0], images[:, :2], images.reshape(5, 3, 16, 64)):
            with pytest.raises(ValueError, match=r"images must be \[B, 3, 32, 32\]"):
                backend.run(bad, masks)
        with pytest.raises(ValueError, match="masks cover 16 patches"):
            backend.run(images, other)
        empty = backend.run(images[:0], masks, want_feature=True, want_lcas=True)
        assert empty.logit.shape == (0,) and empty.stats.shape == (0, 3)
        assert empty.lcas.shape == (0, 2, bundle.backbone.num_patches)
        assert empty.feature.shape == (0, bundle.backbone.embed_dim)
        # after refusing, the backend still scores
        assert backend.run(images[:2], masks).logit.shape == (2,)
    finally:
        backend.close()


@pytest.fixture(scope="module")
def embedded() -> Bundle:
    """The embedded CIFAKE bundle (D=128): large enough that ONNX Runtime's GEMMs give other last
    bits at other row counts (the tiny test bundle happens not to)."""
    from cinemae.runtime.bundle import default_bundle_path

    path = default_bundle_path()
    if path is None:
        pytest.skip("this install has no embedded bundle")
    return Bundle(path)


@pytest.mark.parametrize("name, kind, precision", CASES)
def test_score_does_not_depend_on_the_batch(embedded, name, kind, precision) -> None:
    """Issue 16 item 16: the same image alone and inside batches of other composition and at
    other positions gives a bit-identical logit and statistics."""
    backend = _open(embedded, name, kind, precision)
    try:
        if not getattr(backend, "batch_invariant", False):
            pytest.skip(f"{name} does not promise batch-invariant scores (batch_invariant is not set)")
        bb = embedded.backbone
        masks = make_masks(bb.num_patches, embedded.k, embedded.mask_ratio, embedded.mask_seed)
        rng = np.random.default_rng(0)
        others = rng.standard_normal((16, 3, bb.img_size, bb.img_size)).astype(np.float32)
        x = others[:1]
        alone = backend.run(x, masks)
        for batch, at in ((others[:2], 0), (np.concatenate([others[1:5], x]), 4), (others, 0),
                          (np.concatenate([others[1:8], x, others[8:]]), 7), (np.concatenate([others[5:], x]), 11)):
            out = backend.run(batch, masks)
            assert out.logit[at] == alone.logit[0], (len(batch), at, out.logit[at] - alone.logit[0])
            assert np.array_equal(out.stats[at], alone.stats[0])
    finally:
        backend.close()


def test_the_cpu_numeric_path_is_batch_invariant() -> None:
    """The promise the test above checks is made where it must be: ONNX Runtime on the CPU."""
    assert getattr(REGISTRY["onnxruntime-cpu"].load(), "batch_invariant", False) is True


def test_every_registered_backend_is_covered() -> None:
    assert {c[0] for c in CASES} == set(REGISTRY) and ("onnxruntime-cpu", "cpu", "fp32") in CASES


def test_batch_invariance_bench_measures_both_modes(embedded) -> None:
    """benchmarks/batch_invariance.py, one short round: both modes timed at each batch size, the
    whole-batch mode's logit shift measured and the per-image mode's zero."""
    from cinemae.benchmarks.batch_invariance import measure

    r = measure(str(embedded.root), rounds=1, threads=1, batches=(1, 4), seconds=0.05)
    assert set(r["throughput"]) == {1, 4} and all(t["whole"] > 0 and t["per_image"] > 0
                                                  for t in r["throughput"].values())
    assert r["max_logit_shift_per_image"] == 0.0 and r["max_logit_shift_whole"] >= 0.0
