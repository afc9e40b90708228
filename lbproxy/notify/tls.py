"""Mutually authenticated TLS for the notification protocol, failing closed on both sides.

Both ends present a certificate signed by the deployment's CA and check the other's.  OpenSSL
checks the chain (our CA only, validity dates, TLS 1.2 or newer, a certificate required of
both sides); :func:`check_certificate` then checks the leaf's *identity* and *role*, inside
OpenSSL's verification callback so that a refused certificate fails the handshake itself:

* the expected name must be a **subjectAltName**, matched exactly: a DNS-ID (case-insensitive)
  or, for an identity that is an IP address, an iPAddress SAN.  The subject's common name is
  never read; a certificate without subjectAltName is refused; **wildcards never match** (a
  certificate whose only names are ``*.test`` or ``*.example.test`` proves no identity -- each
  agent and balancer has its own certificate);
* a terminal's certificate must also carry the terminal's home address as an iPAddress SAN;
  a terminal that *dials in* (no configuration on the balancer) is named by its certificate
  alone: exactly one IPv6 iPAddress SAN, its home address (:func:`check_terminal_certificate`);
* the **extended key usage** must be present and name the role: ``serverAuth`` for the side
  that is dialled (an agent), ``clientAuth`` for the side that dials (the balancer); a CA
  certificate (basicConstraints CA:TRUE) is never accepted as a peer.

Why not Twisted's ``optionsForClientTLS``: its verification callback (``_verifyCB`` in
``twisted.internet._sslverify``) turns ``service_identity.VerificationError`` into a failed
handshake but catches every *other* exception -- including ``service_identity``'s
``CertificateError``, raised for a certificate with no subjectAltName and for a wildcard it
considers invalid such as ``*.test`` -- logs it, and returns OpenSSL's chain verdict: such a
certificate from the right CA was accepted as any name.  ``service_identity`` also accepts
``*.example.test`` for ``ha1.example.test`` and ignores the extended key usage.  Here every
exception in the callback refuses the certificate.

The TLS layer is put *inside* the factory (``TLSMemoryBIOFactory`` around the AMP factory)
rather than around the endpoint, so that the AMP protocol is the TLS protocol's direct
``wrappedProtocol`` and hears ``handshakeCompleted`` even under ``ClientService``'s proxy.
"""

from __future__ import annotations

import ipaddress
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from lbproxy.notify.policy import Refusal

log = Logger()

SERVER_AUTH: ObjectIdentifier = ExtendedKeyUsageOID.SERVER_AUTH  # the side that is dialled
CLIENT_AUTH: ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH  # the side that dials
_USAGE_NAMES = {SERVER_AUTH: "serverAuth", CLIENT_AUTH: "clientAuth"}

#: OpenSSL's X509_V_ERR_* codes that the chain check reports most often, for the log.
_CHAIN_ERRORS = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    24: "invalid CA certificate",
    26: "unsupported certificate purpose",
}
_INVALID_PURPOSE = 26


def load_cas(pem: bytes) -> tuple[ssl.Certificate, ...]:
    """Every certificate of a CA file (a bundle: one or more PEM certificates), in order;
    raises ``ValueError`` when there is none or one cannot be read."""
    certificates = x509.load_pem_x509_certificates(pem)
    return tuple(ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
                 for c in certificates)  # fmt: skip


