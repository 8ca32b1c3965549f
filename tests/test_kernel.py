"""The fused LCAS-statistics kernel (cinemae.kernels, kernels/lcas.cu).

Three levels, so that a machine without a GPU still checks what it can:
- CPU, always: import cost, the launch plan, and the kernel source itself run on the CPU under
  the SIMT emulator of tests/native (built here with the C++ compiler) against the numpy
  reference cinemae.runtime.lcas, including the Python mirror of the C++ launch plan;
- CPU with cuda-python and the NVRTC library (pip install cuda-python 'cuda-toolkit[nvrtc]'):
  NVRTC compiles lcas.cu to PTX and to a CUBIN, the on-disk cache works, and the loader's whole
  driver-API path plus the GPU tests below run against a stand-in libcuda
  (tests/native/fake_libcuda.cpp) that executes the kernel under the emulator;
- GPU (marked gpu, skipped without one): the real kernel against the numpy reference on the
  DESIGN.md shapes, every output written, the NaN pattern, determinism, a caller's stream.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cinemae import kernels
from cinemae.runtime.lcas import lcas_map, lcas_stats, patchify
from cinemae.runtime.masks import make_masks

REPO = Path(__file__).resolve().parents[1]
NATIVE = REPO / "tests" / "native"
SENTINEL = np.float32(-12345.0)


# ---------------------------------------------------------------------------------------------
# inputs and comparison


def make_inputs(
    b: int, k: int, hw: int, p: int, fp16: bool, norm_pix: bool, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random normalised images [B,3,hw,hw], pred [B*K,L,3P^2] (the patches plus noise, as a
    decoder would give) and the seeded masks' visible [K,L]."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((b, 3, hw, hw), dtype=np.float32)
    num_patches = (hw // p) ** 2
    visible = make_masks(num_patches, k, 0.75, seed).visible
    t = patchify(images, p)  # [B, L, D]
    base = np.zeros_like(t) if norm_pix else 0.8 * t
    noise = 0.5 * rng.standard_normal((b, k) + t.shape[1:], dtype=np.float32)
    pred = (base[:, None] + noise).reshape(b * k, num_patches, t.shape[-1])
    return images, pred.astype(np.float16 if fp16 else np.float32), visible


def max_rel_err(got: np.ndarray, ref: np.ndarray, floor: float) -> float:
    """Largest |got - ref| / max(|ref|, floor * max|ref|) over the non-NaN entries."""
    got = got.astype(np.float64)
    ref = ref.astype(np.float64)
    ok = ~np.isnan(ref)
    if not ok.any():
        return 0.0
    den = np.maximum(np.abs(ref[ok]), floor * max(np.abs(ref[ok]).max(), 1e-30))
    return float(np.max(np.abs(got[ok] - ref[ok]) / den))


def check_against_reference(
    stats: np.ndarray,
    lmap: np.ndarray,
    images: np.ndarray,
    pred: np.ndarray,
    visible: np.ndarray,
    p: int,
    lam: float,
    norm_pix: bool,
    tol: float,
) -> None:
    assert not np.any(stats == SENTINEL), "stats element not written"
    assert not np.any(lmap == SENTINEL), "map element not written"
    ref_stats = lcas_stats(images, pred, visible, p, lam, norm_pix)
    assert stats.shape == ref_stats.shape and stats.dtype == np.float32
    if visible.shape[0] == 0:
        assert np.all(stats == 0)
        return
    ref_map = lcas_map(images, pred, visible, p, lam, norm_pix)
    assert lmap.shape == ref_map.shape
    assert np.array_equal(np.isnan(lmap), np.isnan(ref_map)), "NaN pattern differs"
    assert max_rel_err(lmap, ref_map, 1e-3) <= tol
    for s, r in zip(stats, ref_stats, strict=True):  # per image, relative to its largest stat
        assert max_rel_err(s, r, 1e-6) <= tol, (s, r)
    if visible.shape[0] == 1:
        assert np.all(stats[:, 2] == 0)


# ---------------------------------------------------------------------------------------------
# CPU: package and plan


def test_import_is_cheap_and_never_imports_torch_or_cuda() -> None:
    code = (
        "import sys, cinemae.kernels\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'cuda', 'numpy')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))


def test_source_files_ship_with_the_package() -> None:
    assert b"lcas_stats_f32" in kernels.source_bytes()
    assert (Path(kernels.__file__).parent / "lcas.h").is_file()


def test_plan() -> None:
    vitl = kernels.plan(2, 224, 224, 16)
    assert vitl.single_pass and vitl.threads == 512 and 0 < vitl.smem_bytes <= 48 * 1024
    assert kernels.plan(2, 224, 224, 16, batch=256).threads == 256
    for batch in (1, 256):
        assert kernels.plan(8, 224, 224, 16, batch).single_pass  # ViT-L/16, K=8
        assert kernels.plan(8, 224, 224, 14, batch).single_pass  # ViT-H/14, K=8
        assert kernels.plan(8, 32, 32, 4, batch).single_pass  # tiny
        assert not kernels.plan(8, 224, 224, 8, batch).single_pass  # L=784: two passes
    assert kernels.plan(0, 224, 224, 16).smem_bytes == 0
    for bad in ((2, 224, 224, 32), (2, 225, 224, 16), (-1, 32, 32, 4), (64, 224, 224, 4)):
        with pytest.raises(ValueError):
            kernels.plan(*bad)


def test_kernel_unavailable_is_one_clear_sentence() -> None:
    if kernels.is_available():
        pytest.skip("a GPU is available here")
    images, pred, visible = make_inputs(1, 2, 32, 4, False, False)
    with pytest.raises(kernels.KernelUnavailable) as exc:
        kernels.lcas_stats_gpu(images, pred, visible, 4)
    msg = str(exc.value)
    assert isinstance(exc.value, RuntimeError)
    assert msg and "\n" not in msg and len(msg) < 200


# ---------------------------------------------------------------------------------------------
# CPU: the kernel source under the SIMT emulator


def build_native(source: str, out: Path) -> Path:
    """Compile tests/native/<source> (which includes kernels/lcas.cu) into the shared library
    ``out``; skips without a C++ compiler."""
    cxx = next((c for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c and shutil.which(c)),
               None)
    if cxx is None or not sys.platform.startswith("linux"):
        pytest.skip("no C++ compiler on Linux: the kernel's CPU emulator cannot be built")
    cmd = [cxx, "-std=c++17", "-O2", "-shared", "-fPIC", "-Wno-unknown-pragmas",
           str(NATIVE / source), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"building {source} failed:\n{res.stderr[-4000:]}"
    return out


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """tests/native/lcas_emulated.cpp (which includes kernels/lcas.cu) as a shared library."""
    out = build_native("lcas_emulated.cpp",
                       tmp_path_factory.mktemp("lcas_emulator") / "liblcas_emulated.so")
    lib = ctypes.CDLL(str(out))
    vp, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.cinemae_lcas_stats_emulated.argtypes = [vp, vp, i, vp, i, i, i, i, i, f, i, vp, vp, i, i]
    lib.cinemae_lcas_stats_emulated.restype = i
    lib.cinemae_lcas_plan_emulated.argtypes = [i, i, i, i, i, ctypes.POINTER(ctypes.c_int)]
    lib.cinemae_lcas_plan_emulated.restype = i
    return lib


def run_emulated(
    lib: ctypes.CDLL,
    images: np.ndarray,
    pred: np.ndarray,
    visible: np.ndarray,
    p: int,
    lam: float,
    norm_pix: bool,
    threads: int = 0,
    two_pass: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    b, _, h, w = images.shape
    k, num_patches = visible.shape
    images = np.ascontiguousarray(images, dtype=np.float32)
    pred = np.ascontiguousarray(pred)
    vis = np.ascontiguousarray(visible, dtype=np.uint8)
    stats = np.full((b, 3), SENTINEL, dtype=np.float32)
    lmap = np.full((b, k, num_patches), SENTINEL, dtype=np.float32)
    rc = lib.cinemae_lcas_stats_emulated(
        images.ctypes.data, pred.ctypes.data, int(pred.dtype == np.float16), vis.ctypes.data,
        b, k, h, w, p, lam, int(norm_pix), stats.ctypes.data, lmap.ctypes.data, threads,
        int(two_pass))
    assert rc == 0
    return stats, lmap


EMULATED_CASES = [
    # b, k, hw, p, fp16, norm_pix, lam, threads, two_pass
    (3, 1, 32, 4, False, False, 1.0, 0, False),
    (3, 2, 32, 4, False, False, 1.0, 0, False),
    (3, 2, 32, 4, True, True, 0.5, 0, False),
    (2, 4, 32, 4, False, True, 1.0, 64, True),
    (2, 8, 32, 4, True, False, 2.0, 0, False),
    (2, 8, 32, 4, False, True, 1.0, 96, True),
    (2, 0, 32, 4, False, False, 1.0, 0, False),
    (1, 2, 224, 16, True, True, 1.0, 0, False),  # ViT-L/16
    (1, 2, 224, 14, False, False, 1.0, 0, False),  # ViT-H/14
    (1, 2, 224, 14, True, True, 1.0, 128, True),
]


@pytest.mark.parametrize("b,k,hw,p,fp16,norm_pix,lam,threads,two_pass", EMULATED_CASES)
def test_emulated_kernel_matches_numpy_reference(
    emulator: ctypes.CDLL, b: int, k: int, hw: int, p: int, fp16: bool, norm_pix: bool,
    lam: float, threads: int, two_pass: bool,
) -> None:
    images, pred, visible = make_inputs(b, k, hw, p, fp16, norm_pix, seed=b * 100 + k * 10 + p)
    stats, lmap = run_emulated(emulator, images, pred, visible, p, lam, norm_pix, threads,
                               two_pass)
    check_against_reference(stats, lmap, images, pred, visible, p, lam, norm_pix, tol=1e-4)


def test_emulated_kernel_near_uniform_image(emulator: ctypes.CDLL) -> None:
    """A flat image: the context variance is the 1e-2 floor."""
    images, pred, visible = make_inputs(2, 2, 32, 4, False, False)
    images = (0.3 + 1e-4 * images).astype(np.float32)
    stats, lmap = run_emulated(emulator, images, pred, visible, 4, 1.0, False)
    check_against_reference(stats, lmap, images, pred, visible, 4, 1.0, False, tol=1e-4)


def test_python_plan_mirrors_the_cpp_plan(emulator: ctypes.CDLL) -> None:
    out = (ctypes.c_int * 3)()
    shapes = ((32, 4), (224, 16), (224, 14), (224, 8), (224, 4), (384, 16), (336, 14), (64, 32))
    for b in (1, 128, 129, 256):
        for k in (0, 1, 2, 4, 8, 16, 64):
            for hw, p in shapes:
                rc = emulator.cinemae_lcas_plan_emulated(b, k, hw, hw, p, out)
                try:
                    py = kernels.plan(k, hw, hw, p, b)
                except ValueError:
                    assert rc == 1, (b, k, hw, p)
                    continue
                assert rc == 0, (b, k, hw, p)
                assert (py.threads, int(py.single_pass), py.smem_bytes) == tuple(out), (b, k, hw, p)


# ---------------------------------------------------------------------------------------------
# CPU with NVRTC: the source compiles the way the loader compiles it


@pytest.fixture(scope="module")
def nvrtc_ready() -> None:
    try:
        kernels.nvrtc_version()
    except kernels.KernelUnavailable as exc:
        pytest.skip(f"NVRTC not usable here: {exc}")


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CINEMAE_CACHE shared by this module's tests (one NVRTC compile for sm_90)."""
    return tmp_path_factory.mktemp("cinemae_cache")


