"""Provenance: what a file says about itself, read before the pixels and reported beside the
pixel score.

    prov = read_provenance(data)                 # encoded bytes -> the ``provenance`` object
    verdict, reason = apply_policy(prov, pixel_verdict)

The policy (default on; ``policy=False`` / ``--no-provenance-policy`` turns it off):

* a C2PA manifest whose signature and hashes check out (state ``Valid`` or ``Trusted``) and whose
  actions declare an AI ``digitalSourceType`` (``trainedAlgorithmicMedia``,
  ``compositeWithTrainedAlgorithmicMedia``), or
* generator parameters in the file (Stable Diffusion web UIs' ``parameters``, ComfyUI's
  ``prompt``/``workflow`` graphs, InvokeAI, Fooocus, NovelAI, Civitai; see :mod:`.embedded`), or
* an IPTC ``DigitalSourceType`` of AI media in the XMP

make the verdict ``ai`` with the reason ``provenance``. Metadata never makes an image ``real``
(it is easily stripped or never written); a C2PA manifest with a broken signature is reported
and otherwise ignored; the pixel score and the pixel verdict are always reported too.
"""

from __future__ import annotations

from typing import Any

from .content_credentials import empty_c2pa, read_c2pa, reader_settings
from .embedded import AI_SOURCE_TYPES, read_embedded, source_type_name

POLICY = ("signed C2PA AI provenance, generator parameters or an IPTC AI DigitalSourceType make the "
          "verdict ai (reason provenance); metadata never makes an image real")


def read_provenance(data: bytes | bytearray | memoryview, *, c2pa: bool = True,
                    trust_anchors: str | None = None) -> dict[str, Any]:
    """Encoded image bytes -> the ``provenance`` object of a result.

    Keys: ``c2pa`` (see :func:`read_c2pa`), ``xmp`` {digital_source_type, creator_tool,
    provenance_url}, ``exif`` {Make, Model, Software, Artist, ImageDescription, UserComment},
    ``text`` {PNG keyword: text}, ``comments`` [JPEG comments], ``generator`` {tool, keys,
    parameters} or None, ``format``, ``ai_evidence`` (what the policy acts on), ``reasons``
    (which findings are AI evidence: ``c2pa``, ``generator_parameters``, ``iptc_digital_source_type``),
    ``errors`` (malformed metadata) and ``truncated`` (a string was cut to its size limit).
    Never raises for a hostile or malformed file.
    """
    data = bytes(data)
    out = read_embedded(data)
    out["c2pa"] = read_c2pa(data, out.get("format"), trust_anchors) if c2pa else empty_c2pa()
    url = out["xmp"].get("provenance_url")
    if url and not out["c2pa"]["present"]:  # only a reference to a remote manifest: never fetched
        out["c2pa"].update(present=True, embedded=False, remote_url=url,
                           error="the manifest is remote and was not fetched")
    elif url and not out["c2pa"]["remote_url"]:
        out["c2pa"]["remote_url"] = url
    reasons = []
    c = out["c2pa"]
    if c["present"] and c["signature_valid"] and c["ai"]:
        reasons.append("c2pa")
    if out["generator"]:
        reasons.append("generator_parameters")
    if any(source_type_name(d) in AI_SOURCE_TYPES for d in out["xmp"].get("digital_source_type", [])):
        reasons.append("iptc_digital_source_type")
    out["reasons"] = reasons
    out["ai_evidence"] = bool(reasons)
    return out


def no_provenance(why: str) -> dict[str, Any]:
    """The provenance object of an input with no file to read (a decoded array, a video frame)."""
    return {"format": None, "exif": {}, "xmp": {}, "text": {}, "comments": [], "generator": None,
            "c2pa": empty_c2pa(), "reasons": [], "ai_evidence": False, "errors": [], "truncated": False,
            "unavailable": why}


def apply_policy(provenance: dict[str, Any] | None, pixel_verdict: str | None,
                 enabled: bool = True) -> tuple[str | None, str]:
    """(verdict, reason): ``("ai", "provenance")`` when the policy is on and the provenance is AI
    evidence, else the pixel verdict with reason ``pixels``. Never turns a verdict into ``real``."""
    if enabled and provenance and provenance.get("ai_evidence") and pixel_verdict is not None:
        return "ai", "provenance"
    return pixel_verdict, "pixels"


__all__ = ["POLICY", "apply_policy", "no_provenance", "read_c2pa", "read_embedded", "read_provenance",
           "reader_settings"]
