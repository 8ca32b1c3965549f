"""Provenance read before the pixels: every fixture is written here (Pillow text chunks, EXIF, XMP,
JPEG comments; C2PA manifests signed by c2pa-python with a certificate chain made here)."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from cinemae.runtime.provenance import apply_policy, read_provenance
from cinemae.runtime.provenance.embedded import KEEP_CHARS, MAX_TEXT_BYTES

IPTC = "http://cv.iptc.org/newscodes/digitalsourcetype/"
A1111 = ("a photo of a cat, best quality\nNegative prompt: blurry\n"
         "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x512, Model: sd15")
COMFY_PROMPT = json.dumps({"3": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 20}},
                           "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}}})
COMFY_WORKFLOW = json.dumps({"last_node_id": 9, "nodes": [{"id": 3, "type": "KSampler"}]})


def picture(seed: int = 0, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))


def png(text: dict[str, str] | None = None, ztxt: dict[str, str] | None = None, **kw) -> bytes:
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    for k, v in (ztxt or {}).items():
        info.add_text(k, v, zip=True)
    buf = io.BytesIO()
    picture().save(buf, "PNG", pnginfo=info, **kw)
    return buf.getvalue()


def xmp_packet(source_type: str, tool: str = "Generator 1.0") -> bytes:
    return (f'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
            f'<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
            f'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
            f'xmlns:xmp="http://ns.adobe.com/xap/1.0/" Iptc4xmpExt:DigitalSourceType="{IPTC}{source_type}" '
            f'xmp:CreatorTool="{tool}"/></rdf:RDF></x:xmpmeta><?xpacket end="w"?>').encode()


def jpeg(exif: dict[int, object] | None = None, user_comment: bytes | None = None, xmp: bytes | None = None,
         comment: bytes | None = None) -> bytes:
    im = picture()
    ex = Image.Exif()
    for tag, v in (exif or {}).items():
        ex[tag] = v
    if user_comment is not None:
        ex.get_ifd(0x8769)[0x9286] = user_comment
    buf = io.BytesIO()
    kw = {"exif": ex.tobytes()} if (exif or user_comment) else {}
    if xmp is not None:
        kw["xmp"] = xmp
    if comment is not None:
        kw["comment"] = comment
    im.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


# --- embedded metadata ---------------------------------------------------------------------------

def test_a1111_parameters_png_is_ai_evidence():
    p = read_provenance(png({"parameters": A1111}))
    assert p["format"] == "PNG"
    assert p["generator"]["keys"] == ["parameters"]
    assert p["generator"]["tool"] == ["AUTOMATIC1111-compatible web UI"]
    assert "Steps: 20" in p["generator"]["parameters"]
    assert p["reasons"] == ["generator_parameters"] and p["ai_evidence"]
    assert apply_policy(p, "real") == ("ai", "provenance")
    assert apply_policy(p, "real", enabled=False) == ("real", "pixels")


def test_comfyui_prompt_and_workflow_compressed_chunks():
    p = read_provenance(png(ztxt={"prompt": COMFY_PROMPT, "workflow": COMFY_WORKFLOW}))
    assert p["generator"]["keys"] == ["prompt", "workflow"]
    assert p["generator"]["tool"] == ["ComfyUI"]
    assert p["text"]["prompt"] == COMFY_PROMPT


def test_text_after_image_data_is_read():
    """Generators may write text chunks after IDAT; they are read without decoding pixels."""
    data = png()
    body = b"parameters\x00" + A1111.encode("latin-1")
    chunk = len(body).to_bytes(4, "big") + b"tEXt" + body + zlib.crc32(b"tEXt" + body).to_bytes(4, "big")
    iend = data.rindex(b"IEND") - 4
    p = read_provenance(data[:iend] + chunk + data[iend:])
    assert p["generator"]["keys"] == ["parameters"]


@pytest.mark.parametrize("text", [
    {"prompt": "holiday at the sea"},              # not a ComfyUI graph
    {"parameters": "exposure +1, contrast 3"},     # not A1111's format
    {"Software": "GIMP 2.10", "Comment": "scanned"},
])
def test_ordinary_text_is_not_generator_evidence(text):
    p = read_provenance(png(text))
    assert p["generator"] is None and not p["ai_evidence"]
    assert p["text"] == text
    assert apply_policy(p, "real") == ("real", "pixels")


def test_novelai_comment_with_software():
    p = read_provenance(png({"Software": "NovelAI", "Comment": json.dumps({"prompt": "x", "steps": 28})}))
    assert p["generator"]["tool"] == ["NovelAI"] and p["ai_evidence"]


def test_exif_make_model_software_and_a1111_user_comment():
    uc = b"UNICODE\x00" + A1111.encode("utf-16-be")
    p = read_provenance(jpeg({0x010F: "Canon", 0x0110: "EOS R5", 0x0131: "Firmware 1.8"}, user_comment=uc))
    assert p["exif"]["Make"] == "Canon" and p["exif"]["Model"] == "EOS R5"
    assert p["exif"]["Software"] == "Firmware 1.8"
    assert p["exif"]["UserComment"].startswith("a photo of a cat")
    assert p["generator"]["keys"] == ["exif:UserComment"]


def test_camera_exif_alone_never_makes_real():
    p = read_provenance(jpeg({0x010F: "Nikon", 0x0110: "D850"}))
    assert not p["ai_evidence"]
    assert apply_policy(p, "ai") == ("ai", "pixels")
    assert apply_policy(p, "uncertain") == ("uncertain", "pixels")


@pytest.mark.parametrize("kind,ai", [("trainedAlgorithmicMedia", True),
                                     ("compositeWithTrainedAlgorithmicMedia", True),
                                     ("digitalCapture", False)])
def test_xmp_digital_source_type_jpeg_and_png(kind, ai):
    for data in (jpeg(xmp=xmp_packet(kind)), png({"XML:com.adobe.xmp": xmp_packet(kind).decode()})):
        p = read_provenance(data)
        assert p["xmp"]["digital_source_type"] == [IPTC + kind]
        assert p["xmp"]["creator_tool"] == "Generator 1.0"
        assert ("iptc_digital_source_type" in p["reasons"]) == ai


def test_jpeg_comment():
    p = read_provenance(jpeg(comment=b"made with love"))
    assert p["comments"] == ["made with love"]
    assert not p["ai_evidence"]
    assert read_provenance(jpeg(comment=b"      \x00"))["comments"] == []  # padding some cameras write


def test_hostile_metadata_is_bounded():
    """A 60 MB zTXt bomb inflates to at most MAX_TEXT_BYTES; kept strings are cut to KEEP_CHARS."""
    bomb = zlib.compress(b"A" * (60 << 20), 9)
    body = b"Comment\x00\x00" + bomb
    chunk = len(body).to_bytes(4, "big") + b"zTXt" + body + zlib.crc32(b"zTXt" + body).to_bytes(4, "big")
    data = png()
    cut = data.index(b"IDAT") - 4
    t = time.perf_counter()
    p = read_provenance(data[:cut] + chunk + data[cut:])
    assert len(p["text"]["Comment"]) == KEEP_CHARS < MAX_TEXT_BYTES
    assert p["truncated"]
    assert time.perf_counter() - t < 30  # bounded, not a timing claim: 60 MB never materialises


@pytest.mark.parametrize("data", [b"", b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x10tEXt", b"\xff\xd8\xff\xfe\x00",
                                  b"not an image at all", b"c2pa" * 100])
def test_malformed_files_are_findings_not_errors(data):
    p = read_provenance(data)
    assert not p["ai_evidence"]
    assert isinstance(p["errors"], list)


def test_truncated_png_chunk_is_an_error_field():
    data = png({"parameters": A1111})
    i = data.index(b"tEXt")
    p = read_provenance(data[:i + 40])
    assert p["generator"] is None
    assert any("cut short" in e or "header" in e for e in p["errors"])


# --- C2PA -------------------------------------------------------------------------------------------

c2pa = pytest.importorskip("c2pa", reason="c2pa-python is not installed")


@pytest.fixture(scope="module")
def chain():
    pytest.importorskip("cryptography", reason="cryptography is not installed")
    from cinemae.benchmarks.c2pa_fixture import make_chain

    return make_chain()


def sign(chain, source_type, data, mime="image/jpeg", remote_url=None):
    """A C2PA-signed copy of ``data`` (benchmarks/c2pa_fixture.py: a chain generated with cryptography,
    signed by c2pa-python, offline)."""
    from cinemae.benchmarks.c2pa_fixture import sign as c2pa_sign

    return c2pa_sign(chain, data, source_type, mime, remote_url)


@pytest.mark.parametrize("source_type,ai", [("trainedAlgorithmicMedia", True),
                                            ("compositeWithTrainedAlgorithmicMedia", True),
                                            ("digitalCapture", False)])
def test_c2pa_signed_jpeg(chain, source_type, ai):
    p = read_provenance(sign(chain, source_type, jpeg()))
    c = p["c2pa"]
    assert c["present"] and c["embedded"] and c["error"] is None
    assert c["state"] == "Valid" and c["signature_valid"] and not c["trusted"]
    assert [f["code"] for f in c["failures"]] == ["signingCredential.untrusted"]
    assert c["claim_generator"].startswith("cinemae-tests 1.0")
    assert c["signer"]["common_name"] == "cinemae test signer"
    assert c["actions"] == [{"action": "c2pa.created", "digitalSourceType": IPTC + source_type,
                             "softwareAgent": "TestDiffusion 2.1"}]
    assert c["digital_source_types"] == [source_type]
    assert c["ai"] is ai and (p["reasons"] == ["c2pa"]) is ai
    assert apply_policy(p, "real") == (("ai", "provenance") if ai else ("real", "pixels"))


def test_c2pa_signed_png_trusted_with_anchor(chain):
    data = sign(chain, "trainedAlgorithmicMedia", png(), "image/png")
    p = read_provenance(data, trust_anchors=chain[2])
    assert p["format"] == "PNG"
    assert p["c2pa"]["state"] == "Trusted" and p["c2pa"]["trusted"] and p["c2pa"]["failures"] == []


def test_c2pa_tampered_pixels_invalid_signature_is_not_evidence(chain):
    data = bytearray(sign(chain, "trainedAlgorithmicMedia", jpeg()))
    data[-200] ^= 0xFF  # inside the entropy-coded image data, which the manifest hashes
    p = read_provenance(bytes(data))
    c = p["c2pa"]
    assert c["present"] and c["state"] == "Invalid" and not c["signature_valid"]
    assert any("dataHash.mismatch" in f["code"] for f in c["failures"])
    assert c["ai"] and "c2pa" not in p["reasons"] and not p["ai_evidence"]


def test_c2pa_malformed_manifest_is_a_field(chain):
    data = bytearray(sign(chain, "trainedAlgorithmicMedia", jpeg()))
    i = data.index(b"c2pa.actions")
    data[i + 100:i + 160] = b"x" * 60  # break a JUMBF box
    p = read_provenance(bytes(data))
    assert p["c2pa"]["present"]
    assert p["c2pa"]["error"] or p["c2pa"]["state"] == "Invalid"
    assert "c2pa" not in p["reasons"]


def test_c2pa_remote_manifest_is_never_fetched(chain):
    """A manifest only at a URL: reported, not fetched. The same file read with c2pa's default
    settings does connect (so this test can fail)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(5)
    hits: list[bytes] = []

    def accept():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            hits.append(conn.recv(1024))
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    url = f"http://127.0.0.1:{srv.getsockname()[1]}/manifest.c2pa"
    try:
        data = sign(chain, "trainedAlgorithmicMedia", jpeg(), remote_url=url)
        p = read_provenance(data)
        time.sleep(0.3)
        assert hits == []
        assert p["c2pa"]["present"] and p["c2pa"]["remote_url"] == url
        assert "not fetched" in p["c2pa"]["error"]
        assert not p["ai_evidence"]
        with pytest.raises(c2pa.C2paError):  # the library's defaults would fetch it
            c2pa.Reader("image/jpeg", io.BytesIO(data))
        time.sleep(0.3)
        assert len(hits) == 1
    finally:
        srv.close()


