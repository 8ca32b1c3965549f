"""The torch reference pipeline: the whole CINEMAE forward in eager torch.

Every exported form (ONNX fp32/fp16, TensorRT) and every runtime backend is checked against it,
and ``cinemae-bench`` times it as "the way a researcher runs the paper's model".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..runtime.masks import MaskSet, full_ids_keep
from .head import CinemaeHead
from .lcas import lcas_map, summary_stats
from .model import MaskedAutoencoderViT


@dataclass
class ReferenceOutput:
    """logit [B], stats [B, 3], global_tokens [B, 1+L, D], lcas [B, K, L], pred [B*K, L, P*P*3]."""

    logit: np.ndarray
    stats: np.ndarray
    global_tokens: np.ndarray
    lcas: np.ndarray
    pred: np.ndarray


class TorchReference:
    """Eager torch pipeline over a model and a head, with the runtime's masks and row order."""

    def __init__(self, model: MaskedAutoencoderViT, head: CinemaeHead, lam: float = 1.0,
                 device: str = "cpu") -> None:
        self.model = model.eval().to(device)
        self.head = head.eval().to(device)
        self.lam = lam
        self.device = device

    @torch.no_grad()
    def run(self, images: np.ndarray, masks: MaskSet, autocast_fp16: bool = False
            ) -> ReferenceOutput:
        """images [B, 3, H, W] float32 normalised -> ReferenceOutput."""
        dev = self.device
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(dev)
        b = x.shape[0]
        cfg = self.model.cfg
        ctx = (torch.autocast(device_type=dev.split(":")[0], dtype=torch.float16)
               if autocast_fp16 else torch.autocast(device_type="cpu", enabled=False))
        with ctx:
            g_tokens = self.model.forward_encoder(
                x, torch.from_numpy(full_ids_keep(b, cfg.num_patches)).to(dev)).float()
            k = masks.k
            if k:
                keep, restore = masks.tile(b)
                xk = x.repeat_interleave(k, dim=0)  # row b*K + k
                tokens = self.model.forward_encoder(xk, torch.from_numpy(keep).to(dev))
                pred = self.model.forward_decoder(tokens, torch.from_numpy(restore).to(dev)).float()
                vis = torch.from_numpy(masks.visible).to(dev)
                lmap = lcas_map(self.model.targets(x.float()), pred, vis, self.lam)
                stats = summary_stats(lmap, vis)
            else:
                pred = torch.zeros(0, cfg.num_patches, cfg.patch_dim, device=dev)
                lmap = torch.zeros(b, 0, cfg.num_patches, device=dev)
                stats = torch.zeros(b, 3, device=dev)
            logit = self.head(g_tokens.float(), stats.float().to(dev)).float()
        return ReferenceOutput(
            logit=logit[:, 0].cpu().numpy(), stats=stats.cpu().float().numpy(),
            global_tokens=g_tokens.cpu().numpy(), lcas=lmap.cpu().float().numpy(),
            pred=pred.cpu().numpy(),
        )
