"""Calibration feeds (export/calibration.py) and precision as a value (issue 20 section 4).

The feeds are recorded from the runtime's own pipeline, so each graph is calibrated on exactly
what it receives when scoring; the FP16 range rule uses them today and INT8 calibration will.
"""

from __future__ import annotations

import numpy as np
import pytest

from cinemae.runtime.bundle import Bundle, default_bundle_path
from cinemae.runtime.masks import make_masks
from cinemae.runtime.precision import PRECISIONS, check_precision, float_dtype


@pytest.fixture(scope="module")
def embedded() -> Bundle:
    path = default_bundle_path()
    if path is None:
        pytest.skip("this install has no embedded bundle")
    return Bundle(path)


def test_feeds_per_graph_follow_the_pipeline(embedded: Bundle) -> None:
    from cinemae.export.calibration import iter_calibration_feeds
    from cinemae.runtime.backends.onnxruntime_cpu import OnnxRuntimeCPU
    from cinemae.runtime.pipeline import PipelineConfig, run_pipeline

    bb = embedded.backbone
    k, big_l = embedded.k, bb.num_patches
    n_keep = embedded.manifest["n_keep"]
    masks = make_masks(big_l, k, embedded.mask_ratio, embedded.mask_seed)
    images = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    graphs = {g: embedded.graph(g) for g in ("encoder", "decoder", "head")}
    feeds = list(iter_calibration_feeds(graphs, iter(images), masks, patch_size=bb.patch_size, lam=embedded.lam,
                                        norm_pix=bb.norm_pix, batch_size=2))
    # two pipeline calls (2 images, then 1): encoder global, encoder masked, decoder, head each
    assert [g for g, _ in feeds] == ["encoder", "encoder", "decoder", "head"] * 2
    (_, g1), (_, m1), (_, d1), (_, h1) = feeds[:4]
    assert g1["image"].shape == (2, 3, 32, 32) and g1["ids_keep"].shape == (2, big_l)
    assert m1["image"].shape == (2 * k, 3, 32, 32) and m1["ids_keep"].shape == (2 * k, n_keep)
    assert np.array_equal(m1["image"][1], images[0]) and np.array_equal(m1["image"][k], images[1])  # row b*K + k
    assert d1["tokens"].shape == (2 * k, 1 + n_keep, bb.embed_dim) and d1["ids_restore"].shape == (2 * k, big_l)
    assert h1["global_tokens"].shape == (2, 1 + big_l, bb.embed_dim) and h1["stats"].shape == (2, 3)
    # the head's stats are the runtime's own statistics for those images
    cpu = OnnxRuntimeCPU(embedded, per_image=False)
    ref = run_pipeline(cpu.run_graph, images[:2], masks, PipelineConfig.from_bundle(embedded))
    assert np.array_equal(h1["stats"], ref.stats)


def test_k0_has_no_decoder_feeds(embedded: Bundle) -> None:
    from cinemae.export.calibration import bundle_calibration_feeds

    images = np.zeros((2, 3, 32, 32), np.float32)
    feeds = bundle_calibration_feeds(embedded, images, k=0)
    assert {g: len(v) for g, v in feeds.items()} == {"encoder": 2, "decoder": 0, "head": 2}
    assert all(np.all(f["stats"] == 0) for f in feeds["head"])


def test_precision_is_a_checked_value() -> None:
    from cinemae.export.parity import TOLERANCES, tolerances_for

    assert set(TOLERANCES) == set(PRECISIONS)
    assert tolerances_for("int8") != tolerances_for("fp16")  # no precision borrows another's rules
    with pytest.raises(ValueError, match="no parity tolerances for precision 'fp8'"):
        tolerances_for("fp8")
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        check_precision("fp8")
    assert float_dtype("tensor(float16)") == np.float16 and float_dtype("DataType.HALF") == np.float16
    assert float_dtype("tensor(float)") == np.float32 and float_dtype("FLOAT") == np.float32
    with pytest.raises(ValueError, match="neither float32 nor float16"):
        float_dtype("tensor(bfloat16)")


def test_unknown_precision_is_refused_by_the_factory(embedded: Bundle) -> None:
    from cinemae.runtime.backends import create_backend

    with pytest.raises(ValueError, match="unknown precision"):
        create_backend(embedded, "auto", "cpu", "fp8")


def test_kernel_reads_only_the_dtypes_it_has() -> None:
    from cinemae import kernels

    assert kernels.pred_kernel(np.float32) == "lcas_stats_f32" and kernels.pred_kernel("float16") == "lcas_stats_f16"
    with pytest.raises(kernels.KernelInputUnsupported, match="not int8"):
        kernels.pred_kernel(np.int8)
    # every reason not to use the kernel is a KernelError; a failing CUDA call is not
    for cls in (kernels.KernelUnavailable, kernels.KernelCompileError, kernels.KernelInputUnsupported):
        assert issubclass(cls, kernels.KernelError)
    assert not issubclass(kernels.CudaError, kernels.KernelError)
    from cinemae.runtime.backends import cuda_memory

    assert cuda_memory.CudaError is kernels.CudaError  # one class


def test_prepare_kernel_returns_a_status_without_a_gpu() -> None:
    from cinemae.runtime.backends.cuda_memory import KernelStatus, gpu_count, prepare_kernel

    if gpu_count():
        pytest.skip("checks the no-GPU answer")
    status = prepare_kernel(0, 2, 32, 32, 4)
    assert isinstance(status, KernelStatus) and not status.ready
    assert status.reason and "\n" not in status.reason and not status.reason.startswith("host")
    shape = prepare_kernel(0, 2, 32, 32, 32)  # P > 16: refused by the plan before any CUDA call
    assert not shape.ready and "patch sizes 1..16" in shape.reason
