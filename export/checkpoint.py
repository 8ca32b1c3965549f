"""Loading MAE checkpoints: facebookresearch/mae ``.pth`` files and Hugging Face
``ViTMAEForPreTraining`` state dicts (DESIGN.md section 1, "Backbone").

Everything is read with ``torch.load(..., weights_only=True)``; no pickled code runs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from .model import PRESETS, MAEConfig, MaskedAutoencoderViT


class CheckpointError(ValueError):
    """The file is not a usable MAE checkpoint; the message says why and what to do."""


ENCODER_ONLY_HINT = (
    "{name} holds only the MAE encoder (a 'mae_pretrain_*' file); CINEMAE needs the decoder to "
    "reconstruct masked patches. Use mae_visualize_vit_large.pth (pixel targets) or "
    "mae_visualize_vit_large_ganloss.pth / a '*_full.pth' checkpoint (norm-pix targets) from "
    "facebookresearch/mae instead."
)


HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """A checkpoint file, or a Hugging Face model folder -> its weights file."""
    p = Path(path)
    if p.is_dir():
        for name in HF_WEIGHTS:
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"{p}: a folder without {' or '.join(HF_WEIGHTS)} (a Hugging Face "
                              "ViTMAEForPreTraining folder written by save_pretrained is expected)")
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file or folder")
    return p


def _read(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: the file is empty")
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - optional dependency
            raise CheckpointError(f"{p}: reading .safetensors needs `pip install safetensors`") from e
        try:
            return load_file(str(p))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"{p}: not a readable .safetensors file ({msg}; truncated or "
                                  "corrupt?)") from None
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{p}: not a readable torch checkpoint with weights only ({msg})") from e


def infer_config(sd: dict[str, torch.Tensor], norm_pix: bool = False, norm_eps: float = 1e-6,
                 heads: int | None = None, decoder_heads: int | None = None, act: str = "gelu"
                 ) -> MAEConfig:
    """Read the architecture off a facebookresearch-layout state dict.

    Head counts are not in the weights: ``heads`` / ``decoder_heads`` when given, else those of
    the preset with the same shapes (MAE's ViT-B/L/H and this project's small ones). A shape no
    preset has, with a head count not given, is refused rather than guessed."""
    w = sd["patch_embed.proj.weight"]  # [D, C, P, P]
    d, c, p, _ = w.shape
    n = sd["pos_embed"].shape[1] - 1
    grid = int(round(n ** 0.5))
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    ddepth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"decoder_blocks\.(\d+)\.", k)))
    dd = sd["decoder_embed.weight"].shape[0]
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    dhidden = sd["decoder_blocks.0.mlp.fc1.weight"].shape[0]
    shape = (d, depth, dd, ddepth, p, hidden / d, dhidden / dd)
    match = next((c for c in PRESETS.values() if (
        c.embed_dim, c.depth, c.decoder_embed_dim, c.decoder_depth, c.patch_size, c.mlp_ratio,
        c.decoder_mlp_ratio or c.mlp_ratio) == shape), None)
    if match is None and (heads is None or decoder_heads is None):
        raise CheckpointError(
            f"the attention head counts are not stored in this checkpoint and its shape (width {d}, "
            f"depth {depth}, decoder width {dd}, depth {ddepth}, patch {p}) matches no known preset; "
            "give them with --heads N --decoder-heads M")
    return MAEConfig(img_size=grid * p, patch_size=p, in_chans=c, embed_dim=d, depth=depth,
                     num_heads=heads or match.num_heads, decoder_embed_dim=dd,
                     decoder_depth=ddepth, decoder_num_heads=decoder_heads or match.decoder_num_heads,
                     mlp_ratio=hidden / d,
                     decoder_mlp_ratio=None if dhidden * d == hidden * dd else dhidden / dd,
                     norm_eps=norm_eps, norm_pix=norm_pix, act=act)


def convert_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ViTMAEForPreTraining names -> facebookresearch names (q/k/v concatenated)."""
    out: dict[str, torch.Tensor] = {}
    simple = {
        "vit.embeddings.cls_token": "cls_token",
        "vit.embeddings.position_embeddings": "pos_embed",
        "vit.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "vit.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "vit.layernorm.weight": "norm.weight",
        "vit.layernorm.bias": "norm.bias",
        "decoder.mask_token": "mask_token",
        "decoder.decoder_pos_embed": "decoder_pos_embed",
        "decoder.decoder_embed.weight": "decoder_embed.weight",
        "decoder.decoder_embed.bias": "decoder_embed.bias",
        "decoder.decoder_norm.weight": "decoder_norm.weight",
        "decoder.decoder_norm.bias": "decoder_norm.bias",
        "decoder.decoder_pred.weight": "decoder_pred.weight",
        "decoder.decoder_pred.bias": "decoder_pred.bias",
    }
    layer = {
        "attention.output.dense": "attn.proj",
        "intermediate.dense": "mlp.fc1",
        "output.dense": "mlp.fc2",
        "layernorm_before": "norm1",
        "layernorm_after": "norm2",
    }
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, v in sd.items():
        if key in simple:
            out[simple[key]] = v
            continue
        # decoder layers: decoder.decoder_layers.N (transformers 4.x) or
        # decoder.decoder_encoder.layer.N (transformers 5.x)
        m = re.match(r"(vit\.encoder\.layer|decoder\.decoder_layers|decoder\.decoder_encoder\.layer)"
                     r"\.(\d+)\.(.+)\.(weight|bias)$", key)
        if not m:
            raise CheckpointError(f"unexpected key {key!r} in a Hugging Face ViTMAE state dict")
        prefix = "blocks" if m.group(1).startswith("vit") else "decoder_blocks"
        i, name, kind = m.group(2), m.group(3), m.group(4)
        qkv = re.match(r"attention\.attention\.(query|key|value)$", name)
        if qkv:
            pending.setdefault((f"{prefix}.{i}.attn.qkv", kind), {})[qkv.group(1)] = v
        elif name in layer:
            out[f"{prefix}.{i}.{layer[name]}.{kind}"] = v
        else:
            raise CheckpointError(f"unexpected key {key!r} in a Hugging Face ViTMAE state dict")
    for (base, kind), parts in pending.items():
        if set(parts) != {"query", "key", "value"}:
            raise CheckpointError(f"{base}: q/k/v incomplete in the Hugging Face state dict")
        out[f"{base}.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def detect_format(obj: Any) -> str:
    """'facebookresearch', 'hf' or raise CheckpointError."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"expected a dict of tensors, got {type(obj).__name__}")
    sd = obj.get("model", obj) if isinstance(obj.get("model", None), dict) else obj
    keys = set(sd)
    if any(k.startswith("vit.embeddings.") for k in keys):
        return "hf"
    if "patch_embed.proj.weight" in keys:
        return "facebookresearch"
    return "unknown"


def load_checkpoint(path: str | os.PathLike[str], norm_pix: bool | None = None,
                    config: MAEConfig | None = None, heads: int | None = None,
                    decoder_heads: int | None = None) -> tuple[MaskedAutoencoderViT, dict[str, Any]]:
    """Load a facebookresearch ``.pth`` (``{'model': state_dict}``) or a Hugging Face
    ``ViTMAEForPreTraining`` folder / weights file (``model.safetensors`` or ``pytorch_model.bin``
    beside its ``config.json``; decoder keys of transformers 4.x and 5.x alike).

    The target space: a filename with ``_full`` means norm-pix targets (facebookresearch's
    naming); ``visualize`` means pixel targets; Hugging Face folders record ``norm_pix_loss`` in
    their config.json. ``norm_pix`` overrides. ``heads`` / ``decoder_heads``: attention head counts
    for a facebookresearch file whose shape matches no preset (see :func:`infer_config`).
    Returns the model (eval mode) and provenance (format, file name, sha-free summary).
    """
    p = resolve_path(path)
    obj = _read(p)
    name = p.name
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p}: expected a dict of tensors, got {type(obj).__name__}")
    fmt = detect_format(obj)
    sd = obj["model"] if isinstance(obj.get("model"), dict) else obj
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    norm_eps, act = 1e-6, "gelu"
    hf_cfg: dict[str, Any] = {}
    if fmt == "hf":
        hf_cfg = _hf_config(p)
        norm_eps = float(hf_cfg.get("layer_norm_eps", 1e-12))
        act = str(hf_cfg.get("hidden_act", "gelu"))
        if norm_pix is None and "norm_pix_loss" in hf_cfg:
            norm_pix = bool(hf_cfg["norm_pix_loss"])
        heads = heads or int(hf_cfg["num_attention_heads"])
        decoder_heads = decoder_heads or int(hf_cfg["decoder_num_attention_heads"])
        if int(hf_cfg.get("num_channels", 3)) != 3:
            raise CheckpointError(f"{p.parent / 'config.json'}: num_channels="
                                  f"{hf_cfg['num_channels']}; CINEMAE scores RGB images and needs a "
                                  "3-channel MAE")
        if hf_cfg.get("qkv_bias", True) is not True:
            raise CheckpointError(f"{p.parent / 'config.json'}: qkv_bias=false is not supported "
                                  "(MAE's attention has q/k/v biases)")
        sd = convert_hf(sd)
    elif fmt == "facebookresearch":
        if "decoder_embed.weight" not in sd:
            raise CheckpointError(ENCODER_ONLY_HINT.format(name=name))
    else:
        if "mae_pretrain" in name:
            raise CheckpointError(ENCODER_ONLY_HINT.format(name=name))
        raise CheckpointError(
            f"{p}: not an MAE checkpoint (no 'patch_embed.proj.weight' or "
            "'vit.embeddings.*' keys); expected a facebookresearch/mae .pth or a Hugging Face "
            "ViTMAEForPreTraining state dict")
    if norm_pix is None:
        norm_pix = "_full" in name and "visualize" not in name
    try:
        if config is None:
            config = infer_config(sd, norm_pix=norm_pix, norm_eps=norm_eps, heads=heads,
                                  decoder_heads=decoder_heads, act=act)
        else:
            config = config.with_(norm_pix=norm_pix, norm_eps=norm_eps)
    except CheckpointError as e:
        raise CheckpointError(f"{p}: {e}") from None
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{p}: cannot read the architecture ({e})") from None
    if fmt == "hf":
        _check_hf_sizes(p, hf_cfg, config)
    model = MaskedAutoencoderViT(config)
    missing, unexpected = _strict_keys(model, sd)
    if missing or unexpected:
        raise CheckpointError(
            f"{p}: keys do not match the MAE layout (missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})")
    want = model.state_dict()
    bad = [f"{k} {tuple(v.shape)} (expected {tuple(want[k].shape)})" for k, v in sd.items()
           if tuple(v.shape) != tuple(want[k].shape)]
    if bad:
        raise CheckpointError(f"{p}: {len(bad)} tensor shape(s) do not match the MAE layout: "
                              + "; ".join(bad[:3]) + ("; ..." if len(bad) > 3 else ""))
    model.load_state_dict(sd, strict=True)
    return model.eval(), {"format": fmt, "file": name,
                          "target": "norm_pix" if norm_pix else "pixel"}


def _check_hf_sizes(p: Path, hf: dict[str, Any], cfg: MAEConfig) -> None:
    """config.json must describe the weights it sits beside."""
    have = {"hidden_size": cfg.embed_dim, "num_hidden_layers": cfg.depth,
            "decoder_hidden_size": cfg.decoder_embed_dim,
            "decoder_num_hidden_layers": cfg.decoder_depth, "patch_size": cfg.patch_size,
            "image_size": cfg.img_size, "intermediate_size": round(cfg.embed_dim * cfg.mlp_ratio),
            "decoder_intermediate_size": round(cfg.decoder_embed_dim
                                               * (cfg.decoder_mlp_ratio or cfg.mlp_ratio))}
    wrong = [f"{k}={hf[k]!r} (weights: {v})" for k, v in have.items() if k in hf and hf[k] != v]
    if wrong:
        raise CheckpointError(f"{p.parent / 'config.json'} does not describe {p.name}: "
                              + ", ".join(wrong))


def _strict_keys(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    want = set(model.state_dict())
    have = set(sd)
    return sorted(want - have), sorted(have - want)


def _hf_config(p: Path) -> dict[str, Any]:
    """The config.json beside Hugging Face weights: required (it holds the head counts, the
    activation and the layer-norm epsilon that the weights do not)."""
    import json

    cfg = p.parent / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{p}: Hugging Face weights without a config.json beside them (it "
                              "holds the head counts and activation); save the model with "
                              "save_pretrained")
    try:
        d = json.loads(cfg.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{cfg}: expected a JSON object")
    for key in ("num_attention_heads", "decoder_num_attention_heads"):
        if not isinstance(d.get(key), int) or isinstance(d.get(key), bool):
            raise CheckpointError(f"{cfg}: {key} missing or not an integer")
    return d


def save_facebookresearch(model: MaskedAutoencoderViT, path: str | os.PathLike[str]) -> None:
    """Write ``{'model': state_dict}`` as facebookresearch/mae does."""
    torch.save({"model": model.state_dict()}, str(path))


def to_hf_state_dict(model: MaskedAutoencoderViT) -> dict[str, torch.Tensor]:
    """facebookresearch names -> Hugging Face ViTMAEForPreTraining names (q/k/v split)."""
    sd = model.state_dict()
    inv = {
        "cls_token": "vit.embeddings.cls_token",
        "pos_embed": "vit.embeddings.position_embeddings",
        "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
        "norm.weight": "vit.layernorm.weight",
        "norm.bias": "vit.layernorm.bias",
        "mask_token": "decoder.mask_token",
        "decoder_pos_embed": "decoder.decoder_pos_embed",
    }
    layer = {"attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
             "mlp.fc2": "output.dense", "norm1": "layernorm_before", "norm2": "layernorm_after"}
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k in inv:
            out[inv[k]] = v
            continue
        m = re.match(r"(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$", k)
        if m:
            prefix = "vit.encoder.layer" if m.group(1) == "blocks" else "decoder.decoder_layers"
            i, name, kind = m.group(2), m.group(3), m.group(4)
            if name == "attn.qkv":
                for part, t in zip(("query", "key", "value"), v.chunk(3, dim=0), strict=True):
                    out[f"{prefix}.{i}.attention.attention.{part}.{kind}"] = t.clone()
            else:
                out[f"{prefix}.{i}.{layer[name]}.{kind}"] = v
        else:
            out[f"decoder.{k}"] = v  # decoder_embed / decoder_norm / decoder_pred
    return out
