"""Fetching a URL that a stranger typed (the web demo's URL box) without turning the server against itself.

`fetch_untrusted` reads an ``http`` or ``https`` URL only, and only from public addresses: the host name is
resolved once, every address it resolves to must be public (`is_public_address`: not loopback, private,
link-local, multicast, reserved, unspecified, shared 100.64/10, nor an IPv4-mapped or 6to4 IPv6 form of
one), and the connection goes to an address that was checked, never to the name again (a second lookup
could answer differently: DNS rebinding). The Host header, TLS SNI and certificate check still use the
name. Redirects are followed by hand, each hop checked the same way (at most `MAX_REDIRECTS`); the body is
bounded (``max_bytes``, announced or received; a body cut short is refused) and the whole exchange by
``timeout`` seconds: at the deadline the connection is shut down, so a server sending a byte at a time
cannot hold it; name lookups are within it too (`lookup`: ``getaddrinfo`` has no timeout of its own). No
proxy from the environment is used (a proxy would resolve and connect on its own).

Every refusal and every failure (another scheme, a path, a private or unresolvable host, a closed port, a
timeout, an HTTP error, a body too large) raises `URLRefused` with the same message, `REFUSED`, so the
answer tells a visitor nothing about the server's files or network; the real reason is in
``URLRefused.reason`` and the log, for the operator.

The command line and the Python API read URLs through `utils.image_io.read_url` instead: their user is the
operator, who may fetch from the local network and wants the precise error.

Example::

    from utils.safe_fetch import URLRefused, fetch_untrusted
    try:
        data = fetch_untrusted(text, max_bytes=20 * 2**20)
    except URLRefused as e:
        show(str(e))                     # always REFUSED
"""

import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
import urllib.parse

logger = logging.getLogger(__name__)

#: the one message of every URL not fetched, whatever the reason
REFUSED = "this URL was not fetched: only http(s) URLs of public hosts serving the file within the limits are read"
SCHEMES = {"http": http.client.HTTPConnection, "https": http.client.HTTPSConnection}
REDIRECTS = (301, 302, 303, 307, 308)
#: redirects followed before giving up
MAX_REDIRECTS = 5
#: seconds for the whole exchange: every name lookup, connection, redirect and byte
TIMEOUT_S = 20.0
#: name lookups running at once (`lookup`): a flood of names whose servers never answer holds at most this
#: many threads, each until the system resolver gives up on its own
MAX_LOOKUPS = 16
_lookups = threading.BoundedSemaphore(MAX_LOOKUPS)
_CHUNK = 1 << 16


class URLRefused(ValueError):
    """A URL that was not fetched. ``str(e)`` is always `REFUSED`; ``e.reason`` says why (for logs only)."""

    def __init__(self, reason):
        super().__init__(REFUSED)
        self.reason = reason


#: blocks that some Python versions' `ipaddress` counts as global: IETF protocol assignments (RFC 6890; only
#: 192.0.0.9 and .10 are anycast services, not image hosts)
_ALSO_NOT_PUBLIC = (ipaddress.ip_network("192.0.0.0/24"),)


def _is_public_plain(ip) -> bool:
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified
                                 or any(ip in network for network in _ALSO_NOT_PUBLIC if network.version == ip.version))


def is_public_address(address) -> bool:
    """Whether ``address`` (an IP string, IPv6 scope allowed) is a public unicast address.

    IPv6 forms that carry an IPv4 address are judged by it too: ``::ffff:127.0.0.1`` (IPv4-mapped, which
    reaches 127.0.0.1) and ``2002:7f00:1::`` (6to4) are refused. 100.64.0.0/10 (shared, carrier-grade NAT)
    is neither private nor global in `ipaddress` and is refused.
    """
    ip = ipaddress.ip_address(address)
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return _is_public_plain(ip.ipv4_mapped)
        if ip.sixtofour is not None and not _is_public_plain(ip.sixtofour):
            return False
    return _is_public_plain(ip)


def _split(url):
    """(scheme, host, port, path) of an http(s) URL without credentials; `URLRefused` otherwise."""
    if not isinstance(url, str) or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise URLRefused("not a URL string (or it holds whitespace / control characters)")
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise URLRefused(f"scheme {parts.scheme!r}: only http and https")
    if parts.username is not None or parts.password is not None:
        raise URLRefused("credentials in the URL")
    host = parts.hostname
    if not host:
        raise URLRefused("no host")
    port = parts.port or (443 if scheme == "https" else 80)  # ValueError for a bad port: refused by the caller
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, host, port, path


