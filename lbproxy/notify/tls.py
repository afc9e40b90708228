"""Mutually authenticated TLS for the notification protocol (pyOpenSSL + service_identity).

Both ends present a certificate signed by the deployment's CA and check the other's: the
balancer checks an agent's DNS-ID against the peer's configured ``identity`` (and, for a
terminal, that the certificate carries the terminal's home address as an IP address
subjectAltName); an agent checks the balancer's DNS-ID against its allowed list.  Anything
else -- plaintext, another CA, another name -- ends the connection before a command is read.

The TLS layer is put *inside* the factory (``TLSMemoryBIOFactory`` around the AMP factory)
rather than around the endpoint, so that the AMP protocol is the TLS protocol's direct
``wrappedProtocol`` and hears ``handshakeCompleted`` even under ``ClientService``'s proxy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from pathlib import Path

import attrs
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.exceptions import CertificateError
from service_identity.pyopenssl import verify_hostname, verify_ip_address
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IProtocolFactory
from twisted.protocols.tls import TLSMemoryBIOFactory


@attrs.frozen
class TlsMaterial:
    """The deployment CA and this party's own certificate and key."""

    ca: ssl.Certificate
    own: ssl.PrivateCertificate

    @classmethod
    def from_pem(cls, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> TlsMaterial:
        """From PEM bytes."""
        return cls(
            ssl.Certificate.loadPEM(ca_pem),
            ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem),
        )

    @classmethod
    def from_files(cls, ca: str, certificate: str, key: str) -> TlsMaterial:
        """From PEM files (raises ``OSError`` or ``SSL.Error`` for unusable files)."""
        return cls.from_pem(
            Path(ca).read_bytes(), Path(certificate).read_bytes(), Path(key).read_bytes()
        )


def client_creator(material: TlsMaterial, identity: str) -> IOpenSSLClientConnectionCreator:
    """Client TLS that trusts only the CA and requires the server to be ``identity``."""
    return ssl.optionsForClientTLS(
        identity,
        trustRoot=material.ca,
        clientCertificate=material.own,
        extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2},
    )


def server_options(material: TlsMaterial) -> ssl.CertificateOptions:
    """Server TLS that requires a client certificate signed by the CA."""
    return ssl.CertificateOptions(
        privateKey=material.own.privateKey.original,
        certificate=material.own.original,
        trustRoot=material.ca,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


def client_factory(
    material: TlsMaterial, identity: str, factory: IProtocolFactory
) -> TLSMemoryBIOFactory:
    """``factory`` wrapped in client TLS for the peer ``identity``."""
    return TLSMemoryBIOFactory(client_creator(material, identity), True, factory)


def server_factory(material: TlsMaterial, factory: IProtocolFactory) -> TLSMemoryBIOFactory:
    """``factory`` wrapped in server TLS requiring client certificates."""
    return TLSMemoryBIOFactory(server_options(material), False, factory)


def peer_dns_id(connection: SSL.Connection, allowed: Iterable[str]) -> str | None:
    """The first of ``allowed`` that the peer's certificate proves, or ``None``."""
    for name in allowed:
        try:
            verify_hostname(connection, name)
        except (VerificationError, CertificateError):
            continue
        return name
    return None


def peer_has_address(connection: SSL.Connection, address: bytes) -> bool:
    """Whether the peer's certificate carries ``address`` as an IP subjectAltName."""
    try:
        verify_ip_address(connection, str(ipaddress.IPv6Address(address)))
    except (VerificationError, CertificateError):
        return False
    return True
