"""Inputs of a cluster scan: folders, files or URIs that pyarrow can list, or manifests of URIs.

A source without a scheme is a local path and is listed exactly as ``cinemae-detect`` lists it
(:func:`cinemae.runtime.cli.iter_inputs`), so both commands name an input by the same string.
A URI (``s3://bucket/prefix``, ``gs://...``, ``file:///...``) is listed recursively through
``pyarrow.fs``; each file keeps the URI's scheme in its name. Folders contribute the files with
an image suffix; files named directly are taken whatever their suffix.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from cinemae.runtime.inputs import IMAGE_SUFFIXES, iter_inputs, normalise_path


def has_scheme(source: str) -> bool:
    """True for ``scheme://...`` (a URI), False for a local path."""
    head, sep, _ = source.partition("://")
    return bool(sep) and head.isalnum() and len(head) > 1


def _list_uri(uri: str) -> list[str]:
    import pyarrow.fs as pafs

    scheme = uri.partition("://")[0]
    fs, root = pafs.FileSystem.from_uri(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type == pafs.FileType.NotFound:
        return [uri]  # recorded as a per-input error, like a missing local file
    sel = pafs.FileSelector(root, recursive=True)
    out = []
    for fi in fs.get_file_info(sel):
        if fi.type == pafs.FileType.File and Path(fi.path).suffix.lower() in IMAGE_SUFFIXES:
            out.append(f"{scheme}://{fi.path}")
    return sorted(out)


def identity(source: str) -> str:
    """What makes two names one input: the URI as given, or the normalised absolute path
    (``small``, ``./small`` and ``/abs//small`` are one file), as the local scan's ``path``."""
    return source if has_scheme(source) else normalise_path(source)


def read_manifest(path: str) -> list[str]:
    """One input (path or URI) per line; blank lines and ``#`` comments are ignored."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def list_inputs(sources: Iterable[str], manifests: Iterable[str] = ()) -> dict[str, str]:
    """Every input named by ``sources`` (folders, files, URIs) and the ``manifests``:
    {identity: name as listed}, each input once (the first name met), sorted by identity
    (the order the plan is cut from)."""
    found: dict[str, str] = {}
    items = list(sources)
    for m in manifests:
        items += read_manifest(m)
    for s in items:
        if s.startswith("file://"):
            s = s[len("file://"):]
        for name in (_list_uri(s) if has_scheme(s) else iter_inputs([s])):
            found.setdefault(identity(name), name)
    return dict(sorted(found.items()))


def read_input(source: str, max_bytes: int) -> bytes:
    """The bytes of one input; raises :class:`cinemae.runtime.preprocess.InputError`
    (``not_found``, ``too_large``, ``unsupported``) with a one-sentence message."""
    from cinemae.runtime.preprocess import InputError, read_bytes

    if not has_scheme(source):
        return read_bytes(source, max_bytes)
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(source)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise InputError("not_found", f"{source}: no such object")
        if info.type != pafs.FileType.File:
            raise InputError("unsupported", f"{source}: not a file")
        if info.size is not None and info.size > max_bytes:
            raise InputError("too_large", f"{source}: {info.size} bytes exceeds the {max_bytes}-byte limit")
        with fs.open_input_stream(path) as f:
            data = f.read(max_bytes + 1)
    except InputError:
        raise
    except (OSError, ValueError) as e:
        raise InputError("not_found", f"{source}: cannot read ({e})") from None
    if len(data) > max_bytes:
        raise InputError("too_large", f"{source}: exceeds the {max_bytes}-byte limit")
    return bytes(data)

