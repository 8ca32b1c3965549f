"""C2PA-signed files made offline: a throw-away root CA and ES256 signing certificate generated with
``cryptography``, and a manifest signed by ``c2pa-python`` (used by the explain-cost bench and by
tests/test_provenance.py; needs c2pa-python and cryptography)."""

from __future__ import annotations

import datetime
import io

IPTC = "http://cv.iptc.org/newscodes/digitalsourcetype/"


def make_chain(days: int = 30) -> tuple[bytes, bytes, str]:
    """(certificate chain PEM [signer, root], signer private key PEM, root certificate PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cinemae tests")])

    def usage(ca: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                             encipher_only=False, decipher_only=False)

    ca_key, ee_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=days)
    ca = (x509.CertificateBuilder().subject_name(name("cinemae test root")).issuer_name(name("cinemae test root"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(usage(True), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    ee = (x509.CertificateBuilder().subject_name(name("cinemae test signer")).issuer_name(ca.subject)
          .public_key(ee_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
          .add_extension(usage(False), critical=True)
          .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
          .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ee_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key = ee_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ee.public_bytes(pem) + ca.public_bytes(pem), key, ca.public_bytes(pem).decode()


def sign(chain: tuple[bytes, bytes, str], data: bytes, source_type: str | None = "trainedAlgorithmicMedia",
         mime: str = "image/jpeg", remote_url: str | None = None) -> bytes:
    """``data`` with a C2PA manifest (claim generator ``cinemae-tests 1.0``, one ``c2pa.created``
    action by ``TestDiffusion 2.1`` with the IPTC ``source_type``), signed with ``chain``; with
    ``remote_url`` the manifest is not embedded, only referenced."""
    import c2pa

    certs, key, _ = chain
    action: dict = {"action": "c2pa.created", "softwareAgent": {"name": "TestDiffusion", "version": "2.1"}}
    if source_type:
        action["digitalSourceType"] = IPTC + source_type
    manifest = {"claim_generator_info": [{"name": "cinemae-tests", "version": "1.0"}], "title": "fixture",
                "assertions": [{"label": "c2pa.actions", "data": {"actions": [action]}}]}
    signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, certs, key, None))
    builder = c2pa.Builder(manifest, c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": False}}}))
    if remote_url:
        builder.set_no_embed()
        builder.set_remote_url(remote_url)
    out = io.BytesIO()
    builder.sign(signer, mime, io.BytesIO(data), out)
    return out.getvalue()
