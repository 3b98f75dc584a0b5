"""`utils.safe_fetch.fetch_untrusted`: the web demo's reader of a stranger's URL, against a loopback server.

Every way of naming this machine or its network (loopback in decimal, octal, hex and short forms,
``localhost``, ``0.0.0.0``, ``[::1]``, IPv4-mapped IPv6), every other scheme and every path is refused with
the one message before any byte is sent; a closed port, a 404, a slow or too large body read the same.
Names that should look public are given by an injected resolver and reach the local server through an
injected connector, which receives the checked address (so the name is resolved once: no DNS rebinding);
a redirect from such a host to loopback is refused; over https the certificate is checked against the name.
"""

import datetime
import http.server
import ipaddress
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from unitest.http_helpers import QuietHandler, closed_port, running, start
from utils import safe_fetch
from utils.safe_fetch import REFUSED, URLRefused, fetch_untrusted, is_public_address

CAT = (Path(__file__).resolve().parents[1] / "demo" / "cat.jpg").read_bytes()
PUBLIC_IP = "93.184.216.34"  # a global unicast address; tests never connect to it (the connector redirects)


class _Handler(QuietHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        server = self.server
        server.requests.append((self.path, self.headers.get("Host")))
        if self.path in server.redirects:
            self.send_response(302)
            self.send_header("Location", server.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/cat.jpg":
            self.send_bytes(CAT)
        elif self.path == "/big-unannounced":
            self.send_response(200)
            self.end_headers()
            self.close_connection = True
            for _ in range(50):
                self.wfile.write(b"x" * 10_000)
        elif self.path.startswith("/drip-"):  # one byte every 0.1 s for 3 s, in the headers or in the body
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: " if self.path == "/drip-headers" else
                             b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
            for _ in range(30):
                self.wfile.write(b"a")
                self.wfile.flush()
                time.sleep(0.1)
            self.close_connection = True
        elif self.path == "/truncated":  # announces more than it sends, then hangs up
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(CAT) + CAT[:1000])
            self.close_connection = True
        elif self.path == "/silent":
            self.send_silence()
        else:
            self.send_error(404)


@pytest.fixture
def server():
    with running(_Handler, requests=[], redirects={}) as httpd:
        yield httpd


def public_names(port, names=("public.test",), calls=None):
    """(resolver, connector): ``names`` resolve to `PUBLIC_IP` (others as usual), and a connection to
    `PUBLIC_IP` goes to 127.0.0.1:``port``; ``calls`` records each lookup and each connection's address."""
    calls = calls if calls is not None else []

    def resolver(host, p, type=0):
        calls.append(("resolve", host))
        if host in names:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC_IP, p))]
        return socket.getaddrinfo(host, p, type=type)

    def connector(address, timeout):
        calls.append(("connect", address[0]))
        target = ("127.0.0.1", port) if address[0] == PUBLIC_IP else address
        return socket.create_connection(target, timeout)

    return resolver, connector


def _refused(url, max_bytes=10**6, timeout=5, **kwargs):
    with pytest.raises(URLRefused) as info:
        fetch_untrusted(url, max_bytes=max_bytes, timeout=timeout, **kwargs)
    assert str(info.value) == REFUSED
    return info.value


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.255.0.9", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "224.0.0.1", "233.1.1.1", "239.255.255.250", "240.0.0.1", "255.255.255.255", "192.0.0.8",
    "198.18.0.1", "::", "::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::127.0.0.1",
    "fe80::1", "fe80::1%1", "fc00::1", "fd12::1", "ff02::1", "ff0e::1", "2002:7f00:1::1", "2002:a00:1::1",
    "64:ff9b::7f00:1", "2001:db8::1", "2001::1"])
def test_non_public_addresses(address):
    assert not is_public_address(address)


@pytest.mark.parametrize("address", ["8.8.8.8", PUBLIC_IP, "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8",
                                     "2002:808:808::1"])
def test_public_addresses(address):
    assert is_public_address(address)


