"""TensorRT engines for a bundle: the TensorRT module, building (torch-free), choosing an engine
for the running GPU, and the first-use engine cache.

One code path for TensorRT 10, TensorRT 11 and TensorRT-RTX (modules ``tensorrt``,
``tensorrt_rtx`` or the standalone ``tensorrt_rtx_bindings`` wheel, tried in that order):

* the network is created strongly typed (``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` where
  the flag exists; TensorRT 11 and TensorRT-RTX are strongly typed anyway) and no precision
  builder flag is ever set: fp32 or fp16 comes from the graph (``encoder.fp16.onnx`` etc.);
* optimization profiles: the encoder engine has two, the global pass (``image`` [1..B,3,H,W],
  ``ids_keep`` [1..B, L]) and the masked pass (B*K rows, ``ids_keep`` [1..B*K, n_keep]); the
  decoder one on 1..B*K rows; the head one on 1..B images;
* ahead of time: TensorRT-RTX builds for a named compute capability without that GPU
  (``config.set_compute_capability``); ``cinemae-export --trt-targets sm80,sm86,sm89`` puts such
  engines in ``BUNDLE/engines/`` and lists them in the manifest (``engines``), each keyed by
  flavour and version, target compute capability, precision, graph sha256 and profiles;
* at run time :func:`select_engine` (a pure function) picks the bundle's engine made for the
  running GPU and TensorRT. When the bundle has none (SM90 with TensorRT-RTX, which offers no SM90
  target; another TensorRT version; another batch limit), the engine is **built at first use** on
  the running GPU and cached outside the bundle (``$CINEMAE_CACHE`` or ``~/.cache/cinemae/engines``),
  keyed the same way; ``CINEMAE_TRT_BUILD=never`` turns that into a one-sentence refusal instead.
  An engine whose key differs from the running one is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..bundle import Bundle, sha256_file
from ..masks import n_keep_for
from .base import BackendUnavailable

_logger = logging.getLogger(__name__)

ENGINE_FORMAT = 2
TRT_MODULES = ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings")
Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


class EngineBuildError(BackendUnavailable):
    """TensorRT could not parse a graph or build an engine; the message says which and why
    (the parser's or builder's own error text). A kind of BackendUnavailable: ``auto`` passes over
    TensorRT and says why."""


# ------------------------------------------------------------------------------------------------
# the TensorRT module


@dataclass(frozen=True)
class TensorRT:
    """The imported TensorRT Python module and what engines it makes.

    ``flavour`` is ``tensorrt`` or ``tensorrt-rtx`` (``tensorrt_rtx`` and ``tensorrt_rtx_bindings``
    are the same library, so their engines are interchangeable at the same version)."""

    module: Any
    name: str
    flavour: str
    version: str

    @property
    def aot_targets(self) -> tuple[str, ...]:
        """Compute capabilities ("8.6") this TensorRT builds for without that GPU (TensorRT-RTX's
        ``ComputeCapability`` enum); () for TensorRT, which builds only for the GPU it runs on."""
        enum = getattr(self.module, "ComputeCapability", None)
        if enum is None:
            return ()
        out = []
        for name in getattr(enum, "__members__", {}):
            m = re.fullmatch(r"SM(\d+)(\d)", name)
            if m:
                out.append(f"{int(m.group(1))}.{m.group(2)}")
        return tuple(out)

    def __str__(self) -> str:
        return f"{self.flavour} {self.version}"


def import_tensorrt(order: Iterable[str] = TRT_MODULES) -> TensorRT:
    """The first TensorRT module that imports, in the order ``tensorrt``, ``tensorrt_rtx``,
    ``tensorrt_rtx_bindings``. Raises BackendUnavailable (one sentence) when none does.

    The standalone wheels (``tensorrt-rtx-cu13-bindings`` + ``-libs``) need no library path: the
    bindings import ``tensorrt_rtx_libs``, which loads ``libtensorrt_rtx.so.1`` and the ONNX parser
    from its own folder, and the bindings' ``libtensorrt_rtx.so.1`` dependency resolves to that
    already-loaded library by its soname."""
    import importlib

    errors = []
    for name in order:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # the module is there but something it needs is not
                errors.append(f"{name}: {e}")
            continue
        except ImportError as e:  # e.g. a shared library that does not load
            errors.append(f"{name}: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - a broken install (missing libnvinfer) is "not usable"
            errors.append(f"{name}: {e}")
            continue
        flavour = "tensorrt-rtx" if name.startswith("tensorrt_rtx") else "tensorrt"
        return TensorRT(mod, name, flavour, str(getattr(mod, "__version__", "unknown")))
    if errors:
        raise BackendUnavailable("TensorRT is installed but does not load (" + "; ".join(errors) + ")")
    raise BackendUnavailable("TensorRT is not installed (module tensorrt, tensorrt_rtx or tensorrt_rtx_bindings; "
                             "pip install 'cinemae[tensorrt-rtx]')")


def parse_target(text: str) -> str:
    """``sm86``, ``sm_86``, ``86`` or ``8.6`` -> ``"8.6"`` (ValueError otherwise)."""
    t = text.strip().lower().replace("sm_", "").replace("sm", "")
    m = re.fullmatch(r"(\d+)\.(\d)", t) or re.fullmatch(r"(\d+)(\d)", t)
    if not m:
        raise ValueError(f"bad compute capability {text!r}; write it as sm86 or 8.6")
    return f"{int(m.group(1))}.{m.group(2)}"


def sm_tag(cc: str) -> str:
    """``"8.6"`` -> ``"sm86"``."""
    return "sm" + cc.replace(".", "")


# ------------------------------------------------------------------------------------------------
# keys


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; a different key means a different engine (and file)."""

    role: str  # "encoder", "decoder" or "head"
    precision: str
    target: str  # compute capability the engine runs on, "8.6"
    gpu: str  # "" = any GPU of that compute capability (TensorRT-RTX); else the GPU it was built on
    flavour: str  # "tensorrt" or "tensorrt-rtx"
    trt_version: str
    graph_sha256: str
    profiles: tuple[tuple[tuple[str, tuple[Shape, Shape, Shape]], ...], ...]
    format: int = ENGINE_FORMAT

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["profiles"] = profiles_to_json(self.profiles)
        return d

    @property
    def profile_id(self) -> str:
        """8 hex digits naming the optimization profiles."""
        return hashlib.sha256(json.dumps(profiles_to_json(self.profiles)).encode()).hexdigest()[:8]

    @property
    def filename(self) -> str:
        """``encoder.fp16.tensorrt-rtx-1.7.1.116.sm86.g<graph sha256[:12]>.p<profiles>.engine``
        (plus a slug of the GPU name for engines tied to one GPU model)."""
        ver = re.sub(r"[^A-Za-z0-9.]+", "-", self.trt_version)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.gpu).strip("-").lower()
        return (f"{self.role}.{self.precision}.{self.flavour}-{ver}.{sm_tag(self.target)}"
                f"{'.' + slug if slug else ''}.g{self.graph_sha256[:12]}.p{self.profile_id}.engine")


