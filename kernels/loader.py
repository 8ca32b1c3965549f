"""NVRTC loader for the fused LCAS-statistics kernel ``kernels/lcas.cu``.

At first use the kernel source is compiled with NVRTC for the GPU's compute capability (a CUBIN;
PTX for a GPU newer than the installed NVRTC knows), cached on disk under
``$CINEMAE_CACHE/kernels`` (default ``~/.cache/cinemae/kernels``, or
``$XDG_CACHE_HOME/cinemae/kernels``) as ``lcas-<sha256 of source, options, NVRTC version>-<arch>``,
and loaded with the CUDA driver API. cuda-python (``cuda.bindings``) is imported only inside
the functions that need it, so importing this module is cheap and works without CUDA.

Wheels that provide what this needs: ``cuda-python`` (or ``cuda-bindings``) for the bindings,
``cuda-toolkit[nvrtc]`` (the ``nvidia-cuda-nvrtc`` wheel) for ``libnvrtc``; the NVIDIA driver
provides ``libcuda``. Use bindings and NVRTC of the CUDA major version the driver supports
(13.x needs a driver for CUDA 13; use ``cuda-bindings==12.*`` and ``nvidia-cuda-nvrtc-cu12``
with a CUDA 12 driver).
"""

from __future__ import annotations

import ctypes
import hashlib
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

SOURCE_PATH = Path(__file__).with_name("lcas.cu")
HEADER_PATH = Path(__file__).with_name("lcas.h")


# Mirrors of the launch planning in lcas.cu (cinemae_lcas::make_plan); tests/test_kernel.py checks
# them against the C++ code through the CPU emulator.
MAX_PATCH = 16
SMALL_BATCH = 128  # up to this many images: 512 threads per image, else 256
SMEM_LIMIT = 48 * 1024

# No fast-math: logf, sqrtf and divisions stay IEEE-accurate.
NVRTC_OPTIONS: tuple[str, ...] = ("-std=c++17",)


class KernelError(RuntimeError):
    """The fused kernel cannot be used for this work; callers fall back to the numpy reference
    on the host. Every reason the kernel is not used is a subclass."""


class KernelUnavailable(KernelError):
    """The kernel cannot run here (no cuda-python, no NVRTC library, no driver or no GPU)."""


class KernelCompileError(KernelError):
    """NVRTC rejected kernels/lcas.cu; the message carries the compiler log."""


class KernelInputUnsupported(KernelError):
    """The kernel does not take this input (a decoder output dtype other than float32/float16,
    a patch size over 16, a working set over the shared memory it uses)."""


class CudaError(RuntimeError):
    """A CUDA call (driver or runtime API) failed; the message names the call and the error.
    The one class for every CUDA failure in the project (the backends' ``cuda_memory.check``
    raises it too). Not a :class:`KernelError`: a failing CUDA call is not a reason to fall back."""


# the decoder output dtypes the kernel reads, and the kernel that reads each
PRED_KERNELS = {"float32": "lcas_stats_f32", "float16": "lcas_stats_f16"}


def pred_kernel(pred_dtype: Any) -> str:
    """The kernel function for a decoder output dtype (numpy dtype or its name);
    KernelInputUnsupported for a dtype the kernel does not read (bfloat16, int8...)."""
    import numpy as np

    try:
        name = np.dtype(pred_dtype).name
    except TypeError:
        name = str(pred_dtype)
    if name not in PRED_KERNELS:
        raise KernelInputUnsupported(f"the LCAS kernel reads float32 or float16 predictions, not {name}")
    return PRED_KERNELS[name]


@dataclass(frozen=True)
class Plan:
    """Launch configuration: one block of ``threads`` per image, ``smem_bytes`` of dynamic shared
    memory; ``single_pass`` keeps the residual sums in shared memory (one read of the image)."""

    threads: int
    single_pass: bool
    smem_bytes: int


