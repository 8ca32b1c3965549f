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


# --- issue 16 items 18-21: checked against transformers' own ViTMAEForPreTraining -------------

transformers = pytest.importorskip("transformers")


def hf_model(act: str = "gelu", decoder_intermediate: int = 128, channels: int = 3):  # noqa: ANN201
    cfg = transformers.ViTMAEConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
        image_size=32, patch_size=4, decoder_hidden_size=32, decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4, decoder_intermediate_size=decoder_intermediate,
        hidden_act=act, num_channels=channels, mask_ratio=0.75)
    torch.manual_seed(5)
    m = transformers.ViTMAEForPreTraining(cfg).eval()
    with torch.no_grad():  # non-trivial biases and norms, so every parameter matters
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def write_hf(m, folder: Path, layout: str) -> Path:  # noqa: ANN001
    """Save as transformers itself does (5.x: decoder.decoder_encoder.layer.N); the 4.x layout is
    the documented rename of those keys to decoder.decoder_layers.N, in pytorch_model.bin."""
    m.save_pretrained(folder)
    if layout == "4.x":
        from safetensors.torch import load_file

        sd = load_file(str(folder / "model.safetensors"))
        assert any(k.startswith("decoder.decoder_encoder.layer.") for k in sd)
        (folder / "model.safetensors").unlink()
        torch.save({k.replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers."): v
                    for k, v in sd.items()}, folder / "pytorch_model.bin")
    return folder


def compare_with_hf(m, model: MaskedAutoencoderViT) -> None:  # noqa: ANN001
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 32, 32, generator=g)
    noise = torch.rand(2, 64, generator=g)
    with torch.no_grad():
        ref = m(pixel_values=x, noise=noise)
        latent = m.vit(pixel_values=x, noise=noise).last_hidden_state
        shuffle = torch.argsort(noise, dim=1)
        t = model.forward_encoder(x, shuffle[:, :16])
        pred = model.forward_decoder(t, torch.argsort(shuffle, dim=1))
    torch.testing.assert_close(t, latent, rtol=0, atol=1e-5)
    torch.testing.assert_close(pred, ref.logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", ["5.x", "4.x"])
@pytest.mark.parametrize("act", ["gelu", "relu", "gelu_pytorch_tanh", "gelu_new", "quick_gelu"])
def test_huggingface_layouts_and_activations(tmp_path: Path, layout: str, act: str) -> None:
    m = hf_model(act)
    folder = write_hf(m, tmp_path / "hf", layout)
    model, prov = load_checkpoint(folder)  # a folder is read as a Hugging Face folder
    assert prov["format"] == "hf" and model.cfg.act == act
    compare_with_hf(m, model)


def test_decoder_mlp_width_not_4x(tmp_path: Path) -> None:
    m = hf_model(decoder_intermediate=96)
    model, _ = load_checkpoint(write_hf(m, tmp_path / "hf", "5.x"))
    compare_with_hf(m, model)


@pytest.mark.parametrize("act", ["relu", "gelu_pytorch_tanh"])
def test_exported_graphs_follow_hidden_act(tmp_path: Path, act: str) -> None:
    import numpy as np
    import onnxruntime as ort

    from cinemae.export.cli import main as export_main

    m = hf_model(act)
    folder = write_hf(m, tmp_path / "hf", "5.x")
    out = tmp_path / "bundle"
    assert export_main(["--checkpoint", str(folder), "--out", str(out), "--k", "1",
                        "--tensorrt", "skip"]) == 0
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 32, 32, generator=g)
    noise = torch.rand(2, 64, generator=g)
    shuffle = torch.argsort(noise, dim=1)
    enc = ort.InferenceSession(str(out / "encoder.onnx"))
    dec = ort.InferenceSession(str(out / "decoder.onnx"))
    tokens = enc.run(None, {"image": x.numpy(), "ids_keep": shuffle[:, :16].numpy().astype(np.int32)})[0]
    pred = dec.run(None, {"tokens": tokens,
                          "ids_restore": torch.argsort(shuffle, dim=1).numpy().astype(np.int32)})[0]
    with torch.no_grad():
        ref = m(pixel_values=x, noise=noise).logits.numpy()
    np.testing.assert_allclose(pred, ref, atol=1e-4)