def profiles_to_json(profiles: Any) -> list[dict[str, list[list[int]]]]:
    return [{name: [list(s) for s in shapes] for name, shapes in p} for p in profiles]


def make_key(role: str, precision: str, target: str, gpu: str, flavour: str, trt_version: str,
             graph_sha256: str, profiles: list[Profile]) -> EngineKey:
    prof = tuple(tuple(sorted((n, tuple(tuple(int(x) for x in s) for s in shapes))
                              for n, shapes in p.items())) for p in profiles)
    return EngineKey(role, precision, target, gpu, flavour, trt_version, graph_sha256, prof)  # type: ignore[arg-type]


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


def engine_roles(k: int) -> tuple[str, ...]:
    return ("encoder", "decoder", "head") if k else ("encoder", "head")


def bundle_keys(bundle: Bundle, precision: str, trt: TensorRT, target: str, gpu: str, max_batch: int,
                k: int | None = None) -> dict[str, EngineKey]:
    """The key of each engine of ``bundle`` at ``precision`` for one target."""
    k_eff = bundle.k if k is None else k
    profiles = bundle_profiles(bundle, max_batch, k_eff)
    return {role: make_key(role, precision, target, gpu, trt.flavour, trt.version,
                           sha256_file(bundle.graph(role, precision)), profiles[role])
            for role in engine_roles(k_eff)}


