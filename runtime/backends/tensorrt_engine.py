"""TensorRT engines for a bundle: building (torch-free) and the engine cache.

One code path for TensorRT 10, TensorRT 11 and TensorRT-RTX (module ``tensorrt_rtx``):

* the network is created strongly typed (``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` where
  the flag exists; TensorRT 11 and TensorRT-RTX are strongly typed anyway) and no precision
  builder flag is ever set: fp32 or fp16 comes from the graph (``encoder.fp16.onnx`` etc.);
* optimization profiles: the encoder engine has two, the global pass (``image`` [1..B,3,H,W],
  ``ids_keep`` [1..B, L]) and the masked pass (B*K rows, ``ids_keep`` [1..B*K, n_keep]); the
  decoder one on 1..B*K rows; the head one on 1..B images;
* a timing cache file per TensorRT version beside the engines (TensorRT only: TensorRT-RTX
  deprecated the timing cache, its kernels are compiled just in time instead);
* engines live in ``BUNDLE/engines/`` (or ``~/.cache/cinemae/engines/...`` when the bundle is
  read-only), one file per graph, precision and GPU, each with a JSON sidecar holding its key:
  GPU name, compute capability, TensorRT module and version, precision, the graph's sha256 and
  the profile shapes. A sidecar that does not match the running key (other TensorRT, changed
  graph, other batch limit, corrupted file) means the engine is rebuilt, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..bundle import Bundle, sha256_file
from ..masks import n_keep_for
from .base import BackendUnavailable

ENGINE_FORMAT = 1
Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


class EngineBuildError(BackendUnavailable):
    """TensorRT could not parse a graph or build an engine; the message says which and why.
    A kind of BackendUnavailable: ``auto`` passes over TensorRT and says why."""


def import_tensorrt() -> tuple[Any, str]:
    """The TensorRT Python module and its name: ``tensorrt`` first, then ``tensorrt_rtx``.
    Raises BackendUnavailable (one sentence) when neither imports."""
    errors = []
    for name in ("tensorrt", "tensorrt_rtx"):
        try:
            return __import__(name), name
        except ImportError as e:
            errors.append(str(e))
        except Exception as e:  # noqa: BLE001 - a broken install (missing libnvinfer) is "not usable"
            errors.append(f"{name}: {e}")
    if any("No module named" not in e for e in errors):
        raise BackendUnavailable("TensorRT is installed but does not load ("
                                 + "; ".join(e for e in errors if "No module named" not in e) + ")")
    raise BackendUnavailable("TensorRT is not installed (module tensorrt or tensorrt_rtx)")


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; a different key means a different engine."""

    role: str  # "encoder", "decoder" or "head"
    precision: str
    gpu: str
    compute_capability: str  # "8.9"
    trt_module: str  # "tensorrt" or "tensorrt_rtx"
    trt_version: str
    graph_sha256: str
    profiles: tuple[tuple[tuple[str, tuple[Shape, Shape, Shape]], ...], ...]
    format: int = ENGINE_FORMAT

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["profiles"] = [{name: [list(s) for s in shapes] for name, shapes in p} for p in self.profiles]
        return d

    @property
    def filename(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.gpu).strip("-").lower() or "gpu"
        return f"{self.role}.{self.precision}.{slug}.sm{self.compute_capability.replace('.', '')}.engine"


def make_key(role: str, precision: str, gpu: str, cc: str, trt_module: str, trt_version: str,
             graph_sha256: str, profiles: list[Profile]) -> EngineKey:
    prof = tuple(tuple(sorted((n, tuple(tuple(int(x) for x in s) for s in shapes))
                              for n, shapes in p.items())) for p in profiles)
    return EngineKey(role, precision, gpu, cc, trt_module, trt_version, graph_sha256, prof)  # type: ignore[arg-type]


