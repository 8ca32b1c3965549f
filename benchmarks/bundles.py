"""Which bundle a benchmark runs, and the torch weights for its reference rows.

- ``--bundle PATH``: that bundle.
- ``--arch NAME``: a random-weight bundle of a preset, built from ``--init-seed`` and cached
  under ``~/.cache/cinemae/bench/NAME-kK-sSEED[-fp16]`` (exporting ViT-L takes minutes and
  ~1.3 GB); the torch model comes from the same seed in the same process.
- neither: the embedded default bundle, or - until one ships - the ``tiny`` preset with random
  weights (rows marked "random weights: latency only").

Torch weights for the reference rows. A bundle holds only ONNX graphs, and the exporter's
constant folding renames most encoder/decoder weights (``onnx::MatMul_123``, transposed) and
merges equal tensors, so they cannot be mapped back to parameters reliably. The bench therefore
takes, in this order: (1) the model built in this run (``--arch``); (2) a bundle whose manifest
says it was made from random weights (``provenance.checkpoint.format == "random-init"``) is
rebuilt from its recorded preset and seed (torch's CPU generator is deterministic), and the
bench reports the torch-vs-ONNX logit difference on the benchmark inputs, so a mismatch shows;
(3) ``--checkpoint`` (a facebookresearch / Hugging Face MAE checkpoint) with the head from
``--head`` or, failing that, from ``head.onnx``, whose initializers keep their parameter names;
(4) a bundle whose source weights, ``mae.pth`` (facebookresearch format) and ``head.pt``, lie in
its folder or, for the embedded default bundle, in ``cinemae/export/weights/`` paired with its
graphs by sha256 (:mod:`cinemae.export.source_weights`).
Otherwise the torch rows are error rows that say what to pass.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runtime.bundle import Bundle, BundleError, default_bundle_path, resolve_bundle
from .environment import cache_dir

_logger = logging.getLogger(__name__)

RANDOM_NOTE = "random weights: latency only"


class TorchUnavailable(RuntimeError):
    """The torch reference cannot run for this bundle (the message says why and what to pass)."""


@dataclass
class BenchTarget:
    """A bundle to benchmark and how to get its torch reference (model, head)."""

    bundle: Bundle
    origin: str  # "--bundle", "--arch vit-large", "embedded default", "tiny fallback"
    note: str  # "" or "random weights: latency only" / "untrained head: ..."
    torch_loader: Callable[[], tuple[Any, Any]]

    @property
    def random_weights(self) -> bool:
        return self.note == RANDOM_NOTE


def _provenance_ckpt(bundle: Bundle) -> dict[str, Any]:
    ck = bundle.manifest.get("provenance", {}).get("checkpoint", {})
    return ck if isinstance(ck, dict) else {}


def bundle_note(bundle: Bundle) -> str:
    """"random weights: latency only" for random-init backbones, a note for untrained heads."""
    if _provenance_ckpt(bundle).get("format") == "random-init":
        return RANDOM_NOTE
    if not bundle.trained:
        return "untrained head: scores are not calibrated"
    return ""


def _rebuild_random(bundle: Bundle) -> tuple[Any, Any]:
    """The torch model and head of a random-init bundle, from its recorded seed."""
    try:
        import torch
    except ImportError:
        raise TorchUnavailable("torch is not installed (pip install 'cinemae[export]')") from None
    from ..export.head import CinemaeHead, HeadConfig
    from ..export.model import MAEConfig, MaskedAutoencoderViT

    ck = _provenance_ckpt(bundle)
    torch.manual_seed(int(ck.get("init_seed", 0)))
    model = MaskedAutoencoderViT(MAEConfig.from_dict(bundle.manifest["backbone"])).eval()
    head = CinemaeHead(HeadConfig.from_dict(bundle.manifest["head"])).eval()
    return model, head


def head_from_onnx(bundle: Bundle) -> Any:
    """The head's torch module from ``head.onnx`` initializers (names are kept for the head)."""
    import onnx
    import torch
    from onnx import numpy_helper

    from ..export.head import CinemaeHead, HeadConfig

    head = CinemaeHead(HeadConfig.from_dict(bundle.manifest["head"])).eval()
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(bundle.graph("head"))).graph.initializer}
    sd = head.state_dict()
    missing = [k for k in sd if k not in inits]
    if missing:
        raise TorchUnavailable(f"head.onnx does not name the head's parameters ({missing[:3]}...); "
                               "pass --head HEAD.pt")
    head.load_state_dict({k: torch.from_numpy(inits[k].copy()).reshape(sd[k].shape) for k in sd})
    return head