def _is_ip_literal(host):
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def lookup(host, port, deadline, resolver=None):
    """``resolver(host, port, type=SOCK_STREAM)`` (default ``socket.getaddrinfo``) answered before
    ``deadline`` (`time.monotonic`), else `TimeoutError`. ``getaddrinfo`` cannot be given a timeout nor be
    interrupted: a name whose DNS server never answers would hold the caller for what the system resolver
    allows (its attempts times its timeout, or for ever with a hung resolver library). So the lookup runs in a
    daemon thread that the caller stops waiting for at the deadline; it ends on its own later, and at most
    `MAX_LOOKUPS` run at once (a lookup that cannot start before the deadline is a `TimeoutError` too). An
    address given as an IP literal is answered directly."""
    resolver = resolver or socket.getaddrinfo
    if _is_ip_literal(host):
        return resolver(host, port, type=socket.SOCK_STREAM)
    slots = _lookups
    if not slots.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
        raise TimeoutError(f"no name lookup of {host!r} could start before the deadline ({MAX_LOOKUPS} running)")
    answer, done = {}, threading.Event()

    def run():
        try:
            answer["infos"] = resolver(host, port, type=socket.SOCK_STREAM)
        except BaseException as e:  # handed to the caller, if it is still waiting
            answer["error"] = e
        finally:
            slots.release()
            done.set()

    threading.Thread(target=run, name=f"lookup {host}", daemon=True).start()
    if not done.wait(max(deadline - time.monotonic(), 0.0)):
        raise TimeoutError(f"the name lookup of {host!r} did not answer before the deadline")
    if "error" in answer:
        raise answer["error"]
    return answer["infos"]


def connect_within(address, deadline, source_address=None, resolver=None):
    """``socket.create_connection(address, ...)`` whose name lookup (`lookup`) and connections all end by
    ``deadline`` (`time.monotonic`): `TimeoutError` otherwise. For a trusted URL's reader
    (`utils.image_io.read_url`): any address the name gives is tried, none is checked."""
    host, port = address
    error = None
    for *_, sockaddr in lookup(host, port, deadline, resolver):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the deadline passed")
        try:
            return socket.create_connection(sockaddr[:2], remaining, source_address)
        except OSError as e:
            error = e
    raise error or OSError(f"{host!r} resolves to no address")


def checked_addresses(host, port, allow_private=False, resolver=None, deadline=None):
    """The addresses ``host`` resolves to, once (`lookup`, before ``deadline``: `TimeoutError` otherwise), all
    checked by `is_public_address` (unless ``allow_private``); `URLRefused` when there are none or any one is
    not public (a name that also points inside is refused whole)."""
    try:
        if deadline is None:
            infos = (resolver or socket.getaddrinfo)(host, port, type=socket.SOCK_STREAM)
        else:
            infos = lookup(host, port, deadline, resolver)
    except (OSError, UnicodeError) as e:
        if isinstance(e, TimeoutError):
            raise
        raise URLRefused(f"cannot resolve {host!r}: {e}") from e
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise URLRefused(f"{host!r} resolves to no address")
    if not allow_private:
        for address in addresses:
            if not is_public_address(address):
                raise URLRefused(f"{host!r} resolves to {address}, not a public address")
    return addresses


def _connect_checked(addresses, port, timeout, connector):
    """A socket to the first of ``addresses`` that answers (each already checked)."""
    error = None
    for address in addresses:
        try:
            return connector((address, port), timeout)
        except OSError as e:
            error = e
    raise error


class Cutoff:
    """Shuts every connection of one fetch down at its deadline, so that a server sending its headers or body
    a byte at a time (each byte within the socket's timeout) cannot hold the fetch past it. The shutdown goes
    through a duplicate of each socket: it ends a blocked read on the original, TLS-wrapped or not.

    ``with Cutoff(deadline) as cutoff:`` starts the timer; ``cutoff.watch(sock)`` (the plain socket, before any
    TLS wrapping) registers each connection; ``cutoff.fired`` tells a read ended by the deadline from a peer's
    close. Also `utils.image_io.read_url`'s deadline (the operator's URLs)."""

    def __init__(self, deadline):
        self.deadline, self._sockets, self._fired, self._lock = deadline, [], False, threading.Lock()
        self._timer = threading.Timer(max(deadline - time.monotonic(), 0.0), self._fire)
        self._timer.daemon = True

    @property
    def fired(self):
        """Whether the deadline came (and the connections were shut down)."""
        return self._fired

    def watch(self, sock):
        with self._lock:
            self._sockets.append(sock.dup())
            if self._fired:
                self._shutdown(self._sockets[-1])
        return sock

    @staticmethod
    def _shutdown(sock):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed by the peer
            pass

    def _fire(self):
        with self._lock:
            self._fired = True
            for sock in self._sockets:
                self._shutdown(sock)

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        with self._lock:
            for sock in self._sockets:
                sock.close()