def bundle_profiles(bundle: Bundle, max_batch: int, k: int | None = None) -> dict[str, list[Profile]]:
    """Optimization profiles of the three engines for batches of 1..max_batch images.

    encoder: [global pass (n = L), masked pass (n = n_keep, B*K rows)] (the second only when K>0)
    decoder: [B*K rows];  head: [B images]
    """
    bb = bundle.backbone
    k = bundle.k if k is None else k
    s, big_l, d = bb.img_size, bb.num_patches, bb.embed_dim
    nk = n_keep_for(big_l, bundle.mask_ratio)
    opt_b = max(1, min(max_batch, 8))
    rows_max = max(1, max_batch * max(k, 1))
    opt_r = max(1, opt_b * max(k, 1))
    enc: list[Profile] = [{"image": ((1, 3, s, s), (opt_b, 3, s, s), (max_batch, 3, s, s)),
                           "ids_keep": ((1, big_l), (opt_b, big_l), (max_batch, big_l))}]
    if k:
        enc.append({"image": ((1, 3, s, s), (opt_r, 3, s, s), (rows_max, 3, s, s)),
                    "ids_keep": ((1, nk), (opt_r, nk), (rows_max, nk))})
    dec: list[Profile] = [{"tokens": ((1, 1 + nk, d), (opt_r, 1 + nk, d), (rows_max, 1 + nk, d)),
                           "ids_restore": ((1, big_l), (opt_r, big_l), (rows_max, big_l))}]
    head: list[Profile] = [{"global_tokens": ((1, 1 + big_l, d), (opt_b, 1 + big_l, d),
                                              (max_batch, 1 + big_l, d)),
                            "stats": ((1, 3), (opt_b, 3), (max_batch, 3))}]
    return {"encoder": enc, "decoder": dec, "head": head}