@attrs.frozen
class TlsMaterial:
    """The deployment CA and this party's own certificate and key.

    The CA file may be a bundle: every CA in it is trusted (``ca`` is the first,
    ``extra_cas`` the others).  That is how a CA is rotated without a gap: trust the old
    and the new one while the peers' certificates are reissued, then the new one alone."""

    ca: ssl.Certificate
    own: ssl.PrivateCertificate
    extra_cas: tuple[ssl.Certificate, ...] = ()

    @property
    def cas(self) -> tuple[ssl.Certificate, ...]:
        """Every trusted CA."""
        return (self.ca, *self.extra_cas)

    @property
    def trust_root(self) -> Any:
        """What OpenSSL is told to trust: the CA, or every CA of the bundle."""
        return self.ca if not self.extra_cas else ssl.trustRootFromCertificates(list(self.cas))

    @classmethod
    def from_pem(cls, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> TlsMaterial:
        """From PEM bytes (``ca_pem`` may hold several CA certificates)."""
        cas = load_cas(ca_pem)
        return cls(
            cas[0],
            ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem),
            cas[1:],
        )

    @classmethod
    def from_files(cls, ca: str, certificate: str, key: str) -> TlsMaterial:
        """From PEM files (raises ``OSError`` or ``SSL.Error`` for unusable files)."""
        return cls.from_pem(
            Path(ca).read_bytes(), Path(certificate).read_bytes(), Path(key).read_bytes()
        )

    def same_as(self, other: TlsMaterial) -> bool:
        """The same CAs, certificate and key (the same files read twice)."""
        return self.same_ca(other) and (self.own.dump(), self.own.privateKey.dump()) == (
            other.own.dump(), other.own.privateKey.dump())

    def same_ca(self, other: TlsMaterial) -> bool:
        """The same CA certificates, in the same order."""
        return [c.dump() for c in self.cas] == [c.dump() for c in other.cas]


class Credentials:
    """The TLS material in force, shared by every connection maker of one party, so that a
    reload can rotate it (`lbproxy.notify.reload`): connections made after `use` present
    the new certificate and trust the new CA; connections already up keep the context
    they were made with (the certificate is only shown in the handshake)."""

    def __init__(self, material: TlsMaterial) -> None:
        self.material = material
        self.rotations = 0  # times `use` changed the material

    def use(self, material: TlsMaterial) -> None:
        """From now on, new connections use ``material``."""
        self.material = material
        self.rotations += 1


@attrs.frozen
class Verdict:
    """What :func:`check_certificate` found: the proven name, or why the peer is refused."""

    name: str | None
    refusal: Refusal | None = None
    detail: str = ""

    @property
    def accepted(self) -> bool:
        return self.refusal is None and self.name is not None


