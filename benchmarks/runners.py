"""What the bench times: a runtime backend, or the torch reference, behind one interface.

Each runner's ``run(images [B, 3, H, W], masks)`` returns logits [B] and seconds per stage
(``global_encoder``, ``masked_encoder``, ``decoder``, ``lcas``, ``head``). GPU work is
synchronised before a clock is read (the runtime's GPU backends do this in their own timings;
the torch runner calls ``torch.cuda.synchronize``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..runtime.masks import MaskSet

STAGE_NAMES = ("global_encoder", "masked_encoder", "decoder", "lcas", "head")


def runtime_backends() -> tuple[str, ...]:
    """The runtime's backends, from its registry (cinemae.runtime.backends.registry), in
    ``auto`` order."""
    from ..runtime.backends.registry import specs

    return tuple(s.name for s in specs())


def all_backends() -> tuple[str, ...]:
    """Every row the bench can time: the runtime's backends and the torch reference."""
    return (*runtime_backends(), "torch")


def runs_on(backend: str, device: str) -> bool:
    """Whether a bench row ``backend`` on ``device`` ("cpu", "cuda", "cuda:1", ...) is a
    combination: the registry's declared devices for runtime backends, any device for torch."""
    from ..runtime.backends.registry import REGISTRY

    if backend not in REGISTRY:
        return True
    return device.split(":", 1)[0].split(".", 1)[0].lower() in REGISTRY[backend].devices


def cpu_reduced(backend: str) -> tuple[str, ...]:
    """The reduced precisions (bf16, int8) a bench row ``backend`` has on the CPU: the registry's
    for runtime backends (ONNX Runtime CPU int8, OpenVINO bf16/int8), bf16 autocast for torch."""
    from ..runtime.backends.registry import REGISTRY

    if backend == "torch":
        return ("bf16",)
    spec = REGISTRY.get(backend)
    return tuple(p for p in spec.precisions if p in ("bf16", "int8")) if spec else ()


class RuntimeRunner:
    """A :mod:`cinemae.runtime.backends` backend (TensorRT, ONNX Runtime CUDA or CPU)."""

    def __init__(self, bundle: Any, backend: str, device: str, precision: str,
                 threads: int | None = None) -> None:
        from ..runtime.backends import create_backend

        self.name = backend
        self.device = device
        self.precision = precision
        self.backend, _ = create_backend(bundle, backend, device, precision, threads)
        if getattr(self.backend, "name", backend) != backend:
            got = self.backend.name
            self.backend.close()
            raise RuntimeError(f"asked for {backend}, the runtime gave {got}")
        self.threads: int | str = threads or ("openvino default" if backend == "openvino" else "ort default")

    def run(self, images: np.ndarray, masks: MaskSet) -> tuple[np.ndarray, dict[str, float]]:
        out = self.backend.run(images, masks)
        return np.asarray(out.logit, dtype=np.float32), dict(out.timings)

    def close(self) -> None:
        self.backend.close()


class TorchRunner:
    """The torch reference (``cinemae.export.reference.TorchReference``), eager fp32, fp16
    autocast (GPU) or bf16 autocast (CPU: ``torch.autocast("cpu", dtype=torch.bfloat16)``, the
    first thing a torch user tries), timed stage by stage.

    The staged run repeats TorchReference.run's calls in the same order; the first warm-up call
    goes through TorchReference.run itself and the staged logits are checked against it
    (``reference_check`` = the largest |difference|)."""

    name = "torch"

    def __init__(self, model: Any, head: Any, lam: float, device: str, precision: str,
                 threads: int | None = None) -> None:
        import torch

        from ..export.reference import TorchReference

        if precision == "fp16" and not device.startswith("cuda"):
            raise RuntimeError("torch fp16 autocast is the GPU configuration; on the CPU the "
                               "reference runs in fp32 or bf16 autocast")
        if precision == "bf16" and device.startswith("cuda"):
            raise RuntimeError("torch bf16 autocast is a CPU row here; on the GPU the reference runs fp16")
        if precision not in ("fp32", "fp16", "bf16"):
            raise RuntimeError(f"the torch reference has no {precision} configuration")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device (CPU-only torch build or no GPU)")
        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads() if not device.startswith("cuda") else None
        self.torch = torch
        self.device = device
        self.precision = precision
        self.ref = TorchReference(model, head, lam, device)
        self.reference_check: float | None = None

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def _autocast(self):  # noqa: ANN202 - a torch autocast context
        torch = self.torch
        if self.precision == "fp16":
            return torch.autocast(device_type=self.device.split(":")[0], dtype=torch.float16)
        if self.precision == "bf16":
            return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
        return torch.autocast(device_type="cpu", enabled=False)

    def reference_logits(self, images: np.ndarray, masks: MaskSet) -> np.ndarray:
        """TorchReference.run itself (not timed)."""
        if self.precision == "bf16":
            # TorchReference has no bf16 switch: the same forward under the CPU autocast here
            staged, _ = self.run(images, masks)
            return staged
        return self.ref.run(images, masks, autocast_fp16=self.precision == "fp16").logit

    def run(self, images: np.ndarray, masks: MaskSet) -> tuple[np.ndarray, dict[str, float]]:
        torch = self.torch
        from ..export.lcas import lcas_map, summary_stats
        from ..runtime.masks import full_ids_keep

        ref, dev = self.ref, self.device
        model, cfg = ref.model, ref.model.cfg
        t: dict[str, float] = {}
        with torch.no_grad():
            with self._autocast():
                self._sync()
                t0 = time.perf_counter()
                x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(dev)
                b = x.shape[0]
                g_tokens = model.forward_encoder(
                    x, torch.from_numpy(full_ids_keep(b, cfg.num_patches)).to(dev)).float()
                self._sync()
                t1 = time.perf_counter()
                t["global_encoder"] = t1 - t0
                k = masks.k
                if k:
                    keep, restore = masks.tile(b)
                    xk = x.repeat_interleave(k, dim=0)
                    tokens = model.forward_encoder(xk, torch.from_numpy(keep).to(dev))
                    self._sync()
                    t2 = time.perf_counter()
                    pred = model.forward_decoder(tokens, torch.from_numpy(restore).to(dev)).float()
                    self._sync()
                    t3 = time.perf_counter()
                    vis = torch.from_numpy(masks.visible).to(dev)
                    lmap = lcas_map(model.targets(x.float()), pred, vis, ref.lam)
                    stats = summary_stats(lmap, vis)
                    self._sync()
                    t4 = time.perf_counter()
                    t.update(masked_encoder=t2 - t1, decoder=t3 - t2, lcas=t4 - t3)
                else:
                    stats = torch.zeros(b, 3, device=dev)
                    t4 = time.perf_counter()
                logit = ref.head(g_tokens.float(), stats.float().to(dev)).float()
                out = logit[:, 0].cpu().numpy()
                t["head"] = time.perf_counter() - t4
        return out, t

    def max_memory_mb(self) -> float | None:
        if self.device.startswith("cuda"):
            return self.torch.cuda.max_memory_allocated() / 2**20
        return None

    def reset_memory(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.reset_peak_memory_stats()

    def close(self) -> None:
        self.ref = None  # type: ignore[assignment]