def torch_loader_for(bundle: Bundle, checkpoint: str | None, head_path: str | None
                     ) -> Callable[[], tuple[Any, Any]]:
    """How the torch rows get weights for an existing bundle (see the module docstring)."""

    def load() -> tuple[Any, Any]:
        if checkpoint:
            try:
                from ..export.checkpoint import load_checkpoint
                from ..export.head import load_head
            except ImportError as e:
                raise TorchUnavailable(f"torch is not installed ({e})") from None
            model, _ = load_checkpoint(checkpoint, norm_pix=bundle.backbone.norm_pix)
            head = load_head(head_path)[0] if head_path else head_from_onnx(bundle)
            return model.eval(), head.eval()
        if _provenance_ckpt(bundle).get("format") == "random-init":
            return _rebuild_random(bundle)
        from ..export.source_weights import find_source_weights

        found = find_source_weights(bundle)
        if found is not None:
            try:
                from ..export.checkpoint import load_checkpoint
                from ..export.head import load_head
            except ImportError as e:
                raise TorchUnavailable(f"torch is not installed ({e})") from None
            model, _ = load_checkpoint(found[0], norm_pix=bundle.backbone.norm_pix)
            return model.eval(), load_head(str(found[1]))[0].eval()
        raise TorchUnavailable("this bundle holds only ONNX graphs (their weights are renamed and "
                               "folded by the exporter); pass --checkpoint MAE.pth [--head HEAD.pt] "
                               "for the torch reference rows")

    return load


def _arch_dir(arch: str, k: int, seed: int, fp16: bool) -> Path:
    return cache_dir() / "bench" / f"{arch}-k{k}-s{seed}{'-fp16' if fp16 else ''}"


def build_arch_target(arch: str, k: int = 2, seed: int = 0, fp16: bool = False,
                      log: Callable[[str], None] = _logger.info, origin: str | None = None) -> BenchTarget:
    """A random-weight bundle of preset ``arch`` (cached) and, in this process, its torch model
    built from the same seed. ``fp16`` also asks the exporter for FP16 graphs."""
    try:
        import torch
    except ImportError:
        raise BundleError(f"--arch {arch} builds a bundle with torch, which is not installed "
                          "(pip install 'cinemae[export]')") from None
    from ..export.bundle import ExportOptions, export_bundle
    from ..export.head import CinemaeHead, HeadConfig
    from ..export.model import MaskedAutoencoderViT, preset

    cfg = preset(arch)
    torch.manual_seed(seed)
    model = MaskedAutoencoderViT(cfg).eval()
    head = CinemaeHead(HeadConfig(cfg.embed_dim, k=k)).eval()
    out = _arch_dir(arch, k, seed, fp16)
    bundle = None
    if (out / "cinemae.json").is_file():
        try:
            b = Bundle(out)
            ck = _provenance_ckpt(b)
            if ck.get("arch") == arch and int(ck.get("init_seed", -1)) == seed and b.k == k \
                    and (not fp16 or "fp16" in b.precisions()):
                bundle = b
                log(f"using cached {arch} bundle {out}")
        except (BundleError, KeyError, ValueError, json.JSONDecodeError) as e:
            log(f"cached bundle {out} is unusable ({e}); rebuilding")
    if bundle is None:
        log(f"building a random-weight {arch} bundle in {out} (once; cached)")
        opts = ExportOptions(k=k, model_id=f"bench-{arch}", precisions=("fp32", "fp16") if fp16 else ("fp32",),
                             parity_random=2,
                             provenance={"checkpoint": {"format": "random-init", "arch": arch,
                                                        "init_seed": seed, "note": RANDOM_NOTE}})
        try:
            export_bundle(model, head, out, opts, log=lambda m: None)
        except ImportError as e:  # FP16 conversion not available in this install
            if not fp16:
                raise
            log(f"FP16 graphs could not be built ({e}); benchmarking fp32 graphs only")
            return build_arch_target(arch, k, seed, False, log, origin)
        bundle = Bundle(out)
    return BenchTarget(bundle, origin or f"--arch {arch}", RANDOM_NOTE, lambda: (model, head))


def resolve_target(bundle_path: str | None, arch: str | None, checkpoint: str | None = None,
                   head_path: str | None = None, k: int = 2, seed: int = 0, fp16: bool = False,
                   log: Callable[[str], None] = _logger.info) -> BenchTarget:
    """``--bundle`` / ``--arch`` / the embedded default / the tiny fallback (in that order)."""
    if arch:
        return build_arch_target(arch, k, seed, fp16, log)
    if bundle_path:
        b = resolve_bundle(bundle_path)  # a folder, or an embedded bundle's name
        return BenchTarget(b, f"--bundle {bundle_path}", bundle_note(b),
                           torch_loader_for(b, checkpoint, head_path))
    default = default_bundle_path()
    if default is not None:
        b = Bundle(default)
        return BenchTarget(b, "embedded default bundle", bundle_note(b),
                           torch_loader_for(b, checkpoint, head_path))
    log("no embedded default bundle in this install: using a tiny random-weight bundle "
        "(rows marked 'random weights: latency only')")
    return build_arch_target("tiny", k, seed, fp16, log, origin="tiny fallback (no embedded bundle)")
