"""An HTTPS server for MTA-STS policies (RFC 8461 §3.3), on loopback, for the tests; it also
takes TLS-RPT reports POSTed to it (RFC 8460 §5.4), recorded in :attr:`PolicyServer.posts`.

Rules of this module:

- :func:`issue_certificate` signs a server certificate for any names with the test CA of
  :mod:`tests.peers.tls` (its ``ca.pem`` / ``ca.key``), with the ``openssl`` command-line
  tool, as that module makes its own: ECDSA P-256, names in the subjectAltName, serverAuth.
- :class:`PolicyServer` is the standard library's ``http.server`` in a thread, each
  connection wrapped in TLS in its own handler thread (a client that refuses our certificate
  costs only that connection). What it answers is per ``Host`` name, in :attr:`routes`; every
  request is recorded in :attr:`requests`, so tests can count fetches.
- It listens on ``127.0.0.1`` at a free port and is stopped by :meth:`PolicyServer.stop`.
"""

from __future__ import annotations

import http.server
import shutil
import socket
import socketserver
import ssl
import subprocess
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs

from tests.peers.tls import TLSFiles

HOST = "127.0.0.1"
_OPENSSL_TIMEOUT = 30.0


def issue_certificate(
    tls_files: TLSFiles, names: Iterable[str], directory: Path
) -> tuple[Path, Path]:
    """A certificate for ``names`` signed by the test CA, and its key: ``(cert, key)``."""
    openssl = shutil.which("openssl")
    assert openssl is not None, "the openssl command is needed (apt-get install openssl)"
    names = list(names)
    ca_key = tls_files.directory / "ca.key"
    san = ",".join(f"DNS:{name}" for name in names)
    (directory / "policy.ext").write_text(
        f"subjectAltName={san}\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    commands = [
        ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-subj", f"/CN={names[0]}", "-keyout", "policy.key", "-out", "policy.csr"],
        ["x509", "-req", "-in", "policy.csr", "-CA", str(tls_files.ca_file),
         "-CAkey", str(ca_key), "-CAcreateserial", "-days", "3650",
         "-extfile", "policy.ext", "-out", "policy.pem"],
    ]  # fmt: skip
    for args in commands:
        result = subprocess.run(
            [openssl, *args],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=_OPENSSL_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")
    (directory / "policy.key").chmod(0o600)
    return directory / "policy.pem", directory / "policy.key"


@attrs.frozen(kw_only=True)
class Response:
    """What the server answers for one host.

    Attributes:
        status: the HTTP status.
        body: the body.
        content_type: the Content-Type header (``None``: no such header).
        headers: more headers.
        drip: when above 0, the headers are sent one byte every ``drip`` seconds (with a
            padding header of :data:`DRIP_PADDING` bytes), as a slow server would.
    """

    status: int = 200
    body: bytes = b""
    content_type: str | None = "text/plain"
    headers: tuple[tuple[str, str], ...] = ()
    drip: float = 0.0


#: The padding header's size in a dripping answer: 1000 bytes at 0.01 s are 10 s in all.
DRIP_PADDING = 1000
#: The most bytes of a POST body the server reads.
MAX_POST_SIZE = 1024 * 1024


@attrs.frozen(kw_only=True)
class Posted:
    """One POST the server received (TLS-RPT reports, RFC 8460 §5.4).

    Attributes:
        host: the ``Host`` name.
        path: the request path.
        content_type: the media type of the body (parameters left out).
        body: the body.
    """

    host: str
    path: str
    content_type: str
    body: bytes


def policy_response(text: str) -> Response:
    """A ``200 text/plain`` answer with the policy ``text``."""
    return Response(body=text.encode())


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].lower()
        owner = self.server.owner
        with owner.lock:
            owner.requests.append((host, self.path))
            response = owner.routes.get(host)
        if response is None or self.path != "/.well-known/mta-sts.txt":
            response = Response(status=404, body=b"not found\n")
        headers = list(response.headers)
        if response.content_type is not None:
            headers.append(("Content-Type", response.content_type))
        headers.append(("Content-Length", str(len(response.body))))
        if response.drip <= 0:
            self.send_response(response.status)
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(response.body)
            return
        headers.append(("X-Padding", "x" * DRIP_PADDING))
        lines = [f"HTTP/1.1 {response.status} Slow", *(f"{n}: {v}" for n, v in headers), "", ""]
        head = "\r\n".join(lines).encode()
        owner = self.server.owner
        try:
            for index in range(len(head)):  # bounded: the headers' length
                if owner.stopping.is_set():
                    return
                self.wfile.write(head[index : index + 1])
                self.wfile.flush()
                time.sleep(response.drip)
            self.wfile.write(response.body)
            self.wfile.flush()
        except OSError:
            owner.drips.append("cut")  # the client hung up before the headers were out
        else:
            owner.drips.append("complete")
        finally:
            owner.drip_done.set()

    def do_POST(self) -> None:
        # TLS-RPT (RFC 8460 §5.4): reports are POSTed; the body is read up to its declared
        # length (bounded) and recorded with the host, path and media type.
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].lower()
        length = min(int(self.headers.get("Content-Length") or 0), MAX_POST_SIZE)
        body = self.rfile.read(length)
        owner = self.server.owner
        with owner.lock:
            owner.requests.append((host, self.path))
            owner.posts.append(
                Posted(host=host, path=self.path, content_type=self.headers.get_content_type(),
                       body=body)
            )  # fmt: skip
            response = owner.post_routes.get(host, Response(status=404, body=b"not found\n"))
        self.send_response(response.status)
        for name, value in response.headers:
            self.send_header(name, value)
        if response.content_type is not None:
            self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the requests are recorded; stderr stays quiet


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    owner: PolicyServer

    def finish_request(self, request: Any, client_address: Any) -> None:
        # TLS in the handler's thread: a failed handshake ends this connection only.
        try:
            wrapped = self.owner.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            with self.owner.lock:
                self.owner.tls_failures.append(repr(exc))
            return
        try:
            super().finish_request(wrapped, client_address)
        finally:
            wrapped.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up early are expected in the failure tests


