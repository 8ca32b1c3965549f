"""MAE pretraining recipe for the small 32-px backbone of the embedded bundle (train/RECIPE.md).

Pixel targets (no norm-pix), mask ratio 0.75, per-image random masks (MAE ``random_masking``),
loss = mean squared error on the masked patches only. Data: real images only (CIFAKE
``train-real.tar``, i.e. CIFAR-10 photographs), decoded and normalised exactly as the runtime
does (``cinemae.runtime.preprocess``), random horizontal flips. AdamW (betas 0.9/0.95, weight
decay 0.05), linear warm-up then cosine decay. A checkpoint is written at the end of every
epoch (atomically) and ``--resume`` continues from it, so an interruption loses at most one
epoch.

    python -m cinemae.train.pretrain_mae --tar ../shared/data/cifake/train-real.tar \
        --arch vit-mini-32 --epochs 8 --out runs/mae32

Photo crops instead of an archive (``--images``): a folder with a ``labels.csv`` (path, label,
source, as ``../shared/data/photos-train``); only its **real** rows are read, minus any
``--exclude-source`` (a source held out of the head's evaluation stays out of pretraining too).
Every step draws fresh random img_size x img_size crops at native resolution (no resizing: the
runtime's native tiles see the pixels the same way), with random horizontal flips; an "epoch" is
``--crops-per-epoch`` crops. The reconstruction loss is reported on fixed crops (a seeded grid,
``runtime.tiles``) of the real images held out by crc32 of their path.

``--invariance W`` adds W x :func:`invariance_loss`: every epoch each training photo gets a JPEG
copy at a random quality (30-95), and every step ``--invariance-batch`` crops are cut at the same
places from photos and copies; the pooled feature a CINEMAE head reads (mean of the final-norm
patch tokens, unmasked) of the recompressed crops is pulled onto that of the clean ones (no
gradient through the clean side), against the feature's spread. With ``--images`` the same measure
on fixed held-out pairs is reported every epoch (``val_invariance``), trained with it or not.

``--grow-depth`` with ``--init`` of a shallower run of the same backbone (``vit-micro-32`` ->
``vit-micro-32-d12``) starts a deeper one from that run's function: :func:`grow_depth` follows every
encoder block with copies of itself whose output projections are zero.

``--grow-patch`` with ``--init`` of a run whose crops and patches are half the size (``vit-micro-32-d12``
-> ``vit-micro-64-d12``: 32-px crops in 4-px patches -> 64-px crops in 8-px patches, the same 8 x 8 token
grid) starts from that run's function on the crop shrunk 2x: :func:`grow_patch`.

``--grow-grid`` with ``--init`` of a run on smaller crops in the same patches (``vit-micro-32-d12`` ->
``vit-micro-64p4-d12``: a 16 x 16 token grid instead of 8 x 8) keeps every weight and extends the fixed
sin-cos position embeddings to the larger grid (:func:`grow_grid`): the source's positions are the top-left
corner of the new grid, so on the tokens of a crop's top-left quarter alone the encoder is the source's.

``--device cuda`` trains on a GPU, where photo crops are cut too (``--crops-on``, :class:`DeviceCrops`:
the pictures held on the device, a batch of crops one gather); ``--autocast bf16``
runs the forward pass in bfloat16 (weights, AdamW state and the reported held-out loss stay
float32). Checkpoints are written with CPU tensors, so a run made on a GPU loads anywhere; the
summary records the device, the autocast and the crops per second.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.atomic import atomic_write

_logger = logging.getLogger(__name__)


def random_masks(batch: int, num_patches: int, n_keep: int, gen: Any) -> tuple[Any, Any, Any]:
    """Per-image random masks: ids_keep [B, n_keep], ids_restore [B, L] (int64), mask [B, L]
    (1 = masked), as MAE's ``random_masking``."""
    import torch

    noise = torch.rand(batch, num_patches, generator=gen)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :n_keep]
    mask = torch.ones(batch, num_patches)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, ids_restore, mask


def mae_loss(model: Any, imgs: Any, ids_keep: Any, ids_restore: Any, mask: Any) -> Any:
    """Mean squared error on masked patches; imgs [B, 3, H, W] -> scalar."""
    tokens = model.forward_encoder(imgs, ids_keep)  # [B, 1+n, D]
    pred = model.forward_decoder(tokens, ids_restore)  # [B, L, P*P*3]
    target = model.targets(imgs)
    loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # [B, L], float32 under autocast too
    return (loss * mask).sum() / mask.sum()


def pooled_feature(model: Any, imgs: Any) -> Any:
    """What a CINEMAE head reads: the mean of the final-norm patch tokens of the unmasked image.
    imgs [B, 3, H, W] -> [B, D]."""
    import torch

    keep = torch.arange(model.cfg.num_patches, device=imgs.device).expand(len(imgs), -1)
    return model.forward_encoder(imgs, keep)[:, 1:, :].mean(dim=1)


def shift_over_spread(z: Any, z2: Any) -> Any:
    """Pooled features [B, D] of clean crops and of the same crops recompressed -> the mean over
    dimensions of (z2 - z)^2 / (batch variance of z + 1e-6): the measure :func:`invariance_loss`
    trains and :func:`evaluate_invariance` reports."""
    return (((z2 - z) ** 2) / (z.var(dim=0, unbiased=False) + 1e-6)).mean()


