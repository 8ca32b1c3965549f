"""Training the CINEMAE head on extracted features, and writing it into a bundle.

Training follows DESIGN.md section 1 ("Head", "Training"): g [N, D] and s [N, 3] standardised
with training-set mean/std (stored in the head as constants), BCE with logits, AdamW (lr 1e-3,
weight decay 0.05), batch 256, 25 epochs. The epoch with the lowest validation loss is kept
(model choice on the validation split, never on test data).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.bundle import Bundle, write_manifest

_logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 25
    batch: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    seed: int = 0
    threads: int = 2


@dataclass
class TrainedHead:
    head: Any  # cinemae.export.head.CinemaeHead (eval mode)
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0


def head_logits(head: Any, g: np.ndarray, s: np.ndarray, batch: int = 4096) -> np.ndarray:
    """Torch head on pooled features: g [N, D], s [N, 3] -> logits [N] (eval mode)."""
    import torch

    head.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(g), batch):
            out.append(head.forward_features(torch.from_numpy(g[i:i + batch]).float(),
                                             torch.from_numpy(s[i:i + batch]).float())[:, 0].numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _new_head(g: np.ndarray, s: np.ndarray, *, fusion: str, pooling: str, k: int, cfg: TrainConfig
              ) -> tuple[Any, Any]:
    """A fresh head standardised on the training rows g [N, D], s [N, 3] (torch threads and seed
    from ``cfg`` first), and its AdamW (weight decay on matrices only) -> (head, optimiser)."""
    import torch

    from ..export.head import CinemaeHead, HeadConfig

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    head = CinemaeHead(HeadConfig(embed_dim=int(g.shape[1]), fusion=fusion, pooling=pooling, k=k))
    s_std = s.std(axis=0) if k else np.ones(3, np.float32)  # s is identically zero at K=0
    head.set_standardisation(s.mean(axis=0), s_std, g.mean(axis=0), g.std(axis=0))
    decay = [p for n, p in head.named_parameters() if p.ndim > 1]
    other = [p for n, p in head.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr)
    return head, opt


def blind_projector(head: Any, blind: np.ndarray | None) -> Callable[[], None]:
    """A function that keeps the head's classifier blind to ``blind`` [k, D] (orthonormal rows, in
    the head's standardised feature space): it sets the first classifier Linear's weight W to W P,
    P = I - U^T U. The classifier reads h = g_std + delta (``fusion="add"``), so the head then computes
    classifier(P h) while its graph keeps its form: nothing along U reaches the verdict."""
    import torch

    if blind is None or not len(blind):
        return lambda: None
    if head.cfg.fusion != "add":
        raise ValueError(f"blind directions need fusion='add', got {head.cfg.fusion!r}")
    u = torch.as_tensor(np.asarray(blind, np.float32))
    p = torch.eye(u.shape[1]) - u.T @ u
    lin = head.classifier[0]

    def project() -> None:
        with torch.no_grad():
            lin.weight.copy_(lin.weight @ p)
    return project


def _checked_weight(w: np.ndarray, n: int) -> np.ndarray:
    """Row weights [n] as float32, refused unless finite, non-negative and not all zero."""
    w = np.asarray(w, np.float32)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or not (w > 0).any():
        raise ValueError(f"row weights must be [{n}] finite, >= 0 and not all zero, got shape {w.shape}")
    return w


def train_head(g: np.ndarray, s: np.ndarray, y: np.ndarray, g_val: np.ndarray, s_val: np.ndarray,
               y_val: np.ndarray, *, fusion: str = "add", pooling: str = "cls", k: int = 2,
               cfg: TrainConfig | None = None, log: Callable[[str], None] = _logger.info,
               blind: np.ndarray | None = None, weight: np.ndarray | None = None,
               val_weight: np.ndarray | None = None) -> TrainedHead:
    """Train one head for K=k.

    g: [N, D] pooled global features, s: [N, 3] statistics, y: [N] labels (1 = AI-generated);
    the ``_val`` arrays are the validation split used for model choice. blind: [k, D] orthonormal
    directions of the standardised g (``g_mean``/``g_std`` of these rows) the classifier must not
    read (:func:`blind_projector`, applied at initialisation and after every step). weight: [N]
    non-negative row weights of the BCE (a batch's loss is the weighted mean of its rows'),
    val_weight: [N_val] the same for the validation loss that chooses the epoch; None = all equal
    (exactly the unweighted recipe).
    """
    import torch

    cfg = cfg or TrainConfig()
    t0 = time.perf_counter()
    head, opt = _new_head(g, s, fusion=fusion, pooling=pooling, k=k, cfg=cfg)
    project = blind_projector(head, blind)
    project()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    gt, st, yt = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in (g, s, y))
    wt = None if weight is None else torch.from_numpy(_checked_weight(weight, len(g)))
    wv = None if val_weight is None else _checked_weight(val_weight, len(g_val)).astype(np.float64)
    gen = torch.Generator().manual_seed(cfg.seed)
    best: tuple[float, int, dict[str, Any]] | None = None
    history = []
    for epoch in range(cfg.epochs):
        head.train()
        perm = torch.randperm(len(gt), generator=gen)
        tot = 0.0
        for i in range(0, len(perm), cfg.batch):
            idx = perm[i:i + cfg.batch]
            logit = head.forward_features(gt[idx], st[idx])[:, 0]
            if wt is None:
                loss = loss_fn(logit, yt[idx])
            else:
                w = wt[idx]
                per_row = torch.nn.functional.binary_cross_entropy_with_logits(logit, yt[idx], reduction="none")
                loss = (per_row * w).sum() / w.sum().clamp_min(1e-12)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            project()
            tot += float(loss.detach()) * len(idx)
        lv = head_logits(head, g_val, s_val)
        val_loss = (float(np.average(np.logaddexp(0, lv) - y_val * lv, weights=wv)) if len(lv)
                    else float("nan"))
        val_acc = float(((lv >= 0) == (y_val == 1)).mean()) if len(lv) else float("nan")
        history.append({"epoch": epoch + 1, "train_loss": tot / len(perm), "val_loss": val_loss,
                        "val_acc@0.5": val_acc})
        if best is None or val_loss < best[0] or np.isnan(best[0]):
            best = (val_loss, epoch + 1, {k_: v.clone() for k_, v in head.state_dict().items()})
    assert best is not None
    head.load_state_dict(best[2])
    head.eval()
    log(f"K={k} {fusion}: best epoch {best[1]}/{cfg.epochs}, val loss {best[0]:.4f}, "
        f"val acc@0.5 {history[best[1] - 1]['val_acc@0.5']:.4f}")
    return TrainedHead(head, history, best[1], time.perf_counter() - t0)


def _bags(owner: np.ndarray, view: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows -> (bag [R]: one id per (image, view), 0..B-1; bag_owner [B])."""
    n_views = int(view.max(initial=0)) + 1
    uniq, bag = np.unique(owner.astype(np.int64) * n_views + view, return_inverse=True)
    return bag, uniq // n_views


