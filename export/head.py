"""The CINEMAE head, the only learned part (DESIGN.md section 1, "Head").

Standardises the statistics s [B, 3] and the pooled global feature g [B, D] with training-set
constants stored as buffers, computes ``delta = MLP_delta(s)``, fuses it with g (additive by
default; ``concat`` and ``gate`` for ablation) and classifies to one logit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

FUSIONS = ("add", "concat", "gate")
POOLINGS = ("cls", "mean")


@dataclass(frozen=True)
class HeadConfig:
    embed_dim: int
    fusion: str = "add"
    pooling: str = "cls"
    hidden: int = 256
    dropout: float = 0.1
    k: int = 2  # the number of masking runs this head was trained for

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class CinemaeHead(nn.Module):
    """global_tokens [B, 1+L, D], stats [B, 3] -> logit [B, 1]."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.register_buffer("s_mean", torch.zeros(3))
        self.register_buffer("s_std", torch.ones(3))
        self.register_buffer("g_mean", torch.zeros(d))
        self.register_buffer("g_std", torch.ones(d))
        self.mlp_delta = nn.Sequential(nn.Linear(3, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, d))
        if cfg.fusion == "gate":
            self.gate = nn.Linear(2 * d, d)
        fused = 2 * d if cfg.fusion == "concat" else d
        self.classifier = nn.Sequential(
            nn.Linear(fused, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, 1)
        )

    def pool(self, global_tokens: torch.Tensor) -> torch.Tensor:
        """[B, 1+L, D] -> g [B, D] (final-norm CLS token, or the mean of the patch tokens)."""
        if self.cfg.pooling == "mean":
            return global_tokens[:, 1:, :].mean(dim=1)
        return global_tokens[:, 0, :]

    def forward_features(self, g: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        """Pooled g [B, D] and stats [B, 3] -> logit [B, 1]."""
        g = (g - self.g_mean) / self.g_std
        s = (stats - self.s_mean) / self.s_std
        delta = self.mlp_delta(s)
        if self.cfg.fusion == "concat":
            h = torch.cat([g, delta], dim=-1)
        elif self.cfg.fusion == "gate":
            h = g * torch.sigmoid(self.gate(torch.cat([g, delta], dim=-1))) + delta
        else:
            h = g + delta
        return self.classifier(h)

    def forward(self, global_tokens: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        return self.forward_features(self.pool(global_tokens), stats)

    def set_standardisation(self, s_mean: Any, s_std: Any, g_mean: Any, g_std: Any) -> None:
        """Store training-set mean/std (std floored at 1e-6) as constants of the graph."""
        for name, value in (("s_mean", s_mean), ("s_std", s_std), ("g_mean", g_mean),
                            ("g_std", g_std)):
            t = torch.as_tensor(value, dtype=torch.float32).reshape(getattr(self, name).shape)
            if name.endswith("std"):
                t = t.clamp_min(1e-6)
            getattr(self, name).copy_(t)


def save_head(head: CinemaeHead, path: str, extra: dict[str, Any] | None = None) -> None:
    """Write ``{'config': ..., 'state_dict': ..., **extra}`` (the ``--head`` file format)."""
    torch.save({"config": head.cfg.to_dict(), "state_dict": head.state_dict(), **(extra or {})}, path)


def load_head(path: str) -> tuple[CinemaeHead, dict[str, Any]]:
    """Read a head file written by :func:`save_head`; returns the head and the whole record."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or "config" not in obj or "state_dict" not in obj:
        raise ValueError(f"{path}: not a CINEMAE head file (expected keys 'config', 'state_dict')")
    head = CinemaeHead(HeadConfig.from_dict(obj["config"]))
    head.load_state_dict(obj["state_dict"], strict=True)
    return head.eval(), obj
