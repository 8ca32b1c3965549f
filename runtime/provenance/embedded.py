"""What a file says about itself outside C2PA: EXIF, XMP (IPTC DigitalSourceType), PNG text chunks
written by image generators, JPEG comments.

Everything is read from the encoded bytes without decoding a pixel, and every read is bounded:
at most :data:`MAX_CHUNKS` chunks/segments are looked at, a compressed text chunk is inflated to at
most :data:`MAX_TEXT_BYTES`, XMP is matched with regular expressions over at most
:data:`MAX_XMP_BYTES` (no XML parser, so no entity expansion), and every string kept in the result
is cut to :data:`KEEP_CHARS` characters (``truncated`` says so).
"""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from typing import Any

MAX_CHUNKS = 512  # PNG chunks / JPEG segments looked at
MAX_TEXT_BYTES = 1 << 20  # one inflated text chunk
MAX_TOTAL_TEXT_BYTES = 8 << 20  # all text chunks of one file together
MAX_XMP_BYTES = 2 << 20
KEEP_CHARS = 4096  # longest string kept in a result

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
XMP_JPEG_PREFIX = b"http://ns.adobe.com/xap/1.0/\x00"

# IPTC digital source types (https://cv.iptc.org/newscodes/digitalsourcetype/) that say "made by AI".
AI_SOURCE_TYPES = frozenset(("trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia"))

# Text-chunk keys that image generators write, with who writes them (documented by each tool):
#   parameters           AUTOMATIC1111 / Forge / SD.Next web UIs ("<prompt>\nNegative prompt: ...\nSteps: ...")
#   prompt, workflow     ComfyUI (the API graph and the editor graph, both JSON)
#   invokeai_metadata, invokeai_graph, sd-metadata, Dream    InvokeAI (current and older versions)
#   fooocus_scheme       Fooocus (with its JSON in `parameters`)
#   Comment + Software="NovelAI"   NovelAI (JSON with prompt, steps, sampler, seed)
#   generation_data      Civitai's on-site generator
GENERATOR_KEYS: dict[str, str] = {
    "parameters": "AUTOMATIC1111-compatible web UI",
    "prompt": "ComfyUI",
    "workflow": "ComfyUI",
    "invokeai_metadata": "InvokeAI",
    "invokeai_graph": "InvokeAI",
    "sd-metadata": "InvokeAI",
    "Dream": "InvokeAI",
    "fooocus_scheme": "Fooocus",
    "generation_data": "Civitai",
}

# EXIF tags (IFD0 unless noted)
EXIF_TAGS = {0x010F: "Make", 0x0110: "Model", 0x0131: "Software", 0x013B: "Artist",
             0x010E: "ImageDescription"}
EXIF_IFD_TAGS = {0x9286: "UserComment"}  # in the Exif sub-IFD (A1111 writes its parameters here in JPEG/WebP)


def keep(s: str, state: dict[str, Any]) -> str:
    """Cut ``s`` to KEEP_CHARS characters, noting the cut in ``state['truncated']``."""
    if len(s) > KEEP_CHARS:
        state["truncated"] = True
        return s[:KEEP_CHARS]
    return s


def _inflate(data: bytes) -> bytes:
    """zlib data -> at most MAX_TEXT_BYTES bytes (a zip bomb stops there)."""
    d = zlib.decompressobj()
    out = d.decompress(data, MAX_TEXT_BYTES)
    return out


def png_text_chunks(data: bytes, errors: list[str], exif: list[bytes] | None = None) -> dict[str, str]:
    """tEXt / zTXt / iTXt chunks of a PNG, before and after the image data: {keyword: text}. The
    first eXIf chunk's bytes are appended to ``exif`` when given (Pillow's PngImageFile.getexif
    would decode every pixel to find one after the image data)."""
    out: dict[str, str] = {}
    pos, total, n = len(PNG_SIGNATURE), 0, 0
    while pos + 8 <= len(data) and n < MAX_CHUNKS:
        n += 1
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if len(body) < length:
            errors.append(f"png: chunk {ctype!r} cut short")
            break
        if ctype not in (b"tEXt", b"zTXt", b"iTXt"):
            if ctype == b"eXIf" and exif is not None and not exif:
                exif.append(body)
            if ctype == b"IEND":
                break
            continue
        try:
            key, _, rest = body.partition(b"\x00")
            if ctype == b"tEXt":
                text = rest[:MAX_TEXT_BYTES].decode("latin-1")
            elif ctype == b"zTXt":
                text = _inflate(rest[1:]).decode("latin-1")
            else:  # iTXt: compressed flag, method, language\0, translated keyword\0, text
                flag = rest[0]
                _, _, rest2 = rest[2:].partition(b"\x00")
                _, _, raw = rest2.partition(b"\x00")
                text = (_inflate(raw) if flag else raw[:MAX_TEXT_BYTES]).decode("utf-8", "replace")
        except (zlib.error, IndexError, UnicodeDecodeError) as e:
            errors.append(f"png: unreadable {ctype.decode('latin-1')} chunk ({e})")
            continue
        total += len(text)
        if total > MAX_TOTAL_TEXT_BYTES:
            errors.append(f"png: text chunks exceed {MAX_TOTAL_TEXT_BYTES} bytes; the rest was not read")
            break
        k = key.decode("latin-1")[:79]
        out[k] = text if k not in out else out[k]
    return out


