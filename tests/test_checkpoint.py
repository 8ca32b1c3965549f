"""Checkpoint loading in the official formats, on randomly initialised checkpoints written in
each format, compared output-for-output with the model that wrote them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from cinemae.export.checkpoint import (  # noqa: E402
    CheckpointError,
    load_checkpoint,
    save_facebookresearch,
    to_hf_state_dict,
)
from cinemae.export.model import MaskedAutoencoderViT, preset  # noqa: E402


def outputs(m: MaskedAutoencoderViT) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = m.cfg
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, cfg.img_size, cfg.img_size, generator=g)
    shuffle = torch.argsort(torch.rand(2, cfg.num_patches, generator=g), dim=1)
    with torch.no_grad():
        t = m.forward_encoder(x, shuffle[:, : cfg.num_patches // 4])
        return t, m.forward_decoder(t, torch.argsort(shuffle, dim=1))


@pytest.mark.parametrize("arch", ["tiny", "tiny-p8", "tiny-224"])
@pytest.mark.parametrize("fname,target", [("mae_visualize_vit_tiny.pth", "pixel"),
                                          ("mae_finetuned_vit_tiny_full.pth", "norm_pix")])
def test_facebookresearch_roundtrip(tmp_path: Path, arch: str, fname: str, target: str) -> None:
    torch.manual_seed(1)
    src = MaskedAutoencoderViT(preset(arch)).eval()
    path = tmp_path / fname
    save_facebookresearch(src, path)
    assert set(torch.load(path, weights_only=True)) == {"model"}
    model, prov = load_checkpoint(path)
    assert prov == {"format": "facebookresearch", "file": fname, "target": target}
    assert model.cfg.norm_pix == (target == "norm_pix")
    for a, b in zip(outputs(src), outputs(model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["tiny", "tiny-224"])
def test_huggingface_state_dict(tmp_path: Path, arch: str) -> None:
    cfg = preset(arch).with_(norm_eps=1e-12)  # Hugging Face ViTMAE's layer_norm_eps
    torch.manual_seed(2)
    src = MaskedAutoencoderViT(cfg).eval()
    sd = to_hf_state_dict(src)
    assert "vit.encoder.layer.0.attention.attention.query.weight" in sd
    assert not any("qkv" in k for k in sd)
    d = tmp_path / "hf"
    d.mkdir()
    torch.save(sd, d / "pytorch_model.bin")
    (d / "config.json").write_text(json.dumps({
        "architectures": ["ViTMAEForPreTraining"], "layer_norm_eps": 1e-12, "norm_pix_loss": True,
        "num_attention_heads": cfg.num_heads, "decoder_num_attention_heads": cfg.decoder_num_heads}))
    model, prov = load_checkpoint(d / "pytorch_model.bin")
    assert prov["format"] == "hf" and prov["target"] == "norm_pix"
    assert model.cfg.norm_eps == 1e-12
    for a, b in zip(outputs(src), outputs(model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_encoder_only_checkpoint_is_refused_with_advice(tmp_path: Path) -> None:
    m = MaskedAutoencoderViT(preset("tiny"))
    sd = {k: v for k, v in m.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    path = tmp_path / "mae_pretrain_vit_large.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match="needs the decoder.*mae_visualize_vit_large.pth"):
        load_checkpoint(path)


@pytest.mark.parametrize("content,match", [
    (b"", "empty"),
    (b"not a checkpoint at all", "not a readable torch checkpoint"),
])
def test_unreadable_files(tmp_path: Path, content: bytes, match: str) -> None:
    p = tmp_path / "x.pth"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(p)


def test_pickled_code_is_not_run(tmp_path: Path) -> None:
    p = tmp_path / "evil.pth"
    torch.save({"model": {"x": object()}}, p)  # not loadable with weights_only
    with pytest.raises(CheckpointError, match="weights only"):
        load_checkpoint(p)


def test_wrong_dict_and_missing_keys(tmp_path: Path) -> None:
    p = tmp_path / "other.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, p)
    with pytest.raises(CheckpointError, match="not an MAE checkpoint"):
        load_checkpoint(p)
    sd = MaskedAutoencoderViT(preset("tiny")).state_dict()
    del sd["decoder_norm.bias"]
    torch.save({"model": sd}, p)
    with pytest.raises(CheckpointError, match="missing.*decoder_norm.bias"):
        load_checkpoint(p)
    assert not Path(tmp_path / "nope.pth").exists()
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.pth")
