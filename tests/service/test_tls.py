"""TLS and mutual TLS: a client bound to a certificate (cert_sha256) is authenticated only
over a connection that presented exactly that certificate, so its token alone is useless;
an unbound client needs no certificate; a certificate the CA did not sign never gets
past the handshake. Real TLS on loopback, certificates made with cryptography."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tests.service.conftest import Running

from anyhsm.client import Client
from anyhsm.errors import ConfigError, ServiceUnreachable, Unauthenticated
from anyhsm.service.settings import ClientSpec, Listen, Op, ServiceSettings

DIGEST = hashlib.sha256(b"tls").digest()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def issue(
    directory: Path,
    name: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(issuer[0].subject if issuer else _name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert, key, cert_path, key_path


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, tuple[x509.Certificate, Path, Path]]:
    ca_cert, ca_key, ca_path, _ = issue(tmp_path, "ca", None, ca=True)
    out = {"ca": (ca_cert, ca_path, ca_path)}
    _, _, sc, sk = issue(tmp_path, "server", (ca_cert, ca_key), server=True)
    out["server"] = (ca_cert, sc, sk)
    for who in ("alice", "mallory"):
        cert, _, cp, kp = issue(tmp_path, who, (ca_cert, ca_key))
        out[who] = (cert, cp, kp)
    rogue_ca, rogue_key, _, _ = issue(tmp_path, "rogue-ca", None, ca=True)
    cert, _, cp, kp = issue(tmp_path, "rogue", (rogue_ca, rogue_key))
    out["rogue"] = (cert, cp, kp)
    return out


def test_mutual_tls_binds_a_token_to_its_certificate(
    start: Callable[..., Running], pki: dict[str, tuple[x509.Certificate, Path, Path]]
) -> None:
    _, server_cert, server_key = pki["server"]
    ca = pki["ca"][1]
    alice = pki["alice"][0]

    def bind(settings: ServiceSettings) -> ServiceSettings:
        clients = tuple(
            replace(c, cert_sha256=fingerprint(alice)) if c.name == "signer" else c
            for c in settings.clients
        )
        return replace(settings, clients=clients)

    r = start(tls_cert=server_cert, tls_key=server_key, tls_client_ca=ca)
    r.service._apply(bind(r.service.settings))  # the signer client is bound to alice's cert
    token = r.tokens["signer"]

    def client(who: str | None, tok: str = token) -> Client:
        if who is None:
            return Client(r.url, tok, cafile=ca)
        _, cp, kp = pki[who]
        return Client(r.url, tok, cafile=ca, certfile=cp, keyfile=kp)

    assert client("alice").sign("hot-1", DIGEST)
    with pytest.raises(Unauthenticated):
        client(None).sign("hot-1", DIGEST)  # the token alone
    with pytest.raises(Unauthenticated):
        client("mallory").sign("hot-1", DIGEST)  # another valid certificate
    with pytest.raises(ServiceUnreachable):
        client("rogue").sign("hot-1", DIGEST)  # not signed by the CA: no handshake
    assert client(None, r.tokens["reader"]).list_keys()  # unbound clients need none
    with pytest.raises(ServiceUnreachable):
        Client(r.url.replace("https", "http"), token).list_keys()  # plain HTTP to TLS
    audit = r.hsm.audit_path.read_text()
    assert "token used without its client certificate" in audit


def test_certificate_binding_needs_mutual_tls() -> None:
    digest = "sha256:" + "0" * 64 + ":" + "1" * 64
    with pytest.raises(ConfigError):
        ClientSpec("a", digest, ("*",), frozenset())  # no op: refused
    bound = ClientSpec("a", digest, ("*",), frozenset({Op.READ}), "ab" * 32)
    with pytest.raises(ConfigError, match="tls_client_ca"):
        ServiceSettings(clients=(bound,))


def test_another_address_than_loopback_needs_tls_and_a_client() -> None:
    assert ServiceSettings().refusal() is None
    assert "TLS" in (ServiceSettings(listen=Listen("0.0.0.0", 8420)).refusal() or "")
    tls = ServiceSettings(
        listen=Listen("0.0.0.0", 8420), tls_cert=Path("c.pem"), tls_key=Path("k.pem")
    )
    assert "client" in (tls.refusal() or "")
    assert Listen.parse("[::1]:8420").loopback and Listen.parse("localhost:1").loopback
    assert not Listen.parse("10.0.0.1:8420").loopback
