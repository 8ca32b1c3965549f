"""FLOPs per image from the architecture and K (matmul and convolution only).

Counted as 2 * multiply-accumulates of every matmul/convolution, the convention of
``torch.utils.flop_counter`` (element-wise work - LayerNorm, softmax, GELU, the LCAS
statistics - is left out; it is a few percent of a ViT and not what the tensor units do).

With D the encoder width, H_e = int(D * mlp_ratio), depth E; Dd, H_d, depth Dp for the decoder;
L patches of p = P*P*3 values, n_keep visible patches per masking run, K runs:

    block(N, W, H)   = 2 * N * (3*W*W + W*W + 2*W*H) + 4 * N*N * W
                       (qkv, proj, fc1 + fc2, then q @ k^T and attn @ v over all heads)
    patch_embed      = 2 * L * p * D                       (the stride-P convolution, full image)
    encoder(n)       = patch_embed + E * block(n + 1, D, H_e)
    global_encoder   = encoder(L)                          (once per image)
    masked_encoder   = K * encoder(n_keep)                 (the patch embedding runs on the whole
                                                           image before the gather, so L again)
    decoder          = K * (2 * (n_keep + 1) * D * Dd      (decoder_embed)
                            + Dp * block(L + 1, Dd, H_d)
                            + 2 * (L + 1) * Dd * p)         (decoder_pred, CLS row included)
    lcas             = K * 2 * 2 * L * 3                   (the visible-set sums of t and t^2 per
                                                           colour channel, two [K,L] x [L,3]
                                                           contractions; the rest is element-wise)
    head             = 2 * (3*h + h*D)                     (MLP_delta, h = hidden, 256)
                       [+ 2 * 2D * D for ``gate`` fusion]
                       + 2 * (F*h + h)                     (classifier, F = D or 2D for concat)

K = 0 runs neither the masked encoder nor the decoder.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

STAGES = ("global_encoder", "masked_encoder", "decoder", "lcas", "head")


def block_flops(tokens: int, width: int, hidden: int) -> int:
    """One pre-norm transformer block on [B=1, N=tokens, width]."""
    n, w = tokens, width
    return 2 * n * (3 * w * w + w * w + 2 * w * hidden) + 4 * n * n * w


def encoder_flops(cfg: Mapping[str, Any], n_visible: int) -> int:
    """The encoder on one image with ``n_visible`` kept patches (tokens [1, 1+n, D])."""
    d = int(cfg["embed_dim"])
    p = int(cfg["patch_size"])
    c = int(cfg.get("in_chans", 3))
    num_patches = (int(cfg["img_size"]) // p) ** 2
    hidden = int(d * float(cfg.get("mlp_ratio", 4.0)))
    patch_embed = 2 * num_patches * (p * p * c) * d
    return patch_embed + int(cfg["depth"]) * block_flops(n_visible + 1, d, hidden)


def decoder_flops(cfg: Mapping[str, Any], n_keep: int) -> int:
    """One decoder row: tokens [1, 1+n_keep, D] -> pred [1, L, P*P*3]."""
    d = int(cfg["embed_dim"])
    dd = int(cfg["decoder_embed_dim"])
    p = int(cfg["patch_size"])
    c = int(cfg.get("in_chans", 3))
    num_patches = (int(cfg["img_size"]) // p) ** 2
    hidden = int(dd * float(cfg.get("mlp_ratio", 4.0)))
    embed = 2 * (n_keep + 1) * d * dd
    blocks = int(cfg["decoder_depth"]) * block_flops(num_patches + 1, dd, hidden)
    pred = 2 * (num_patches + 1) * dd * (p * p * c)
    return embed + blocks + pred


def head_flops(embed_dim: int, fusion: str = "add", hidden: int = 256) -> int:
    """The CINEMAE head on one image (pooling and standardisation are element-wise)."""
    d = embed_dim
    f = 2 * (3 * hidden + hidden * d)
    if fusion == "gate":
        f += 2 * (2 * d) * d
    fused = 2 * d if fusion == "concat" else d
    return f + 2 * (fused * hidden + hidden)


def flops_per_image(cfg: Mapping[str, Any], k: int, n_keep: int, fusion: str = "add",
                    hidden: int = 256) -> dict[str, int]:
    """FLOPs of one image through the whole pipeline, per stage and ``total``.

    cfg: the backbone config (``MAEConfig.to_dict()`` or a bundle manifest's ``backbone``).
    """
    num_patches = (int(cfg["img_size"]) // int(cfg["patch_size"])) ** 2
    out = {
        "global_encoder": encoder_flops(cfg, num_patches),
        "masked_encoder": k * encoder_flops(cfg, n_keep) if k else 0,
        "decoder": k * decoder_flops(cfg, n_keep) if k else 0,
        "lcas": k * 2 * 2 * num_patches * 3,
        "head": head_flops(int(cfg["embed_dim"]), fusion, hidden),
    }
    out["total"] = sum(out[s] for s in STAGES)
    return out


def bundle_flops(manifest: Mapping[str, Any], k: int) -> dict[str, int]:
    """:func:`flops_per_image` for a bundle manifest at K masking runs."""
    head = manifest.get("head", {})
    return flops_per_image(manifest["backbone"], k, int(manifest["n_keep"]),
                           head.get("fusion", "add"), int(head.get("hidden", 256)))
