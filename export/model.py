"""MAE ViT reference model in the facebookresearch/mae parameter layout.

The encoder and decoder take given masks (``ids_keep`` / ``ids_restore``) instead of drawing
them, so the torch reference, the ONNX graphs and the runtime all see the same masks. Parameter
names match ``models_mae.py`` so official checkpoints load with a strict key match.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class MAEConfig:
    """Backbone architecture. ``norm_pix`` records the target space (pixels or per-patch
    normalised pixels) the decoder was trained to predict."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    norm_pix: bool = False
    act: str = "gelu"  # MLP activation (Hugging Face ``hidden_act`` names; see ACTIVATIONS)
    decoder_mlp_ratio: float | None = None  # None: the encoder's mlp_ratio

    def __post_init__(self) -> None:
        if self.in_chans != 3:
            raise ValueError(f"num_channels={self.in_chans}: CINEMAE scores RGB images and needs a "
                             "3-channel MAE")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"activation {self.act!r} is not supported (supported: "
                             f"{', '.join(sorted(ACTIVATIONS))})")
        for name, dim, heads in (("encoder", self.embed_dim, self.num_heads),
                                 ("decoder", self.decoder_embed_dim, self.decoder_num_heads)):
            if heads < 1 or dim % heads:
                raise ValueError(f"{name} width {dim} is not divisible by {heads} attention heads")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_chans

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MAEConfig:
        fields = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in fields})

    def with_(self, **kw: Any) -> MAEConfig:
        return replace(self, **kw)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x) (CLIP's ``quick_gelu``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


#: Hugging Face ``hidden_act`` names -> the module computing it (gelu_new, gelu_fast and
#: gelu_pytorch_tanh are all the tanh approximation of GELU)
ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_fast": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": lambda: nn.ReLU(),
    "quick_gelu": lambda: QuickGELU(),
    "silu": lambda: nn.SiLU(),
    "swish": lambda: nn.SiLU(),
}