class PeerRefused(Exception):  # noqa: N818 - a refusal, reported to connectionLost
    """The peer's certificate was refused during the handshake; carries the reason."""

    def __init__(self, refusal: Refusal, detail: str) -> None:
        super().__init__(f"{refusal.value}: {detail}")
        self.refusal = refusal
        self.detail = detail


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _role_and_names(
    cert: x509.Certificate, usage: ObjectIdentifier
) -> Verdict | tuple[list[str], set[Any]]:
    """The certificate's DNS-IDs (lower case) and iPAddress SANs, once it is shown to be a
    peer's (not a CA's) for the role ``usage``; else the refusal."""
    try:
        extensions = cert.extensions
    except Exception as e:  # duplicate or malformed extensions
        return Verdict(None, Refusal.WRONG_IDENTITY, f"unreadable extensions: {e}")
    try:
        basic = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None
    if basic is not None and basic.ca:
        return Verdict(None, Refusal.WRONG_USAGE, "a CA certificate, not a peer's")
    try:
        ekus = list(extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return Verdict(None, Refusal.WRONG_USAGE, "no extended key usage")
    if usage not in ekus:
        have = ", ".join(_USAGE_NAMES.get(e, e.dotted_string) for e in ekus) or "none"
        return Verdict(
            None, Refusal.WRONG_USAGE, f"extended key usage {have}, not {_USAGE_NAMES[usage]}"
        )
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return Verdict(None, Refusal.WRONG_IDENTITY, "no subjectAltName")
    dns = [d.lower().rstrip(".") for d in san.get_values_for_type(x509.DNSName)]
    return dns, set(san.get_values_for_type(x509.IPAddress))


def check_certificate(
    cert: x509.Certificate,
    names: Sequence[str],
    usage: ObjectIdentifier,
    addresses: Sequence[bytes] = (),
) -> Verdict:
    """The first of ``names`` that ``cert`` proves, for the role ``usage``, carrying every
    one of ``addresses`` (16-octet IPv6 addresses) as an iPAddress SAN; or the refusal.

    The chain is OpenSSL's to check; this is the identity and the role (module docstring).
    """
    found = _role_and_names(cert, usage)
    if isinstance(found, Verdict):
        return found
    dns, ips = found
    exact = {d for d in dns if "*" not in d}
    for address in addresses:
        if ipaddress.IPv6Address(address) not in ips:
            return Verdict(
                None,
                Refusal.WRONG_IDENTITY,
                f"no iPAddress subjectAltName {ipaddress.IPv6Address(address)}",
            )
    for name in names:
        as_ip = _ip(name)  # an IP identity matches iPAddress SANs only, a name DNS-IDs only
        matched = as_ip in ips if as_ip is not None else name.lower().rstrip(".") in exact
        if matched:
            return Verdict(name)
    wildcards = sorted(d for d in dns if "*" in d)
    wanted = " or ".join(names) or "(none allowed)"
    if wildcards and not exact:
        detail = f"only wildcard names {wildcards}, which never match {wanted}"
    else:
        detail = f"subjectAltNames {sorted(exact) + [str(i) for i in ips]} are not {wanted}"
    return Verdict(None, Refusal.WRONG_IDENTITY, detail)


def check_terminal_certificate(cert: x509.Certificate) -> Verdict:
    """A terminal agent that dials in (``clientAuth``) is named by the one IPv6 address its
    certificate carries as an iPAddress SAN -- its home address, the only one it may speak
    for.  ``Verdict.name`` is that address's text; no IPv6 iPAddress SAN, or several (which
    one would it be?), is refused ``wrong_identity``.  DNS-IDs play no part."""
    found = _role_and_names(cert, CLIENT_AUTH)
    if isinstance(found, Verdict):
        return found
    homes = sorted(str(ip) for ip in found[1] if isinstance(ip, ipaddress.IPv6Address))
    if not homes:
        return Verdict(None, Refusal.WRONG_IDENTITY,
                       "no IPv6 iPAddress subjectAltName: a terminal's certificate names "
                       "its home address")  # fmt: skip
    if len(homes) > 1:
        return Verdict(None, Refusal.WRONG_IDENTITY,
                       f"several IPv6 iPAddress subjectAltNames {homes[:4]}: a terminal's "
                       "certificate names one home address")  # fmt: skip
    return Verdict(homes[0])


Check = Callable[[x509.Certificate], Verdict]


def peer_verdict(
    connection: SSL.Connection,
    names: Sequence[str],
    usage: ObjectIdentifier,
    addresses: Sequence[bytes] = (),
    check: Check | None = None,
) -> Verdict:
    """:func:`check_certificate` (or ``check``) on the certificate the peer of
    ``connection`` presented."""
    try:
        peer = connection.get_peer_certificate()
        if peer is None:
            return Verdict(None, Refusal.TLS_FAILED, "no peer certificate")
        cert = peer.to_cryptography()
        if check is not None:
            return check(cert)
        return check_certificate(cert, names, usage, addresses)
    except Exception as e:
        return Verdict(None, Refusal.WRONG_IDENTITY, f"cannot read the certificate: {e}")


def untrusted(connection: SSL.Connection, cas: Sequence[ssl.Certificate]) -> str | None:
    """Why none of ``cas`` would accept the certificate the peer of ``connection``
    presented (chain and validity dates; the identity and role are unchanged), or None:
    after the CA changed, the connections verified under the old one are checked again
    with this."""
    from OpenSSL import crypto

    try:
        peer = connection.get_peer_certificate()
        if peer is None:
            return "no peer certificate"
        store = crypto.X509Store()
        for ca in cas:
            store.add_cert(ca.original)
        crypto.X509StoreContext(store, peer).verify_certificate()
    except crypto.X509StoreContextError as e:
        return f"not trusted by the new CA ({e})"
    except Exception as e:  # fail closed
        return f"cannot check the certificate: {e}"
    return None


def _verify_callback(
    protocol: TLSMemoryBIOProtocol, check: Check
) -> Callable[[SSL.Connection, Any, int, int, int], bool]:
    """OpenSSL's per-certificate callback: the chain verdict, then the leaf's identity.

    Returns False (and fails the handshake with a :class:`PeerRefused` reason) on any
    refusal and on any exception -- never the chain verdict alone.
    """
    ref = weakref.ref(protocol)

    def refuse(refusal: Refusal, detail: str) -> bool:
        tls = ref()
        if tls is not None:
            tls.failVerification(Failure(PeerRefused(refusal, detail)))
        return False

    def callback(connection: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
        try:
            if not ok:
                reason = Refusal.WRONG_USAGE if errno == _INVALID_PURPOSE else Refusal.TLS_FAILED
                text = _CHAIN_ERRORS.get(errno, f"X509 verify error {errno}")
                return refuse(reason, f"{text} (depth {depth})")
            if depth != 0:
                return True
            verdict = check(cert.to_cryptography())
            if verdict.refusal is not None:
                return refuse(verdict.refusal, verdict.detail)
            return True
        except BaseException as e:  # fail closed, unlike Twisted's callback
            log.failure("notify: certificate check failed")
            try:
                return refuse(Refusal.WRONG_IDENTITY, f"certificate check failed: {e}")
            except BaseException:
                return False

    return callback


@implementer(IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator)
class VerifyingOptions:
    """TLS 1.2+ trusting only the CA, presenting our certificate, requiring the peer's, and
    refusing in the handshake any peer that is not one of ``names`` in the role ``usage``
    (or, with ``check``, whatever ``check`` refuses)."""

    def __init__(
        self,
        material: TlsMaterial | Credentials,
        names: Sequence[str],
        usage: ObjectIdentifier,
        addresses: Sequence[bytes] = (),
        check: Check | None = None,
    ) -> None:
        self.names = tuple(names)
        self.usage = usage
        self.addresses = tuple(addresses)
        self.check: Check = check if check is not None else (
            lambda cert: check_certificate(cert, self.names, self.usage, self.addresses))
        self.credentials = (
            material if isinstance(material, Credentials) else Credentials(material)
        )
        self._built: tuple[TlsMaterial, ssl.CertificateOptions] | None = None

    @property
    def options(self) -> ssl.CertificateOptions:
        """The OpenSSL options for the material in force (made again after a rotation)."""
        material = self.credentials.material
        if self._built is None or self._built[0] is not material:
            self._built = (material, ssl.CertificateOptions(
                privateKey=material.own.privateKey.original,
                certificate=material.own.original,
                trustRoot=material.trust_root,
                raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
            ))  # fmt: skip
        return self._built[1]

    def _verifying(self, connection: SSL.Connection, tls: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
            _verify_callback(tls, self.check),
        )
        return connection

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return self._verifying(self.options.clientConnectionForTLS(tlsProtocol), tlsProtocol)

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return self._verifying(self.options.serverConnectionForTLS(tlsProtocol), tlsProtocol)


def client_factory(
    material: TlsMaterial | Credentials,
    identity: str | Sequence[str],
    factory: IProtocolFactory,
    addresses: Sequence[bytes] = (),
    clock: IReactorTime | None = None,
) -> TLSMemoryBIOFactory:
    """``factory`` wrapped in client TLS (we dial): the server must be ``identity`` (or one
    of several, for a terminal agent dialling its balancers) with ``serverAuth``, carrying
    ``addresses`` (a terminal's home address).  ``clock`` is the one TLS uses to gather
    small writes (the reactor by default)."""
    names = [identity] if isinstance(identity, str) else list(identity)
    options = VerifyingOptions(material, names, SERVER_AUTH, addresses)
    return TLSMemoryBIOFactory(options, True, factory, clock=clock)


def server_factory(
    material: TlsMaterial | Credentials,
    factory: IProtocolFactory,
    allowed: Sequence[str],
    clock: IReactorTime | None = None,
) -> TLSMemoryBIOFactory:
    """``factory`` wrapped in server TLS (we are dialled): the client must present a
    certificate proving one of ``allowed`` with ``clientAuth``."""
    options = VerifyingOptions(material, allowed, CLIENT_AUTH)
    return TLSMemoryBIOFactory(options, False, factory, clock=clock)


def dial_in_factory(
    material: TlsMaterial | Credentials,
    factory: IProtocolFactory,
    clock: IReactorTime | None = None,
) -> TLSMemoryBIOFactory:
    """``factory`` wrapped in server TLS for terminal agents that dial in: a certificate
    from the CA with ``clientAuth`` and exactly one IPv6 iPAddress SAN, the terminal's
    home address (:func:`check_terminal_certificate`)."""
    options = VerifyingOptions(material, (), CLIENT_AUTH, check=check_terminal_certificate)
    return TLSMemoryBIOFactory(options, False, factory, clock=clock)
