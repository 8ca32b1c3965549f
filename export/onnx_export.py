"""ONNX export of the three graphs (DESIGN.md section 2, "Graphs").

encoder.onnx: image [B,3,H,W] float, ids_keep [B,n] int32 -> tokens [B,1+n,D]
decoder.onnx: tokens [R,1+n,D], ids_restore [R,L] int32 -> pred [R,L,P*P*3]   (R = B*K)
head.onnx:    global_tokens [B,1+L,D], stats [B,3] -> logit [B,1]
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..runtime.atomic import atomic_path
from .head import CinemaeHead
from .model import MaskedAutoencoderViT

OPSET = 17


class EncoderGraph(nn.Module):
    def __init__(self, model: MaskedAutoencoderViT) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        return self.model.forward_encoder(image, ids_keep)


class DecoderGraph(nn.Module):
    def __init__(self, model: MaskedAutoencoderViT) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        return self.model.forward_decoder(tokens, ids_restore)


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path,
            input_names: list[str], output_names: list[str],
            dynamic_axes: dict[str, dict[int, str]], output_shapes: dict[str, list[int | str]]
            ) -> Path:
    module.eval()
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(tmp), input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes,
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
        _set_output_shapes(tmp, output_shapes)
    return path


def _set_output_shapes(path: Path, shapes: dict[str, list[int | str]]) -> None:
    """Write the contract's output shapes (the exporter leaves names like 'Slicepred_dim_1')."""
    import onnx

    m = onnx.load(str(path))
    for out in m.graph.output:
        dims = out.type.tensor_type.shape.dim
        for d, want in zip(dims, shapes[out.name], strict=True):
            if isinstance(want, int):
                d.ClearField("dim_param")
                d.dim_value = want
            else:
                d.ClearField("dim_value")
                d.dim_param = want
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def export_encoder(model: MaskedAutoencoderViT, path: str | os.PathLike[str]) -> Path:
    cfg = model.cfg
    img = torch.zeros(2, 3, cfg.img_size, cfg.img_size)
    ids = torch.arange(cfg.num_patches, dtype=torch.int32).repeat(2, 1)[:, : max(1, cfg.num_patches // 4)]
    return _export(EncoderGraph(model), (img, ids), Path(path), ["image", "ids_keep"], ["tokens"],
                   {"image": {0: "batch"}, "ids_keep": {0: "batch", 1: "n"},
                    "tokens": {0: "batch", 1: "n_plus_1"}},
                   {"tokens": ["batch", "n_plus_1", cfg.embed_dim]})


def export_decoder(model: MaskedAutoencoderViT, path: str | os.PathLike[str], n_keep: int
                   ) -> Path:
    cfg = model.cfg
    tokens = torch.zeros(2, 1 + n_keep, cfg.embed_dim)
    restore = torch.arange(cfg.num_patches, dtype=torch.int32).repeat(2, 1)
    return _export(DecoderGraph(model), (tokens, restore), Path(path), ["tokens", "ids_restore"],
                   ["pred"], {"tokens": {0: "rows", 1: "n_plus_1"}, "ids_restore": {0: "rows"},
                              "pred": {0: "rows"}},
                   {"pred": ["rows", cfg.num_patches, cfg.patch_dim]})


def export_head(head: CinemaeHead, num_patches: int, path: str | os.PathLike[str]) -> Path:
    d = head.cfg.embed_dim
    args = (torch.zeros(2, 1 + num_patches, d), torch.zeros(2, 3))
    return _export(head, args, Path(path), ["global_tokens", "stats"], ["logit"],
                   {"global_tokens": {0: "batch"}, "stats": {0: "batch"}, "logit": {0: "batch"}},
                   {"logit": ["batch", 1]})


__all__ = ["OPSET", "EncoderGraph", "DecoderGraph", "export_encoder", "export_decoder",
           "export_head"]