def _user_comment(v: bytes) -> str:
    """EXIF UserComment bytes -> text. "UNICODE\\0" is UTF-16: big-endian as piexif writes it (the
    A1111 web UI), little-endian when the first byte is not NUL, a BOM wins."""
    prefix, body = v[:8], v[8:MAX_TEXT_BYTES]
    if not prefix.startswith(b"UNICODE"):
        return body.decode("utf-8" if prefix.startswith(b"ASCII") else "latin-1", "replace")
    if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return body.decode("utf-16", "replace")
    return body.decode("utf-16-be" if body[:1] == b"\x00" else "utf-16-le", "replace")


def _exif(im: Any, state: dict[str, Any], errors: list[str], raw: bytes | None = None) -> dict[str, str]:
    """The EXIF tags we report, from ``raw`` (a PNG's eXIf chunk) or the header Pillow parsed;
    never through PngImageFile.getexif, which decodes the whole image first."""
    from PIL import Image

    out: dict[str, str] = {}
    try:
        if raw is not None:
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = Image.Image.getexif(im)
    except Exception as e:  # noqa: BLE001 - a malformed EXIF block is a finding, not a failure
        errors.append(f"exif: unreadable ({type(e).__name__}: {e})")
        return out
    items = [(EXIF_TAGS, exif)]
    try:
        items.append((EXIF_IFD_TAGS, exif.get_ifd(0x8769)))
    except Exception as e:  # noqa: BLE001
        errors.append(f"exif: unreadable Exif IFD ({type(e).__name__}: {e})")
    for tags, ifd in items:
        for tag, name in tags.items():
            v = ifd.get(tag)
            if v is None:
                continue
            if isinstance(v, bytes):  # UserComment: 8-byte charset prefix, then the text
                v = _user_comment(v)
            s = str(v).strip("\x00 ")
            if s:
                out[name] = keep(s, state)
    return out


_DST_RE = re.compile(
    rb"DigitalSourceType(?:\s*=\s*[\"']([^\"']{1,512})[\"']|\s*>\s*([^<]{1,512})<)|"
    rb"DigitalSourceType[^>]{0,64}rdf:resource\s*=\s*[\"']([^\"']{1,512})[\"']")
_TOOL_RE = re.compile(rb"CreatorTool(?:\s*=\s*[\"']([^\"']{1,512})[\"']|\s*>\s*([^<]{1,512})<)")
_PROV_RE = re.compile(rb"dcterms:provenance(?:\s*=\s*[\"']([^\"']{1,2048})[\"']|\s*>\s*([^<]{1,2048})<)")


def _first(m: re.Match[bytes]) -> str:
    return next(g for g in m.groups() if g is not None).decode("utf-8", "replace").strip()


def xmp_fields(xmp: bytes) -> dict[str, Any]:
    """XMP packet -> {"digital_source_type": [...], "creator_tool", "provenance_url"} (present keys)."""
    xmp = xmp[:MAX_XMP_BYTES]
    out: dict[str, Any] = {}
    dst = [_first(m) for m in _DST_RE.finditer(xmp)][:16]
    if dst:
        out["digital_source_type"] = dst
    m = _TOOL_RE.search(xmp)
    if m:
        out["creator_tool"] = _first(m)[:KEEP_CHARS]
    m = _PROV_RE.search(xmp)
    if m:
        out["provenance_url"] = _first(m)[:KEEP_CHARS]  # a remote C2PA manifest; never fetched
    return out