def _open(scheme, host, port, path, addresses, cutoff, connector, ssl_context):
    """(connection, response) of one GET to one of ``addresses``, named ``host`` in Host, SNI and the
    certificate check."""
    remaining = cutoff.deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("deadline passed")
    kwargs = {"context": ssl_context or ssl.create_default_context()} if scheme == "https" else {}
    connection = SCHEMES[scheme](host, port, timeout=remaining, **kwargs)
    # the name is not looked up again: the socket goes to an address that was checked
    connection._create_connection = (lambda _address, timeout, _source=None:
                                     cutoff.watch(_connect_checked(addresses, port, timeout, connector)))
    try:
        connection.request("GET", path, headers={"User-Agent": "image_captioning", "Accept-Encoding": "identity"})
        return connection, connection.getresponse()
    except BaseException:
        connection.close()
        raise


def _read_body(response, max_bytes, cutoff):
    length = response.getheader("Content-Length", "")
    if max_bytes is not None and length.strip().isdigit() and int(length) > max_bytes:
        raise URLRefused(f"announces {length} bytes, more than {max_bytes}")
    data = bytearray()
    while True:
        if cutoff.fired:
            raise URLRefused("too slow")
        chunk = response.read1(_CHUNK)
        if not chunk:
            break
        data += chunk
        if max_bytes is not None and len(data) > max_bytes:
            raise URLRefused(f"more than {max_bytes} bytes")
    if cutoff.fired:  # the cutoff ended the read: what arrived is not all of it
        raise URLRefused("too slow")
    if response.length:  # read1 ends quietly when the connection closes before the announced length
        raise URLRefused(f"connection closed {response.length} bytes before the announced end")
    if not data:
        raise URLRefused("empty body")
    return bytes(data)


def fetch_untrusted(url, max_bytes, timeout=TIMEOUT_S, allow_private=False, resolver=None,
                    connector=socket.create_connection, ssl_context=None) -> bytes:
    """The body of a 200 answer to GET ``url``, read as described in the module's docstring.

    Args:
        url: the text a visitor gave.
        max_bytes: the most bytes accepted (None: no bound; not for untrusted input).
        timeout: seconds for everything, redirects included.
        allow_private: also fetch loopback, private, link-local... addresses (the operator's choice: the
            visitors can then reach what the server reaches). Schemes and paths are refused all the same.
        resolver: ``getaddrinfo``-like ``(host, port, type=...)`` (default ``socket.getaddrinfo``); connector: ``create_connection``-like
            ``((address, port), timeout)``; ssl_context: for https (default: the system's trust store and
            hostname checking). Injectable for tests.

    Raises:
        URLRefused: for everything that is not a fetched body, always with the message `REFUSED`.
    """
    deadline = time.monotonic() + timeout
    try:
        with Cutoff(deadline) as cutoff:
            return _fetch(url, max_bytes, allow_private, resolver, connector, ssl_context, cutoff)
    except URLRefused as e:
        logger.info("URL not fetched (%s): %s", e.reason, url)
        raise
    except (OSError, http.client.HTTPException, ValueError) as e:  # timeouts, resets, TLS, bad ports...
        logger.info("URL not fetched (%s: %s): %s", type(e).__name__, e, url)
        raise URLRefused(f"{type(e).__name__}: {e}") from e


def _fetch(url, max_bytes, allow_private, resolver, connector, ssl_context, cutoff):
    """`fetch_untrusted`'s exchange: each hop resolved, checked, requested; redirects followed by hand."""
    for _ in range(MAX_REDIRECTS + 1):
        if time.monotonic() >= cutoff.deadline:
            raise URLRefused("too slow")
        scheme, host, port, path = _split(url)
        addresses = checked_addresses(host, port, allow_private, resolver, cutoff.deadline)
        connection, response = _open(scheme, host, port, path, addresses, cutoff, connector, ssl_context)
        try:
            if response.status in REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise URLRefused(f"HTTP {response.status} without a Location")
                url = urllib.parse.urljoin(url, location.strip())
                continue
            if response.status != 200:
                raise URLRefused(f"HTTP {response.status} {response.reason}")
            return _read_body(response, max_bytes, cutoff)
        finally:
            response.close()
            connection.close()
    raise URLRefused(f"more than {MAX_REDIRECTS} redirects")