def test_nvrtc_compiles_ptx(nvrtc_ready: None) -> None:
    ptx = kernels.compile_ptx("compute_75").decode()
    assert ".target sm_75" in ptx
    assert ".entry lcas_stats_f32" in ptx and ".entry lcas_stats_f16" in ptx
    with pytest.raises(ValueError):
        kernels.compile_ptx("sm_75")


def test_nvrtc_cubin_is_cached(nvrtc_ready: None, kernel_cache: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CINEMAE_CACHE", str(kernel_cache))
    assert kernels.cache_dir() == kernel_cache / "kernels"
    data, path = kernels.cached_binary((9, 0))
    assert path.parent == kernel_cache / "kernels" and path.name.endswith("-sm_90.cubin")
    assert path.read_bytes() == data and data[:4] == b"\x7fELF"

    def no_compile(target: str) -> bytes:
        raise AssertionError("compiled again instead of using the cache")

    monkeypatch.setattr(kernels.loader, "_compile", no_compile)
    assert kernels.cached_binary((9, 0)) == (data, path)


def test_loader_end_to_end_on_a_fake_driver(nvrtc_ready: None, kernel_cache: Path,
                                            tmp_path: Path) -> None:
    """The whole Python path of the GPU tests below (loader: context choice, NVRTC cubin cache,
    module load, parameter packing, launch plan, copies; and the GPU tests' own code) run in a
    subprocess whose libcuda.so.1 is tests/native/fake_libcuda.cpp: host memory as device memory,
    cuLaunchKernel running lcas.cu under the emulator. It proves the glue, not the GPU."""
    driver_dir = tmp_path / "driver"
    driver_dir.mkdir()
    build_native("fake_libcuda.cpp", driver_dir / "libcuda.so.1")
    script = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("test_kernel_copy", {str(Path(__file__))!r})
tk = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tk)
assert tk.kernels.is_available()
# b, k, hw, p, norm_pix, fp16; 96 px with K=8 is a two-pass shape
for *case, fp16 in [(3, 2, 32, 4, False, False), (3, 8, 32, 4, True, True), (2, 1, 32, 4, True, True),
                    (2, 0, 32, 4, False, False), (1, 8, 96, 4, False, True)]:
    tk.test_gpu_kernel_matches_numpy_reference(*case, fp16)
