"""The torch MAE reference over several configs (as timm tests one family over many configs)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cinemae.export.model import PRESETS, MaskedAutoencoderViT, preset, sincos_pos_embed  # noqa: E402
from cinemae.runtime.masks import full_ids_keep, make_masks  # noqa: E402

TINY = ["tiny", "tiny-p8", "tiny-224"]
# the photo backbones (32- and 64-px crops, 4- and 8-px patches) and the device run's
PHOTO = ["vit-micro-32-d12", "vit-micro-64-d12", "vit-micro-64p4-d12", "vit-tiny-32", "vit-tiny-64"]


@pytest.mark.parametrize("arch", TINY + PHOTO)
def test_shapes(arch: str) -> None:
    cfg = preset(arch)
    m = MaskedAutoencoderViT(cfg).eval()
    x = torch.randn(3, 3, cfg.img_size, cfg.img_size)
    masks = make_masks(cfg.num_patches, 2, 0.75, 0)
    keep, restore = masks.tile(3)
    with torch.no_grad():
        g = m.forward_encoder(x, torch.from_numpy(full_ids_keep(3, cfg.num_patches)))
        t = m.forward_encoder(x.repeat_interleave(2, 0), torch.from_numpy(keep))
        pred = m.forward_decoder(t, torch.from_numpy(restore))
    assert g.shape == (3, 1 + cfg.num_patches, cfg.embed_dim)
    assert t.shape == (6, 1 + masks.n_keep, cfg.embed_dim)
    assert pred.shape == (6, cfg.num_patches, cfg.patch_dim)


def mae_random_masking_forward(m: MaskedAutoencoderViT, x: torch.Tensor, noise: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """facebookresearch/mae's forward_encoder + forward_decoder with its random_masking, noise
    given: written from models_mae.py's algorithm to check our ids_keep / ids_restore interface."""
    cfg = m.cfg
    h = m.patch_embed(x) + m.pos_embed[:, 1:, :]
    n, L, D = h.shape
    len_keep = int(L * (1 - 0.75))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    h = torch.gather(h, 1, ids_keep.unsqueeze(-1).repeat(1, 1, D))
    cls = m.cls_token + m.pos_embed[:, :1, :]
    h = torch.cat([cls.expand(n, -1, -1), h], 1)
    for blk in m.blocks:
        h = blk(h)
    h = m.norm(h)
    y = m.decoder_embed(h)
    mask_tokens = m.mask_token.repeat(n, ids_restore.shape[1] + 1 - y.shape[1], 1)
    y_ = torch.cat([y[:, 1:, :], mask_tokens], 1)
    y_ = torch.gather(y_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, y.shape[2]))
    y = torch.cat([y[:, :1, :], y_], 1) + m.decoder_pos_embed
    for blk in m.decoder_blocks:
        y = blk(y)
    y = m.decoder_pred(m.decoder_norm(y))[:, 1:, :]
    assert y.shape[-1] == cfg.patch_dim
    return h, y


@pytest.mark.parametrize("arch", TINY)
def test_given_masks_match_mae_random_masking(arch: str) -> None:
    cfg = preset(arch)
    m = MaskedAutoencoderViT(cfg).eval()
    x = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    noise = torch.rand(2, cfg.num_patches)
    ids_shuffle = torch.argsort(noise, dim=1)
    n_keep = int(cfg.num_patches * 0.25)
    with torch.no_grad():
        h_ref, y_ref = mae_random_masking_forward(m, x, noise)
        h = m.forward_encoder(x, ids_shuffle[:, :n_keep].int())
        y = m.forward_decoder(h, torch.argsort(ids_shuffle, dim=1).int())
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(y, y_ref)


def test_global_pass_is_patch_order_and_unmasked() -> None:
    cfg = preset("tiny")
    m = MaskedAutoencoderViT(cfg).eval()
    x = torch.randn(1, 3, 32, 32)
    perm = torch.randperm(cfg.num_patches)[None]
    with torch.no_grad():
        a = m.forward_encoder(x, torch.arange(cfg.num_patches)[None])
        b = m.forward_encoder(x, perm)
    # attention is permutation-equivariant once positions are added: CLS is unchanged
    torch.testing.assert_close(a[:, 0], b[:, 0], atol=1e-5, rtol=1e-5)


def test_sincos_matches_mae_definition() -> None:
    e = sincos_pos_embed(8, 2)
    assert e.shape == (5, 8)
    assert np.all(e[0] == 0)
    # position (h=0, w=1): first half encodes w
    assert e[2, 0] == pytest.approx(np.sin(1.0)) and e[2, 4] == pytest.approx(0.0)


def test_presets_are_the_paper_sizes() -> None:
    assert (PRESETS["vit-large"].embed_dim, PRESETS["vit-large"].depth) == (1024, 24)
    assert PRESETS["vit-huge"].patch_size == 14 and PRESETS["vit-huge"].num_patches == 256
    for name in ("vit-base", "vit-large", "vit-huge"):
        assert (PRESETS[name].decoder_embed_dim, PRESETS[name].decoder_depth) == (512, 8)
    with pytest.raises(ValueError, match="unknown architecture"):
        preset("vit-giant")