# --- the policy through the Detector -----------------------------------------------------------------

def test_detector_policy_default_on_and_flag_off(tmp_path):
    """Generator parameters make the verdict ai (reason provenance) whatever the pixels say; the
    pixel score and verdict are still reported; the flag turns it off; an array has no metadata."""
    from cinemae.runtime import Detector

    data = png({"parameters": A1111})
    on, off = Detector(device="cpu"), Detector(device="cpu", provenance_policy=False)
    r, q = on.detect(data), off.detect(data)
    assert r.score == q.score and r.pixel_verdict == q.pixel_verdict == q.verdict
    assert r.verdict == "ai" and r.reason == "provenance"
    assert q.reason == "pixels" and q.provenance["ai_evidence"]
    rec = r.to_record()
    assert rec["provenance"]["generator"]["keys"] == ["parameters"] and rec["pixel_verdict"] == r.pixel_verdict
    plain = on.detect(png())
    assert plain.reason == "pixels" and plain.verdict == plain.pixel_verdict
    arr = on.detect(np.asarray(picture()))
    assert arr.provenance["unavailable"] and not arr.provenance["ai_evidence"]
    # read before the pixels: a file whose pixels fail still reports its metadata
    bad = on.detect(data[:data.index(b"IDAT") + 20])
    assert not bad.ok and bad.verdict is None and bad.provenance["generator"] is not None
    assert Detector(device="cpu", provenance=False).detect(data).provenance is None


def test_png_exif_without_decoding_the_pixels(monkeypatch):
    """A PNG's eXIf chunk is read from the chunk itself: decoding the pixels (Pillow's
    PngImageFile.getexif does) is never needed for metadata."""
    from PIL import PngImagePlugin

    ex = Image.Exif()
    ex[0x0131] = "SomeGenerator 3"
    ex[0x010F] = "NoCamera"
    buf = io.BytesIO()
    picture().save(buf, "PNG", exif=ex.tobytes())

    def no_load(self):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_load)
    p = read_provenance(buf.getvalue())
    assert p["exif"]["Software"] == "SomeGenerator 3" and p["exif"]["Make"] == "NoCamera"
    assert p["errors"] == []
