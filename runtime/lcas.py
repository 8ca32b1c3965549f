"""LCAS statistics, numpy reference (DESIGN.md section 1, "LCAS" and "Summary statistics").

This is the reference the fused CUDA kernel (``cinemae.kernels``) is checked against. The big
arrays are float32, every sum over them and everything after is float64, and it returns float32
(:func:`lcas_map_reference` is the same formula written directly in float64).

Row order of the masked pass: row ``b * K + k`` of ``pred`` is image b under run k.
"""

from __future__ import annotations

import numpy as np

SIGMA2_FLOOR = 1e-2
NORM_PIX_EPS = 1e-6


def patchify(images: np.ndarray, patch_size: int) -> np.ndarray:
    """[B, 3, H, W] -> [B, L, P*P*3], channel-last inside each patch (MAE ``patchify``)."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = x.transpose(0, 2, 4, 3, 5, 1)  # [B, h, w, p, q, c]
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def targets(images: np.ndarray, patch_size: int, norm_pix: bool, dtype: type = np.float64) -> np.ndarray:
    """Target patches t [B, L, P*P*3] in ``dtype`` (float64 by default); per-patch standardised
    for norm-pix backbones.

    The per-patch standardisation is MAE's: (t - mean) / sqrt(var + 1e-6) with the unbiased
    variance (torch ``Tensor.var`` default), as the ``*_full`` checkpoints were trained; its
    mean and variance are taken in float64 whatever ``dtype`` is.
    """
    t = np.ascontiguousarray(patchify(np.asarray(images, dtype=dtype), patch_size))
    if norm_pix:
        mean = t.mean(axis=-1, keepdims=True, dtype=np.float64)
        var = t.var(axis=-1, ddof=1, keepdims=True, dtype=np.float64)
        t = ((t - mean) / np.sqrt(var + NORM_PIX_EPS)).astype(dtype, copy=False)
    return t


def _channel_selector(d: int) -> np.ndarray:
    """[D, 3] float32 one-hot: column c picks the dimensions of colour channel c (d % 3 == c)."""
    sel = np.zeros((d, 3), dtype=np.float32)
    sel[np.arange(d), np.arange(d) % 3] = 1.0
    return sel


def lcas_map(
    images: np.ndarray,
    pred: np.ndarray,
    visible: np.ndarray,
    patch_size: int,
    lam: float = 1.0,
    norm_pix: bool = False,
) -> np.ndarray:
    """Per-patch LCAS.

    images:  [B, 3, H, W] normalised image batch
    pred:    [B*K, L, P*P*3] decoder output, row b*K + k
    visible: [K, L] bool, True where patch i is visible in run k
    returns: [B, K, L] float32, LCAS_k,i for masked patches and NaN for visible ones

    The big arrays stay float32 and are touched three times: one residual buffer [B, K, L, D]
    (r = t - mu, squared in place), then one matmul with a [D, 3] channel selector gives the
    per-channel sums of r^2 [B, K, L, 3]. Everything after that, and the context variance, is
    float64 on arrays of B*K*L*3 values, so the result matches the float64 formulation
    (:func:`lcas_map_reference`) within ~1e-6 relative.
    """
    visible = np.asarray(visible, dtype=bool)
    k, num_patches = visible.shape
    b = images.shape[0]
    t = targets(images, patch_size, norm_pix, dtype=np.float32)  # [B, L, D]
    if pred.shape[0] != b * k or pred.shape[1:] != t.shape[1:]:
        raise ValueError(f"pred {pred.shape} does not match B*K={b * k} rows of {t.shape[1:]}")
    d = t.shape[-1]
    sel = _channel_selector(d)
    # context variance per channel over the visible patches (float64 sums of float32 values)
    t_sum = (t.reshape(-1, d) @ sel).reshape(b, num_patches, 3).astype(np.float64)  # [B, L, 3]
    t_sq = (np.square(t).reshape(-1, d) @ sel).reshape(b, num_patches, 3).astype(np.float64)
    w = visible.astype(np.float64)  # [K, L]
    n = w.sum(axis=1)[None, :, None] * (d // 3)  # values per channel in the context
    mean = np.einsum("kj,bjc->bkc", w, t_sum) / n
    sigma2 = np.maximum(np.einsum("kj,bjc->bkc", w, t_sq) / n - mean * mean, 0.0) + SIGMA2_FLOOR  # [B, K, 3]

    r = np.subtract(t[:, None], np.asarray(pred, dtype=np.float32).reshape(b, k, num_patches, d),
                    dtype=np.float32)  # [B, K, L, D]
    np.square(r, out=r)
    q = (r.reshape(-1, d) @ sel).reshape(b, k, num_patches, 3).astype(np.float64)  # sum_d in c of r^2
    scaled = np.einsum("bklc,bkc->bkl", q, 1.0 / sigma2) / d  # mean_d r^2 / sigma2_c(d)
    dev = 0.5 * (scaled + np.log(sigma2).mean(axis=-1)[:, :, None])
    err = q.sum(axis=-1) / d
    out = dev + lam * err
    out[:, visible] = np.nan
    return out.astype(np.float32)


def lcas_map_reference(
    images: np.ndarray,
    pred: np.ndarray,
    visible: np.ndarray,
    patch_size: int,
    lam: float = 1.0,
    norm_pix: bool = False,
) -> np.ndarray:
    """:func:`lcas_map` written directly in float64 (slower, more memory): the reference the
    fast version is tested against. Same arguments and result."""
    visible = np.asarray(visible, dtype=bool)
    k, num_patches = visible.shape
    b = images.shape[0]
    t = targets(images, patch_size, norm_pix)  # [B, L, D]
    if pred.shape[0] != b * k or pred.shape[1:] != t.shape[1:]:
        raise ValueError(f"pred {pred.shape} does not match B*K={b * k} rows of {t.shape[1:]}")
    d = t.shape[-1]
    tc = t.reshape(b, num_patches, d // 3, 3)  # channel c = d % 3
    w = visible.astype(np.float64)  # [K, L]
    n = w.sum(axis=1)[None, :, None] * (d // 3)  # values per channel in the context
    s1 = np.einsum("kj,bjc->bkc", w, tc.sum(axis=2))
    s2 = np.einsum("kj,bjc->bkc", w, (tc * tc).sum(axis=2))
    mean = s1 / n
    sigma2 = np.maximum(s2 / n - mean * mean, 0.0) + SIGMA2_FLOOR  # [B, K, 3]

    r = t[:, None] - pred.astype(np.float64).reshape(b, k, num_patches, d)  # [B, K, L, D]
    r2 = (r * r).reshape(b, k, num_patches, d // 3, 3)
    scaled = (r2 / sigma2[:, :, None, None, :]).mean(axis=(3, 4))  # [B, K, L]
    dev = 0.5 * (scaled + np.log(sigma2).mean(axis=-1)[:, :, None])
    err = r2.mean(axis=(3, 4))
    out = dev + lam * err
    out[:, visible] = np.nan
    return out.astype(np.float32)


def stats_from_map(lmap: np.ndarray) -> np.ndarray:
    """[B, K, L] LCAS map (NaN at visible patches) -> [B, 3] (s1 variability, s2 mean anomaly,
    s3 perturbation sensitivity). K=0 gives zeros; s3 is 0 when K=1."""
    b, k = lmap.shape[:2]
    if k == 0:
        return np.zeros((b, 3), dtype=np.float32)
    masked = ~np.isnan(lmap[0])  # [K, L], the same for every image
    m = int(masked[0].sum())
    a = lmap[:, masked].reshape(b, k, m).astype(np.float64)  # [B, K, M]
    s1 = a.reshape(b, -1).std(axis=1)
    s2 = a.reshape(b, -1).mean(axis=1)
    s3 = a.mean(axis=2).std(axis=1)
    return np.stack([s1, s2, s3], axis=1).astype(np.float32)


def lcas_stats(
    images: np.ndarray,
    pred: np.ndarray,
    visible: np.ndarray,
    patch_size: int,
    lam: float = 1.0,
    norm_pix: bool = False,
) -> np.ndarray:
    """Summary statistics [B, 3] from images [B, 3, H, W] and pred [B*K, L, P*P*3]."""
    visible = np.asarray(visible, dtype=bool)
    if visible.shape[0] == 0:
        return np.zeros((images.shape[0], 3), dtype=np.float32)
    return stats_from_map(lcas_map(images, pred, visible, patch_size, lam, norm_pix))
