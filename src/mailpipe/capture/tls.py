"""TLS contexts for the SMTP listeners: configured cert/key, or a self-signed pair made at start."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import tempfile
from pathlib import Path

from mailpipe.config import TLSConfig


def make_self_signed(hostname: str, directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for `hostname` (and 127.0.0.1/::1), valid for a year."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.UTC)
    alt_names: list[x509.GeneralName] = [
        x509.DNSName(hostname),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / "selfsigned-cert.pem"
    key_path = directory / "selfsigned-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def server_context(tls: TLSConfig, hostname: str, data_dir: Path | None = None) -> ssl.SSLContext:
    if tls.self_signed:
        directory = (data_dir or Path(tempfile.gettempdir())) / "tls"
        cert, key = make_self_signed(hostname, directory)
    else:
        assert tls.cert and tls.key
        cert, key = Path(tls.cert), Path(tls.key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # Development clients are often old; accept what they speak, TLS 1.2 upwards.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context