def test_every_local_form_and_every_path_is_refused_alike(server, tmp_path):
    port = server.port
    photo = tmp_path / "x.jpg"
    photo.write_bytes(CAT)
    urls = [f"http://127.0.0.1:{port}/cat.jpg", f"http://localhost:{port}/cat.jpg",
            f"http://2130706433:{port}/cat.jpg", f"http://0x7f.1:{port}/cat.jpg",
            f"http://017700000001:{port}/cat.jpg", f"http://127.1:{port}/cat.jpg", f"http://0.0.0.0:{port}/cat.jpg",
            f"http://[::1]:{port}/cat.jpg", f"http://[::ffff:127.0.0.1]:{port}/cat.jpg",
            f"HTTP://LOCALHOST:{port}/cat.jpg", f"https://127.0.0.1:{port}/cat.jpg",
            f"http://127.0.0.1:{closed_port()}/cat.jpg", f"http://x@127.0.0.1:{port}/cat.jpg",
            str(photo), "/etc/passwd", str(tmp_path), str(tmp_path / "missing.jpg"), "x.jpg", "~/x.jpg",
            f"file://{photo}", "file:///etc/passwd", "ftp://127.0.0.1/x.jpg", "gopher://127.0.0.1:70/",
            "data:image/jpeg;base64,AAAA", "http://", "http:///cat.jpg", f"http://127.0.0.1:{port}x/cat.jpg",
            f"http://127.0.0.1:{port}/cat.jpg\r\nX: y", "http://no-such-host.invalid/cat.jpg"]
    reasons = [_refused(url).reason for url in urls]
    assert server.requests == []  # nothing reached the server
    assert len(set(reasons)) > 5  # the reasons differ (for the log); the message did not


def test_private_addresses_with_the_operators_flag(server):
    port = server.port
    for url in (f"http://127.0.0.1:{port}/cat.jpg", f"http://localhost:{port}/cat.jpg",
                f"http://2130706433:{port}/cat.jpg"):
        assert fetch_untrusted(url, max_bytes=10**6, allow_private=True) == CAT
    # the flag opens addresses, not failures: a closed port, a 404, another scheme, a path read the same
    for url in (f"http://127.0.0.1:{closed_port()}/cat.jpg", f"http://127.0.0.1:{port}/missing.jpg",
                "file:///etc/passwd", "/etc/passwd"):
        _refused(url, allow_private=True)


def test_failures_of_a_public_host_read_the_same(server):
    resolver, connector = public_names(server.port)
    fetch = dict(resolver=resolver, connector=connector)
    _refused("http://public.test/missing.jpg", **fetch)
    _refused("http://public.test/truncated", **fetch)
    _refused("http://public.test/big-unannounced", max_bytes=100_000, **fetch)
    _refused("http://public.test/cat.jpg", max_bytes=len(CAT) - 1, **fetch)  # announced: too large
    for path in ("/silent", "/drip-headers", "/drip-body"):  # the timeout bounds the whole exchange
        start = time.monotonic()
        _refused(f"http://public.test{path}", timeout=0.5, **fetch)
        assert time.monotonic() - start < 1.5, path


def test_connects_to_the_checked_address_and_resolves_once(server):
    calls = []
    resolver, connector = public_names(server.port, calls=calls)
    assert fetch_untrusted("http://public.test/cat.jpg", max_bytes=10**6, resolver=resolver,
                           connector=connector) == CAT
    assert calls == [("resolve", "public.test"), ("connect", PUBLIC_IP)]
    assert server.requests == [("/cat.jpg", "public.test")]  # the Host header keeps the name


