"""A throw-away PKI for tests, the test bed, the demo and benchmarks: a CA and its leaves.

Mutual TLS needs a CA, a certificate per balancer and per agent, each with the right
subjectAltNames (DNS-IDs; a terminal also carries its home address as an IP address) and
extended key usages (``serverAuth`` for an agent, which is dialled; ``clientAuth`` for a
balancer, which dials; leaves get both by default).  Production deployments bring their own;
this module makes a consistent set in memory or in a directory in one call, so nothing has to
ship private keys.  Tests also make the certificates that must be refused (no
subjectAltName, one usage only or none, expired, not yet valid, a CA as a leaf).
``cryptography`` is already a dependency of pyOpenSSL.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lbproxy.notify.tls import TlsMaterial

USAGES = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}


@attrs.frozen
class Issued:
    """A certificate and its key, PEM-encoded."""

    cert_pem: bytes
    key_pem: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class CertificateAuthority:
    """A self-signed CA that issues server-and-client leaf certificates."""

    def __init__(self, name: str = "lbproxy test CA", days: int = 2) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate, PEM."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        common_name: str | None = None,
        days: float = 2,
        usages: Sequence[str] | None = ("server", "client"),
        starts: float = -300.0,
        ca: bool = False,
    ) -> Issued:
        """A leaf certificate for ``dns`` names and ``ips`` addresses.

        ``usages``: extended key usages among "server" and "client" (``None``: no extended
        key usage extension); valid from ``starts`` seconds from now (negative: in the
        past) for ``days`` days after now; ``ca`` marks it basicConstraints CA:TRUE.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name or (dns[0] if dns else "lbproxy")))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + datetime.timedelta(seconds=starts))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(
                x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True
            )
        )
        if usages is not None:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([USAGES[u] for u in usages]), critical=False
            )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))

    def material(self, issued: Issued) -> TlsMaterial:
        """TLS material trusting this CA and presenting ``issued``."""
        return TlsMaterial.from_pem(self.cert_pem, issued.cert_pem, issued.key_pem)

    def write(self, directory: str | Path, name: str, issued: Issued) -> tuple[str, str, str]:
        """Write ``ca.pem``, ``<name>.pem`` and ``<name>.key``; return their paths."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        ca, cert, key = d / "ca.pem", d / f"{name}.pem", d / f"{name}.key"
        ca.write_bytes(self.cert_pem)
        cert.write_bytes(issued.cert_pem)
        key.write_bytes(issued.key_pem)
        key.chmod(0o600)
        return str(ca), str(cert), str(key)