# ------------------------------------------------------------------------------------------------
# choosing an engine (pure)


def select_engine(engines: list[dict[str, Any]], want: EngineKey) -> tuple[dict[str, Any] | None, str]:
    """Pick, from a manifest's ``engines`` list, the entry whose key equals ``want``.

    Returns (entry, "") or (None, one sentence saying why none fits): no engines; none for this
    graph and precision; another TensorRT flavour or version; no engine for this compute
    capability (naming the ones the bundle has); built on another GPU model; from another graph;
    for other batch profiles. Pure: reads nothing but its arguments.
    """
    what = f"{want.precision} {want.role}"
    if not engines:
        return None, "the bundle has no ahead-of-time TensorRT engines"
    cands = [e for e in engines if _k(e).get("role") == want.role and _k(e).get("precision") == want.precision]
    if not cands:
        return None, f"the bundle has no {what} engine"
    same = [e for e in cands if _k(e).get("flavour") == want.flavour and _k(e).get("trt_version") == want.trt_version]
    if not same:
        have = sorted({f"{_k(e).get('flavour')} {_k(e).get('trt_version')}" for e in cands})
        return None, (f"the bundle's {what} engines are for {', '.join(have)}, this is "
                      f"{want.flavour} {want.trt_version}")
    on_target = [e for e in same if _k(e).get("target") == want.target]
    if not on_target:
        have = sorted({sm_tag(str(_k(e).get("target"))) for e in same})
        return None, (f"the bundle has no {what} engine for {sm_tag(want.target)} "
                      f"(it has {', '.join(have)} for {want.flavour} {want.trt_version})")
    gpu_ok = [e for e in on_target if _k(e).get("gpu", "") in ("", want.gpu)]
    if not gpu_ok:
        names = sorted({str(_k(e).get("gpu")) for e in on_target})
        return None, f"the bundle's {what} engines for {sm_tag(want.target)} were built on {', '.join(names)}"
    graph_ok = [e for e in gpu_ok if _k(e).get("graph_sha256") == want.graph_sha256]
    if not graph_ok:
        return None, (f"the bundle's {what} engine for {sm_tag(want.target)} was built from another "
                      "graph (its sha256 differs)")
    want_prof = profiles_to_json(want.profiles)
    prof_ok = [e for e in graph_ok if _k(e).get("profiles") == want_prof]
    if not prof_ok:
        got = sorted({_max_rows(_k(e).get("profiles")) for e in graph_ok})
        return None, (f"the bundle's {what} engine for {sm_tag(want.target)} has other batch profiles "
                      f"(largest batch {', '.join(map(str, got))}; this run wants {_max_rows(want_prof)})")
    fmt_ok = [e for e in prof_ok if _k(e).get("format") == want.format]
    if not fmt_ok:
        return None, f"the bundle's {what} engine for {sm_tag(want.target)} has an older engine format"
    return fmt_ok[0], ""


def _k(entry: dict[str, Any]) -> dict[str, Any]:
    k = entry.get("key")
    return k if isinstance(k, dict) else {}


def _max_rows(profiles: Any) -> int:
    """Largest first dimension of the first input of the first profile (the batch limit)."""
    try:
        first = profiles[0]
        return int(next(iter(first.values()))[2][0])
    except (TypeError, IndexError, KeyError, StopIteration, ValueError):
        return -1


# ------------------------------------------------------------------------------------------------
# building


@dataclass
class BuildReport:
    """What one build said: seconds, the layer table's precision summary, warnings and errors."""

    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time (all threads) during the build
    layers: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    layer_lines: list[str] = field(default_factory=list)


def _capture_logger(trt: Any, report: BuildReport, echo: Callable[[str], None] | None) -> Any:
    """A TensorRT logger at VERBOSE that keeps the layer table (``LayerType:`` lines printed after
    a build with DETAILED profiling verbosity), warnings and errors."""
    sev = trt.ILogger.Severity

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:  # noqa: D401 - TensorRT's callback
            if "LayerType:" in msg:  # the layer table: one message, one line per layer
                report.layer_lines.extend(x for x in msg.splitlines() if "LayerType:" in x)
            elif severity in (sev.ERROR, sev.INTERNAL_ERROR):
                report.errors.append(msg.strip())
                if echo:
                    echo(f"TensorRT: {msg.strip()}")
            elif severity == sev.WARNING:
                report.warnings.append(msg.strip())

    return _Logger()


