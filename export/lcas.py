"""LCAS and the summary statistics in torch: the reference the exported forms are checked
against (the same formulas as ``cinemae.runtime.lcas``, DESIGN.md section 1)."""

from __future__ import annotations

import torch

SIGMA2_FLOOR = 1e-2


def lcas_map(t: torch.Tensor, pred: torch.Tensor, visible: torch.Tensor, lam: float = 1.0
             ) -> torch.Tensor:
    """t [B, L, D] targets, pred [B*K, L, D] (row b*K+k), visible [K, L] bool
    -> [B, K, L] LCAS with NaN at visible patches."""
    k, num_patches = visible.shape
    b, _, d = t.shape
    t = t.double()
    tc = t.reshape(b, num_patches, d // 3, 3)
    w = visible.double()
    n = w.sum(dim=1)[None, :, None] * (d // 3)
    mean = torch.einsum("kj,bjc->bkc", w, tc.sum(2)) / n
    sq = torch.einsum("kj,bjc->bkc", w, (tc * tc).sum(2)) / n
    sigma2 = (sq - mean * mean).clamp_min(0) + SIGMA2_FLOOR  # [B, K, 3]
    r = t[:, None] - pred.double().reshape(b, k, num_patches, d)
    r2 = (r * r).reshape(b, k, num_patches, d // 3, 3)
    dev = 0.5 * ((r2 / sigma2[:, :, None, None, :]).mean(dim=(3, 4))
                 + sigma2.log().mean(-1)[:, :, None])
    out = dev + lam * r2.mean(dim=(3, 4))
    return out.masked_fill(visible[None], float("nan")).float()


def summary_stats(lmap: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """[B, K, L] map and visible [K, L] -> [B, 3] (s1 variability, s2 mean anomaly,
    s3 perturbation sensitivity)."""
    b, k = lmap.shape[:2]
    if k == 0:
        return torch.zeros(b, 3)
    a = lmap[:, ~visible].reshape(b, k, -1).double()  # [B, K, M]
    flat = a.reshape(b, -1)
    s1 = flat.std(dim=1, unbiased=False)
    s2 = flat.mean(dim=1)
    s3 = a.mean(dim=2).std(dim=1, unbiased=False) if k > 1 else torch.zeros(b, dtype=a.dtype)
    return torch.stack([s1, s2, s3], dim=1).float()
