"""TLS on the HTTP listener, for real: a CA, a server and client certificates made here.

Promises: a client trusting the CA reaches REST and ``wss://`` sessions; the
protocol floor is TLS 1.2; with ``tls_client_ca`` a client needs a certificate
signed by that CA; and a non-loopback listener without TLS refuses to start
unless ``allow_plaintext = true``.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import subprocess
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from serialmuxd.daemon import Daemon, StartupError, server_ssl_context
from tests.conftest import DaemonFactory, Users, url_of
from tests.test_sessions import recv_json

DEMO = [{"name": "vm1", "uart": "demo:?boot=0"}]


@dataclass
class Pki:
    dir: Path

    def path(self, name: str) -> str:
        return str(self.dir / name)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_ca(path: Path, cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(path, key, cert)
    return key, cert


def issue(
    path: Path,
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    cn: str,
    *,
    client: bool,
) -> None:
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if not client:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    _write(path, key, builder.sign(ca_key, hashes.SHA256()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d / "ca", "serialmuxd test CA")
    other = make_ca(d / "other-ca", "someone else's CA")
    issue(d / "server", ca, "127.0.0.1", client=False)
    issue(d / "alice", ca, "alice", client=True)
    issue(d / "mallory", other, "mallory", client=True)
    return Pki(d)


def client_ctx(pki: Pki, cert: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki.path("ca.crt"))
    if cert:
        ctx.load_cert_chain(pki.path(f"{cert}.crt"), pki.path(f"{cert}.key"))
    return ctx


async def tls_daemon(make_daemon: DaemonFactory, users: Users, pki: Pki, *, mutual: bool = False) -> Daemon:
    http = {"tls_cert": pki.path("server.crt"), "tls_key": pki.path("server.key")}
    if mutual:
        http["tls_client_ca"] = pki.path("ca.crt")
    d = await make_daemon(DEMO, users=users.config(), http=http)
    assert url_of(d).startswith("https://127.0.0.1:")
    return d


async def test_client_trusting_the_ca_reaches_rest_and_wss_sessions(
    make_daemon: DaemonFactory, users: Users, pki: Pki
) -> None:
    """With tls_cert/tls_key the listener speaks HTTPS and wss://, TLS 1.2 or newer;
    a client that does not trust the CA is refused by its own verification."""
    d = await tls_daemon(make_daemon, users, pki)
    base = url_of(d)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ctx(pki))) as s:
        r = await s.get(base + "/api/v1/consoles", headers=users.header("reader"))
        assert r.status == 200
        assert [c["name"] for c in (await r.json())["consoles"]] == ["vm1"]
        ws = await s.ws_connect(
            base.replace("https://", "wss://") + "/api/v1/consoles/vm1/session",
            headers=users.header("contributor"),
        )
        assert (await recv_json(ws, "hello"))["user"] == "contributor"
        await ws.send_bytes(b"echo over-tls\r")
        await ws.close()
    async with aiohttp.ClientSession() as s:  # the system's CAs: ours is not among them
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await s.get(base + "/healthz")
    version = await asyncio.to_thread(_handshake_version, d.bound[0].port, client_ctx(pki))
    assert version in {"TLSv1.2", "TLSv1.3"}


def _handshake_version(port: int, ctx: ssl.SSLContext) -> str:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert tls.recv(12).startswith(b"HTTP/1.1 200")
        return str(tls.version())


async def test_protocol_floor_is_tls_1_2(make_daemon: DaemonFactory, users: Users, pki: Pki) -> None:
    """A client that speaks at most TLS 1.1 is refused in the handshake; one that speaks
    at most TLS 1.2 gets in (so the floor is exactly 1.2)."""
    d = await tls_daemon(make_daemon, users, pki)
    port = d.bound[0].port
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = client_ctx(pki)
        # Let this client offer TLS 1.1 at all (OpenSSL 3 refuses it at the default level),
        # so what refuses it is the server's floor.
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    # Control: this client does get in where a server allows TLS 1.1 ...
    assert await asyncio.to_thread(_tls11_control, pki, old) == "TLSv1.1"
    # ... and the daemon refuses it (uvloop closes without an alert, stdlib sends one).
    with pytest.raises(ssl.SSLError) as e:
        await asyncio.to_thread(_handshake_version, port, old)
    assert e.value.reason in {"TLSV1_ALERT_PROTOCOL_VERSION", "UNEXPECTED_EOF_WHILE_READING"}, e.value
    tls12 = client_ctx(pki)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    assert await asyncio.to_thread(_handshake_version, port, tls12) == "TLSv1.2"


def _tls11_control(pki: Pki, client: ssl.SSLContext) -> str:
    """Handshake ``client`` with a throw-away stdlib server whose floor is TLS 1.0."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki.path("server.crt"), pki.path("server.key"))
    server.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server.minimum_version = ssl.TLSVersion.TLSv1

    def serve(sock: socket.socket) -> None:
        with sock, server.wrap_socket(sock, server_side=True):
            pass

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)
        with socket.create_connection(listener.getsockname(), timeout=5) as raw:
            accepted, _ = listener.accept()
            accepted.settimeout(5)
            t = threading.Thread(target=serve, args=(accepted,))
            t.start()
            with client.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                version = str(tls.version())
            t.join(5)
    return version


