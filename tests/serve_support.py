"""Fixtures of the service tests (moved out of the shipped benchmarks): images, a decompression
bomb, a malformed-input corpus, raw-socket attack clients, /metrics parsing and process RSS."""

from __future__ import annotations

import functools
import os
import socket
import struct
import time
import zlib
from pathlib import Path

import numpy as np


def encode(img: np.ndarray, ext: str = ".png", quality: int = 95) -> bytes:
    """RGB uint8 [h, w, 3] -> encoded bytes."""
    import cv2

    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(img[:, :, ::-1]), params)
    assert ok
    return buf.tobytes()


def random_images(n: int, size: tuple[int, int] = (40, 48), seed: int = 0, ext: str = ".png") -> list[bytes]:
    """``n`` distinct random images (smooth + noise, so JPEG/PNG both behave)."""
    rng = np.random.default_rng(seed)
    out = []
    h, w = size
    for _ in range(n):
        base = rng.integers(0, 255, (4, 4, 3)).astype(np.float32)
        import cv2

        img = cv2.resize(base, (w, h), interpolation=cv2.INTER_LINEAR)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        out.append(encode(img, ext))
    return out


@functools.lru_cache(maxsize=4)
def png_bomb(side: int = 30000) -> bytes:
    """A valid 1-bit greyscale PNG of side x side black pixels (side^2 decoded pixels) that is
    about side^2 / 8000 bytes on the wire: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    parts = [comp.compress(row * 1000) for _ in range(side // 1000)]
    parts.append(comp.compress(row * (side % 1000)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts))
            + chunk(b"IEND", b""))


def malformed_corpus(good_jpeg: bytes, huge_bytes: int) -> dict[str, tuple[dict, bytes, int]]:
    """name -> (extra request headers, raw body, expected HTTP status) for POST /v1/detect."""
    return {
        "empty": ({"Content-Type": "image/jpeg"}, b"", 422),
        "truncated_jpeg": ({"Content-Type": "image/jpeg"}, good_jpeg[: len(good_jpeg) // 2], 422),
        "header_only_jpeg": ({"Content-Type": "image/jpeg"}, good_jpeg[:20], 422),  # truncated
        "corrupt_png_body": ({"Content-Type": "image/png"}, _corrupt_png(), 422),
        "text": ({"Content-Type": "text/plain"}, b"hello, this is not an image\n" * 10, 415),
        "json": ({"Content-Type": "application/json"}, b'{"image": "cat.jpg"}', 415),
        "pdf": ({"Content-Type": "application/pdf"}, b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", 415),
        "zip": ({"Content-Type": "application/zip"}, b"PK\x03\x04" + os.urandom(200), 415),
        "random_bytes": ({"Content-Type": "application/octet-stream"}, os.urandom(4096), 415),
        "png_bomb_30000x30000": ({"Content-Type": "image/png"}, png_bomb(30000), 413),
        "huge_body": ({"Content-Type": "image/jpeg"}, b"\xff\xd8\xff" + b"\0" * huge_bytes, 413),
        "bad_multipart": ({"Content-Type": "multipart/form-data; boundary=xyz"},
                          b"--xyz\r\nContent-Disposition: form-data; name=\"a\"; filename=\"a.jpg\"\r\n"
                          b"garbage without the closing boundary", 400),
        "multipart_no_boundary": ({"Content-Type": "multipart/form-data"}, b"whatever", 400),
        "multipart_no_files": ({"Content-Type": "multipart/form-data; boundary=xyz"},
                               b"--xyz\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhi\r\n--xyz--\r\n",
                               422),
    }


def _corrupt_png() -> bytes:
    data = bytearray(encode(np.full((64, 64, 3), 100, np.uint8) + np.arange(64, dtype=np.uint8)[:, None, None],
                            ".png"))
    i = data.index(b"IDAT") + 8
    data[i:i + 40] = os.urandom(40)  # garbage in the compressed stream (the CRC now fails too)
    return bytes(data)




@functools.lru_cache(maxsize=4)
def zeros_png(side: int) -> bytes:
    """A side x side 8-bit RGB PNG of zeros: ~side^2 / 340 bytes, side^2 pixels to decode."""
    import cv2

    return cv2.imencode(".png", np.zeros((side, side, 3), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])[1].tobytes()


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus exposition -> {(sample name, sorted labels): value}, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(metrics: dict, name: str, **labels: str) -> float:
    """The value of one sample (0 when absent: a labelled counter appears on first increment)."""
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def total(metrics: dict, name: str) -> float:
    """Sum over every label set of ``name``."""
    return sum(v for (n, _), v in metrics.items() if n == name)


def peak_rss_kb(pid: int) -> int:
    """The process's peak resident set (VmHWM), kB."""
    return int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("VmHWM:")))


def raw_connect(url: str, timeout: float = 10.0) -> socket.socket:
    host, port = url.split("//", 1)[1].split(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def read_response(sock: socket.socket, limit: float = 30.0) -> tuple[int | None, dict[str, str], bytes]:
    """(status, headers, body) of one HTTP response on a raw socket, reading until the server
    closes or the declared body is complete; status None when the server closed without one."""
    end = time.monotonic() + limit
    buf = b""
    while b"\r\n\r\n" not in buf and time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            break
        if not chunk:
            break
        buf += chunk
    if b"\r\n\r\n" not in buf:
        return None, {}, buf
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:] if ":" in x)}
    n = int(headers.get("content-length", "0"))
    while len(body) < n and time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            break
        if not chunk:
            break
        body += chunk
    return status, headers, body


def closed_by_peer(sock: socket.socket, limit: float) -> float | None:
    """Seconds until the server closes this connection (reading and discarding what it sends),
    or None when it is still open after ``limit`` seconds."""
    t = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - t < limit:
        try:
            if not sock.recv(65536):
                return time.monotonic() - t
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - t
    return None


def tiny_png() -> bytes:
    """A valid 1x1 PNG (for requests whose body must be small)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\x80\x80\x80")) + chunk(b"IEND", b""))



