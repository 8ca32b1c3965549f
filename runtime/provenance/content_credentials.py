"""C2PA manifests (Content Credentials) read with ``c2pa-python``, offline.

Validation never touches the network: the reader's settings turn off remote-manifest fetching
(``verify.remote_manifest_fetch``) and OCSP fetching (``verify.ocsp_fetch``), allow no network
host (``core.allowed_network_hosts = []``), skip decoding identity assertions (which can name
remote credentials) and cap a decompressed manifest (``core.max_decompressed_manifest_size_in_mb``).
A manifest that only lives at a remote URL is reported with that URL, unvalidated. Timestamps are
checked against what the manifest carries (no TSA is contacted when reading).

Trust: without trust anchors every signer is ``untrusted`` (the signature and the hashes can still
be valid: state ``Valid``); ``trust_anchors`` (PEM) makes signers under them ``Trusted``.
"""

from __future__ import annotations

import io
from typing import Any

from .embedded import AI_SOURCE_TYPES, KEEP_CHARS, source_type_name

MAX_MANIFEST_MB = 16  # decompressed manifest store
MAX_ACTIONS = 32
MAX_FAILURES = 16

OFFLINE_SETTINGS: dict[str, Any] = {
    "verify": {"remote_manifest_fetch": False, "ocsp_fetch": False, "verify_trust": True,
               "verify_timestamp_trust": True},
    "core": {"allowed_network_hosts": [], "decode_identity_assertions": False,
             "max_decompressed_manifest_size_in_mb": MAX_MANIFEST_MB},
}


def reader_settings(trust_anchors: str | None = None) -> dict[str, Any]:
    """The c2pa settings every read uses (offline; ``trust_anchors``: PEM certificates)."""
    s = {k: dict(v) for k, v in OFFLINE_SETTINGS.items()}
    if trust_anchors:
        s["trust"] = {"user_anchors": trust_anchors}
    return s


def _mime(fmt: str | None) -> str | None:
    return {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
            "TIFF": "image/tiff", "GIF": "image/gif", "HEIF": "image/heif", "AVIF": "image/avif"
            }.get(fmt or "")


def empty_c2pa() -> dict[str, Any]:
    """The c2pa field when there is no manifest."""
    return {"present": False, "embedded": None, "remote_url": None, "state": None,
            "signature_valid": None, "trusted": None, "failures": [], "claim_generator": None,
            "signer": None, "actions": [], "digital_source_types": [], "ai": False, "error": None}


def _claim_generator(m: dict[str, Any]) -> str | None:
    info = m.get("claim_generator_info")
    if isinstance(info, list) and info and isinstance(info[0], dict):
        i = info[0]
        return " ".join(str(x) for x in (i.get("name"), i.get("version")) if x)[:KEEP_CHARS] or None
    cg = m.get("claim_generator")
    return str(cg)[:KEEP_CHARS] if cg else None


def _actions(m: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for a in m.get("assertions") or []:
        if not isinstance(a, dict) or not str(a.get("label", "")).startswith("c2pa.actions"):
            continue
        for act in (a.get("data") or {}).get("actions") or []:
            if not isinstance(act, dict) or len(out) >= MAX_ACTIONS:
                continue
            agent = act.get("softwareAgent")
            if isinstance(agent, dict):
                agent = " ".join(str(x) for x in (agent.get("name"), agent.get("version")) if x)
            out.append({"action": str(act.get("action", ""))[:256],
                        "digitalSourceType": (str(act["digitalSourceType"])[:512]
                                              if act.get("digitalSourceType") else None),
                        "softwareAgent": str(agent)[:512] if agent else None})
    return out


def read_c2pa(data: bytes, fmt: str | None = None, trust_anchors: str | None = None) -> dict[str, Any]:
    """Encoded bytes -> the c2pa field of the provenance object.

    Keys: present, embedded, remote_url, state (``Trusted`` | ``Valid`` | ``Invalid``),
    signature_valid (claim signature and content hashes check out), trusted (signer under a
    trust anchor), failures [{code, explanation}], claim_generator, signer {issuer, common_name},
    actions [{action, digitalSourceType, softwareAgent}], digital_source_types (short IPTC names),
    ai (an AI digitalSourceType in the active manifest), error (a manifest that could not be read:
    a finding of the file, never an exception).
    """
    out = empty_c2pa()
    # Every embedded manifest store is a JUMBF box labelled "c2pa"; without those bytes there is
    # nothing to read and the native reader is not started. (A manifest only referenced by URL
    # comes with XMP dcterms:provenance, which the caller reports.)
    if b"c2pa" not in data:
        return out
    try:
        import c2pa
    except ImportError:
        out["error"] = "c2pa-python is not installed; C2PA manifests were not read"
        return out
    try:
        ctx = c2pa.Context.from_dict(reader_settings(trust_anchors))
        with ctx, c2pa.Reader(_mime(fmt), io.BytesIO(data), None, ctx) as reader:
            manifest = reader.get_active_manifest() or {}
            state = reader.get_validation_state()
            results = reader.get_validation_results() or {}
            embedded = reader.is_embedded()
            remote = reader.get_remote_url()
    except Exception as e:  # noqa: BLE001 - malformed manifests are findings, not failures
        kind = type(e).__name__.lstrip("_").replace("C2pa", "") or "Error"
        msg = str(e)[:512]
        if "ManifestNotFound" in kind or msg.startswith("ManifestNotFound") or "JumbfNotFound" in msg:
            return out
        out.update(present="NotSupported" not in kind, error=f"{kind}: {msg}")
        if "Remote" in kind or msg.startswith("Remote"):
            out["error"] = f"the manifest is remote and was not fetched ({msg})"
        return out
    active = results.get("activeManifest") or {}
    failures = [{"code": str(f.get("code", ""))[:128], "explanation": str(f.get("explanation", ""))[:512]}
                for f in (active.get("failure") or [])[:MAX_FAILURES] if isinstance(f, dict)]
    actions = _actions(manifest)
    dst = [source_type_name(a["digitalSourceType"]) for a in actions if a["digitalSourceType"]]
    sig = manifest.get("signature_info") or {}
    out.update(
        present=True, embedded=bool(embedded), remote_url=remote, state=state,
        signature_valid=state in ("Valid", "Trusted"),
        trusted=state == "Trusted", failures=failures, claim_generator=_claim_generator(manifest),
        signer={"issuer": sig.get("issuer"), "common_name": sig.get("common_name")} if sig else None,
        actions=actions, digital_source_types=sorted(set(dst)),
        ai=any(d in AI_SOURCE_TYPES for d in dst))
    return out
