"""``cinemae-stream [BUNDLE] --source 0|rtsp://...|file.mp4 --every N``: score camera and video
frames through OpenCV, one JSON line per scored frame on stdout.

* ``--source``: a camera index (``0``), a URL (rtsp, rtmp, http(s), udp, tcp, gst pipelines
  are passed to OpenCV as they are) or a video file.
* Every ``N``-th frame is decoded and scored (the others are only grabbed, which is cheap);
  frames are BGR in OpenCV and are converted to RGB before scoring.
* Live sources (camera, URL, or ``--live``) reconnect with exponential backoff when they cannot
  be opened or stop delivering frames (``--backoff``, doubling up to ``--max-backoff``; a
  delivered frame resets it; ``--max-retries`` bounds the attempts in a row, 0 = no bound).
* A file source ends cleanly at its end (exit 0). SIGINT / SIGTERM end the stream cleanly too.

A JSON line is the runtime's one result record (``Result.to_record()``: ``source`` (the
``--source`` as given), ``score``, ``logit``, ``verdict``, ``stats`` [s1, s2, s3], ``error``,
``error_code``, ``timings``, ``model`` {id, version, manifest_sha256, backend, precision, k,
threshold}) plus the stream's own fields ``frame``, ``timestamp_ms``, ``time`` (unix s) and
``latency_ms``, where ``frame`` counts the frames read from the source since the start (across
reconnects) and ``timestamp_ms`` is the source's position (``CAP_PROP_POS_MSEC``), or the time
since the stream began when the source reports none. A frame that cannot be scored has
``error`` and ``error_code`` set and null score fields.

``--heatmap DIR`` draws each scored frame's per-patch LCAS map on the frame
(``DIR/frame-<frame>.heatmap.png``, the legend below it) and adds ``heatmap`` to its line;
``--explain-k N`` makes those maps from N masking runs (the verdict keeps the bundle's K).
Frames carry no file metadata: ``provenance`` says so.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

LIVE_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://",
                "srt://")


def parse_source(source: str) -> int | str:
    """``"0"`` -> camera index 0; anything else is a path or URL as given."""
    s = source.strip()
    return int(s) if s.isdigit() else s


def is_live(source: int | str) -> bool:
    """Cameras and network streams are live (reconnect); files are not (end at EOF)."""
    if isinstance(source, int):
        return True
    low = source.lower()
    return low.startswith(LIVE_SCHEMES) or "!" in source  # a GStreamer pipeline


def open_capture(source: int | str, timeout_s: float = 10.0) -> Any:
    """An opened ``cv2.VideoCapture`` or None. Network sources get open and read timeouts so a
    dead stream is noticed (and reconnected) instead of blocking."""
    import cv2

    if isinstance(source, str) and source.lower().startswith(LIVE_SCHEMES):
        ms = int(timeout_s * 1000)
        cap = cv2.VideoCapture(source, cv2.CAP_ANY, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms,
                                                     cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms])
    else:
        cap = cv2.VideoCapture(source)
    if cap is None or not cap.isOpened():
        if cap is not None:
            cap.release()
        return None
    if isinstance(source, int):  # a camera: keep the driver queue short so frames are fresh
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
    return cap


class Stopper:
    """Set by SIGINT / SIGTERM so the frame loop ends between frames."""

    def __init__(self) -> None:
        self.stop = False

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        self.stop = True

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stop and time.monotonic() < end:
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))


def frames(source: int | str, every: int, live: bool, *, backoff: float = 0.5,
           max_backoff: float = 30.0, max_retries: int = 0, stopper: Stopper | None = None,
           log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
           opener: Callable[[int | str], Any] = open_capture
           ) -> Iterator[tuple[int, float, Any]]:
    """Yield (frame index, timestamp ms, BGR frame [h, w, 3] uint8) for every ``every``-th frame.

    Raises ``ConnectionError`` when a file cannot be opened, or a live source fails
    ``max_retries`` times in a row (0: retry forever).
    """
    import cv2

    stopper = stopper or Stopper()
    every = max(1, int(every))
    index = 0  # frames read from the source, across reconnects
    t_start = time.monotonic()
    delay = backoff
    failures = 0
    cap = None
    try:
        while not stopper.stop:
            if cap is None:
                cap = opener(source)
                if cap is None:
                    if not live:
                        raise ConnectionError(f"cannot open {source!r}")
                    failures += 1
                    if max_retries and failures >= max_retries:
                        raise ConnectionError(f"cannot open {source!r} after {failures} attempts")
                    log(f"# cannot open {source!r}; retrying in {delay:.1f} s (attempt {failures})")
                    stopper.sleep(delay)
                    delay = min(max_backoff, delay * 2)
                    continue
                if failures:
                    log(f"# reconnected to {source!r}")
            wanted = index % every == 0
            ok = cap.grab()
            if ok and wanted:
                ok, frame = cap.retrieve()
            if not ok:
                cap.release()
                cap = None
                if not live:
                    return  # end of file
                failures += 1
                if max_retries and failures >= max_retries:
                    raise ConnectionError(f"{source!r} stopped delivering frames ({failures} "
                                          "attempts in a row)")
                log(f"# {source!r} dropped; reconnecting in {delay:.1f} s (attempt {failures})")
                stopper.sleep(delay)
                delay = min(max_backoff, delay * 2)
                continue
            failures, delay = 0, backoff
            if wanted:
                pos = cap.get(cv2.CAP_PROP_POS_MSEC)
                ts = float(pos) if pos and pos > 0 else (
                    0.0 if not live and index == 0 else 1000.0 * (time.monotonic() - t_start))
                yield index, ts, frame
            index += 1
    finally:
        if cap is not None:
            cap.release()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cinemae-stream",
                                 description="Score camera or video frames; one JSON line per scored frame.")
    ap.add_argument("bundle", nargs="?", help="bundle directory (default: the embedded bundle)")
    ap.add_argument("--source", required=True, help="camera index (0), rtsp://... URL or video file")
    ap.add_argument("--every", type=int, default=1, help="score every N-th frame (default 1)")
    ap.add_argument("--max-frames", type=int, default=0, help="stop after this many scored frames")
    ap.add_argument("--live", action="store_true",
                    help="reconnect on drop/end even for a file path (a file being rotated, a pipe)")
    ap.add_argument("--backoff", type=float, default=0.5, help="first reconnect delay, seconds")
    ap.add_argument("--max-backoff", type=float, default=30.0)
    ap.add_argument("--max-retries", type=int, default=0,
                    help="give up after this many failed attempts in a row (0: never)")
    ap.add_argument("--timeout", type=float, default=10.0,
                    help="open/read timeout for network sources, seconds")
    from .backends import backend_choices, device_help, precision_choices  # the backend registry

    ap.add_argument("--backend", default="auto", choices=backend_choices())
    ap.add_argument("--device", default="auto", help=device_help())
    ap.add_argument("--precision", default="fp32", choices=precision_choices())
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime")
    ap.add_argument("--heatmap", metavar="DIR",
                    help="draw each scored frame's per-patch LCAS heatmap on it into DIR/frame-N.heatmap.png "
                         "and add the map to the JSON line")
    ap.add_argument("--explain-k", type=int, default=None, metavar="N",
                    help="heatmaps from N masking runs (e.g. 8: every patch scored); the verdict keeps the bundle's K")
    from .commands import add_reship_arguments

    add_reship_arguments(ap, "each scored frame")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.every < 1:
        print("cinemae-stream: --every must be >= 1", file=sys.stderr)
        return 2
    if args.explain_k is not None and not 1 <= args.explain_k <= 64:
        print("cinemae-stream: --explain-k must be in 1..64", file=sys.stderr)
        return 2
    explain = bool(args.heatmap) or args.explain_k is not None
    from .commands import open_detector

    det = open_detector("cinemae-stream", args.bundle, backend=args.backend, device=args.device,
                        precision=args.precision, batch_size=1, threads=args.threads, reship=args.reship,
                        reship_on=args.reship_on)
    if det is None:
        return 2
    source = parse_source(args.source)
    live = args.live or is_live(source)
    stopper = Stopper()
    stopper.install()
    scored = 0
    try:
        for index, ts, bgr in frames(source, args.every, live, backoff=args.backoff,
                                     max_backoff=args.max_backoff, max_retries=args.max_retries,
                                     stopper=stopper,
                                     opener=lambda s: open_capture(s, args.timeout)):
            t = time.perf_counter()
            rgb = bgr[:, :, ::-1]  # OpenCV frames are BGR
            r = det.detect_batch([rgb], [args.source], explain=explain, explain_k=args.explain_k)[0]
            if args.heatmap and r.heatmap is not None:
                from .explain.files import write_frame_heatmap

                write_frame_heatmap(args.heatmap, index, rgb, r)
            rec = r.to_record(frame=index, timestamp_ms=round(ts, 3), time=time.time(),
                              latency_ms=1000 * (time.perf_counter() - t))
            print(json.dumps(rec), flush=True)
            scored += 1
            if args.max_frames and scored >= args.max_frames:
                break
    except ConnectionError as e:
        print(f"cinemae-stream: {e}", file=sys.stderr)
        return 1 if scored else 2
    except BrokenPipeError:
        sys.stderr.close()
        return 0
    finally:
        det.close()
    print(f"# {scored} frames scored", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