class PolicyServer:
    """An HTTPS server answering ``GET /.well-known/mta-sts.txt`` per ``Host`` name.

    Args:
        context: the server's TLS context (its certificate).
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.lock = threading.Lock()
        self.routes: dict[str, Response] = {}
        self.requests: list[tuple[str, str]] = []
        self.posts: list[Posted] = []
        self.post_routes: dict[str, Response] = {}
        self.tls_failures: list[str] = []
        self.stopping = threading.Event()
        self.drips: list[str] = []
        """How each dripping answer ended: "cut" by the client, or "complete"."""
        self.drip_done = threading.Event()
        self._server = _Server((HOST, 0), _Handler)
        self._server.owner = self
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def start(self) -> PolicyServer:
        """Start serving in a thread."""
        self._thread.start()
        return self

    def serve(self, domain: str, response: Response | str) -> None:
        """Answer requests for ``mta-sts.<domain>`` with ``response`` (a policy text, or a
        :class:`Response`)."""
        if isinstance(response, str):
            response = policy_response(response)
        with self.lock:
            self.routes[f"mta-sts.{domain}"] = response

    def accept_posts(self, host: str, response: Response | None = None) -> None:
        """Answer POSTs for ``host`` with ``response`` (default: ``200``, empty)."""
        with self.lock:
            self.post_routes[host] = response if response is not None else Response(body=b"")

    def fetches(self, domain: str) -> int:
        """How many requests for ``mta-sts.<domain>`` arrived."""
        with self.lock:
            return sum(1 for host, _path in self.requests if host == f"mta-sts.{domain}")

    def stop(self) -> None:
        """Stop serving (a dripping answer stops too) and close the listening socket."""
        self.stopping.set()
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()


def closed_port() -> int:
    """A loopback port where nothing listens right now (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])
