"""Credentials for a local broker that requires token authentication and TLS.

``LocalPulsar(secure=True)`` calls :func:`make_credentials` when it starts: a
self-signed CA, a broker certificate for 127.0.0.1 and a client certificate
(both signed by that CA, made with the machine's ``openssl``), and a secret
key for HS256 tokens (what ``bin/pulsar tokens create-secret-key`` makes).
The broker then listens on TLS ports only, requires a trusted client
certificate on every connection (mTLS) and a token or certificate identity,
as a production cluster may. Test credentials only: short-lived, kept in the
broker's data directory.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tally.service.pulsar.distribution import PulsarStartError

ADMIN_ROLE = "tally-admin"          # the broker's super-user: its token is the cluster's
CLIENT_CERT_ROLE = "tally-client"   # the client certificate's common name
CERT_DAYS = 2


@dataclass(frozen=True)
class Credentials:
    """Files and the secret of one secure local broker."""

    directory: Path
    secret_key: bytes

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    def cert_file(self, name: str) -> Path:
        return self.directory / f"{name}.pem"

    def key_file(self, name: str) -> Path:
        return self.directory / f"{name}.key"

    def token(self, subject: str = ADMIN_ROLE, expires_at: float | None = None) -> str:
        return hs256_token(self.secret_key, subject, expires_at)


def make_credentials(directory: Path) -> Credentials:
    """A CA, the ``broker`` and ``client`` certificates and a token secret
    key in ``directory`` (kept if already made)."""
    directory.mkdir(parents=True, exist_ok=True)
    secret_file = directory / "secret.key"
    if not secret_file.exists():
        secret_file.write_bytes(os.urandom(32))
    credentials = Credentials(directory, secret_file.read_bytes())
    if not credentials.ca_file.exists():
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(CERT_DAYS),
                 "-subj", "/CN=tally-test-ca", "-keyout", "ca.key", "-out", "ca.pem",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
        _signed_certificate(directory, "broker", "127.0.0.1",
                            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
        _signed_certificate(directory, "client", CLIENT_CERT_ROLE,
                            "extendedKeyUsage=clientAuth\n")
    return credentials


def _signed_certificate(directory: Path, name: str, common_name: str, extensions: str):
    (directory / f"{name}.ext").write_text(extensions)
    # openssl 3 writes PKCS#8 keys ("BEGIN PRIVATE KEY"), the form the broker reads
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={common_name}",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=directory)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", str(CERT_DAYS), "-extfile", f"{name}.ext",
             "-out", f"{name}.pem", cwd=directory)


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        raise PulsarStartError("a secure local broker needs `openssl` on PATH for its "
                               "test certificates")
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        raise PulsarStartError(f"openssl {args[0]} failed: {result.stderr.strip()}")


def broker_security_config(credentials: Credentials, broker_port: int,
                           web_port: int) -> dict[str, object]:
    """broker.conf keys: TLS-only ports, mTLS, token and certificate
    authentication, and the broker's own client (it calls its admin API to
    create public/default) authenticated as the super-user."""
    providers = "org.apache.pulsar.broker.authentication."
    return {
        # None disables a port: only the TLS ones listen
        "brokerServicePort": None,
        "webServicePort": None,
        "brokerServicePortTls": broker_port,
        "webServicePortTls": web_port,
        "tlsCertificateFilePath": credentials.cert_file("broker"),
        "tlsKeyFilePath": credentials.key_file("broker"),
        "tlsTrustCertsFilePath": credentials.ca_file,
        "tlsRequireTrustedClientCertOnConnect": True,
        "tlsAllowInsecureConnection": False,
        "authenticationEnabled": True,
        "authenticationProviders": f"{providers}AuthenticationProviderToken,"
                                   f"{providers}AuthenticationProviderTls",
        "tokenSecretKey": "data:;base64," + base64.b64encode(credentials.secret_key).decode(),
        "superUserRoles": f"{ADMIN_ROLE},{CLIENT_CERT_ROLE}",
        "brokerClientTlsEnabled": True,
        "brokerClientTrustCertsFilePath": credentials.ca_file,
        "brokerClientCertificateFilePath": credentials.cert_file("client"),
        "brokerClientKeyFilePath": credentials.key_file("client"),
        "brokerClientAuthenticationPlugin":
            "org.apache.pulsar.client.impl.auth.AuthenticationToken",
        "brokerClientAuthenticationParameters": "token:" + credentials.token(),
    }


def hs256_token(secret: bytes, subject: str, expires_at: float | None = None) -> str:
    """A JWT signed with HMAC-SHA256, as ``bin/pulsar tokens create
    --secret-key`` makes for a broker configured with ``tokenSecretKey``."""
    def part(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")
    claims = {"sub": subject, **({"exp": int(expires_at)} if expires_at else {})}
    signed = part(json.dumps({"alg": "HS256"}).encode()) + b"." + part(
        json.dumps(claims).encode())
    return (signed + b"." + part(hmac.new(secret, signed, hashlib.sha256).digest())).decode()