def invariance_loss(model: Any, clean: Any, recompressed: Any) -> Any:
    """How far recompression moves the pooled feature, against its spread: the mean over feature
    dimensions of (z' - sg(z))^2 / (batch variance of sg(z) + 1e-6), z = :func:`pooled_feature` of
    the clean crops (no gradient: the clean representation is the anchor the MAE loss trains),
    z' = that of the same crops recompressed. clean, recompressed [B, 3, H, W] -> scalar."""
    import torch

    with torch.no_grad():
        z = pooled_feature(model, clean).float()
    return shift_over_spread(z, pooled_feature(model, recompressed).float())


def grow_depth(state: dict[str, Any], src_depth: int, depth: int) -> dict[str, Any]:
    """A depth-``src_depth`` MAE state dict -> one for ``depth`` encoder blocks (a multiple of it) that
    computes the same function: block i becomes blocks i*r .. i*r+r-1, the first a copy of it, the others
    copies whose attention and MLP output projections (``attn.proj``, ``mlp.fc2``) are zero, so each adds
    nothing to the residual stream until training moves them (progressive stacking with a function-preserving
    start). Every other tensor (patch embedding, final norm, decoder) is kept as it is."""
    if depth % src_depth or depth <= src_depth:
        raise ValueError(f"can grow {src_depth} encoder blocks only to a larger multiple, not {depth}")
    r = depth // src_depth
    out: dict[str, Any] = {}
    for k, v in state.items():
        if not k.startswith("blocks."):
            out[k] = v
            continue
        _, i, rest = k.split(".", 2)
        for j in range(r):
            zero = j > 0 and rest.startswith(("attn.proj.", "mlp.fc2."))
            out[f"blocks.{int(i) * r + j}.{rest}"] = v.clone().zero_() if zero else v.clone()
    return out