def test_unsupported_activation_is_refused_by_name(tmp_path: Path) -> None:
    folder = write_hf(hf_model("mish"), tmp_path / "hf", "5.x")
    with pytest.raises(CheckpointError, match="activation 'mish' is not supported"):
        load_checkpoint(folder)


def test_huggingface_folder_needs_a_valid_config(tmp_path: Path) -> None:
    folder = write_hf(hf_model(), tmp_path / "hf", "5.x")
    cfg = (folder / "config.json").read_text()
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="without a config.json"):
        load_checkpoint(folder)
    (folder / "config.json").write_text(cfg[:40])
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_checkpoint(folder)
    (folder / "config.json").write_text(json.dumps({**json.loads(cfg), "num_attention_heads": None}))
    with pytest.raises(CheckpointError, match="num_attention_heads missing or not an integer"):
        load_checkpoint(folder)
    (folder / "config.json").write_text(json.dumps({**json.loads(cfg), "hidden_size": 128}))
    with pytest.raises(CheckpointError, match="does not describe model.safetensors: hidden_size=128"):
        load_checkpoint(folder)


def test_num_channels_1_is_refused(tmp_path: Path) -> None:
    folder = write_hf(hf_model(channels=1), tmp_path / "hf", "5.x")
    with pytest.raises(CheckpointError, match="num_channels=1.*3-channel"):
        load_checkpoint(folder)


def test_truncated_safetensors(tmp_path: Path) -> None:
    from cinemae.export.cli import main as export_main

    folder = write_hf(hf_model(), tmp_path / "hf", "5.x")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable .safetensors file") as e:
        load_checkpoint(folder)
    assert "\n" not in str(e.value)
    assert export_main(["--checkpoint", str(folder), "--out", str(tmp_path / "o")]) == 2


ODD = dict(img_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=2, decoder_embed_dim=32,
           decoder_depth=1, decoder_num_heads=8)  # a shape no preset has


def test_head_counts_are_never_guessed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cinemae.export.cli import main as export_main
    from cinemae.export.model import MAEConfig

    torch.manual_seed(6)
    src = MaskedAutoencoderViT(MAEConfig(**ODD)).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "mae_visualize_odd.pth"
    save_facebookresearch(src, path)
    with pytest.raises(CheckpointError, match="matches no known preset.*--heads N --decoder-heads M"):
        load_checkpoint(path)
    model, _ = load_checkpoint(path, heads=2, decoder_heads=8)
    for a, b in zip(outputs(src), outputs(model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    out = tmp_path / "b"
    assert export_main(["--checkpoint", str(path), "--out", str(out), "--tensorrt", "skip"]) == 2
    assert "--heads N" in capsys.readouterr().err
    assert export_main(["--checkpoint", str(path), "--out", str(out), "--heads", "3",
                        "--decoder-heads", "8", "--tensorrt", "skip"]) == 2
    assert "not divisible by 3 attention heads" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "b.staging").exists()
    assert export_main(["--checkpoint", str(path), "--out", str(out), "--heads", "2",
                        "--decoder-heads", "8", "--tensorrt", "skip", "--k", "1"]) == 0
    assert json.loads((out / "cinemae.json").read_text())["backbone"]["decoder_num_heads"] == 8


def test_failed_export_leaves_no_staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cinemae.export.bundle as bundle_mod
    from cinemae.export.cli import main as export_main

    def fail(*a: object, **k: object) -> None:
        raise RuntimeError("simulated exporter failure")

    monkeypatch.setattr(bundle_mod, "export_decoder", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        export_main(["--arch", "tiny", "--out", str(tmp_path / "b"), "--tensorrt", "skip"])
    assert not (tmp_path / "b.staging").exists() and not (tmp_path / "b").exists()
