"""Helpers for the service tests and the load test: start the real ``cinemae-serve`` process on
loopback, build images and a malformed-input corpus."""

from __future__ import annotations

import functools
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m cinemae.runtime.serve BUNDLE --port P ...`` as a child process."""

    def __init__(self, bundle: str | os.PathLike[str] | None, *args: str, env: dict[str, str] | None = None,
                 log: str | os.PathLike[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "cinemae.runtime.serve"]
        if bundle is not None:
            cmd.append(str(bundle))
        cmd += ["--port", str(self.port), "--log-level", "warning", *args]
        self.log_path = Path(log) if log else None
        self._log = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=self._log,
                                     env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 60.0) -> None:
        import httpx

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_text()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("server not ready: " + self.log_text())

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path else ""

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        return rc


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
        "header_only_jpeg": ({"Content-Type": "image/jpeg"}, good_jpeg[:20], 415),
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
