"""How to reach one Pulsar cluster: its URLs, authentication and TLS.

A ``Cluster`` is built once (from the command line, the environment and
``tally.toml``: ``tally.service.config.cluster``) and handed to everything
that opens a connection: the binary protocol's clients
(``tally.service.pulsar.client.connect``) and the admin REST API
(``tally.service.pulsar.admin.Admin``) read their authentication and TLS from
it, so the two never disagree. It holds settings only (paths, not open files
or clients), so it pickles to the bootstrap's reader processes.

Authentication, as the Python client offers it:

- a token (``token``, or ``token_file`` re-read on every connection so a
  rotated token is picked up): ``Authorization: Bearer`` on REST;
- OAuth2 client credentials (``oauth2_issuer_url``, ``oauth2_credentials_file``
  holding ``client_id`` and ``client_secret``, optional ``oauth2_audience``
  and ``oauth2_scope``): the client fetches its own tokens; REST calls fetch
  one from the issuer's token endpoint here, cached until it expires;
- a TLS client certificate (``tls_cert_file`` and ``tls_key_file`` with no
  token or OAuth2): the certificate is the identity.

TLS: ``pulsar+ssl://`` and ``https://`` URLs, checked against
``tls_ca_file`` (else the system's CAs). A client certificate alongside a
token or OAuth2 is presented at the TLS layer (mTLS) without being the
identity.
"""
from __future__ import annotations

import dataclasses
import json
import ssl
import threading
import time
import urllib.parse
import urllib.request

from tally.core.errors import TallyError

# a fetched OAuth2 token is renewed this long before the issuer says it expires
OAUTH2_RENEW_MARGIN_S = 30.0


class ClusterConfigError(TallyError, ValueError):
    """Connection settings that cannot work together."""


@dataclasses.dataclass(frozen=True)
class TieredStorage:
    """How Tally reads the cluster's offloaded ledgers from object storage
    (``tally.service.history.tiered``): each setting given overrides what the
    broker's offload policies say; credentials come only from here or the
    platform's credential chain. ``direct=False`` reads offloaded ledgers
    through the broker; ``mount``: a directory where the buckets are mounted
    as files (``<mount>/<bucket>/<key>``), read instead of the object store's
    API."""
    direct: bool = True
    endpoint: str | None = None
    bucket: str | None = None
    region: str | None = None
    access_key: str | None = dataclasses.field(default=None, repr=False)
    secret_key: str | None = dataclasses.field(default=None, repr=False)
    mount: str | None = None