def grow_patch(state: dict[str, Any]) -> dict[str, Any]:
    """An MAE state dict for P-px patches -> one for 2P-px patches over the same token grid (crops twice
    the side) that computes, on a crop, what the source computes on that crop shrunk 2x by 2 x 2 averaging:

    - ``patch_embed.proj.weight`` [D, C, P, P] -> [D, C, 2P, 2P], each weight spread over the 2 x 2
      pixels it now covers and divided by 4 (a stride-2P convolution of the crop = the source's stride-P
      convolution of its 2 x 2 average); the bias is kept;
    - ``decoder_pred`` [P*P*C, Dd] -> [4*P*P*C, Dd] (rows in ``patchify``'s (row, column, channel) order):
      each output pixel copies the source's prediction for the pixel it shrinks to (a nearest 2x upsample
      of the source's reconstruction), so the masked-patch loss starts where the source's would be on
      the shrunk crop plus the detail a 2x average removes;
    - everything else (position embeddings of the same grid, blocks, norms, decoder) is kept.

    P and C are read from the patch embedding's shape."""
    out = dict(state)
    w = state["patch_embed.proj.weight"]  # [D, C, P, P]
    c, p = int(w.shape[1]), int(w.shape[-1])
    out["patch_embed.proj.weight"] = w.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3) / 4.0
    # output index of pixel (i, j, ch) of a 2P patch -> the source index of (i // 2, j // 2, ch)
    i, j, ch = np.meshgrid(np.arange(2 * p), np.arange(2 * p), np.arange(c), indexing="ij")
    src_rows = ((i // 2) * p + (j // 2)) * c + ch  # [2P, 2P, C]
    idx = src_rows.reshape(-1)  # indexing copies: the source's tensors are not shared
    out["decoder_pred.weight"] = state["decoder_pred.weight"][idx]
    out["decoder_pred.bias"] = state["decoder_pred.bias"][idx]
    return out


def grow_grid(state: dict[str, Any], grid: int) -> dict[str, Any]:
    """An MAE state dict for a g x g token grid -> one for ``grid`` x ``grid`` tokens of the same patches
    (crops ``grid / g`` times the side). The fixed 2-D sin-cos position embeddings (``pos_embed`` [1, 1+g*g, D],
    ``decoder_pos_embed`` [1, 1+g*g, Dd]) are recomputed for the larger grid; as they are a function of the
    integer (row, column), the source's g x g positions are exactly the new grid's top-left g x g. Every other
    tensor is kept, so the encoder given only the tokens of a crop's top-left g x g patches computes what the
    source computes on that sub-crop. A source whose embeddings are not the sin-cos ones is refused."""
    from ..export.model import sincos_pos_embed

    out = dict(state)
    for key in ("pos_embed", "decoder_pos_embed"):
        v = state[key]  # [1, 1+g*g, dim]
        g, dim = math.isqrt(v.shape[1] - 1), int(v.shape[-1])
        if grid <= g:
            raise ValueError(f"can grow a {g} x {g} grid only to a larger one, not {grid} x {grid}")
        if not np.allclose(v[0].float().numpy(), sincos_pos_embed(dim, g), atol=1e-6):
            raise ValueError(f"{key} is not the fixed sin-cos embedding: it cannot be extended to a larger grid")
        out[key] = v.new_tensor(sincos_pos_embed(dim, grid))[None]
    return out


def lr_at(step: int, total: int, warmup: int, base: float, minimum: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return minimum + (base - minimum) * 0.5 * (1.0 + math.cos(math.pi * t))


def load_images(tar: Path, limit: int | None = None, log: Any = _logger.info) -> tuple[np.ndarray, list[str]]:
    """All images of a tar archive -> [N, 3, 32, 32] float32 normalised (runtime preprocessing),
    member names in archive order. Undecodable members are skipped and counted."""
    from ..runtime.preprocess import InputError, preprocess
    from .data import iter_tar

    arrays, names, bad = [], [], 0
    for name, data in iter_tar(tar):
        if limit is not None and len(arrays) >= limit:
            break
        try:
            arrays.append(preprocess(data, 32, 1.0))
            names.append(name)
        except InputError:
            bad += 1
    if bad:
        log(f"{tar}: skipped {bad} undecodable members")
    return np.stack(arrays), names


#: the JPEG qualities (uniform, inclusive) of --invariance's recompressed copies
INVARIANCE_JPEG = (30, 95)


class PhotoCrops:
    """Real photos decoded once (uint8 [h, w, 3] each, native size) and sampled as random crops."""

    def __init__(self, root: Path, img_size: int, exclude_sources: tuple[str, ...] = (),
                 log: Any = _logger.info) -> None:
        import csv

        from ..runtime.preprocess import InputError, load_image, to_u8

        self.img_size = img_size
        self.images: list[np.ndarray] = []
        self.names: list[str] = []
        small = bad = excluded = 0
        with open(root / "labels.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["label"].strip().lower() == "real"]
        for r in rows:
            if any(r.get("source", "").startswith(x) for x in exclude_sources):
                excluded += 1
                continue
            try:
                rgb = load_image(str(root / r["path"]))
            except InputError:
                bad += 1
                continue
            if min(rgb.shape[:2]) < img_size:
                small += 1  # no native crop exists; enlarging would teach the MAE resampled pixels
                continue
            self.images.append(to_u8(rgb))
            self.names.append(r["path"])
        if not self.images:
            raise SystemExit(f"{root}: no real image of at least {img_size} px")
        log(f"{root}: {len(self.images)} real images ({excluded} from excluded sources, {small} smaller "
            f"than {img_size} px, {bad} undecodable skipped), "
            f"{sum(a.shape[0] * a.shape[1] for a in self.images) / 1e6:.1f} M pixels")

    def subset(self, keep: np.ndarray) -> PhotoCrops:
        """The images where ``keep`` [N] is true (shares the arrays)."""
        out = object.__new__(PhotoCrops)
        out.img_size = self.img_size
        out.images = [a for a, k in zip(self.images, keep, strict=True) if k]
        out.names = [n for n, k in zip(self.names, keep, strict=True) if k]
        return out

    def reshipped(self, rng: np.random.Generator, share: float, max_side: int | None
                  ) -> tuple[PhotoCrops, list[str]]:
        """A copy in which each image, with probability ``share``, is replaced by a random re-shipping
        of it (:func:`train.reship_augment.draw_view`: JPEG 30-95, a shrink, an upscale, a crop or a
        letterbox, half the resizes re-encoded), and then every image is prepared as a tiled bundle
        with ``trim_borders`` and ``max_side`` prepares it (:func:`runtime.tiles.prepare_picture`), so
        the MAE learns the real pictures the runtime cuts its crops from after a site re-delivered them.
        Returns the copy and each image's view name ("" = as delivered)."""
        from ..runtime.preprocess import to_u8
        from ..runtime.tiles import TileSpec, prepare_picture
        from .reship_augment import apply_view, draw_view, view_name

        spec = TileSpec(mode="grid", n=1, trim_borders=True, max_side=max_side)
        out = object.__new__(PhotoCrops)
        out.img_size, out.names, out.images = self.img_size, self.names, []
        names = []
        for a in self.images:
            rgb = a.astype(np.float32) / 255.0
            view = draw_view(rng) if rng.random() < share else []
            rgb, _ = prepare_picture(apply_view(rgb, view), self.img_size, spec)
            out.images.append(to_u8(rgb))
            names.append(view_name(view))
        return out, names

    def jpeg_copy(self, rng: np.random.Generator, lo: int = INVARIANCE_JPEG[0], hi: int = INVARIANCE_JPEG[1]
                  ) -> tuple[PhotoCrops, list[int]]:
        """Every image after one JPEG round trip at a uniform random quality in [lo, hi] (same size,
        so a crop of the copy is the same crop recompressed, with the whole picture's 8x8 block grid
        as a site's re-encoding leaves it) -> (the copy, the qualities)."""
        from ..runtime.preprocess import jpeg_round_trip, to_u8

        out = object.__new__(PhotoCrops)
        out.img_size, out.names, out.images = self.img_size, self.names, []
        qs = [int(q) for q in rng.integers(lo, hi + 1, len(self.images))]
        for a, q in zip(self.images, qs, strict=True):
            out.images.append(to_u8(jpeg_round_trip(a.astype(np.float32) / 255.0, q)))
        return out, qs

    def sample(self, n: int, rng: np.random.Generator, pair: PhotoCrops | None = None
               ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """n random crops, images drawn in proportion to their area -> [n, 3, S, S] float32 normalised;
        with ``pair`` (a same-size copy, :meth:`jpeg_copy`) also the crops of the copy at the same
        places and flips -> (crops, paired crops)."""
        from ..runtime.preprocess import normalise

        s = self.img_size
        area = np.array([a.shape[0] * a.shape[1] for a in self.images], dtype=np.float64)
        which = rng.choice(len(self.images), size=n, p=area / area.sum())
        out = np.empty((n, 3, s, s), np.float32)
        out2 = np.empty((n, 3, s, s), np.float32) if pair is not None else None
        for j, i in enumerate(which):
            a = self.images[i]
            t = int(rng.integers(0, a.shape[0] - s + 1))
            left = int(rng.integers(0, a.shape[1] - s + 1))
            flip = rng.random() < 0.5

            def cut(src: np.ndarray, t: int = t, left: int = left, flip: bool = flip) -> np.ndarray:
                crop = src[t:t + s, left:left + s].astype(np.float32) / 255.0
                return normalise(np.ascontiguousarray(crop[:, ::-1] if flip else crop))

            out[j] = cut(a)
            if pair is not None and out2 is not None:
                out2[j] = cut(pair.images[i])
        return out if out2 is None else (out, out2)

    def fixed_crops(self, per_image: int = 16) -> np.ndarray:
        """A seeded grid of crops of every image (runtime.tiles) -> [M, 3, S, S] (the held-out set)."""
        from ..runtime.tiles import TileSpec, tile_views

        spec = TileSpec(mode="grid", n=per_image)
        return np.concatenate([tile_views(a.astype(np.float32) / 255.0, self.img_size, spec)[0]
                               for a in self.images])


class DeviceCrops:
    """A :class:`PhotoCrops` held on a torch device and cut there (``--crops-on device``).

    A GPU step of a small backbone takes milliseconds, so cutting crops one at a time on the CPU
    (:meth:`PhotoCrops.sample`) would leave it idle. Here the images live on the device as one uint8
    tensor of all their pixels [sum(H*W), 3] (no padding: memory is the pictures' own, whatever
    their sizes) and a batch of crops is one gather. The distribution is
    :meth:`PhotoCrops.sample`'s (images in proportion to their area, a uniform position inside the
    image, a horizontal flip with probability 1/2, the runtime's normalisation); the random stream is
    torch's, so a run's crops differ from a CPU-cut run with the same seed."""

    def __init__(self, photos: PhotoCrops, device: Any, pair: PhotoCrops | None = None) -> None:
        import torch

        from ..runtime.bundle import IMAGENET_MEAN, IMAGENET_STD

        self.img_size = photos.img_size
        self.device = device
        self.hw = torch.tensor([a.shape[:2] for a in photos.images], dtype=torch.int64, device=device)  # [N, 2]
        pixels = self.hw[:, 0] * self.hw[:, 1]  # [N] each picture's area
        self.p = (pixels.double() / pixels.sum()).float()  # [N] drawn in proportion to their area
        self.offset = torch.cumsum(pixels, 0) - pixels  # [N] first pixel of each picture
        self.pixels = self._flat(photos.images)
        self.pixels2 = None
        if pair is not None:
            if [a.shape for a in pair.images] != [a.shape for a in photos.images]:
                raise ValueError("a paired copy must hold images of the same sizes")
            self.pixels2 = self._flat(pair.images)
        self.mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def _flat(self, images: list[np.ndarray]) -> Any:
        """Pictures [h, w, 3] uint8 -> one tensor [sum(h*w), 3] on the device, row-major each."""
        import torch

        return torch.from_numpy(np.concatenate([a.reshape(-1, 3) for a in images])).to(self.device)

    def positions(self, n: int, gen: Any) -> tuple[Any, Any, Any, Any]:
        """Draw n crops: (image index [n], top [n], left [n], flip [n] bool), all on the device."""
        import torch

        s = self.img_size
        which = torch.multinomial(self.p, n, replacement=True, generator=gen)
        room = self.hw[which] - s + 1  # [n, 2] positions a crop can start at
        u = torch.rand((n, 2), generator=gen, device=self.device)
        start = torch.minimum((u * room).long(), room - 1)
        flip = torch.rand(n, generator=gen, device=self.device) < 0.5
        return which, start[:, 0], start[:, 1], flip

    def cut(self, pixels: Any, which: Any, top: Any, left: Any, flip: Any) -> Any:
        """Crops of ``pixels`` (:meth:`_flat`) at the given places -> [n, 3, S, S] float32, normalised
        as the runtime's tiles."""
        import torch

        s = self.img_size
        r = torch.arange(s, device=self.device)
        rows = top[:, None] + r  # [n, S]
        cols = left[:, None] + torch.where(flip[:, None], s - 1 - r, r)  # [n, S], mirrored where flipped
        width = self.hw[which, 1]
        at = (self.offset[which, None, None] + rows[:, :, None] * width[:, None, None]
              + cols[:, None, :])  # [n, S, S] pixel indices
        crops = pixels[at]  # [n, S, S, 3] uint8
        x = crops.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean) / self.std

    def sample(self, n: int, gen: Any, paired: bool = False) -> Any:
        """n random crops -> [n, 3, S, S] on the device; ``paired``: also the same crops of the copy
        given at construction -> (crops, paired crops)."""
        which, top, left, flip = self.positions(n, gen)
        x = self.cut(self.pixels, which, top, left, flip)
        if not paired:
            return x
        if self.pixels2 is None:
            raise ValueError("no paired copy was given")
        return x, self.cut(self.pixels2, which, top, left, flip)


def split_holdout(names: list[str], frac: float = 0.02) -> np.ndarray:
    """Deterministic hold-out mask (crc32 of the member name), for the reported recon loss."""
    import zlib

    return np.array([(zlib.crc32(n.encode()) % 1000) < frac * 1000 for n in names])


def evaluate_invariance(model: Any, clean: np.ndarray, recompressed: np.ndarray, batch: int = 512) -> float:
    """:func:`invariance_loss` over fixed held-out crop pairs (float32, eval mode) [M, 3, S, S] each."""
    import torch

    model.eval()
    dev = next(model.parameters()).device
    with torch.no_grad():
        z = torch.cat([pooled_feature(model, torch.from_numpy(clean[i:i + batch]).to(dev)).float()
                       for i in range(0, len(clean), batch)])
        z2 = torch.cat([pooled_feature(model, torch.from_numpy(recompressed[i:i + batch]).to(dev)).float()
                        for i in range(0, len(recompressed), batch)])
    model.train()
    return float(shift_over_spread(z, z2))


def evaluate(model: Any, images: np.ndarray, n_keep: int, seed: int = 123, batch: int = 512) -> float:
    """Masked-patch MSE on ``images`` [N, 3, H, W] with fixed random masks (drawn on the CPU, so the
    same masks on any device), in float32 whatever the training's autocast: comparable across runs."""
    import torch

    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i:i + batch]).to(dev)
            keep, restore, mask = (t.to(dev) for t in random_masks(len(x), model.cfg.num_patches, n_keep, gen))
            tot += float(mae_loss(model, x, keep, restore, mask)) * len(x)
            n += len(x)
    model.train()
    return tot / max(1, n)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(state, f))


def cpu_state(model: Any) -> dict[str, Any]:
    """The model's state dict on the CPU: checkpoints written on a GPU load anywhere."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def training_device(name: str, autocast: str) -> tuple[Any, Any]:
    """``--device`` / ``--autocast`` -> (torch.device, a context-manager factory for the forward pass).
    Raises SystemExit with one sentence when the device is not there or the combination is not offered."""
    import contextlib

    import torch

    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device {name!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name!r}: this recipe runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: this torch build sees no CUDA GPU "
                         f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'none'})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SystemExit(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if autocast == "none":
        return dev, contextlib.nullcontext
    if autocast != "bf16":
        raise SystemExit(f"--autocast {autocast!r}: none or bf16")
    return dev, lambda: torch.autocast(device_type=dev.type, dtype=torch.bfloat16)


def crops_place(choice: str, device: Any, photos: bool) -> str:
    """``--crops-on`` -> "cpu" or "device": auto cuts photo crops on a GPU when training there and on the
    CPU otherwise (the CPU path keeps the random stream of the runs recorded in RECIPE.md)."""
    if choice not in ("auto", "cpu", "device"):
        raise SystemExit(f"--crops-on is auto, cpu or device, not {choice!r}")
    if choice == "device" and not photos:
        raise SystemExit("--crops-on device cuts photo crops: it needs --images")
    if choice == "auto":
        return "device" if photos and device.type == "cuda" else "cpu"
    return choice


def pretrain(args: argparse.Namespace, log: Any = _logger.info) -> dict[str, Any]:
    """Run (or resume) the recipe; returns the summary written to ``OUT/summary.json``."""
    import torch

    from ..benchmarks.environment import cpu_name
    from ..export.model import MaskedAutoencoderViT, preset
    from ..runtime.masks import n_keep_for

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = preset(args.arch)
    if cfg.norm_pix:
        raise SystemExit("this recipe is for pixel-target backbones")
    if args.reship and not args.images:
        raise SystemExit("--reship re-delivers photos: it needs --images")
    if not 0.0 <= args.reship <= 1.0:
        raise SystemExit(f"--reship is a share of the images, in [0, 1], not {args.reship}")
    val_reship: np.ndarray | None = None
    val_inv: tuple[np.ndarray, np.ndarray] | None = None
    if getattr(args, "invariance", 0.0) and not args.images:
        raise SystemExit("--invariance pairs photo crops with their JPEG copies: it needs --images")
    if bool(args.tar) == bool(args.images):
        raise SystemExit("give exactly one of --tar (an archive of 32-px images) or --images (a photo folder)")
    t0 = time.time()
    photos: PhotoCrops | None = None
    if args.images:
        photos = PhotoCrops(Path(args.images), cfg.img_size, tuple(args.exclude_source or ()), log)
        hold = split_holdout(photos.names, frac=args.holdout_frac)
        photos, held = photos.subset(~hold), photos.subset(hold)
        val_x = held.fixed_crops()
        if args.reship:  # the held-out images once re-shipped (seeded, fixed): the loss the augmentation targets
            held_views, names = held.reshipped(np.random.default_rng(7), 1.0, args.max_side)
            val_reship = held_views.fixed_crops()
            log(f"held-out re-shippings: {', '.join(names)}")
        # fixed crop pairs of the held-out images and their seeded JPEG copies: how far recompression
        # moves the pooled feature the head reads (reported every epoch; trained with --invariance)
        held_jpeg, _ = held.jpeg_copy(np.random.default_rng(11))
        val_inv = (val_x, held_jpeg.fixed_crops())
        n_train = args.crops_per_epoch
        log(f"loaded in {time.time() - t0:.0f}s: {len(photos.images)} training images, {len(held.images)} held "
            f"out ({len(val_x)} fixed crops) for the reconstruction loss")
    else:
        if cfg.img_size != 32:
            raise SystemExit("--tar holds 32-px images: use a 32-px preset, or --images for larger crops")
        decoded = out / "decoded.npz"  # the decoded archive, so a resumed run starts at once
        if args.resume and decoded.is_file():
            with np.load(decoded) as z:
                images, names = z["images"], [str(n) for n in z["names"]]
        else:
            images, names = load_images(Path(args.tar), args.limit, log)
            atomic_write(decoded, lambda f: np.savez(f, images=images, names=np.array(names)))
        hold = split_holdout(names)
        train_x, val_x = images[~hold], images[hold]
        n_train = len(train_x)
        log(f"loaded {len(images)} images in {time.time() - t0:.0f}s: {len(train_x)} train, "
            f"{len(val_x)} held out for the reconstruction loss")

    device, autocast = training_device(getattr(args, "device", "cpu"), getattr(args, "autocast", "none"))
    crops_on = crops_place(getattr(args, "crops_on", "auto"), device, photos is not None)
    torch.manual_seed(args.seed)
    model = MaskedAutoencoderViT(cfg)
    model.to(device)  # before the optimiser: its state lives beside the parameters
    n_keep = n_keep_for(cfg.num_patches, args.mask_ratio)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or n.endswith(("cls_token", "mask_token")) else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    steps_per_epoch = n_train // args.batch
    total = steps_per_epoch * args.epochs
    warmup = min(args.warmup_steps, total // 5)
    ckpt = out / "checkpoint.pt"
    history: list[dict[str, float]] = []
    start_epoch = 0
    st: dict[str, Any] = {}
    init_from: dict[str, Any] | None = None
    if getattr(args, "init", None) and not (args.resume and ckpt.is_file()):
        # a further stage: the weights of an earlier run, a fresh optimiser and a fresh schedule
        src = torch.load(args.init, map_location="cpu", weights_only=False)  # copied onto the device below
        # keys added to MAEConfig since the checkpoint was written take their defaults
        state, grown = src["model"], None
        src_cfg = {**cfg.to_dict(), **src.get("config", {})}
        if getattr(args, "grow_depth", False) and src_cfg["depth"] != cfg.depth:
            # a deeper backbone started from a shallower run's function (grow_depth)
            if {**src_cfg, "depth": cfg.depth} != cfg.to_dict():
                raise SystemExit(f"--grow-depth: --init {args.init} differs from --arch {args.arch} "
                                 "in more than its depth")
            state = grow_depth(state, src_cfg["depth"], cfg.depth)
            grown = {"from_depth": src_cfg["depth"], "to_depth": cfg.depth}
        elif getattr(args, "grow_patch", False):
            # larger crops in larger patches over the same token grid, from a run's function (grow_patch)
            want = {**src_cfg, "img_size": 2 * src_cfg["img_size"], "patch_size": 2 * src_cfg["patch_size"]}
            if want != cfg.to_dict():
                raise SystemExit(f"--grow-patch: --arch {args.arch} is not --init {args.init}'s backbone with "
                                 "crops and patches twice the side")
            state = grow_patch(state)
            grown = {"from_patch": src_cfg["patch_size"], "to_patch": cfg.patch_size,
                     "from_img_size": src_cfg["img_size"], "to_img_size": cfg.img_size}
        elif getattr(args, "grow_grid", False):
            # larger crops in the same patches: a larger token grid, every weight kept (grow_grid)
            if {**src_cfg, "img_size": cfg.img_size} != cfg.to_dict() or cfg.img_size <= src_cfg["img_size"]:
                raise SystemExit(f"--grow-grid: --arch {args.arch} is not --init {args.init}'s backbone on "
                                 "larger crops in the same patches")
            state = grow_grid(state, cfg.grid)
            grown = {"from_img_size": src_cfg["img_size"], "to_img_size": cfg.img_size,
                     "patch": cfg.patch_size}
        elif src_cfg != cfg.to_dict():
            raise SystemExit(f"--init {args.init} holds a different backbone ({src['config']}) than --arch {args.arch}")
        model.load_state_dict(state)
        init_from = {"path": str(args.init), "summary": src.get("summary"), **({"grown": grown} if grown else {})}
        log(f"initialised from {args.init}")
    if args.resume and ckpt.is_file():
        st = torch.load(ckpt, map_location="cpu", weights_only=False)
        init_from = st.get("init_from")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        start_epoch, history = st["epoch"], st["history"]
        if st.get("stopped"):
            start_epoch = args.epochs  # the time budget was already spent
        log(f"resumed from {ckpt} after epoch {start_epoch}")
    budget = args.time_budget_min * 60.0 if args.time_budget_min else None
    elapsed = st.get("elapsed", 0.0) if args.resume and ckpt.is_file() else 0.0  # training seconds so far
    inv_w = float(getattr(args, "invariance", 0.0))
    # the held-out invariance of the weights this stage started from (kept in the checkpoint for a resume)
    init_inv = st.get("init_val_invariance") if history else (
        evaluate_invariance(model, *val_inv) if val_inv is not None and init_from else None)
    gen = torch.Generator().manual_seed(args.seed + 1000 * start_epoch)
    rng = np.random.default_rng(args.seed + 1000 * start_epoch)
    # --crops-on device: crops cut on the device from a torch stream of their own (DeviceCrops)
    dgen = torch.Generator(device=device).manual_seed(args.seed + 1000 * start_epoch + 7) \
        if crops_on == "device" else None
    on_device: DeviceCrops | None = None
    model.train()
    stop = False
    for epoch in range(start_epoch, args.epochs):
        if stop:
            break
        te = time.time()
        e0 = elapsed
        order = rng.permutation(n_train) if photos is None else None
        epoch_photos = photos
        if photos is not None and args.reship:  # fresh re-shippings every epoch (PhotoCrops.reshipped)
            epoch_photos, names = photos.reshipped(rng, args.reship, args.max_side)
            log(f"epoch {epoch + 1}: {sum(bool(n) for n in names)} of {len(names)} images re-shipped")
        epoch_jpeg = epoch_photos.jpeg_copy(rng)[0] if inv_w and epoch_photos is not None else None
        if dgen is not None and epoch_photos is not None and (
                on_device is None or args.reship or epoch_jpeg is not None):  # new pictures this epoch
            on_device = DeviceCrops(epoch_photos, device, pair=epoch_jpeg)
        # sums kept on the device, read at log points and at the end of the epoch (no sync per step)
        running_t = torch.zeros((), dtype=torch.float64, device=device)
        running_inv_t = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        for s in range(steps_per_epoch):
            step = epoch * steps_per_epoch + s
            if budget is not None:
                # time-budgeted schedule: warm-up by steps, cosine over the fraction of the budget
                elapsed = e0 + time.time() - te
                if elapsed >= budget:
                    stop = True
                    break
                frac = elapsed / budget
                lr = lr_at(step, warmup + 10**6, warmup, args.lr, args.lr * 0.01) if step < warmup \
                    else args.lr * 0.01 + (args.lr - args.lr * 0.01) * 0.5 * (1 + math.cos(math.pi * frac))
            else:
                lr = lr_at(step, total, warmup, args.lr, args.lr * 0.01)
            for g in opt.param_groups:
                g["lr"] = lr
            if on_device is not None:
                x = on_device.sample(args.batch, dgen)
            else:
                if photos is not None:
                    xb = epoch_photos.sample(args.batch, rng)
                else:
                    idx = order[s * args.batch:(s + 1) * args.batch]
                    xb = train_x[idx]
                    flip = rng.random(len(idx)) < 0.5
                    xb = np.where(flip[:, None, None, None], xb[..., ::-1], xb)
                x = torch.from_numpy(np.ascontiguousarray(xb)).to(device, non_blocking=True)
            keep, restore, mask = (t.to(device, non_blocking=True)
                                   for t in random_masks(len(x), cfg.num_patches, n_keep, gen))
            with autocast():
                loss = mae_loss(model, x, keep, restore, mask)
                total_loss = loss
                if epoch_jpeg is not None:  # --invariance: the same crops recompressed, pulled onto the clean ones
                    if on_device is not None:
                        ta, tb = on_device.sample(args.invariance_batch, dgen, paired=True)
                    else:
                        pa, pb = epoch_photos.sample(args.invariance_batch, rng, pair=epoch_jpeg)
                        ta, tb = torch.from_numpy(pa).to(device), torch.from_numpy(pb).to(device)
                    inv = invariance_loss(model, ta, tb)
                    running_inv_t += inv.detach().double() * len(x)
                    total_loss = loss + inv_w * inv
            opt.zero_grad(set_to_none=True)
            total_loss.backward()
            opt.step()
            running_t += loss.detach().double() * len(x)
            seen += len(x)
            if args.log_every and (s + 1) % args.log_every == 0:
                log(f"epoch {epoch + 1} step {s + 1}/{steps_per_epoch} loss {float(running_t) / seen:.4f} "
                    f"lr {lr:.2e} {seen / (time.time() - te):.0f} img/s")
        running, running_inv = float(running_t), float(running_inv_t)  # waits for the epoch's last step
        elapsed = e0 + time.time() - te
        if stop and seen == 0:  # the budget was spent before this epoch's first step (e.g. a resumed run)
            elapsed = e0
            break
        val = evaluate(model, val_x, n_keep)
        rec = {"epoch": epoch + 1, "steps": (s + 1) if not stop else s, "images": seen,
               "train_loss": running / max(1, seen), "val_loss": val, "seconds": time.time() - te,
               "lr_end": lr}
        if inv_w:
            rec["train_invariance"] = running_inv / max(1, seen)
        if val_inv is not None:
            rec["val_invariance"] = evaluate_invariance(model, *val_inv)
        if val_reship is not None:
            rec["val_loss_reshipped"] = evaluate(model, val_reship, n_keep)
        history.append(rec)
        log(json.dumps(rec))
        save_checkpoint(ckpt, {"model": cpu_state(model), "optimizer": opt.state_dict(),
                               "epoch": epoch + 1, "history": history, "config": cfg.to_dict(),
                               "elapsed": elapsed, "stopped": stop, "args": vars(args),
                               "init_from": init_from, "init_val_invariance": init_inv})
    summary = {"arch": args.arch, "config": cfg.to_dict(), "seed": args.seed, "epochs": args.epochs,
               "batch": args.batch, "lr": args.lr, "weight_decay": args.weight_decay,
               "warmup_steps": warmup, "time_budget_min": args.time_budget_min,
               "steps": int(sum(h["steps"] for h in history)), "train_seconds": round(elapsed, 1),
               "mask_ratio": args.mask_ratio, "threads": args.threads,
               "device": str(device), "autocast": getattr(args, "autocast", "none"), "crops_on": crops_on,
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
               # crops trained on per second of training (held-out evaluations not counted)
               "crops_per_second": round(sum(h["images"] for h in history) / elapsed, 1) if elapsed > 0 else None,
               "train_images": int(n_train if photos is None else len(photos.images)),
               "holdout_images": int(len(val_x) if photos is None else len(held.images)),
               "holdout_crops": None if photos is None else int(len(val_x)),
               "data": str(args.tar or args.images), "target": "pixel",
               "excluded_sources": list(args.exclude_source or ()),
               "crops": None if photos is None else f"random native {cfg.img_size}-px crops, "
                                                    f"{args.crops_per_epoch} per epoch, area-weighted",
               "augmentation": "random horizontal flip" + (
                   f"; each epoch {args.reship:.0%} of the images re-shipped at random (train.reship_augment), "
                   f"every image trimmed and shrunk to max_side {args.max_side} as the runtime's tiles"
                   if args.reship else ""),
               "invariance": {"weight": inv_w, "batch": args.invariance_batch, "jpeg_quality": list(INVARIANCE_JPEG),
                              "init_val_invariance": init_inv} if inv_w else None,
               "init_from": init_from, "history": history,
               "final_val_recon_loss": history[-1]["val_loss"] if history else None,
               "final_train_recon_loss": history[-1]["train_loss"] if history else None,
               "final_val_recon_loss_reshipped": history[-1].get("val_loss_reshipped") if history else None,
               "final_val_invariance": history[-1].get("val_invariance") if history else None,
               "params": int(sum(p.numel() for p in model.parameters()))}
    # the backbone alone, in the facebookresearch layout ({'model': state_dict}), for cinemae-export
    save_checkpoint(out / "mae.pth", {"model": cpu_state(model), "config": cfg.to_dict(),
                                      "summary": {k: v for k, v in summary.items() if k != "history"}})
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tar", default=None, help="tar archive of real 32-px training images (train-real.tar)")
    ap.add_argument("--images", default=None,
                    help="a photo folder with labels.csv (its real rows only), sampled as native-resolution crops")
    ap.add_argument("--exclude-source", action="append", default=None,
                    help="with --images: leave out real rows whose source starts with this (repeatable)")
    ap.add_argument("--crops-per-epoch", type=int, default=20480, help="with --images: crops per epoch")
    ap.add_argument("--holdout-frac", type=float, default=0.05,
                    help="with --images: share of the images held out (crc32 of the path) for the reported loss")
    ap.add_argument("--reship", type=float, default=0.0,
                    help="with --images: share of the images replaced every epoch by a random re-shipping "
                         "(JPEG, resize, crop, letterbox; train.reship_augment), all prepared as tiles with "
                         "trim_borders and --max-side")
    ap.add_argument("--max-side", type=int, default=512, help="with --reship: the tiles' max_side")
    ap.add_argument("--invariance", type=float, default=0.0,
                    help="with --images: weight of a term pulling the pooled feature of recompressed crops "
                         "(every image's JPEG copy at a random quality 30-95 each epoch) onto that of the "
                         "same clean crops (invariance_loss); 0 = off")
    ap.add_argument("--invariance-batch", type=int, default=64, help="crop pairs per step for --invariance")
    ap.add_argument("--arch", default="vit-mini-32", help="backbone preset (cinemae.export.model.PRESETS)")
    ap.add_argument("--out", required=True, help="run directory (checkpoint, mae.pth, summary.json)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup-steps", type=int, default=200)
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu",
                    help="cpu, cuda or cuda:N (the model, optimiser and batches live there)")
    ap.add_argument("--crops-on", default="auto", choices=("auto", "cpu", "device"),
                    help="with --images: where crops are cut; auto = on the device with --device cuda "
                         "(DeviceCrops: one gather per batch), on the CPU otherwise")
    ap.add_argument("--autocast", default="none", choices=("none", "bf16"),
                    help="bf16: the forward pass under torch.autocast (AMX on this CPU, tensor cores on a GPU); "
                         "weights, optimiser and the reported held-out loss stay float32")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N images (smoke runs)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--time-budget-min", type=float, default=None,
                    help="stop after this many minutes of training; the cosine decay follows the "
                         "fraction of the budget spent (for shared CPUs); --epochs is then a cap")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    ap.add_argument("--init", default=None,
                    help="start from the weights of an earlier run's mae.pth (a further stage: fresh optimiser, "
                         "warm-up and cosine); recorded in the summary")
    ap.add_argument("--grow-depth", action="store_true",
                    help="with --init of a shallower run of the same backbone: insert encoder blocks whose "
                         "output projections start at zero (grow_depth), so training starts from its function")
    ap.add_argument("--grow-patch", action="store_true",
                    help="with --init of a run whose crops and patches are half the side (vit-micro-32-d12 -> "
                         "vit-micro-64-d12): start from its function on the crop shrunk 2x (grow_patch)")
    ap.add_argument("--grow-grid", action="store_true",
                    help="with --init of a run on smaller crops in the same patches (vit-micro-32-d12 -> "
                         "vit-micro-64p4-d12): keep its weights, extend its position embeddings (grow_grid)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    s = pretrain(args, log=lambda m: print(m, flush=True))
    print(f"final reconstruction loss (held-out, masked patches): {s['final_val_recon_loss']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