def test_server_context_sets_the_floor_and_requires_client_certs(pki: Pki) -> None:
    """The context itself: minimum TLS 1.2; CERT_REQUIRED only with a client CA."""
    plain = server_ssl_context(pki.path("server.crt"), pki.path("server.key"), "")
    assert plain.minimum_version is ssl.TLSVersion.TLSv1_2
    assert plain.verify_mode is ssl.CERT_NONE
    mutual = server_ssl_context(pki.path("server.crt"), pki.path("server.key"), pki.path("ca.crt"))
    assert mutual.verify_mode is ssl.CERT_REQUIRED


def test_unreadable_tls_files_name_the_key_and_the_file(pki: Pki, tmp_path: Path) -> None:
    """A missing or wrong TLS file stops the start with a message naming the config key."""
    with pytest.raises(StartupError) as e:
        server_ssl_context(str(tmp_path / "missing.crt"), pki.path("server.key"), "")
    assert "http.tls_cert" in str(e.value) and "missing.crt" in str(e.value)
    with pytest.raises(StartupError) as e:
        server_ssl_context(pki.path("server.crt"), pki.path("alice.key"), "")
    assert "http.tls_key" in str(e.value)
    with pytest.raises(StartupError) as e:
        server_ssl_context(pki.path("server.crt"), pki.path("server.key"), str(tmp_path / "no-ca.crt"))
    assert "http.tls_client_ca" in str(e.value) and "no-ca.crt" in str(e.value)


async def test_mutual_tls_needs_a_client_certificate_from_the_ca(
    make_daemon: DaemonFactory, users: Users, pki: Pki
) -> None:
    """With tls_client_ca a client without a certificate, or with one from another CA,
    never gets an HTTP answer; one signed by the CA does, and still needs its token."""
    d = await tls_daemon(make_daemon, users, pki, mutual=True)
    base = url_of(d)
    for cert in (None, "mallory"):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ctx(pki, cert))) as s:
            with pytest.raises(aiohttp.ClientError):
                r = await s.get(base + "/healthz")
                await r.read()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ctx(pki, "alice"))) as s:
        r = await s.get(base + "/api/v1/consoles", headers=users.header("reader"))
        assert r.status == 200
        r = await s.get(base + "/api/v1/consoles")
        assert r.status == 401
        ws = await s.ws_connect(
            base.replace("https://", "wss://") + "/api/v1/consoles/vm1/session?mode=watch",
            headers=users.header("reader"),
        )
        await recv_json(ws, "hello")
        await ws.close()


def _run(config: Path, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serialmuxd", *argv, "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_run_refuses_a_public_plaintext_listener_with_exit_status_2(tmp_path: Path) -> None:
    """`serialmuxd run` on a non-loopback address without TLS exits 2 before binding,
    naming the key and both ways out; allow_plaintext = true is accepted."""
    cfg = tmp_path / "public.toml"
    body = f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[[console]]\nname = "vm1"\nuart = "demo:"\n'
    cfg.write_text(body + '[http]\nlisten = ["0.0.0.0:0"]\n')
    r = _run(cfg, "run")
    assert r.returncode == 2, r.stderr
    assert f"{cfg}: http.listen[0]: 0.0.0.0:0 is not a loopback address and TLS is off" in r.stderr
    assert "tls_cert" in r.stderr and "allow_plaintext = true" in r.stderr
    assert not (tmp_path / "state").exists(), "refused before touching anything"
    # (not started: the tests only ever listen on loopback)
    user = '[[user]]\nname = "alice"\ntoken_sha256 = "' + "a" * 64 + '"\n'
    cfg.write_text(body + user + '[http]\nlisten = ["0.0.0.0:0"]\nallow_plaintext = true\n')
    assert _run(cfg, "check-config").returncode == 0


def test_run_with_a_missing_tls_file_fails_with_a_message(tmp_path: Path) -> None:
    """A TLS file that cannot be read stops `serialmuxd run` at once, naming the key and file."""
    cfg = tmp_path / "tls.toml"
    cfg.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[http]\nlisten = ["127.0.0.1:0"]\ntls_cert = "{tmp_path}/nope.crt"\ntls_key = "{tmp_path}/nope.key"\n'
        '[[console]]\nname = "vm1"\nuart = "demo:"\n'
    )
    r = _run(cfg, "run")
    assert r.returncode == 2, "a TLS file is configuration: exit status 2 like any config error"
    assert "http.tls_cert: cannot read" in r.stderr and "nope.crt" in r.stderr
    assert "backend_up" not in r.stderr, "checked before any console is opened"
