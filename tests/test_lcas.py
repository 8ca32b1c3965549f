"""LCAS statistics: numpy reference vs torch vs a plain loop written from DESIGN.md's formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cinemae.runtime.lcas import lcas_map, lcas_stats, patchify, stats_from_map
from cinemae.runtime.masks import make_masks


def plain_loop_stats(images, pred, visible, p, lam, norm_pix):  # noqa: ANN001, ANN201
    """Straight from the design text, one number at a time (slow, for small shapes only)."""
    B, _, H, W = images.shape
    K, L = visible.shape
    g = W // p
    out = []
    for b in range(B):
        t = []
        for i in range(L):
            r, c = divmod(i, g)
            patch = [float(images[b, ch, r * p + y, c * p + x])
                     for y in range(p) for x in range(p) for ch in range(3)]
            if norm_pix:
                m = sum(patch) / len(patch)
                var = sum((v - m) ** 2 for v in patch) / (len(patch) - 1)
                patch = [(v - m) / math.sqrt(var + 1e-6) for v in patch]
            t.append(patch)
        A = []
        for k in range(K):
            sig = []
            for ch in range(3):
                vals = [t[j][d] for j in range(L) if visible[k, j] for d in range(ch, 3 * p * p, 3)]
                mu = sum(vals) / len(vals)
                sig.append(sum((v - mu) ** 2 for v in vals) / len(vals) + 1e-2)
            row = []
            for i in range(L):
                if visible[k, i]:
                    continue
                rr = [t[i][d] - float(pred[b * K + k, i, d]) for d in range(3 * p * p)]
                dev = 0.5 * sum(rr[d] ** 2 / sig[d % 3] + math.log(sig[d % 3])
                                for d in range(len(rr))) / len(rr)
                err = sum(x * x for x in rr) / len(rr)
                row.append(dev + lam * err)
            A.append(row)
        flat = [a for row in A for a in row]
        m = sum(flat) / len(flat)
        s1 = math.sqrt(sum((a - m) ** 2 for a in flat) / len(flat))
        means = [sum(row) / len(row) for row in A]
        mm = sum(means) / K
        s3 = math.sqrt(sum((x - mm) ** 2 for x in means) / K)
        out.append([s1, m, s3])
    return np.asarray(out)


CASES = [  # (B, K, H, P, lam, norm_pix)
    (2, 2, 16, 4, 1.0, False),
    (1, 1, 8, 2, 0.5, False),
    (3, 3, 16, 4, 2.0, True),
    (2, 4, 12, 4, 1.0, True),
]


@pytest.mark.parametrize("B,K,H,P,lam,norm_pix", CASES)
def test_numpy_matches_plain_loop(B, K, H, P, lam, norm_pix) -> None:  # noqa: ANN001
    rng = np.random.default_rng(B * 100 + K)
    L = (H // P) ** 2
    images = rng.standard_normal((B, 3, H, H)).astype(np.float32)
    pred = rng.standard_normal((B * K, L, P * P * 3)).astype(np.float32)
    masks = make_masks(L, K, 0.75, seed=K)
    got = lcas_stats(images, pred, masks.visible, P, lam, norm_pix)
    want = plain_loop_stats(images, pred, masks.visible, P, lam, norm_pix)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    if K == 1:
        assert np.all(got[:, 2] == 0)


@pytest.mark.parametrize("B,K,H,P,lam,norm_pix", CASES)
def test_numpy_matches_torch(B, K, H, P, lam, norm_pix) -> None:  # noqa: ANN001
    torch = pytest.importorskip("torch")
    from cinemae.export import lcas as tl
    from cinemae.export.model import MAEConfig, MaskedAutoencoderViT

    rng = np.random.default_rng(7 + K)
    L = (H // P) ** 2
    images = rng.standard_normal((B, 3, H, H)).astype(np.float32)
    pred = rng.standard_normal((B * K, L, P * P * 3)).astype(np.float32)
    vis = make_masks(L, K, 0.75, seed=3).visible
    m = MaskedAutoencoderViT(MAEConfig(img_size=H, patch_size=P, embed_dim=8, depth=0, num_heads=1,
                                       decoder_embed_dim=8, decoder_depth=0, decoder_num_heads=1,
                                       norm_pix=norm_pix))
    t = m.targets(torch.from_numpy(images))
    tmap = tl.lcas_map(t, torch.from_numpy(pred), torch.from_numpy(vis), lam)
    nmap = lcas_map(images, pred, vis, P, lam, norm_pix)
    np.testing.assert_allclose(tmap.numpy(), nmap, rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(tl.summary_stats(tmap, torch.from_numpy(vis)).numpy(),
                               stats_from_map(nmap), rtol=1e-5, atol=1e-6)


def test_map_nan_exactly_at_visible_patches() -> None:
    rng = np.random.default_rng(0)
    masks = make_masks(16, 3, 0.75, 0)
    lmap = lcas_map(rng.standard_normal((2, 3, 16, 16)), rng.standard_normal((6, 16, 48)),
                    masks.visible, 4)
    assert lmap.shape == (2, 3, 16)
    assert np.array_equal(np.isnan(lmap), np.broadcast_to(masks.visible, lmap.shape))


def test_k0_is_zero_and_uniform_image_is_finite() -> None:
    masks = make_masks(16, 0)
    assert lcas_stats(np.zeros((2, 3, 16, 16), np.float32), np.zeros((0, 16, 48), np.float32),
                      masks.visible, 4).tolist() == [[0, 0, 0], [0, 0, 0]]
    masks = make_masks(16, 2)
    s = lcas_stats(np.zeros((1, 3, 16, 16), np.float32), np.zeros((2, 16, 48), np.float32),
                   masks.visible, 4, norm_pix=True)
    assert np.all(np.isfinite(s))
    # a perfectly predicted uniform image: dev = 0.5 * log(floor)
    assert s[0, 1] == pytest.approx(0.5 * math.log(1e-2), rel=1e-6)


def test_patchify_layout_is_channel_last() -> None:
    img = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    p = patchify(img, 2)
    assert p.shape == (2, 4, 12)
    # patch 1 = top-right 2x2 block; dimension d = (y*P + x)*3 + c
    assert p[0, 1, (0 * 2 + 1) * 3 + 2] == img[0, 2, 0, 3]


class TestMasks:
    def test_deterministic_and_prefix(self) -> None:
        a = make_masks(196, 4, 0.75, 0)
        b = make_masks(196, 4, 0.75, 0)
        c = make_masks(196, 2, 0.75, 0)
        assert np.array_equal(a.ids_keep, b.ids_keep)
        assert np.array_equal(a.ids_keep[:2], c.ids_keep)
        assert not np.array_equal(a.ids_keep, make_masks(196, 4, 0.75, 1).ids_keep)

    def test_design_definition(self) -> None:
        m = make_masks(196, 2, 0.75, 5)
        rng = np.random.default_rng(5)
        for k in range(2):
            shuffle = np.argsort(rng.random(196))
            assert np.array_equal(m.ids_keep[k], shuffle[:49])
            assert np.array_equal(m.ids_restore[k], np.argsort(shuffle))
        assert m.ids_keep.dtype == np.int32 and m.ids_restore.dtype == np.int32
        assert m.visible.sum(axis=1).tolist() == [49, 49]

    def test_tile_row_order(self) -> None:
        m = make_masks(16, 3, 0.5, 0)
        keep, restore = m.tile(2)
        assert keep.shape == (6, 8) and restore.shape == (6, 16)
        assert np.array_equal(keep[1 * 3 + 2], m.ids_keep[2])

    @pytest.mark.parametrize("bad", [dict(k=-1), dict(mask_ratio=1.0), dict(mask_ratio=0.99)])
    def test_bad_parameters(self, bad: dict) -> None:
        kw = dict(num_patches=16, k=2, mask_ratio=0.75) | bad
        with pytest.raises(ValueError):
            make_masks(**kw)


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("B,K,H,P", [(2, 2, 224, 16), (3, 4, 32, 4), (1, 1, 16, 8)])
def test_fast_map_matches_float64_reference(B, K, H, P, norm_pix) -> None:  # noqa: ANN001
    """The float32-buffer lcas_map against the float64 formulation, on ViT-B shapes too."""
    from cinemae.runtime.lcas import lcas_map_reference

    rng = np.random.default_rng(B + 10 * K)
    L = (H // P) ** 2
    images = (rng.standard_normal((B, 3, H, H)) * 1.2 + 0.3).astype(np.float32)
    pred = (rng.standard_normal((B * K, L, P * P * 3)) * 0.7).astype(np.float32)
    vis = make_masks(L, K, 0.75, seed=1).visible
    fast = lcas_map(images, pred, vis, P, 1.5, norm_pix)
    ref = lcas_map_reference(images, pred, vis, P, 1.5, norm_pix)
    assert fast.dtype == np.float32 and fast.shape == (B, K, L)
    assert np.array_equal(np.isnan(fast), np.isnan(ref))
    np.testing.assert_allclose(fast, ref, rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(stats_from_map(fast), stats_from_map(ref), rtol=1e-5, atol=1e-6)
