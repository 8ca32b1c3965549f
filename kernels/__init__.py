"""cinemae.kernels: the fused LCAS-statistics CUDA kernel (DESIGN.md section 2).

``lcas.cu`` computes exactly what ``cinemae.runtime.lcas.lcas_stats`` / ``lcas_map`` compute, on
the GPU, from the decoder output where it lies: stats [B, 3] and optionally the map [B, K, L].
``lcas.h`` is its C ABI (CMakeLists.txt builds the shared library ``cinemae_lcas``); from Python
the source is compiled with NVRTC at first use and cached (see ``loader``).

Importing this package is cheap: cuda-python is imported only when a function needs it, and
torch never. Without a GPU, driver, cuda-python or NVRTC library the functions raise
``KernelUnavailable`` (a ``KernelError``: the callers' signal to compute LCAS on the host).
"""

from .loader import (
    PRED_KERNELS,
    CudaError,
    KernelCompileError,
    KernelError,
    KernelInputUnsupported,
    KernelUnavailable,
    Plan,
    cache_dir,
    cached_binary,
    compile_cubin,
    compile_ptx,
    is_available,
    lcas_stats_device,
    lcas_stats_gpu,
    nvrtc_version,
    plan,
    pred_kernel,
    prepare,
    source_bytes,
    supported_archs,
)

__all__ = [
    "PRED_KERNELS",
    "CudaError",
    "KernelCompileError",
    "KernelError",
    "KernelInputUnsupported",
    "KernelUnavailable",
    "Plan",
    "cache_dir",
    "cached_binary",
    "compile_cubin",
    "compile_ptx",
    "is_available",
    "lcas_stats_device",
    "lcas_stats_gpu",
    "nvrtc_version",
    "plan",
    "pred_kernel",
    "prepare",
    "source_bytes",
    "supported_archs",
]
