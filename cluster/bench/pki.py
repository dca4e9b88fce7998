"""A throwaway PKI for tests and benchmarks of the expert RPC's TLS: a CA and two shard
certificates (one for IP 127.0.0.1, one for the name expertmesh-shard only), made with the
`cryptography` package when installed, else the openssl CLI. Not for production keys."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
from pathlib import Path


def write_pki(root: Path) -> dict[str, Path]:
    """A CA, a certificate for IP 127.0.0.1 and one for the name expertmesh-shard only."""
    try:
        return _pki_cryptography(root)
    except ImportError:
        return _pki_openssl(root)


def _pki_cryptography(root: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject, key, issuer, issuer_key, sans=None, ca=False):
        b = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )  # fmt: skip
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    pem = serialization.Encoding.PEM
    out: dict[str, Path] = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert(name("expertmesh test CA"), ca_key, name("expertmesh test CA"), ca_key, ca=True)
    out["ca"] = root / "ca.pem"
    out["ca"].write_bytes(ca.public_bytes(pem))
    for label, sans in (
        ("ip", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        ("name", [x509.DNSName("expertmesh-shard")]),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        out[f"{label}_cert"] = root / f"{label}.pem"
        out[f"{label}_cert"].write_bytes(
            cert(name(f"shard-{label}"), key, ca.subject, ca_key, sans).public_bytes(pem)
        )
        out[f"{label}_key"] = root / f"{label}.key"
        out[f"{label}_key"].write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
    return out


def _pki_openssl(root: Path) -> dict[str, Path]:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=root)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "1", "-subj", "/CN=expertmesh test CA")  # fmt: skip
    out = {"ca": root / "ca.pem"}
    for label, san in (("ip", "IP:127.0.0.1"), ("name", "DNS:expertmesh-shard")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{label}.key", "-out",
            f"{label}.csr", "-subj", f"/CN=shard-{label}")  # fmt: skip
        (root / f"{label}.ext").write_text(f"subjectAltName={san}\n")
        run("x509", "-req", "-in", f"{label}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{label}.pem", "-days", "1",
            "-extfile", f"{label}.ext")  # fmt: skip
        out[f"{label}_cert"], out[f"{label}_key"] = root / f"{label}.pem", root / f"{label}.key"
    return out