@dataclasses.dataclass(frozen=True)
class Cluster:
    """One Pulsar cluster's URLs and credentials (see the module docstring)."""

    service_url: str | None = None
    admin_url: str | None = None
    token: str | None = dataclasses.field(default=None, repr=False)
    token_file: str | None = None
    oauth2_issuer_url: str | None = None
    oauth2_credentials_file: str | None = None
    oauth2_audience: str | None = None
    oauth2_scope: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_allow_insecure: bool = False
    tls_validate_hostname: bool = True
    tiered_storage: TieredStorage = TieredStorage()

    def __post_init__(self):
        methods = [name for name, given in (
            ("token", self.token), ("token_file", self.token_file),
            ("oauth2", self.oauth2_issuer_url or self.oauth2_credentials_file)) if given]
        if len(methods) > 1:
            raise ClusterConfigError(f"give one authentication method, not {methods}")
        if bool(self.oauth2_issuer_url) != bool(self.oauth2_credentials_file):
            raise ClusterConfigError("OAuth2 needs both an issuer URL and a credentials file")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ClusterConfigError("a TLS client certificate needs both its cert and key file")

    @property
    def auth_method(self):
        """'token', 'oauth2', 'tls' (the client certificate) or None."""
        if self.token or self.token_file:
            return "token"
        if self.oauth2_issuer_url:
            return "oauth2"
        return "tls" if self.tls_cert_file else None

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    # -- the binary protocol ---------------------------------------------------

    def client_options(self):
        """Keyword arguments of ``pulsar.Client`` for this cluster's auth and TLS."""
        import pulsar
        options = {"tls_allow_insecure_connection": self.tls_allow_insecure,
                   "tls_validate_hostname": self.tls_validate_hostname}
        if self.tls_ca_file:
            options["tls_trust_certs_file_path"] = self.tls_ca_file
        method = self.auth_method
        if method == "token":
            options["authentication"] = pulsar.AuthenticationToken(
                self.token if self.token else self._read_token_file)
        elif method == "oauth2":
            options["authentication"] = pulsar.AuthenticationOauth2(json.dumps(
                {"type": "client_credentials", "issuer_url": self.oauth2_issuer_url,
                 "private_key": self.oauth2_credentials_file,
                 **({"audience": self.oauth2_audience} if self.oauth2_audience else {}),
                 **({"scope": self.oauth2_scope} if self.oauth2_scope else {})}))
        elif method == "tls":
            options["authentication"] = pulsar.AuthenticationTLS(self.tls_cert_file,
                                                                 self.tls_key_file)
        if self.tls_cert_file and method != "tls":
            options["tls_certificate_file_path"] = self.tls_cert_file
            options["tls_private_key_file_path"] = self.tls_key_file
        return options

    def _read_token_file(self):
        with open(self.token_file) as f:
            return f.read().strip()

    # -- the admin REST API ------------------------------------------------------

    def ssl_context(self):
        """The TLS context of REST calls over https (None for plain http)."""
        if not (self.admin_url or "").startswith("https:"):
            return None
        context = ssl.create_default_context(cafile=self.tls_ca_file)
        if self.tls_allow_insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif not self.tls_validate_hostname:
            context.check_hostname = False
        if self.tls_cert_file:
            context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        return context

    def http_headers(self):
        """The authentication headers of a REST call. Like the Java admin
        client, a token names its method: a broker that also accepts client
        certificates would otherwise let the certificate vouch for a bad token."""
        method = self.auth_method
        if method == "token":
            token = self.token or self._read_token_file()
        elif method == "oauth2":
            token = _oauth2_tokens.get(self)
        else:
            return {}
        return {"Authorization": "Bearer " + token, "X-Pulsar-Auth-Method-Name": "token"}


class _OAuth2Tokens:
    """Access tokens fetched with the client-credentials grant, one per cluster
    setting, renewed shortly before they expire."""

    def __init__(self):
        self._lock = threading.Lock()
        self._tokens = {}                     # Cluster -> (token, renew at monotonic s)

    def get(self, cluster):
        with self._lock:
            token, renew_at = self._tokens.get(cluster, (None, 0.0))
            if token is None or time.monotonic() >= renew_at:
                token, lifetime = fetch_oauth2_token(cluster)
                self._tokens[cluster] = (
                    token, time.monotonic() + max(lifetime - OAUTH2_RENEW_MARGIN_S, 0.0))
            return token


_oauth2_tokens = _OAuth2Tokens()


def fetch_oauth2_token(cluster, timeout=30.0):
    """(access token, lifetime in seconds) from the issuer's token endpoint,
    found in its OpenID discovery document, as the Pulsar clients do."""
    with open(cluster.oauth2_credentials_file) as f:
        credentials = json.load(f)
    issuer = cluster.oauth2_issuer_url.rstrip("/")
    discovery = _get_json(issuer + "/.well-known/openid-configuration", timeout)
    form = {"grant_type": "client_credentials", "client_id": credentials["client_id"],
            "client_secret": credentials["client_secret"]}
    if cluster.oauth2_audience:
        form["audience"] = cluster.oauth2_audience
    if cluster.oauth2_scope:
        form["scope"] = cluster.oauth2_scope
    request = urllib.request.Request(discovery["token_endpoint"],
                                     data=urllib.parse.urlencode(form).encode(),
                                     method="POST")
    answer = _get_json(request, timeout)
    return answer["access_token"], float(answer.get("expires_in", 3600))


def _get_json(request, timeout):
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except (OSError, ValueError) as error:
        url = request if isinstance(request, str) else request.full_url
        raise ClusterConfigError(f"OAuth2: {url}: {error}") from None



def as_cluster(cluster=None, admin_url=None):
    """``cluster`` itself, or a ``Cluster`` without credentials for a service
    URL (and ``admin_url``): the form tests and scripts on a local broker use."""
    if isinstance(cluster, Cluster):
        return cluster if admin_url is None else cluster.replace(admin_url=admin_url)
    return Cluster(service_url=cluster, admin_url=admin_url)
