"""Seeded masks shared by every image (DESIGN.md section 1, "Masks")."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MaskSet:
    """K masking runs over L patches.

    ids_keep:    [K, n_keep] int32, the visible patches of each run in shuffle order
    ids_restore: [K, L] int32, the inverse permutation (MAE ``ids_restore``)
    visible:     [K, L] bool, True where the patch is visible in run k
    """

    ids_keep: np.ndarray
    ids_restore: np.ndarray
    visible: np.ndarray

    @property
    def k(self) -> int:
        return int(self.ids_keep.shape[0])

    @property
    def n_keep(self) -> int:
        return int(self.ids_keep.shape[1])

    @property
    def num_patches(self) -> int:
        return int(self.ids_restore.shape[1])

    def head(self, k: int) -> MaskSet:
        """The first k runs (the same masks a bundle with K=k draws, for the same seed)."""
        return MaskSet(self.ids_keep[:k], self.ids_restore[:k], self.visible[:k])

    def tile(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows for the masked pass: row b*K + k is image b under run k.

        Returns ids_keep [B*K, n_keep] int32 and ids_restore [B*K, L] int32.
        """
        return (np.tile(self.ids_keep, (batch, 1)), np.tile(self.ids_restore, (batch, 1)))


def n_keep_for(num_patches: int, mask_ratio: float) -> int:
    """n_keep = int(L * (1 - r)), as in MAE's ``random_masking``."""
    return int(num_patches * (1 - mask_ratio))


def make_masks(num_patches: int, k: int, mask_ratio: float = 0.75, seed: int = 0) -> MaskSet:
    """Draw K masks from ``numpy.random.default_rng(seed)``, run after run.

    Run k uses the k-th draw of one generator, so the first k runs of a K_max draw are exactly
    the masks of a K=k draw with the same seed.
    """
    if not 0 <= k <= 64:
        raise ValueError(f"K must be in 0..64, got {k}")
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {mask_ratio}")
    n_keep = n_keep_for(num_patches, mask_ratio)
    if not 0 < n_keep < num_patches:
        raise ValueError(f"mask ratio {mask_ratio} keeps {n_keep} of {num_patches} patches")
    rng = np.random.default_rng(seed)
    keep = np.empty((k, n_keep), dtype=np.int32)
    restore = np.empty((k, num_patches), dtype=np.int32)
    visible = np.zeros((k, num_patches), dtype=bool)
    for run in range(k):
        ids_shuffle = np.argsort(rng.random(num_patches))
        keep[run] = ids_shuffle[:n_keep]
        restore[run] = np.argsort(ids_shuffle)
        visible[run, keep[run]] = True
    return MaskSet(keep, restore, visible)


def full_ids_keep(batch: int, num_patches: int) -> np.ndarray:
    """ids_keep for the global pass (every patch, in order): [B, L] int32."""
    return np.tile(np.arange(num_patches, dtype=np.int32), (batch, 1))