assert not tk.kernels.plan(8, 96, 96, 4).single_pass
tk.test_gpu_kernel_on_a_caller_stream()  # ViT-L/16 shape, fp16, a non-blocking stream
print("fake-driver run ok")
"""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(driver_dir), os.environ.get("LD_LIBRARY_PATH")) if p)
    env["CINEMAE_CACHE_DIR"] = str(kernel_cache)
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0 and "fake-driver run ok" in res.stdout, res.stdout + res.stderr
    assert list((kernel_cache / "kernels").glob("lcas-*-sm_90.cubin"))


# ---------------------------------------------------------------------------------------------
# GPU: the real kernel

GPU_CASES = [
    # b, k, hw, p, norm_pix
    (8, 1, 224, 16, False),  # ViT-L/16
    (8, 2, 224, 16, True),
    (4, 4, 224, 16, False),
    (4, 8, 224, 16, True),
    (8, 2, 224, 14, False),  # ViT-H/14
    (4, 4, 224, 14, True),
    (4, 8, 224, 14, False),
    (256, 2, 32, 4, False),  # tiny 32-px models, large batch
    (256, 8, 32, 4, True),
    (64, 1, 32, 4, True),
    (3, 8, 224, 8, False),  # two passes over the image
    (5, 0, 224, 16, False),  # K=0: zeros
]


@pytest.mark.gpu
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("b,k,hw,p,norm_pix", GPU_CASES)
def test_gpu_kernel_matches_numpy_reference(
    b: int, k: int, hw: int, p: int, norm_pix: bool, fp16: bool
) -> None:
    if not kernels.is_available():
        pytest.skip("the LCAS kernel cannot run here (cuda-python, NVRTC or driver missing)")
    lam = 0.5 if norm_pix else 1.0
    images, pred, visible = make_inputs(b, k, hw, p, fp16, norm_pix, seed=b + k + p)
    stats, lmap = kernels.lcas_stats_gpu(images, pred, visible, p, lam, norm_pix, want_map=True,
                                         fill=float(SENTINEL))
    check_against_reference(stats, lmap, images, pred, visible, p, lam, norm_pix,
                            tol=5e-3 if fp16 else 1e-3)
    # no map: the same stats, bit for bit (and so deterministic)
    again, none = kernels.lcas_stats_gpu(images, pred, visible, p, lam, norm_pix,
                                         fill=float(SENTINEL))
    assert none is None and np.array_equal(again, stats)


@pytest.mark.gpu
def test_gpu_kernel_on_a_caller_stream() -> None:
    if not kernels.is_available():
        pytest.skip("the LCAS kernel cannot run here (cuda-python, NVRTC or driver missing)")
    from cuda.bindings import driver

    b, k, hw, p = 4, 2, 224, 16
    images, pred, visible = make_inputs(b, k, hw, p, True, False, seed=7)
    vis = visible.astype(np.uint8)
    stats = np.full((b, 3), SENTINEL, dtype=np.float32)

    def ok(res: tuple) -> object:
        assert res[0] == driver.CUresult.CUDA_SUCCESS, res
        return res[1] if len(res) > 1 else None

    ok(driver.cuInit(0))
    ctx = ok(driver.cuDevicePrimaryCtxRetain(ok(driver.cuDeviceGet(0))))
    ok(driver.cuCtxPushCurrent(ctx))
    try:
        stream = ok(driver.cuStreamCreate(1))  # CU_STREAM_NON_BLOCKING
        bufs = [ok(driver.cuMemAlloc(a.nbytes)) for a in (images, pred, vis, stats)]
        for buf, arr in zip(bufs[:3], (images, pred, vis), strict=True):
            ok(driver.cuMemcpyHtoDAsync(buf, arr.ctypes.data, arr.nbytes, stream))
        kernels.lcas_stats_device(int(bufs[0]), int(bufs[1]), np.float16, int(bufs[2]), b, k, hw, hw, p,
                                  1.0, False, int(bufs[3]), 0, int(stream))
        ok(driver.cuMemcpyDtoHAsync(stats.ctypes.data, bufs[3], stats.nbytes, stream))
        ok(driver.cuStreamSynchronize(stream))
        for buf in bufs:
            driver.cuMemFree(buf)
        driver.cuStreamDestroy(stream)
    finally:
        driver.cuCtxPopCurrent()
    ref = lcas_stats(images, pred, visible, p, 1.0, False)
    for s, r in zip(stats, ref, strict=True):
        assert max_rel_err(s, r, 1e-6) <= 5e-3