def build_engine(trt: Any, onnx_path: Path, profiles: list[Profile], timing_cache: Path | None,
                 log: Callable[[str], None] = print, workspace: int | None = None) -> bytes:
    """Parse ``onnx_path`` into a strongly typed network and build a serialized engine with the
    given optimization profiles. No precision flag: the graph's types decide."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly is not None:
        flags |= 1 << int(strongly)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(int(getattr(parser, "num_errors", 0))))
        raise EngineBuildError(f"TensorRT could not parse {onnx_path.name}: {errs}")
    config = builder.create_builder_config()
    if workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    for prof in profiles:
        p = builder.create_optimization_profile()
        for name, (mn, opt, mx) in prof.items():
            p.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(p)
    cache = None
    if timing_cache is not None and hasattr(config, "create_timing_cache"):
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, False)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build an engine from {onnx_path.name} "
                               "(see the TensorRT log above)")
    log(f"built TensorRT engine for {onnx_path.name} in {time.perf_counter() - t0:.1f} s")
    if cache is not None and timing_cache is not None:
        _atomic_write(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def engine_dir(bundle: Bundle) -> Path:
    """``BUNDLE/engines`` when the bundle is writable, else a per-bundle folder under
    ``$CINEMAE_CACHE`` or ``~/.cache/cinemae/engines``."""
    d = bundle.root / "engines"
    if (d.is_dir() and os.access(d, os.W_OK)) or (not d.exists() and os.access(bundle.root, os.W_OK)):
        return d
    base = Path(os.environ.get("CINEMAE_CACHE", Path.home() / ".cache" / "cinemae")) / "engines"
    ident = hashlib.sha256(json.dumps(bundle.manifest.get("files", {}), sort_keys=True).encode()).hexdigest()
    return base / f"{bundle.model_id}-{ident[:16]}"


class EngineCache:
    """Engines on disk, each beside a ``.json`` sidecar with its :class:`EngineKey` and sha256.

    :meth:`load_or_build` returns the stored engine only when the sidecar's key equals the
    running key and the file's sha256 matches; anything else is rebuilt and replaces it.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def paths(self, key: EngineKey) -> tuple[Path, Path]:
        p = self.root / key.filename
        return p, p.with_name(p.name + ".json")

    def lookup(self, key: EngineKey) -> tuple[bytes | None, str]:
        """(engine bytes, "") when a matching engine is stored, else (None, why not)."""
        path, side = self.paths(key)
        if not path.is_file() or not side.is_file():
            return None, "no engine built yet"
        try:
            meta = json.loads(side.read_text())
        except ValueError:
            return None, "unreadable sidecar"
        want = key.to_dict()
        got = meta.get("key", {})
        diff = sorted(k for k in want if got.get(k) != want[k])
        if diff:
            return None, "key mismatch (" + ", ".join(diff) + ")"
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            return None, "engine file does not match its sha256"
        return data, ""

    def store(self, key: EngineKey, data: bytes) -> Path:
        path, side = self.paths(key)
        _atomic_write(path, data)
        meta = {"key": key.to_dict(), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _atomic_write(side, (json.dumps(meta, indent=2) + "\n").encode())
        return path

    def invalidate(self, key: EngineKey) -> None:
        for p in self.paths(key):
            p.unlink(missing_ok=True)

    def load_or_build(self, key: EngineKey, build: Callable[[], bytes],
                      log: Callable[[str], None] = print) -> tuple[bytes, bool]:
        """(engine bytes, built?) : the stored engine when its key matches, else ``build()``
        (stored before returning)."""
        data, why = self.lookup(key)
        if data is not None:
            return data, False
        log(f"building TensorRT engine {key.filename}: {why}")
        data = build()
        self.store(key, data)
        return data, True


def gpu_and_trt(device_index: int = 0) -> tuple[Any, str, Any]:
    """(trt module, module name, GpuInfo); BackendUnavailable when either is missing."""
    from .cuda_memory import require_gpu

    gpu = require_gpu(device_index)
    trt, name = import_tensorrt()
    return trt, name, gpu


@dataclass
class EngineEntry:
    """One engine of a bundle: its key, where it is stored, its serialized bytes, and how to
    rebuild it (used when TensorRT refuses to deserialize a stored engine)."""

    role: str
    key: EngineKey
    path: Path
    data: bytes
    built: bool
    rebuild: Callable[[], bytes]


def ensure_engines(bundle: Bundle, precision: str = "fp32", device_index: int = 0,
                   max_batch: int = 16, k: int | None = None, log: Callable[[str], None] = print,
                   cache_root: Path | None = None) -> dict[str, EngineEntry]:
    """Build (or find) the encoder, decoder (K > 0) and head engines of ``bundle`` at
    ``precision`` for this GPU and TensorRT; BackendUnavailable when either is missing."""
    trt, mod, gpu = gpu_and_trt(device_index)
    version = str(getattr(trt, "__version__", "unknown"))
    root = Path(cache_root) if cache_root else engine_dir(bundle)
    cache = EngineCache(root)
    timing = None if mod == "tensorrt_rtx" else root / f"timing.{mod}-{version}.sm{gpu.sm.replace('.', '')}.cache"
    k_eff = bundle.k if k is None else k
    profiles = bundle_profiles(bundle, max_batch, k_eff)
    out: dict[str, EngineEntry] = {}
    for role in ("encoder", "decoder", "head"):
        if role == "decoder" and k_eff == 0:
            continue
        graph = bundle.graph(role, precision)
        key = make_key(role, precision, gpu.name, gpu.sm, mod, version, sha256_file(graph), profiles[role])

        def make(g: Path = graph, r: str = role) -> bytes:
            return build_engine(trt, g, profiles[r], timing, log)

        def rebuild(kk: EngineKey = key, m: Callable[[], bytes] = make) -> bytes:
            data = m()
            cache.store(kk, data)
            return data

        data, built = cache.load_or_build(key, make, log)
        out[role] = EngineEntry(role, key, cache.paths(key)[0], data, built, rebuild)
    return out


__all__ = ["EngineBuildError", "EngineCache", "EngineKey", "bundle_profiles", "build_engine",
           "EngineEntry", "engine_dir", "ensure_engines", "gpu_and_trt", "import_tensorrt", "make_key"]