PRESETS: dict[str, MAEConfig] = {
    "vit-base": MAEConfig(embed_dim=768, depth=12, num_heads=12),
    "vit-large": MAEConfig(embed_dim=1024, depth=24, num_heads=16),
    "vit-huge": MAEConfig(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    # small configs for tests and the 32-px demonstration backbone
    "tiny": MAEConfig(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4,
                      decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4),
    "tiny-p8": MAEConfig(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3,
                         decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2),
    "tiny-224": MAEConfig(img_size=224, patch_size=16, embed_dim=64, depth=1, num_heads=2,
                          decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2),
    "vit-tiny-32": MAEConfig(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3,
                             decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    # the embedded demonstration backbone (runtime/bundles/cifake32): sized for a CPU pretraining
    # run and a bundle of a few MB
    "vit-mini-32": MAEConfig(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3,
                             decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    "vit-micro-32": MAEConfig(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4,
                              decoder_embed_dim=96, decoder_depth=2, decoder_num_heads=4),
    # the micro backbone at twice the depth: grown from a depth-6 run (pretrain_mae --grow-depth)
    "vit-micro-32-d12": MAEConfig(img_size=32, patch_size=4, embed_dim=128, depth=12, num_heads=4,
                                  decoder_embed_dim=96, decoder_depth=2, decoder_num_heads=4),
    # the same transformer on 64-px crops cut into 8-px patches: the same 8 x 8 token grid (so the same
    # cost per crop) over four times the picture; grown from a 32-px run (pretrain_mae --grow-patch)
    "vit-micro-64-d12": MAEConfig(img_size=64, patch_size=8, embed_dim=128, depth=12, num_heads=4,
                                  decoder_embed_dim=96, decoder_depth=2, decoder_num_heads=4),
    # the same transformer on 64-px crops in 4-px patches: a 16 x 16 token grid, four times the picture at
    # the 32-px backbone's resolution (four times the cost per crop, a quarter of the crops per photo);
    # grown from a 32-px run (pretrain_mae --grow-grid)
    "vit-micro-64p4-d12": MAEConfig(img_size=64, patch_size=4, embed_dim=128, depth=12, num_heads=4,
                                    decoder_embed_dim=96, decoder_depth=2, decoder_num_heads=4),
    # ViT-Tiny's width on section 21's window (64-px crops in 8-px patches, an 8 x 8 grid): the device run's
    # backbone (train/RECIPE.md section 16), pretrained from scratch where a GPU gives it the crops
    "vit-tiny-64": MAEConfig(img_size=64, patch_size=8, embed_dim=192, depth=12, num_heads=3,
                             decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
}


def preset(name: str) -> MAEConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(PRESETS)}") from None


def sincos_pos_embed(dim: int, grid: int, cls_token: bool = True) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding as in MAE: [1+grid*grid, dim] (cls row zero)."""
    gh = np.arange(grid, dtype=np.float64)
    gw = np.arange(grid, dtype=np.float64)
    mesh = np.meshgrid(gw, gh)  # w goes first, as in MAE
    pos = np.stack(mesh, axis=0).reshape(2, 1, grid, grid)

    def one_d(d: int, p: np.ndarray) -> np.ndarray:
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", p.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(dim // 2, pos[0]), one_d(dim // 2, pos[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return emb.astype(np.float32)


class PatchEmbed(nn.Module):
    """[B, 3, H, W] -> [B, L, D] by a stride-P convolution (``patch_embed.proj``)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, D] -> [B, N, D]
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, h, N, d/h]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm ``Block`` names: norm1, attn, norm2, mlp)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float,
                 act: str = "gelu") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, round(dim * mlp_ratio), act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MaskedAutoencoderViT(nn.Module):
    """MAE with given masks: ``forward_encoder`` / ``forward_decoder`` as in models_mae.py."""

    def __init__(self, cfg: MAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, dd = cfg.embed_dim, cfg.decoder_embed_dim
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, d)
        n = cfg.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, d), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(d, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, cfg.act) for _ in range(cfg.depth)]
        )
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)

        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, dd), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(dd, cfg.decoder_num_heads, cfg.decoder_mlp_ratio or cfg.mlp_ratio, cfg.norm_eps,
                   cfg.act) for _ in range(cfg.decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(dd, eps=cfg.norm_eps)
        self.decoder_pred = nn.Linear(dd, cfg.patch_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAE's initialisation: fixed sin-cos position embeddings, xavier linears."""
        g = self.cfg.grid
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed(self.cfg.embed_dim, g))[None])
        self.decoder_pos_embed.data.copy_(
            torch.from_numpy(sincos_pos_embed(self.cfg.decoder_embed_dim, g))[None]
        )
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.LayerNorm):
                nn.init.constant_(m.bias, 0)
                nn.init.constant_(m.weight, 1.0)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, L, P*P*3] (channel-last inside the patch)."""
        p = self.cfg.patch_size
        b, c, h, w = imgs.shape
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def forward_encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """imgs [B, 3, H, W], ids_keep [B, n] (int) -> tokens [B, 1+n, D] after the final norm."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]  # [B, L, D]
        idx = ids_keep.long().unsqueeze(-1).expand(-1, -1, x.shape[-1])
        x = torch.gather(x, 1, idx)  # [B, n, D]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """tokens [R, 1+n, D], ids_restore [R, L] (int) -> pred [R, L, P*P*3]."""
        x = self.decoder_embed(tokens)  # [R, 1+n, Dd]
        r, n1, dd = x.shape
        num_mask = ids_restore.shape[1] + 1 - n1
        mask_tokens = self.mask_token.expand(r, num_mask, dd)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # [R, L, Dd] in shuffle order
        idx = ids_restore.long().unsqueeze(-1).expand(-1, -1, dd)
        x_ = torch.gather(x_, 1, idx)  # back to patch order
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """Target patches [B, L, P*P*3] in the backbone's target space."""
        t = self.patchify(imgs)
        if self.cfg.norm_pix:
            mean = t.mean(dim=-1, keepdim=True)
            var = t.var(dim=-1, keepdim=True)
            t = (t - mean) / (var + 1.0e-6) ** 0.5
        return t