def train_head_images(g: np.ndarray, s: np.ndarray, owner: np.ndarray, view: np.ndarray, y_img: np.ndarray,
                      val: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], *,
                      fusion: str = "add", pooling: str = "mean", k: int = 2, cfg: TrainConfig | None = None,
                      consistency: float = 1.0, images_per_batch: int = 16, bce: str = "image",
                      log: Callable[[str], None] = _logger.info) -> TrainedHead:
    """Train one head for a tiled bundle on what the runtime decides with: each delivered image's
    logit, the mean of its crops' logits.

    g [R, D], s [R, 3]: crop rows; owner [R]: the image of each row (index into y_img [N], 1 = AI);
    view [R]: 0 = the image as delivered, v >= 1 = its v-th re-shipping. A *bag* is one (image,
    view): its logit is the mean of its rows' logits. Loss per batch of images: BCE of every bag's
    logit against its image's label (``bce="crop"``: of every crop's logit, as ``train_head``),
    plus ``consistency`` x the variance of an image's bag logits around their mean (the same
    picture, re-delivered, should get the same logit: the verdict flips the issue measures).
    ``val`` = (g, s, owner, view, y_img) of the validation images; the epoch with the lowest
    validation loss (same loss) is kept.
    """
    import torch

    cfg = cfg or TrainConfig()
    t0 = time.perf_counter()
    head, opt = _new_head(g, s, fusion=fusion, pooling=pooling, k=k, cfg=cfg)

    def prepared(g_: np.ndarray, s_: np.ndarray, owner_: np.ndarray, view_: np.ndarray, y_: np.ndarray
                 ) -> tuple[Any, ...]:
        order = np.argsort(owner_, kind="stable")
        g_, s_, owner_, view_ = g_[order], s_[order], owner_[order], view_[order]
        bag, bag_owner = _bags(owner_, view_)
        starts = np.searchsorted(owner_, np.arange(len(y_) + 1))  # rows of image i: starts[i]:starts[i+1]
        gt, st = (torch.from_numpy(np.ascontiguousarray(a, np.float32)) for a in (g_, s_))
        return gt, st, bag, bag_owner, starts, np.asarray(y_, np.float32)

    def loss_of(data: tuple[Any, ...], images: np.ndarray) -> Any:
        gt, st, bag, bag_owner, starts, y_ = data
        rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in images])
        b_local, b_inv = np.unique(bag[rows], return_inverse=True)
        logit = head.forward_features(gt[rows], st[rows])[:, 0]
        nb = len(b_local)
        inv = torch.from_numpy(b_inv)
        bag_logit = torch.zeros(nb).index_add(0, inv, logit) / torch.bincount(inv, minlength=nb).float()
        owners = bag_owner[b_local]
        yb = torch.from_numpy(y_[owners])
        if bce == "crop":
            y_rows = torch.from_numpy(y_[bag_owner[bag[rows]]])
            bce_v = torch.nn.functional.binary_cross_entropy_with_logits(logit, y_rows)
        else:
            bce_v = torch.nn.functional.binary_cross_entropy_with_logits(bag_logit, yb)
        o_uniq, o_inv = np.unique(owners, return_inverse=True)
        oi = torch.from_numpy(o_inv)
        cnt = torch.bincount(oi, minlength=len(o_uniq)).float()
        mean = torch.zeros(len(o_uniq)).index_add(0, oi, bag_logit) / cnt
        var = ((bag_logit - mean[oi]) ** 2).mean()
        return bce_v + consistency * var, bce_v, var

    tr = prepared(g, s, owner, view, y_img)
    va = prepared(*val)
    has_rows = np.flatnonzero(np.diff(tr[4]) > 0)
    val_images = np.flatnonzero(np.diff(va[4]) > 0)
    rng = np.random.default_rng(cfg.seed)
    best: tuple[float, int, dict[str, Any]] | None = None
    history = []
    for epoch in range(cfg.epochs):
        head.train()
        perm = rng.permutation(has_rows)
        tot = 0.0
        for i in range(0, len(perm), images_per_batch):
            loss, _, _ = loss_of(tr, perm[i:i + images_per_batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(perm[i:i + images_per_batch])
        head.eval()
        with torch.no_grad():
            vl, vb, vv = (float(x) for x in loss_of(va, val_images))
        history.append({"epoch": epoch + 1, "train_loss": tot / max(len(perm), 1), "val_loss": vl,
                        "val_bce": vb, "val_var": vv})
        if best is None or vl < best[0]:
            best = (vl, epoch + 1, {k_: v.clone() for k_, v in head.state_dict().items()})
    assert best is not None
    head.load_state_dict(best[2])
    head.eval()
    h = history[best[1] - 1]
    log(f"K={k} {fusion} ({bce} BCE, consistency {consistency:g}): best epoch {best[1]}/{cfg.epochs}, "
        f"val loss {best[0]:.4f} (BCE {h['val_bce']:.4f}, variance {h['val_var']:.4f})")
    return TrainedHead(head, history, best[1], time.perf_counter() - t0)


def write_head(bundle_dir: str | os.PathLike[str], head: Any, decision: dict[str, Any],
               training: dict[str, Any], *, out: str | os.PathLike[str] | None = None,
               check_features: tuple[np.ndarray, np.ndarray] | None = None,
               tolerance: float = 1e-4, extra_manifest: dict[str, Any] | None = None) -> Path:
    """Export ``head`` as head.onnx into a bundle (in place, or into a copy at ``out``), check
    the ONNX head against the torch head with ONNX Runtime, and update the manifest (head
    section with trained=True and the training summary, decision, k). head.pt (``save_head``)
    is kept in the bundle beside head.onnx so the bundle can be re-exported.

    check_features: optional (global_tokens [N, 1+L, D], stats [N, 3]) real inputs for the
    parity check in addition to random ones. Raises RuntimeError when parity fails (nothing is
    changed then).
    """
    import onnxruntime as ort
    import torch

    from ..export.head import save_head
    from ..export.onnx_export import export_head

    src = Path(bundle_dir)
    b = Bundle(src)
    root = Path(out) if out else src
    if out:
        if root.exists():
            raise FileExistsError(f"{root} exists; choose a new --out-bundle")
        shutil.copytree(src, root)
    bb = b.backbone
    if head.cfg.embed_dim != bb.embed_dim:
        raise ValueError(f"head width {head.cfg.embed_dim} != backbone width {bb.embed_dim}")
    tmp = root / "head.onnx.new"
    export_head(head.eval(), bb.num_patches, tmp)
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    sets = [(rng.standard_normal((8, 1 + bb.num_patches, bb.embed_dim)).astype(np.float32),
             np.abs(rng.standard_normal((8, 3))).astype(np.float32))]
    if check_features is not None:
        sets.append((check_features[0].astype(np.float32), check_features[1].astype(np.float32)))
    worst = 0.0
    with torch.no_grad():
        for gtok, st in sets:
            ref = head(torch.from_numpy(gtok), torch.from_numpy(st)).numpy()
            got = sess.run(["logit"], {"global_tokens": gtok, "stats": st})[0]
            worst = max(worst, float(np.abs(ref - got).max()))
    del sess
    if not worst <= tolerance:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"head.onnx differs from the torch head by {worst:.3g} > {tolerance}")
    m = dict(b.manifest)
    m["head"] = {**head.cfg.to_dict(), "trained": True, "training": training}
    m["decision"] = decision
    m["k"] = int(head.cfg.k)
    m["head_parity"] = {"passed": True, "max_logit_abs": worst, "tolerance": tolerance,
                        "reference": "torch head (cinemae.export.head) vs head.onnx in ONNX Runtime CPU"}
    if "parity" in m:
        m["parity"] = {**m["parity"], "note": "backbone parity from the export; the head was "
                       "replaced by cinemae-train and checked separately (head_parity)"}
    m.update(extra_manifest or {})
    save_head(head, str(root / "head.pt"), {"training": training, "decision": decision})
    os.replace(tmp, root / "head.onnx")
    write_manifest(root, m)
    Bundle(root)  # verifies the hashes
    return root


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    from ..runtime.atomic import atomic_write

    atomic_write(path, json.dumps(obj, indent=2, default=float) + "\n")