def smem_bytes(k: int, num_patches: int, patch_size: int, warps: int, single_pass: bool) -> int:
    """Dynamic shared memory of one block (lcas.cu ``smem_bytes``)."""
    kl = k * num_patches
    doubles = warps * k * 3 + k * 3
    words = warps * k * 7 + k * 4 + 3 * patch_size * patch_size + (3 * kl if single_pass else 0)
    return 8 * doubles + 4 * words + kl


def plan(k: int, height: int, width: int, patch_size: int, batch: int = 1) -> Plan:
    """Launch plan for K runs over [batch, 3, height, width] images with P = patch_size.

    Raises ValueError for shapes the kernel does not take (P > 16, sizes not multiples of P,
    a working set over 48 KiB of shared memory); the numpy reference handles those.
    """
    p = patch_size
    if k < 0:
        raise ValueError(f"K must be >= 0, got {k}")
    if not 0 < p <= MAX_PATCH:
        raise ValueError(f"the LCAS kernel takes patch sizes 1..{MAX_PATCH}, got {p}")
    if height <= 0 or width <= 0 or height % p or width % p:
        raise ValueError(f"image {height}x{width} is not a positive multiple of the patch size {p}")
    if 3 * height * width > 0x7FFFFFFF:
        raise ValueError(f"image {height}x{width} is too large for the LCAS kernel")
    threads = 512 if batch <= SMALL_BATCH else 256
    if k == 0:
        return Plan(threads, False, 0)
    num_patches = (height // p) * (width // p)
    warps = threads // 32
    for single in (True, False):
        need = smem_bytes(k, num_patches, p, warps, single)
        if need <= SMEM_LIMIT:
            return Plan(threads, single, need)
    raise ValueError(
        f"K={k} runs over L={num_patches} patches need {need} bytes of shared memory per image, "
        f"more than the {SMEM_LIMIT} the kernel uses"
    )


# ---------------------------------------------------------------------------------------------
# NVRTC


def source_bytes() -> bytes:
    """The kernel source compiled by NVRTC (kernels/lcas.cu)."""
    return SOURCE_PATH.read_bytes()


def _import_nvrtc() -> Any:
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:
        raise KernelUnavailable(
            "cuda-python is not installed (pip install cuda-python), so the LCAS kernel cannot "
            "be compiled"
        ) from exc
    return nvrtc


def _nvrtc_check(nvrtc: Any, err: Any, what: str) -> None:
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        try:
            name = nvrtc.nvrtcGetErrorString(err)[1].decode()
        except Exception:  # best effort, for the message only
            name = str(err)
        raise KernelCompileError(f"{what} failed: {name}")


def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library; KernelUnavailable when it cannot be loaded."""
    nvrtc = _import_nvrtc()
    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception as exc:  # cuda.pathfinder raises when libnvrtc.so is not found
        raise KernelUnavailable(
            "the NVRTC library was not found; install it with pip install 'cuda-toolkit[nvrtc]' "
            "(wheel nvidia-cuda-nvrtc) in the CUDA major version of cuda-python"
        ) from exc
    _nvrtc_check(nvrtc, err, "nvrtcVersion")
    return int(major), int(minor)


def supported_archs() -> list[int]:
    """Compute capabilities (as 10*major + minor) the installed NVRTC compiles for."""
    nvrtc = _import_nvrtc()
    nvrtc_version()
    err, archs = nvrtc.nvrtcGetSupportedArchs()
    _nvrtc_check(nvrtc, err, "nvrtcGetSupportedArchs")
    return sorted(int(a) for a in archs)


def _compile(target: str) -> bytes:
    """NVRTC-compile lcas.cu for ``sm_XY`` (CUBIN) or ``compute_XY`` (PTX, NUL-terminated)."""
    nvrtc = _import_nvrtc()
    nvrtc_version()
    err, prog = nvrtc.nvrtcCreateProgram(source_bytes(), b"lcas.cu", 0, [], [])
    _nvrtc_check(nvrtc, err, "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture={target}".encode(), *(o.encode() for o in NVRTC_OPTIONS)]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, size = nvrtc.nvrtcGetProgramLogSize(prog)
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise KernelCompileError(
                f"NVRTC could not compile {SOURCE_PATH.name} for {target}:\n"
                + log.rstrip(b"\0 ").decode(errors="replace")
            )
        if target.startswith("sm_"):
            err, size = nvrtc.nvrtcGetCUBINSize(prog)
            _nvrtc_check(nvrtc, err, "nvrtcGetCUBINSize")
            out = b" " * size
            (err,) = nvrtc.nvrtcGetCUBIN(prog, out)
            _nvrtc_check(nvrtc, err, "nvrtcGetCUBIN")
        else:
            err, size = nvrtc.nvrtcGetPTXSize(prog)
            _nvrtc_check(nvrtc, err, "nvrtcGetPTXSize")
            out = b" " * size
            (err,) = nvrtc.nvrtcGetPTX(prog, out)
            _nvrtc_check(nvrtc, err, "nvrtcGetPTX")
        return out
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compile_ptx(arch: str = "compute_90") -> bytes:
    """Compile kernels/lcas.cu to PTX for ``arch`` (``compute_XY``) with NVRTC only.

    Needs cuda-python and the NVRTC library but no GPU or driver, so CPU-only CI can check that
    the source compiles. Returns the NUL-terminated PTX text.
    """
    if not arch.startswith("compute_"):
        raise ValueError(f"compile_ptx takes a virtual architecture compute_XY, got {arch!r}")
    return _compile(arch)


def compile_cubin(arch: str = "sm_90") -> bytes:
    """Compile kernels/lcas.cu to a CUBIN for ``arch`` (``sm_XY``); no GPU needed."""
    if not arch.startswith("sm_"):
        raise ValueError(f"compile_cubin takes a real architecture sm_XY, got {arch!r}")
    return _compile(arch)


def cache_dir() -> Path:
    """Folder of the compiled kernels: ``kernels/`` in the cinemae cache
    (:func:`cinemae.runtime.cache.cache_root`: $CINEMAE_CACHE, else $XDG_CACHE_HOME/cinemae,
    else ~/.cache/cinemae)."""
    from ..runtime.cache import cache_dir as under_cache

    return under_cache("kernels")


def _target_for(capability: tuple[int, int]) -> str:
    major, minor = capability
    cc = 10 * major + minor
    archs = supported_archs()
    if cc in archs:
        return f"sm_{cc}"
    if cc > archs[-1]:  # a GPU newer than this NVRTC: PTX that the driver JIT-compiles
        return f"compute_{archs[-1]}"
    major_v, minor_v = nvrtc_version()
    raise KernelUnavailable(
        f"compute capability {major}.{minor} is not supported by NVRTC {major_v}.{minor_v} "
        f"(it compiles for sm_{archs[0]} and newer)"
    )


def cached_binary(capability: tuple[int, int], refresh: bool = False) -> tuple[bytes, Path]:
    """CUBIN (or PTX) of lcas.cu for a compute capability, from the disk cache or compiled now.

    Returns (binary, path). A cache folder that cannot be written is not an error: the binary is
    then only kept in memory by the caller.
    """
    target = _target_for(capability)
    major_v, minor_v = nvrtc_version()
    key = hashlib.sha256()
    key.update(source_bytes())
    key.update("\0".join((*NVRTC_OPTIONS, f"nvrtc {major_v}.{minor_v}", target)).encode())
    ext = "cubin" if target.startswith("sm_") else "ptx"
    path = cache_dir() / f"lcas-{key.hexdigest()[:32]}-{target}.{ext}"
    if not refresh:
        try:
            return path.read_bytes(), path
        except OSError:
            pass
    data = _compile(target)
    from ..runtime.atomic import atomic_write

    try:
        atomic_write(path, data)
    except OSError:
        pass
    return data, path


# ---------------------------------------------------------------------------------------------
# driver API: contexts, module, launch


@dataclass
class _Module:
    module: Any
    functions: dict[str, Any]  # kernel name -> CUfunction


_lock = threading.Lock()
_initialised = False
_primary: dict[int, Any] = {}  # device ordinal -> retained primary context
_modules: dict[int, _Module] = {}  # context handle -> loaded module


def _import_driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError as exc:
        raise KernelUnavailable(
            "cuda-python is not installed (pip install cuda-python), so the LCAS kernel cannot "
            "run on a GPU"
        ) from exc
    return driver


def _err_name(driver: Any, err: Any) -> str:
    try:
        return driver.cuGetErrorName(err)[1].decode()
    except Exception:  # best effort, for the message only
        return str(err)


def _check(driver: Any, result: tuple[Any, ...], what: str) -> Any:
    err = result[0]
    if err != driver.CUresult.CUDA_SUCCESS:
        raise CudaError(f"{what} failed: {_err_name(driver, err)}")
    if len(result) == 1:
        return None
    return result[1] if len(result) == 2 else result[1:]


def _driver() -> Any:
    """The initialised driver bindings; KernelUnavailable without a driver or a GPU."""
    global _initialised
    driver = _import_driver()
    if _initialised:
        return driver
    with _lock:
        if not _initialised:
            try:
                (err,) = driver.cuInit(0)
            except Exception as exc:  # cuda.pathfinder raises when libcuda.so is missing
                raise KernelUnavailable(
                    "no NVIDIA driver (libcuda) was found, so the LCAS kernel cannot run on a GPU"
                ) from exc
            if err != driver.CUresult.CUDA_SUCCESS:
                raise KernelUnavailable(
                    f"the CUDA driver could not be initialised ({_err_name(driver, err)}), so "
                    "the LCAS kernel cannot run on a GPU"
                )
            err, count = driver.cuDeviceGetCount()
            if err != driver.CUresult.CUDA_SUCCESS or count == 0:
                raise KernelUnavailable("no CUDA GPU is visible, so the LCAS kernel cannot run")
            _initialised = True
    return driver


def is_available() -> bool:
    """True when a GPU, its driver, cuda-python and NVRTC are all present (compiles nothing)."""
    try:
        _driver()
        nvrtc_version()
    except (KernelUnavailable, CudaError):
        return False
    return True


def _primary_context(driver: Any, ordinal: int) -> Any:
    with _lock:
        ctx = _primary.get(ordinal)
        if ctx is None:
            dev = _check(driver, driver.cuDeviceGet(ordinal), f"cuDeviceGet({ordinal})")
            ctx = _check(driver, driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
            _primary[ordinal] = ctx
    return ctx


def _pointer_device(driver: Any, ptr: int) -> int:
    attr = driver.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL
    err, ordinal = driver.cuPointerGetAttribute(attr, ptr)
    if err == driver.CUresult.CUDA_ERROR_INVALID_CONTEXT:  # some drivers want a context
        _check(driver, driver.cuCtxPushCurrent(_primary_context(driver, 0)), "cuCtxPushCurrent")
        try:
            err, ordinal = driver.cuPointerGetAttribute(attr, ptr)
        finally:
            driver.cuCtxPopCurrent()
    if err != driver.CUresult.CUDA_SUCCESS:
        raise ValueError(f"0x{ptr:x} is not a CUDA device pointer ({_err_name(driver, err)})")
    return int(ordinal)


def _launch_context(driver: Any, ptr: int) -> tuple[Any, bool]:
    """The context to launch in: the current one when it is on the pointer's device, else that
    device's primary context (the one the CUDA runtime, ONNX Runtime and TensorRT use), which the
    caller must push (second value True)."""
    ordinal = _pointer_device(driver, ptr)
    cur = _check(driver, driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
    if cur is not None and int(cur) != 0:
        dev = _check(driver, driver.cuCtxGetDevice(), "cuCtxGetDevice")
        if int(dev) == ordinal:
            return cur, False
    return _primary_context(driver, ordinal), True


def _module(driver: Any, ctx: Any) -> _Module:
    """The kernel module loaded in ``ctx`` (which must be current)."""
    key = int(ctx)
    mod = _modules.get(key)
    if mod is not None:
        return mod
    with _lock:
        mod = _modules.get(key)
        if mod is not None:
            return mod
        dev = _check(driver, driver.cuCtxGetDevice(), "cuCtxGetDevice")
        attr = driver.CUdevice_attribute
        major = _check(
            driver,
            driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev),
            "cuDeviceGetAttribute",
        )
        minor = _check(
            driver,
            driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev),
            "cuDeviceGetAttribute",
        )
        binary, path = cached_binary((int(major), int(minor)))
        err, module = driver.cuModuleLoadData(binary)
        if err != driver.CUresult.CUDA_SUCCESS:  # a stale or damaged cache entry: rebuild once
            binary, path = cached_binary((int(major), int(minor)), refresh=True)
            err, module = driver.cuModuleLoadData(binary)
        if err != driver.CUresult.CUDA_SUCCESS:
            raise KernelUnavailable(
                f"the CUDA driver could not load the LCAS kernel ({_err_name(driver, err)}, "
                f"{path.name}); the driver may be older than NVRTC {'.'.join(map(str, nvrtc_version()))}"
            )
        functions = {name: _check(driver, driver.cuModuleGetFunction(module, name.encode()), name)
                     for name in PRED_KERNELS.values()}
        mod = _Module(module, functions)
        _modules[key] = mod
    return mod


def prepare(device: int = 0) -> None:
    """Compile (or take from the cache) and load the kernel for ``device`` ahead of first use."""
    driver = _driver()
    ctx = _primary_context(driver, device)
    _check(driver, driver.cuCtxPushCurrent(ctx), "cuCtxPushCurrent")
    try:
        _module(driver, ctx)
    finally:
        driver.cuCtxPopCurrent()


def lcas_stats_device(
    image_ptr: int,
    pred_ptr: int,
    pred_dtype: Any,
    visible_ptr: int,
    B: int,
    K: int,
    H: int,
    W: int,
    P: int,
    lam: float,
    norm_pix: bool,
    stats_ptr: int,
    map_ptr: int = 0,
    stream: int = 0,
) -> None:
    """Queue the fused LCAS kernel on ``stream`` for buffers already on the GPU (no sync).

    image_ptr   [B, 3, H, W] float32, the normalised image batch
    pred_ptr    [B*K, L, P*P*3] of ``pred_dtype`` (numpy float32 or float16; other dtypes raise
                KernelInputUnsupported); row b*K + k
    visible_ptr [K, L] uint8, nonzero where patch i is visible in run k
    stats_ptr   [B, 3] float32 output (s1, s2, s3)
    map_ptr     [B, K, L] float32 output, NaN at visible patches; 0 to skip
    stream      CUstream / cudaStream_t handle as an int (0: the legacy default stream)

    The launch goes to the current CUDA context when it is on the device of ``stats_ptr``, else
    to that device's primary context. K = 0 writes zeros (pred and visible may be 0).
    """
    cfg = plan(K, H, W, P, B)
    kernel = pred_kernel(pred_dtype)
    if B < 0:
        raise ValueError(f"B must be >= 0, got {B}")
    if B == 0:
        return
    if not stats_ptr or (K > 0 and not (image_ptr and pred_ptr and visible_ptr)):
        raise ValueError("null device pointer")
    driver = _driver()
    ctx, push = _launch_context(driver, int(stats_ptr))
    if push:
        _check(driver, driver.cuCtxPushCurrent(ctx), "cuCtxPushCurrent")
    try:
        mod = _module(driver, ctx)
        args = (
            ctypes.c_void_p(int(image_ptr)),
            ctypes.c_void_p(int(pred_ptr)),
            ctypes.c_void_p(int(visible_ptr)),
            ctypes.c_int(K),
            ctypes.c_int(H),
            ctypes.c_int(W),
            ctypes.c_int(P),
            ctypes.c_float(lam),
            ctypes.c_int(1 if norm_pix else 0),
            ctypes.c_int(1 if cfg.single_pass else 0),
            ctypes.c_void_p(int(stats_ptr)),
            ctypes.c_void_p(int(map_ptr)),
        )
        params = (ctypes.c_void_p * len(args))(*(ctypes.addressof(a) for a in args))
        _check(
            driver,
            driver.cuLaunchKernel(
                mod.functions[kernel],
                B, 1, 1,
                cfg.threads, 1, 1,
                cfg.smem_bytes,
                driver.CUstream(int(stream)),
                ctypes.addressof(params),
                0,
            ),
            "cuLaunchKernel(lcas_stats)",
        )
    finally:
        if push:
            driver.cuCtxPopCurrent()


def lcas_stats_gpu(
    images: np.ndarray,
    pred: np.ndarray,
    visible: np.ndarray,
    patch_size: int,
    lam: float = 1.0,
    norm_pix: bool = False,
    want_map: bool = False,
    *,
    device: int = 0,
    fill: float | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Run the kernel on host arrays: copy in, launch, synchronise, copy out (tests, benchmark).

    images  [B, 3, H, W] float32 (other dtypes are converted)
    pred    [B*K, L, P*P*3] float16 (used as is) or float32 (anything else is converted)
    visible [K, L] bool
    returns stats [B, 3] float32 and, with want_map, the map [B, K, L] float32 (NaN at visible
            patches), else None. ``fill`` pre-fills the device outputs with a value (tests use
            it to check that every element is written).
    """
    import numpy as np

    images = np.ascontiguousarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {images.shape}")
    b, _, h, w = images.shape
    vis = np.ascontiguousarray(np.asarray(visible, dtype=bool), dtype=np.uint8)
    if vis.ndim != 2:
        raise ValueError(f"visible must be [K, L], got {vis.shape}")
    k, num_patches = vis.shape
    p = int(patch_size)
    plan(k, h, w, p, b)
    if k and num_patches != (h // p) * (w // p):
        raise ValueError(f"visible has L={num_patches}, images give {(h // p) * (w // p)}")
    pred = np.asarray(pred)
    pred = np.ascontiguousarray(pred, dtype=np.float16 if pred.dtype == np.float16 else np.float32)
    if k and pred.shape != (b * k, num_patches, 3 * p * p):
        raise ValueError(f"pred {pred.shape} is not [B*K={b * k}, {num_patches}, {3 * p * p}]")
    stats = np.zeros((b, 3), dtype=np.float32)
    lmap = np.full((b, k, num_patches), np.nan, dtype=np.float32) if want_map else None
    if b == 0:
        return stats, lmap

    driver = _driver()
    ctx = _primary_context(driver, device)
    _check(driver, driver.cuCtxPushCurrent(ctx), "cuCtxPushCurrent")
    allocations: list[Any] = []

    def alloc(nbytes: int) -> int:
        ptr = _check(driver, driver.cuMemAlloc(max(int(nbytes), 4)), "cuMemAlloc")
        allocations.append(ptr)
        return int(ptr)

    def upload(arr: np.ndarray) -> int:
        ptr = alloc(arr.nbytes)
        if arr.nbytes:
            _check(driver, driver.cuMemcpyHtoD(ptr, arr.ctypes.data, arr.nbytes), "cuMemcpyHtoD")
        return ptr

    def output(n: int) -> int:
        ptr = alloc(4 * n)
        if fill is not None and n:
            bits = struct.unpack("<I", struct.pack("<f", fill))[0]
            _check(driver, driver.cuMemsetD32(ptr, bits, n), "cuMemsetD32")
        return ptr

    try:
        d_image = upload(images)
        d_pred = upload(pred) if k else 0
        d_vis = upload(vis) if k else 0
        d_stats = output(stats.size)
        d_map = output(lmap.size) if lmap is not None and lmap.size else 0
        lcas_stats_device(
            d_image, d_pred, pred.dtype, d_vis, b, k, h, w, p, lam, norm_pix, d_stats, d_map, 0
        )
        _check(driver, driver.cuCtxSynchronize(), "lcas kernel")
        _check(driver, driver.cuMemcpyDtoH(stats.ctypes.data, d_stats, stats.nbytes), "cuMemcpyDtoH")
        if d_map:
            _check(driver, driver.cuMemcpyDtoH(lmap.ctypes.data, d_map, lmap.nbytes), "cuMemcpyDtoH")
    finally:
        for ptr in allocations:
            driver.cuMemFree(ptr)
        driver.cuCtxPopCurrent()
    return stats, lmap
