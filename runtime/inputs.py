"""What the commands score: the inputs named on a command line, and file names as records carry them.

* :func:`iter_inputs` walks folders (sorted, image suffixes) and passes files through.
* :func:`split_bundle` tells ``[BUNDLE] PATH...`` apart, and refuses a folder that looks like a
  bundle but has no ``cinemae.json`` (it would otherwise be scanned as images by the embedded model).
* :func:`normalise_path` is the identity of a file across runs (``small``, ``/abs/small`` and
  ``/abs//small`` are one file).
* :func:`text_and_bytes` makes a file name valid UTF-8 for JSON and terminals without losing it:
  a name that is not UTF-8 is shown with U+FFFD and its raw bytes travel base64-encoded.

No printing and no argument parsing here: the command-line programs use these.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path

from .bundle import MANIFEST, BundleError

IMAGE_SUFFIXES = frozenset((".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif",
                            ".jfif", ".pgm", ".ppm", ".pbm", ".tga", ".ico"))
#: files only a bundle has: a folder holding one of these but no manifest is a broken bundle
BUNDLE_MARKERS = ("encoder.onnx", "decoder.onnx", "head.onnx", "parity.json")


def iter_inputs(paths: list[str]) -> Iterator[str]:
    """Files as given (whatever their suffix), folders walked recursively in sorted order for
    files with an image suffix."""
    for p in paths:
        if os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for f in sorted(files):
                    if Path(f).suffix.lower() in IMAGE_SUFFIXES:
                        yield os.path.join(root, f)
        else:
            yield p


def split_bundle(positional: list[str], bundle: str | None) -> tuple[str | None, list[str]]:
    """``[BUNDLE] PATH...`` -> (bundle or None for the embedded one, input paths).

    The first positional is the bundle when it is a folder with ``cinemae.json``. A first
    positional folder that holds a bundle's graphs (``encoder.onnx``, ...) or ``parity.json``
    but no manifest raises :class:`BundleError`: it was meant as a bundle, and scanning it as
    images with the embedded model would answer a question nobody asked.
    """
    if bundle is not None or not positional:
        return bundle, positional
    first = Path(positional[0])
    if (first / MANIFEST).is_file():
        return positional[0], positional[1:]
    if first.is_dir():
        marks = [m for m in BUNDLE_MARKERS if (first / m).is_file()]
        if marks:
            raise BundleError(f"{text_and_bytes(str(first))[0]}: has {marks[0]} but no {MANIFEST}, so it is not a "
                              "usable bundle (re-export it with `cinemae-export`); it is not scanned as images")
    return None, positional


def normalise_path(path: str | os.PathLike[str]) -> str:
    """The absolute, lexically normalised form of ``path`` (``.``, ``..`` and repeated slashes
    folded; symlinks are not resolved, so two links to one file stay two inputs)."""
    p = os.path.abspath(os.fspath(path))
    if p.startswith("//") and not p.startswith("///"):  # POSIX keeps a leading '//' as it is
        p = "/" + p.lstrip("/")
    return p


def text_and_bytes(name: str) -> tuple[str, str | None]:
    """A file name as (valid UTF-8 text, base64 of its raw bytes or None).

    Names decoded by Python with ``surrogateescape`` (bytes that are not UTF-8) cannot be written
    to JSON or a strict UTF-8 terminal as they are: the text replaces each undecodable byte with
    U+FFFD and the second value keeps the exact bytes. A UTF-8 name gives (name, None).
    """
    try:
        name.encode("utf-8")
        return name, None
    except UnicodeEncodeError:
        pass
    try:
        raw = os.fsencode(name)
    except UnicodeEncodeError:  # a lone surrogate that did not come from a file name
        raw = name.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace"), base64.b64encode(raw).decode("ascii")


def valid_text(s: str) -> str:
    """``s`` with anything that is not valid UTF-8 (lone surrogates) replaced by U+FFFD."""
    return text_and_bytes(s)[0]


def path_from_record(path: str, path_bytes_b64: str | None) -> bytes:
    """The exact file-name bytes a record names (inverse of :func:`text_and_bytes`)."""
    return base64.b64decode(path_bytes_b64) if path_bytes_b64 else os.fsencode(path)