def source_type_name(uri: str) -> str:
    """``http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia`` -> the last part."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _jpeg_segments(im: Any) -> tuple[list[bytes], bytes | None]:
    """Comments and the XMP packet of a JPEG opened by Pillow (its header already parsed)."""
    comments: list[bytes] = []
    xmp = None
    for marker, body in getattr(im, "applist", [])[:MAX_CHUNKS]:
        if marker == "COM":
            comments.append(body)
        elif marker == "APP1" and body.startswith(XMP_JPEG_PREFIX) and xmp is None:
            xmp = body[len(XMP_JPEG_PREFIX):]
    return comments, xmp


def generator_from_text(text: dict[str, str], exif: dict[str, str]) -> dict[str, Any] | None:
    """Generator parameters found in text chunks or EXIF, checked for the tool's own format (so
    an unrelated ``prompt`` chunk is not taken for ComfyUI's): {"tool", "keys", "parameters"}."""
    keys: list[str] = []
    tools: list[str] = []
    params = None
    for key, tool in GENERATOR_KEYS.items():
        v = text.get(key)
        if not v:
            continue
        if key == "parameters" and not (("Steps:" in v and "Sampler:" in v) or _json_obj(v)):
            continue
        if key in ("prompt", "workflow"):
            obj = _json_obj(v)
            if not obj or not (key == "workflow" and "nodes" in obj
                               or key == "prompt" and any(isinstance(n, dict) and "class_type" in n
                                                          for n in obj.values())):
                continue
        keys.append(key)
        tools.append(tool)
        params = params or v
    software = text.get("Software", "") or exif.get("Software", "")
    if "Comment" in text and "novelai" in software.lower() and _json_obj(text["Comment"]):
        keys.append("Comment")
        tools.append("NovelAI")
        params = params or text["Comment"]
    uc = exif.get("UserComment", "")
    if "Steps:" in uc and "Sampler:" in uc:
        keys.append("exif:UserComment")
        tools.append("AUTOMATIC1111-compatible web UI")
        params = params or uc
    if not keys:
        return None
    return {"tool": sorted(set(tools)), "keys": keys, "parameters": params}


def _json_obj(s: str) -> dict[str, Any] | None:
    if len(s) > MAX_TEXT_BYTES or not s.lstrip().startswith("{"):
        return None
    try:
        v = json.loads(s)
    except (ValueError, RecursionError):
        return None
    return v if isinstance(v, dict) else None


def read_embedded(data: bytes) -> dict[str, Any]:
    """Encoded image bytes -> the non-C2PA metadata findings.

    Returns {"format", "exif": {Make, Model, Software, Artist, ImageDescription, UserComment},
    "xmp": {digital_source_type, creator_tool, provenance_url}, "text": {keyword: text},
    "comments": [str], "generator": {...} | None, "errors": [str], "truncated": bool}; keys with
    nothing found are empty. Never raises on a malformed file: the problem goes in ``errors``.
    """
    from PIL import Image

    state: dict[str, Any] = {"truncated": False}
    errors: list[str] = []
    out: dict[str, Any] = {"format": None, "exif": {}, "xmp": {}, "text": {}, "comments": [],
                           "generator": None}
    is_png = data.startswith(PNG_SIGNATURE)
    png_exif: list[bytes] = []
    text: dict[str, str] = png_text_chunks(data, errors, png_exif) if is_png else {}
    xmp: bytes | None = None
    if is_png:
        out["format"] = "PNG"
        raw = text.pop("XML:com.adobe.xmp", None)
        xmp = raw.encode("utf-8") if raw else None
    try:
        im = Image.open(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - Pillow refuses it (not an image, or its own limits)
        errors.append(f"header: {type(e).__name__}: {e}")
        im = None
    if im is not None:
        with im:
            out["format"] = im.format
            out["exif"] = _exif(im, state, errors, png_exif[0] if png_exif else None)
            if im.format in ("JPEG", "MPO"):
                comments, xmp = _jpeg_segments(im)
                texts = (c[:MAX_TEXT_BYTES].decode("utf-8", "replace").strip("\x00 \t\r\n") for c in comments[:16])
                out["comments"] = [keep(t, state) for t in texts if t]  # blank padding is not a comment
            if xmp is None:
                v = im.info.get("xmp") or im.info.get("XML:com.adobe.xmp")
                xmp = v.encode("utf-8") if isinstance(v, str) else v
    if xmp:
        out["xmp"] = xmp_fields(xmp)
    gen = generator_from_text(text, out["exif"])
    if gen:
        gen["parameters"] = keep(gen["parameters"], state)
    out["generator"] = gen
    out["text"] = {keep(k, state): keep(v, state) for k, v in list(text.items())[:64]}
    out["errors"] = errors
    out["truncated"] = bool(state["truncated"])
    return out