def test_a_name_lookup_that_never_answers_ends_at_the_deadline(server, monkeypatch):
    """``getaddrinfo`` has no timeout: a name whose DNS server never answers held the demo's worker for what
    the system resolver allowed. The lookup is now within the deadline, and at most `MAX_LOOKUPS` hang at once
    (a lookup that cannot start before its deadline is refused too)."""
    answer = threading.Event()
    resolver, connector = public_names(server.port)

    def hung(host, port, type=0):  # a resolver library stuck until the test lets it go
        answer.wait(30)
        return resolver(host, port, type=type)

    try:
        start = time.monotonic()
        e = _refused("http://public.test/cat.jpg", timeout=0.5, resolver=hung, connector=connector)
        assert time.monotonic() - start < 1.5 and "name lookup" in e.reason
        monkeypatch.setattr(safe_fetch, "_lookups", threading.BoundedSemaphore(1))
        started = threading.Thread(target=safe_fetch.lookup, args=("public.test", 80, time.monotonic() + 5, hung),
                                   daemon=True)
        started.start()  # holds the only slot
        time.sleep(0.2)
        with pytest.raises(TimeoutError, match="could start"):
            safe_fetch.lookup("public.test", 80, time.monotonic() + 0.3, hung)
        e = _refused("http://public.test/cat.jpg", timeout=0.3, resolver=hung, connector=connector)
        assert "could start" in e.reason
    finally:
        answer.set()
    started.join(5)
    assert fetch_untrusted("http://public.test/cat.jpg", max_bytes=10**6, resolver=resolver,
                           connector=connector) == CAT  # the slot was given back


def test_a_name_that_also_resolves_inside_is_refused(server):
    def resolver(host, port, type=0):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC_IP, port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    _refused("http://both.test/cat.jpg", resolver=resolver, connector=public_names(server.port)[1])
    assert server.requests == []


def test_redirects_are_checked_at_every_hop(server):
    port = server.port
    resolver, connector = public_names(port)
    fetch = dict(resolver=resolver, connector=connector)
    server.redirects.update({
        "/to-loopback": f"http://127.0.0.1:{port}/cat.jpg", "/to-localhost": f"http://localhost:{port}/cat.jpg",
        "/to-v6": f"http://[::ffff:127.0.0.1]:{port}/cat.jpg", "/to-file": "file:///etc/passwd",
        "/relative": "/cat.jpg", "/loop": "/loop"})
    for path in ("/to-loopback", "/to-localhost", "/to-v6", "/to-file"):
        _refused(f"http://public.test{path}", **fetch)
    assert [p for p, _ in server.requests] == ["/to-loopback", "/to-localhost", "/to-v6", "/to-file"]
    assert fetch_untrusted("http://public.test/relative", max_bytes=10**6, **fetch) == CAT
    server.requests.clear()
    _refused("http://public.test/loop", **fetch)
    assert len(server.requests) == safe_fetch.MAX_REDIRECTS + 1
    # the operator's flag lets the same redirect through
    assert fetch_untrusted("http://public.test/to-loopback", max_bytes=10**6, allow_private=True, **fetch) == CAT


def _self_signed(directory, name):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_checks_the_certificate_against_the_name(tmp_path):
    pytest.importorskip("cryptography")
    cert, key = _self_signed(tmp_path, "public.test")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    httpd.socket = server_context.wrap_socket(httpd.socket, server_side=True)
    httpd.requests, httpd.redirects = [], {}
    start(httpd)
    try:
        resolver, connector = public_names(httpd.port, names=("public.test", "other.test"))
        trust = ssl.create_default_context(cafile=str(cert))
        fetch = dict(max_bytes=10**6, resolver=resolver, connector=connector, ssl_context=trust)
        assert fetch_untrusted("https://public.test/cat.jpg", **fetch) == CAT  # SNI + check on the name
        assert _refused("https://other.test/cat.jpg", **fetch).reason.startswith("SSLCertVerificationError")
        assert _refused("https://public.test/cat.jpg", resolver=resolver, connector=connector).reason.startswith(
            "SSLCertVerificationError")  # the system's trust store does not know this certificate
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_ipaddress_forms_of_the_checked_addresses():
    # what getaddrinfo answers for the odd spellings, as the checks above rely on it (glibc's inet_aton)
    for host in ("2130706433", "0x7f.1", "017700000001", "127.1"):
        assert {info[4][0] for info in socket.getaddrinfo(host, 80, type=socket.SOCK_STREAM)} == {"127.0.0.1"}
    assert ipaddress.ip_address("::ffff:127.0.0.1").ipv4_mapped == ipaddress.ip_address("127.0.0.1")