_ENTRY = re.compile(r"\{ Name: ([^,]*), Dimensions: \[([^\]]*)\][^{}]*?Datatype: (\w+)")
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")


def _operand_types(section: str) -> set[str]:
    """Data types of the non-scalar tensors in one ``Inputs: [...]`` or ``Constants: [...]`` list."""
    return {dt for _, dims, dt in _ENTRY.findall(section) if dims.strip() not in ("", "1")}


def layer_precisions(lines: list[str]) -> dict[str, Any]:
    """Summarise the builder's layer table (one ``Name: ..., LayerType: ..., Inputs: [...],
    Constants: [...], Outputs: [...], ... Metadata: [ONNX Layer: ...]`` line per engine layer,
    printed at VERBOSE after a build with DETAILED profiling verbosity).

    Every ONNX ``MatMul``/``Gemm`` node the layers name (fused attention and fc+GELU layers name
    several) gets the precision of the layer computing it: the data type of its weights (the
    non-scalar constants) when it has any, else of its non-scalar inputs; ``Half`` -> fp16,
    ``Float`` -> fp32, anything else (several types) -> mixed. A ``gemm`` layer naming no ONNX node
    counts under its own name. Optimization profiles are folded together. Returns counts by layer
    type and by matmul precision, with the names of (at most 16 of) the matmuls not in fp16."""
    by_type: dict[str, int] = {}
    nodes: dict[str, set[str]] = {}
    n = 0
    for line in lines:
        m = re.search(r"LayerType: (\w+)", line)
        if not m:
            continue
        n += 1
        ltype = m.group(1)
        by_type[ltype] = by_type.get(ltype, 0) + 1
        head = line.split(", Outputs: [", 1)[0]
        inputs, _, consts = head.partition(", Constants: [")
        weights = _operand_types(consts)
        types = weights or _operand_types(inputs)
        onnx_mm = [x.split(" [profile")[0] for x in _ONNX_LAYER.findall(line)]
        onnx_mm = [x for x in onnx_mm if re.search(r"/(MatMul|Gemm)(_\d+)?$", x)]
        if ltype == "gemm" and not onnx_mm:
            onnx_mm = [re.sub(r"( \[profile \d+\])?_myl\d+_\d+$", "", line.split(",", 1)[0].removeprefix("Name: "))]
        for node in onnx_mm:
            nodes.setdefault(node, set()).update(types)
    prec = {k: ("fp16" if v == {"Half"} else "fp32" if v == {"Float"} else "mixed") for k, v in nodes.items()}
    return {"layers": n, "by_type": dict(sorted(by_type.items())), "matmul_nodes": len(nodes),
            "matmul_fp16": sum(p == "fp16" for p in prec.values()),
            "matmul_fp32": sum(p == "fp32" for p in prec.values()),
            "matmul_mixed": sum(p == "mixed" for p in prec.values()),
            "matmul_not_fp16": dict(sorted((k, p) for k, p in prec.items() if p != "fp16")[:16])}


