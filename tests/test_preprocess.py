"""Decoding and preprocessing: every bad-input class gets its own error, odd colour modes are
scored as their RGB equivalent, and one bad item never affects the others."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cinemae.runtime.preprocess import (
    InputError,
    decode,
    from_array,
    load_image,
    normalise,
    preprocess,
    resize_crop,
)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:  # noqa: ANN003
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def sample_rgb(w: int = 48, h: int = 40) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h)], -1).astype(np.uint8)
    return Image.fromarray(a, "RGB")


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels: a decompression bomb needs no more to be caught."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) \
        + chunk(b"IEND", b"")


def bomb_png(side: int) -> bytes:
    """A real, valid greyscale PNG of side x side zeros: tiny on disk, huge decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = zlib.compress(b"\0" * ((side + 1) * side), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)) \
        + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


class TestBadInput:
    def test_empty(self) -> None:
        with pytest.raises(InputError) as e:
            decode(b"")
        assert e.value.code == "empty"

    def test_truncated_jpeg(self) -> None:
        data = encode(sample_rgb(256, 256), "JPEG", quality=90)
        with pytest.raises(InputError) as e:
            decode(data[: len(data) // 2])
        assert e.value.code == "truncated"

    def test_truncated_png(self) -> None:
        data = encode(sample_rgb(256, 256), "PNG")
        with pytest.raises(InputError) as e:
            decode(data[: len(data) // 2])
        assert e.value.code in ("truncated", "undecodable")

    def test_corrupt_body(self) -> None:
        data = bytearray(encode(sample_rgb(64, 64), "PNG"))
        data[60:200] = b"\xff" * 140
        with pytest.raises(InputError) as e:
            decode(bytes(data))
        assert e.value.code in ("undecodable", "truncated")

    @pytest.mark.parametrize("data", [b"hello, world", b"%PDF-1.7\n...", b"<svg></svg>",
                                      b"\x00" * 100])
    def test_unsupported(self, data: bytes) -> None:
        with pytest.raises(InputError) as e:
            decode(data)
        assert e.value.code == "unsupported"

    def test_pixel_limit_from_header_alone(self) -> None:
        with pytest.raises(InputError) as e:
            decode(png_header_only(100_000, 100_000))
        assert e.value.code == "too_large" and "pixel" in str(e.value)

    def test_decompression_bomb(self) -> None:
        data = bomb_png(8000)  # 64 Mpx decoded from ~60 kB
        assert len(data) < 200_000
        with pytest.raises(InputError) as e:
            decode(data, max_pixels=50_000_000)
        assert e.value.code == "too_large"

    def test_byte_limit(self, tmp_path: Path) -> None:
        p = tmp_path / "big.jpg"
        p.write_bytes(b"\xff" * 2048)
        with pytest.raises(InputError) as e:
            load_image(p, max_bytes=1024)
        assert e.value.code == "too_large"

    def test_missing_and_directory(self, tmp_path: Path) -> None:
        with pytest.raises(InputError) as e:
            load_image(tmp_path / "none.jpg")
        assert e.value.code == "not_found"
        with pytest.raises(InputError) as e:
            load_image(tmp_path)
        assert e.value.code == "unsupported"

    @pytest.mark.parametrize("arr", [np.zeros((4, 4, 2), np.uint8), np.zeros((0, 4, 3), np.uint8),
                                     np.zeros((4, 4, 3), np.int64),
                                     np.full((4, 4, 3), np.nan, np.float32)])
    def test_bad_arrays(self, arr: np.ndarray) -> None:
        with pytest.raises(InputError) as e:
            from_array(arr)
        assert e.value.code == "bad_array"

    def test_wrong_type(self) -> None:
        with pytest.raises(InputError) as e:
            load_image(12345)  # type: ignore[arg-type]
        assert e.value.code == "bad_array"


class TestColourModes:
    """Each mode decodes to what its RGB equivalent decodes to."""

    def rgb(self) -> np.ndarray:
        return decode(encode(sample_rgb(), "PNG"))

    def test_grey(self) -> None:
        g = sample_rgb().convert("L")
        out = decode(encode(g, "PNG"))
        assert out.shape == (40, 48, 3)
        np.testing.assert_array_equal(out[..., 0], np.asarray(g) / np.float32(255))
        assert np.array_equal(out[..., 0], out[..., 2])

    def test_sixteen_bit_grey(self) -> None:
        a = (np.arange(40 * 48).reshape(40, 48) * 30).astype(np.uint16)
        out = decode(encode(Image.fromarray(a), "PNG"))
        np.testing.assert_allclose(out[..., 1], a / 65535.0, atol=1e-6)

    def test_alpha_opaque_and_transparent(self) -> None:
        rgba = sample_rgb().convert("RGBA")
        np.testing.assert_array_equal(decode(encode(rgba, "PNG")), self.rgb())
        a = np.asarray(rgba).copy()
        a[..., 3] = 0
        out = decode(encode(Image.fromarray(a, "RGBA"), "PNG"))
        assert np.all(out == 1.0)  # fully transparent -> white
        la = sample_rgb().convert("LA")
        assert decode(encode(la, "PNG")).shape == (40, 48, 3)

    def test_palette(self) -> None:
        p = sample_rgb().convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        np.testing.assert_array_equal(decode(encode(p, "PNG")),
                                      np.asarray(p.convert("RGB")) / np.float32(255))
        p.info["transparency"] = 0
        assert decode(encode(p, "PNG", transparency=0)).shape == (40, 48, 3)

    def test_cmyk_jpeg(self) -> None:
        rgb = sample_rgb(64, 64)
        cmyk = rgb.convert("CMYK")
        out = decode(encode(cmyk, "JPEG", quality=100))
        ref = decode(encode(rgb, "JPEG", quality=100))
        assert np.abs(out - ref).mean() < 0.02

    @pytest.mark.parametrize("orientation,transpose", [
        (3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_90),
        (8, Image.Transpose.ROTATE_270)])
    def test_exif_rotation(self, orientation: int, transpose: Image.Transpose) -> None:
        upright = sample_rgb()
        stored = upright.transpose(transpose)  # what a camera writes, to be rotated back
        exif = Image.Exif()
        exif[0x0112] = orientation
        out = decode(encode(stored, "PNG", exif=exif))
        np.testing.assert_array_equal(out, decode(encode(upright, "PNG")))

    def test_other_formats(self) -> None:
        ref = self.rgb()
        for fmt in ("BMP", "TIFF", "WEBP"):
            kw = {"lossless": True} if fmt == "WEBP" else {}
            np.testing.assert_allclose(decode(encode(sample_rgb(), fmt, **kw)), ref, atol=1 / 255)

    def test_arrays(self) -> None:
        a = np.asarray(sample_rgb())
        np.testing.assert_array_equal(from_array(a), self.rgb())
        np.testing.assert_allclose(from_array(a.astype(np.uint16) * 257), self.rgb(), atol=1e-6)
        assert from_array(a[..., 0]).shape == (40, 48, 3)


class TestGeometry:
    def test_untouched_at_target_size(self) -> None:
        rgb = np.random.default_rng(0).random((32, 32, 3), dtype=np.float32)
        np.testing.assert_array_equal(resize_crop(rgb, 32, 1.0), rgb)

    def test_shorter_side_and_centre_crop(self) -> None:
        rgb = np.random.default_rng(0).random((300, 400, 3), dtype=np.float32)
        out = resize_crop(rgb, 224, 224 / 256)
        assert out.shape == (224, 224, 3)
        small = np.random.default_rng(0).random((100, 120, 3), dtype=np.float32)
        out = resize_crop(small, 224, 224 / 256)  # enlarged (bicubic), clipped to [0, 1]
        assert out.shape == (224, 224, 3) and out.min() >= 0 and out.max() <= 1

    def test_normalise(self) -> None:
        x = normalise(np.full((2, 2, 3), 0.485, np.float32))
        assert x.shape == (3, 2, 2) and x.dtype == np.float32
        assert abs(float(x[0, 0, 0])) < 1e-6

    def test_preprocess_end_to_end(self) -> None:
        x = preprocess(encode(sample_rgb(512, 384), "JPEG"), 224, 0.875)
        assert x.shape == (3, 224, 224) and x.dtype == np.float32


def full_resize_crop(rgb: np.ndarray, img_size: int, crop_ratio: float) -> np.ndarray:
    """The design's preprocessing done literally: resize the whole image, then crop."""
    import cv2

    h, w = rgb.shape[:2]
    short = round(img_size / crop_ratio)
    scale = short / min(h, w)
    nh, nw = (short, max(short, round(w * scale))) if h <= w else (max(short, round(h * scale)), short)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    r = cv2.resize(rgb, (nw, nh), interpolation=interp)
    r = np.clip(r, 0, 1) if interp == cv2.INTER_CUBIC else r
    top, left = int(round((nh - img_size) / 2.0)), int(round((nw - img_size) / 2.0))
    return r[top:top + img_size, left:left + img_size]


def smooth_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random image (natural images are smooth at the pixel scale) [h, w, 3] in [0, 1]."""
    import cv2

    small = np.random.default_rng(seed).random((max(2, h // 16), max(2, w // 16), 3), dtype=np.float32)
    return np.clip(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), 0, 1)


def peak_rss_mib(code: str) -> float:
    """Run ``code`` in a fresh interpreter and return its peak resident set size in MiB (VmHWM of
    its own address space: getrusage's ru_maxrss would carry over the forking pytest's)."""
    import subprocess
    import sys

    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux /proc to read a process's peak RSS")
    out = subprocess.run([sys.executable, "-c", code + "\nprint([l.split()[1] for l in "
                          "open('/proc/self/status') if l.startswith('VmHWM')][0])"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


class TestBoundedWork:
    """Issue 16 items 1 and 4: the work is bounded by the output size, not by the input's."""

    @pytest.mark.parametrize("w", [300_000, 1_000_000])
    def test_extreme_aspect_ratio_costs_bounded_memory(self, w: int) -> None:
        # 300000x1 used to resize to 9.6 M x 32 floats (3.4-7 GiB); 1000000x1 asked for 12 GB
        data = encode(Image.new("RGB", (w, 1), (120, 60, 30)), "PNG")
        assert len(data) < 4000
        rss = peak_rss_mib(
            "import io\nfrom cinemae.runtime.preprocess import preprocess\n"
            f"x = preprocess(open({str(self._write(data, w))!r}, 'rb').read(), 32, 1.0)\n"
            "assert x.shape == (3, 32, 32)")
        assert rss < 400, f"peak RSS {rss:.0f} MiB for a {w}x1 PNG"
        x = preprocess(data, 32, 1.0)
        np.testing.assert_allclose(x, normalise(np.full((32, 32, 3), [120 / 255, 60 / 255, 30 / 255],
                                                        np.float32)), atol=1e-5)

    _tmp: Path | None = None

    def _write(self, data: bytes, w: int) -> Path:
        import tempfile

        p = Path(tempfile.mkdtemp()) / f"wide{w}.png"
        p.write_bytes(data)
        return p

    @pytest.mark.parametrize("h,w,size,ratio", [(1, 3000, 32, 1.0), (20, 5000, 224, 0.875),
                                                (100, 2000, 224, 0.875), (5000, 32, 32, 1.0),
                                                (3, 400, 32, 1.0), (300, 7001, 224, 0.875)])
    def test_crop_first_matches_resizing_the_whole_image(self, h: int, w: int, size: int,
                                                        ratio: float) -> None:
        rgb = smooth_rgb(h, w)
        got, ref = resize_crop(rgb, size, ratio), full_resize_crop(rgb, size, ratio)
        assert got.shape == ref.shape == (size, size, 3)
        # whole-number scales keep the sampling grid exactly; others are within a sixth of an
        # output pixel of it (_window's search)
        np.testing.assert_allclose(got, ref, atol=1e-5 if (round(size / ratio) / min(h, w)).is_integer()
                                   else 2e-2)

    @pytest.mark.parametrize("h,w", [(300, 400), (300, 1200), (40, 32), (1200, 300)])
    def test_ordinary_aspect_ratios_are_untouched(self, h: int, w: int) -> None:
        rgb = np.random.default_rng(1).random((h, w, 3), dtype=np.float32)
        np.testing.assert_array_equal(resize_crop(rgb, 224, 0.875), full_resize_crop(rgb, 224, 0.875))

    def test_decode_cost_of_a_zero_png_is_bounded(self, tmp_path: Path) -> None:
        # 6000x6000 zeros, 105 kB: decoding to float used 1.1 GB; now the area resize runs over
        # strips of rows, so no float copy of the whole image is made
        p = tmp_path / "zeros.png"
        Image.new("RGB", (6000, 6000)).save(p, optimize=True)
        assert p.stat().st_size < 120_000
        rss = peak_rss_mib("from cinemae.runtime.preprocess import preprocess\n"
                           f"x = preprocess({str(p)!r}, 224, 0.875)\nassert x.shape == (3, 224, 224)")
        assert rss < 600, f"peak RSS {rss:.0f} MiB (decoded RGB alone is 103 MiB; 1.1 GB before)"

    @pytest.mark.parametrize("h,w,size,ratio,mode", [
        (768, 1024, 224, 0.875, "RGB"), (500, 750, 32, 1.0, "RGBA"), (1024, 1024, 32, 1.0, "L"),
        (499, 751, 224, 0.875, "I;16"), (300, 9000, 32, 1.0, "RGB"), (3000, 300, 224, 0.875, "RGB")])
    def test_strip_area_resize_matches_full_decoding(self, h: int, w: int, size: int,
                                                     ratio: float, mode: str) -> None:
        from cinemae.runtime.preprocess import load_resized

        a = (smooth_rgb(h, w, seed=2) * 255).round().astype(np.uint8)
        im = Image.fromarray(a)
        if mode == "RGBA":
            im.putalpha(Image.fromarray(a[:, :, 0]))
        elif mode == "L":
            im = im.convert("L")
        elif mode == "I;16":
            im = Image.fromarray(a[:, :, 0].astype(np.uint16) * 257)
        data = encode(im, "PNG")
        got = load_resized(data, size, ratio)
        ref = full_resize_crop(decode(data), size, ratio)  # the whole image in float, then resized
        np.testing.assert_allclose(got, ref, atol=2e-5)

    def test_jpeg_draft_only_far_above_the_model_size(self) -> None:
        from cinemae.runtime.preprocess import DRAFT_MARGIN, _load_oriented, open_image

        side = 2 * DRAFT_MARGIN * 8  # a model that needs a shorter side of 8
        big = open_image(encode(sample_rgb(side, side), "JPEG"))
        assert _load_oriented(big, 8).size == (side // 2, side // 2)  # DCT scaling by 1/2
        small = open_image(encode(sample_rgb(side - 8, side - 8), "JPEG"))
        assert _load_oriented(small, 8).size == (side - 8, side - 8)

    def test_exif_rotation_with_strips(self) -> None:
        from cinemae.runtime.preprocess import load_resized

        upright = Image.fromarray((smooth_rgb(400, 300, seed=3) * 255).astype(np.uint8))
        exif = Image.Exif()
        exif[0x0112] = 6
        stored = encode(upright.transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif)
        np.testing.assert_allclose(load_resized(stored, 32, 1.0),
                                   load_resized(encode(upright, "PNG"), 32, 1.0), atol=1e-6)


class TestHeaderChecks:
    """Issue 16 items 14, 15, 17: limits and formats are decided from the header."""

    def test_twenty_byte_jpeg_is_truncated(self) -> None:
        data = encode(sample_rgb(64, 64), "JPEG")[:20]
        with pytest.raises(InputError) as e:
            decode(data)
        assert e.value.code == "truncated", e.value

    def test_pixel_limit_above_pillows_own(self) -> None:
        from PIL import Image as PILImage

        pillow = PILImage.MAX_IMAGE_PIXELS or 89_478_485
        side = int((2.5 * pillow) ** 0.5)  # beyond twice Pillow's limit: Pillow alone would refuse it
        with pytest.raises(InputError) as e:
            decode(png_header_only(side, side), max_pixels=side * side + 1)
        assert e.value.code != "too_large"  # passed the limit; the fake body then fails to decode
        with pytest.raises(InputError) as e:
            decode(png_header_only(3 * side, 3 * side), max_pixels=side * side + 1)
        assert e.value.code == "too_large" and f"{side * side + 1}-pixel" in str(e.value)

    def test_eps_is_refused_before_decoding(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from PIL import EpsImagePlugin

        def no_ghostscript(*a: object, **k: object) -> None:
            raise AssertionError("Ghostscript was invoked")

        monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_ghostscript)
        eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n"
        with pytest.raises(InputError) as e:
            decode(eps)
        assert e.value.code == "unsupported" and "EPS images are not accepted" in str(e.value)

    def test_ico_refused_and_formats_configurable(self) -> None:
        ico = encode(sample_rgb(32, 32), "ICO")
        with pytest.raises(InputError) as e:
            decode(ico)
        assert e.value.code == "unsupported" and "ICO" in str(e.value)
        png = encode(sample_rgb(), "PNG")
        with pytest.raises(InputError) as e:
            decode(png, formats=["JPEG"])
        assert e.value.code == "unsupported" and "PNG images are not accepted" in str(e.value)
        assert decode(ico, formats=["ICO"]).shape == (32, 32, 3)
        with pytest.raises(ValueError, match="unknown image format"):
            decode(png, formats=["NOPE"])


def test_embedded_model_warns_once_on_large_images() -> None:
    import warnings

    from cinemae.runtime import Detector

    det = Detector(device="cpu")
    big = encode(sample_rgb(512, 384), "JPEG")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        det.detect_batch([encode(sample_rgb(32, 32), "PNG")])
        assert not caught  # a 32-px image is the model's domain
        det.detect_batch([big, big])
        det.detect_batch([big])
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "32-pixel CIFAKE demonstration" in msgs[0] and "cinemae-export" in msgs[0]


def test_cli_says_once_that_the_embedded_model_is_a_demo(tmp_path: Path) -> None:
    import subprocess
    import sys

    for i in range(3):
        sample_rgb(400 + i, 300).save(tmp_path / f"photo{i}.jpg")
    r = subprocess.run([sys.executable, "-m", "cinemae.runtime.cli", str(tmp_path), "--device", "cpu",
                        "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "32-pixel CIFAKE demonstration" in ln]
    assert len(lines) == 1 and lines[0].startswith("cinemae-detect: warning: ")
    assert "cinemae-export --checkpoint" in lines[0]
