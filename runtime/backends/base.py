"""What every backend provides (DESIGN.md section 2, "Backends").

A backend runs one batch of preprocessed images through the whole pipeline: the global encoder
pass, the masked encoder pass on B*K rows, one decoder call on B*K rows, the LCAS statistics and
the head. GPU backends keep every intermediate on the device; only the inputs and the outputs
below cross to the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ..masks import MaskSet

#: the CPU's ISA extensions that change what a compiler or runtime emits for a graph (GEMM speed, bf16 /
#: int8 support): an OpenVINO cache key, and the benchmark's record of the machine
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "avx_vnni",
             "amx_bf16", "amx_int8", "amx_tile", "amx_fp16")


def cpu_flags() -> list[str]:
    """The ISA extensions of this CPU that change the compiled code (from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return sorted(f for f in ISA_FLAGS if f in have)
    return []


class BackendUnavailable(RuntimeError):
    """The backend cannot run here (no GPU, library missing). The message is one sentence."""


@dataclass
class BatchOutput:
    """What one batch produces.

    logit:   [B] float32
    stats:   [B, 3] float32 (s1 variability, s2 mean anomaly, s3 perturbation sensitivity)
    feature: [B, D] float32 pooled global feature g before standardisation (when asked for)
    lcas:    [B, K, L] float32 per-patch LCAS, NaN at visible patches (when asked for)
    timings: seconds per stage ("global_encoder", "masked_encoder", "decoder", "lcas", "head")
    """

    logit: np.ndarray
    stats: np.ndarray
    feature: np.ndarray | None = None
    lcas: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)


class Backend(Protocol):
    """A runnable form of a bundle's three graphs."""

    name: str  # its registry name (cinemae.runtime.backends.registry): "onnxruntime-cpu", ...
    precision: str  # one of cinemae.runtime.precision.PRECISIONS it declares in the registry
    # optional: ``batch_invariant = True`` promises that a score depends only on its image, bit for
    # bit, whatever else shares the batch (tests/test_backend_contract.py checks the promise)

    def run(
        self,
        images: np.ndarray,
        masks: MaskSet,
        *,
        want_feature: bool = False,
        want_lcas: bool = False,
    ) -> BatchOutput:
        """images: [B, 3, H, W] float32, normalised (B may be 0); masks: K runs (K may be 0).
        A batch of another shape, or masks over another patch grid, raises ValueError
        (``cinemae.runtime.pipeline.check_batch``)."""
        ...

    def close(self) -> None:
        """Release sessions, engines and device memory."""
        ...
