"""``cinemae-export``: checkpoint -> bundle (ONNX graphs, FP16 variants, parity report)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="cinemae-export",
        description="Export a frozen MAE (+ CINEMAE head) to a cinemae bundle: ONNX graphs, "
                    "FP16 variants and a parity report that fails the export when exceeded.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="facebookresearch/mae .pth (with decoder) or a Hugging "
                     "Face ViTMAEForPreTraining state dict (.bin / .safetensors)")
    src.add_argument("--arch", help="no checkpoint: random weights of a preset (vit-base, "
                     "vit-large, vit-huge, tiny, ...) for latency work; marked in the manifest")
    src.add_argument("--bundle", help="no export: add TensorRT engines to this existing bundle "
                     "(with --tensorrt and --trt-targets; every precision the bundle has)")
    ap.add_argument("--head", help="a head file written by cinemae-train (default: an untrained "
                    "head, stated in the manifest)")
    ap.add_argument("--out", help="bundle directory to write (required unless --bundle)")
    ap.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32",
                    help="fp16 / int8 also write the fp32 graphs (the reference); int8 = QDQ encoder and "
                         "decoder calibrated on real images (--calibration-images), fp32 head")
    ap.add_argument("--k", type=int, default=2, help="masking runs K (0..8)")
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--seed", type=int, default=0, help="mask seed")
    ap.add_argument("--lambda", dest="lam", type=float, default=1.0)
    ap.add_argument("--crop-ratio", type=float, default=224 / 256)
    ap.add_argument("--fusion", choices=["add", "concat", "gate"], default="add",
                    help="fusion of an untrained head (a --head file carries its own)")
    ap.add_argument("--pooling", choices=["cls", "mean"], default="cls")
    target = ap.add_mutually_exclusive_group()
    target.add_argument("--norm-pix", dest="norm_pix", action="store_const", const=True,
                        help="the decoder predicts per-patch normalised pixels")
    target.add_argument("--pixel", dest="norm_pix", action="store_const", const=False,
                        help="the decoder predicts pixels")
    ap.add_argument("--parity-images", help="folder of real images for the parity report")
    ap.add_argument("--calibration-images", help="folder of real images for INT8 activation ranges "
                    "(default: the --parity-images folder, files not used by the gate)")
    ap.add_argument("--model-id", default=None)
    ap.add_argument("--init-seed", type=int, default=0, help="seed for --arch / untrained heads")
    ap.add_argument("--heads", type=int, default=None,
                    help="encoder attention heads of a facebookresearch checkpoint whose shape "
                         "matches no preset (not stored in .pth files)")
    ap.add_argument("--decoder-heads", type=int, default=None,
                    help="decoder attention heads, likewise (MAE's own decoders use 16)")
    ap.add_argument("--sign", metavar="KEY", default=None,
                    help="sign the manifest with this Ed25519 private key (PEM, unencrypted): writes "
                         "cinemae.json.sig, checked at load with --require-signature PUBKEY")
    ap.add_argument("--tensorrt", choices=["auto", "skip", "require"], default="auto",
                    help="build TensorRT engines into BUNDLE/engines and list them in the manifest: "
                         "auto = when TensorRT can (a GPU, or --trt-targets with TensorRT-RTX), "
                         "require = fail when it cannot")
    ap.add_argument("--trt-targets", default=None, metavar="SM[,SM...]",
                    help="compute capabilities to build engines for ahead of time, without that GPU "
                         "(TensorRT-RTX: sm75,sm80,sm86,sm89,sm120,sm121), e.g. sm80,sm86,sm89; "
                         "default: the GPU present")
    ap.add_argument("--trt-max-batch", type=int, default=16,
                    help="largest batch the TensorRT engines' profiles accept")
    return ap


def _image_files(folder: str | None) -> list[Path]:
    if not folder:
        return []
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _spread(files: list[Path], n: int) -> list[Path]:
    """``n`` files spread evenly over the sorted list (every subfolder gets its share)."""
    if len(files) <= n:
        return files
    return [files[i * len(files) // n] for i in range(n)]


def int8_image_split(calibration: str | None, parity: str | None, n_calib: int = 32, n_gate: int = 32
                     ) -> tuple[list[Path], list[Path]]:
    """(calibration images, gate images) for --precision int8, spread over each folder and
    disjoint when both come from one folder (alternate files then go to each)."""
    gate_pool = _image_files(parity)
    if calibration:
        calib = _spread(_image_files(calibration), n_calib)
        chosen = set(calib)
        return calib, _spread([p for p in gate_pool if p not in chosen], n_gate)
    return _spread(gate_pool[1::2], n_calib), _spread(gate_pool[0::2], n_gate)


def _targets(text: str | None) -> list[str] | None:
    return [t for t in (text or "").split(",") if t.strip()] or None


def _engines(bundle: str | Path, args: argparse.Namespace, precisions: tuple[str, ...] | None) -> int:
    """Build the TensorRT engines the flags ask for; 0, or 1 with one line on stderr."""
    from ..runtime.backends.base import BackendUnavailable
    from ..runtime.bundle import BundleError
    from .tensorrt_build import build_bundle_engines

    try:
        build_bundle_engines(bundle, precisions, max_batch=args.trt_max_batch,
                             targets=_targets(args.trt_targets), required=args.tensorrt == "require")
    except (BackendUnavailable, BundleError, ValueError) as e:  # EngineBuildError is a BackendUnavailable
        print(f"cinemae-export: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from ..runtime.commands import configure_logging

    ap = build_parser()
    args = ap.parse_args(argv)
    configure_logging("stdout")  # the export's progress and parity table, as before
    if args.trt_max_batch < 1:
        ap.error("--trt-max-batch must be at least 1")
    if args.bundle:
        if args.tensorrt == "skip":
            ap.error("--bundle adds TensorRT engines; --tensorrt skip leaves nothing to do")
        code = _engines(args.bundle, args, None)
        from ..runtime.bundle import SIGNATURE, BundleError, sign_manifest

        if code == 0 and args.sign:  # the manifest changed: sign it again
            try:
                print(f"signed: {sign_manifest(args.bundle, args.sign)}")
            except BundleError as e:
                print(f"cinemae-export: {e}", file=sys.stderr)
                return 1
        elif code == 0 and (Path(args.bundle) / SIGNATURE).is_file():
            print(f"note: {SIGNATURE} no longer matches the rewritten manifest; sign it again with --sign KEY")
        return code
    if not args.out:
        ap.error("--out is required (or --bundle to add engines to an existing bundle)")
    try:
        import torch
    except ImportError:
        print("cinemae-export needs torch: pip install 'cinemae[export]'", file=sys.stderr)
        return 2
    from .bundle import ExportOptions, ParityError, export_bundle
    from .checkpoint import CheckpointError, load_checkpoint
    from .head import CinemaeHead, HeadConfig, load_head
    from .model import MaskedAutoencoderViT, preset

    if args.sign:  # a bad key fails now, not after the export
        from ..runtime.bundle import BundleError, load_private_key

        try:
            load_private_key(args.sign)
        except BundleError as e:
            print(f"cinemae-export: {e}", file=sys.stderr)
            return 2
    torch.manual_seed(args.init_seed)
    try:
        if args.checkpoint:
            model, prov = load_checkpoint(args.checkpoint, norm_pix=args.norm_pix,
                                          heads=args.heads, decoder_heads=args.decoder_heads)
        else:
            cfg = preset(args.arch)
            if args.norm_pix is not None:
                cfg = cfg.with_(norm_pix=args.norm_pix)
            model = MaskedAutoencoderViT(cfg).eval()
            prov = {"format": "random-init", "arch": args.arch, "init_seed": args.init_seed,
                    "note": "random weights: latency only"}
    except (CheckpointError, ValueError) as e:
        print(f"cinemae-export: {e}", file=sys.stderr)
        return 2
    head_record: dict = {}
    trained = False
    if args.head:
        try:
            head, rec = load_head(args.head)
        except (ValueError, OSError, RuntimeError) as e:
            print(f"cinemae-export: {args.head}: {e}", file=sys.stderr)
            return 2
        if head.cfg.embed_dim != model.cfg.embed_dim:
            print(f"cinemae-export: the head expects D={head.cfg.embed_dim}, the backbone has "
                  f"D={model.cfg.embed_dim}", file=sys.stderr)
            return 2
        head_record = {k: v for k, v in rec.items() if k not in ("config", "state_dict")}
        trained = True
        k = head.cfg.k
        if k != args.k:
            print(f"note: the head was trained for K={k}; the bundle uses K={k}")
    else:
        head = CinemaeHead(HeadConfig(model.cfg.embed_dim, fusion=args.fusion,
                                      pooling=args.pooling, k=args.k)).eval()
        k = args.k
    images = []
    if args.parity_images:
        root = Path(args.parity_images)
        images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:8]
    calib: list[Path] = []
    gate: list[Path] = []
    if args.precision == "int8":
        calib, gate = int8_image_split(args.calibration_images, args.parity_images)
        if not calib or not gate:
            print("cinemae-export: --precision int8 needs real images: --parity-images DIR (and optionally "
                  "--calibration-images DIR)", file=sys.stderr)
            return 2
    opts = ExportOptions(k=k, mask_ratio=args.mask_ratio, mask_seed=args.seed, lam=args.lam,
                         crop_ratio=args.crop_ratio,
                         precisions=("fp32", args.precision) if args.precision != "fp32" else ("fp32",),
                         parity_images=images, calibration_images=calib, int8_gate_images=gate,
                         model_id=args.model_id or Path(args.out).name,
                         provenance={"checkpoint": prov}, head_record=head_record)
    try:
        out, _ = export_bundle(model, head, args.out, opts, trained=trained)
    except (ParityError, ValueError) as e:
        print(f"cinemae-export: {e}", file=sys.stderr)
        return 1
    except FileExistsError as e:
        print(f"cinemae-export: {e}", file=sys.stderr)
        return 2
    trt_precisions = tuple(p for p in opts.precisions if p in ("fp32", "fp16"))  # no int8 engines
    if args.tensorrt != "skip" and _engines(out, args, trt_precisions):
        return 1
    if args.sign:
        from ..runtime.bundle import BundleError, sign_manifest

        try:
            print(f"signed: {sign_manifest(out, args.sign)}")
        except BundleError as e:
            print(f"cinemae-export: {e}", file=sys.stderr)
            return 2
    if not trained:
        print("note: the head is untrained (random initialisation); train it with "
              f"`cinemae-train --bundle {out} --real DIR --fake DIR`")
    print(f"wrote {out}\nnext: cinemae-detect {out} IMAGE_OR_FOLDER")
    return 0


if __name__ == "__main__":
    sys.exit(main())