def build_engine(trt: Any, onnx_path: Path, profiles: list[Profile], timing_cache: Path | None = None,
                 log: Callable[[str], None] = _logger.info, workspace: int | None = None,
                 target: str | None = None, report: BuildReport | None = None) -> bytes:
    """Parse ``onnx_path`` into a strongly typed network and build a serialized engine with the
    given optimization profiles. No precision flag: the graph's types decide.

    ``target`` ("8.6") builds ahead of time for that compute capability (TensorRT-RTX only; no
    GPU needed); None builds for the GPU this runs on. Raises EngineBuildError with the parser's
    or builder's own messages. ``report`` (filled in) gets the build time and layer precisions."""
    report = report if report is not None else BuildReport()
    logger = _capture_logger(trt, report, None)
    builder = trt.Builder(logger)
    flags = 0
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly is not None:
        flags |= 1 << int(strongly)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)).strip() for i in range(int(getattr(parser, "num_errors", 0)))]
        raise EngineBuildError(f"TensorRT could not parse {onnx_path.name}: "
                               + "; ".join(errs or report.errors or ["no reason given"]))
    config = builder.create_builder_config()
    if target is not None:
        if not hasattr(config, "set_compute_capability"):
            raise BackendUnavailable(f"this TensorRT cannot build for {sm_tag(target)} without that GPU "
                                     "(ahead-of-time builds need TensorRT-RTX)")
        member = getattr(trt.ComputeCapability, "SM" + target.replace(".", ""), None)
        if member is None:
            raise BackendUnavailable(f"TensorRT-RTX {getattr(trt, '__version__', '')} cannot build for "
                                     f"{sm_tag(target)}")
        config.num_compute_capabilities = 1
        config.set_compute_capability(member, 0)
    if hasattr(trt, "ProfilingVerbosity"):
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the layer table, and for inspectors
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
    t0, c0 = time.perf_counter(), time.process_time()
    serialized = builder.build_serialized_network(network, config)
    report.seconds, report.cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    if serialized is None:
        why = "; ".join(report.errors[-3:]) or "no reason given"
        raise EngineBuildError(f"TensorRT could not build an engine from {onnx_path.name}: {why}")
    report.layers = layer_precisions(report.layer_lines)
    report.layer_lines = []
    where = f"for {sm_tag(target)} ahead of time" if target else "for this GPU"
    log(f"built TensorRT engine from {onnx_path.name} {where} in {report.seconds:.1f} s")
    if cache is not None and timing_cache is not None:
        _atomic_write(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _atomic_write(path: Path, data: bytes) -> None:
    from ..atomic import atomic_write

    atomic_write(path, data)


# ------------------------------------------------------------------------------------------------
# engines built at first use: a cache outside the bundle


def engine_dir(bundle: Bundle) -> Path:
    """Where engines built at first use go: a per-bundle folder under ``$CINEMAE_CACHE/engines``
    (default ``~/.cache/cinemae/engines``), named by the model id and the hash of its graphs.
    Never inside the bundle, whose files the manifest lists and verifies."""
    from ..cache import cache_dir

    base = cache_dir("engines")
    graphs = {k: v for k, v in bundle.manifest.get("files", {}).items() if k.endswith((".onnx", ".data"))}
    ident = hashlib.sha256(json.dumps(graphs, sort_keys=True).encode()).hexdigest()
    return base / f"{re.sub(r'[^A-Za-z0-9._-]+', '-', bundle.model_id)}-{ident[:16]}"


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

    def store(self, key: EngineKey, data: bytes, extra: dict[str, Any] | None = None) -> Path:
        path, side = self.paths(key)
        _atomic_write(path, data)
        meta = {"key": key.to_dict(), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(extra or {})}
        _atomic_write(side, (json.dumps(meta, indent=2) + "\n").encode())
        return path

    def invalidate(self, key: EngineKey) -> None:
        for p in self.paths(key):
            p.unlink(missing_ok=True)

    def load_or_build(self, key: EngineKey, build: Callable[[], bytes],
                      log: Callable[[str], None] = _logger.info) -> tuple[bytes, bool]:
        """(engine bytes, built?) : the stored engine when its key matches, else ``build()``
        (stored before returning)."""
        data, why = self.lookup(key)
        if data is not None:
            return data, False
        log(f"building TensorRT engine {key.filename}: {why}")
        data = build()
        self.store(key, data)
        return data, True


# ------------------------------------------------------------------------------------------------
# the running GPU: bundle engine, else first-use engine


def gpu_and_trt(device_index: int = 0) -> tuple[Any, str, Any]:
    """(trt module, module name, GpuInfo); BackendUnavailable when either is missing."""
    from .cuda_memory import require_gpu

    gpu = require_gpu(device_index)
    trt = import_tensorrt()
    return trt.module, trt.name, gpu


@dataclass
class EngineEntry:
    """One engine for the running GPU: its key, where it came from (``bundle`` = an ahead-of-time
    engine listed in the manifest, ``cache`` = built at first use), its serialized bytes, and how
    to rebuild it into the cache (used when TensorRT refuses to deserialize a stored engine)."""

    role: str
    key: EngineKey
    path: Path
    data: bytes
    built: bool
    rebuild: Callable[[], bytes]
    source: str = "cache"


def build_at_first_use() -> bool:
    """False when ``CINEMAE_TRT_BUILD=never``: then a GPU without a bundle engine is refused."""
    return os.environ.get("CINEMAE_TRT_BUILD", "auto").strip().lower() not in ("never", "0", "no", "off")


def running_key_parts(trt: TensorRT, gpu: Any) -> tuple[str, str]:
    """(target, gpu name in the key) for the running GPU: TensorRT-RTX engines run on any GPU of
    their compute capability; TensorRT engines are tied to the GPU model they were built on."""
    return gpu.sm, ("" if trt.flavour == "tensorrt-rtx" else gpu.name)


def ensure_engines(bundle: Bundle, precision: str = "fp32", device_index: int = 0,
                   max_batch: int = 16, k: int | None = None, log: Callable[[str], None] = _logger.info,
                   cache_root: Path | None = None) -> dict[str, EngineEntry]:
    """The encoder, decoder (K > 0) and head engines of ``bundle`` at ``precision`` for this GPU
    and TensorRT: the bundle's ahead-of-time engine where :func:`select_engine` finds one, else
    one built at first use and cached (BackendUnavailable instead when CINEMAE_TRT_BUILD=never,
    or without TensorRT or a GPU)."""
    from .cuda_memory import require_gpu

    gpu = require_gpu(device_index)
    trt = import_tensorrt()
    target, gpu_key = running_key_parts(trt, gpu)
    root = Path(cache_root) if cache_root else engine_dir(bundle)
    cache = EngineCache(root)
    timing = (None if trt.flavour == "tensorrt-rtx"
              else root / f"timing.{trt.flavour}-{trt.version}.{sm_tag(target)}.cache")
    k_eff = bundle.k if k is None else k
    profiles = bundle_profiles(bundle, max_batch, k_eff)
    keys = bundle_keys(bundle, precision, trt, target, gpu_key, max_batch, k_eff)
    listed = bundle.manifest.get("engines", [])
    out: dict[str, EngineEntry] = {}
    for role, key in keys.items():
        graph = bundle.graph(role, precision)

        def make(g: Path = graph, r: str = role) -> bytes:
            return build_engine(trt.module, g, profiles[r], timing, log)

        def rebuild(kk: EngineKey = key, m: Callable[[], bytes] = make) -> bytes:
            data = m()
            cache.store(kk, data)
            return data

        stored, _ = cache.lookup(key)  # there only when built here before: the bundle had none, or
        entry, why = select_engine(listed if isinstance(listed, list) else [], key)  # TensorRT refused it
        if entry is not None and stored is None:
            path = bundle.root / str(entry.get("file", ""))
            data = path.read_bytes() if path.is_file() else b""
            if hashlib.sha256(data).hexdigest() == entry.get("sha256"):
                log(f"TensorRT {role} engine: {path.name} from the bundle (built ahead of time)")
                out[role] = EngineEntry(role, key, path, data, False, rebuild, "bundle")
                continue
            why = f"the bundle's {path.name} is missing or does not match its sha256"
        if stored is None and not build_at_first_use():
            raise BackendUnavailable(f"no usable TensorRT {precision} {role} engine for this "
                                     f"{gpu.name} ({sm_tag(target)}): {why}, and CINEMAE_TRT_BUILD=never "
                                     "forbids building one at first use")
        if stored is None:
            log(f"TensorRT {role} engine: {why}; building one for this GPU at first use (cached in {root})")
        data, built = cache.load_or_build(key, make, log)
        out[role] = EngineEntry(role, key, cache.paths(key)[0], data, built, rebuild, "cache")
    return out


__all__ = ["BuildReport", "EngineBuildError", "EngineCache", "EngineEntry", "EngineKey", "TRT_MODULES",
           "TensorRT", "build_at_first_use", "build_engine", "bundle_keys", "bundle_profiles", "engine_dir",
           "engine_roles", "ensure_engines", "gpu_and_trt", "import_tensorrt", "layer_precisions",
           "make_key", "parse_target", "select_engine", "sm_tag"]
