"""A quiet loopback HTTP server for the tests that fetch URLs (the demo's safe fetch, the CLI's URL inputs).

`QuietHandler` is a request handler that logs nothing and sends a body with its length (`send_bytes`);
`running(httpd)` serves ``httpd`` on a daemon thread for a ``with`` block; `closed_port` is a loopback port that
nothing listens on. The download tests' server with its failure knobs is `unitest/download_server.py`.
"""

import contextlib
import http.server
import socket
import threading
import time


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """A request handler without access logs; subclasses write ``do_GET``."""

    def send_bytes(self, data):
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_silence(self, seconds=3):
        """Announce 1000 bytes, send one, then nothing for ``seconds`` (a server gone quiet mid-body)."""
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"x")
        self.wfile.flush()
        time.sleep(seconds)

    def log_message(self, *args):
        pass


def start(httpd):
    """Serve ``httpd`` on a daemon thread (polling every 50 ms, so that `stop` returns quickly)."""
    httpd.daemon_threads = True
    httpd.port = httpd.server_address[1]
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    return httpd


def stop(httpd):
    httpd.shutdown()
    httpd.server_close()


@contextlib.contextmanager
def running(handler, **attributes):
    """A `ThreadingHTTPServer` on 127.0.0.1 (a free port: ``.port``) with ``attributes`` set on it, served for
    the ``with`` block."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    for name, value in attributes.items():
        setattr(httpd, name, value)
    start(httpd)
    try:
        yield httpd
    finally:
        stop(httpd)


def closed_port():
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
