"""Test certificates for the real peers: a throw-away CA and a server certificate it signs.

Rules of this module:

- Everything is made with the ``openssl`` command-line tool (Debian package ``openssl``), so
  the files are exactly what a real deployment would load: PEM, a CA with
  ``basicConstraints=CA:TRUE`` and ``keyUsage=keyCertSign``, and a leaf with
  ``extendedKeyUsage=serverAuth`` and subject/authority key identifiers (strict X.509 checks,
  as Python 3.13's default ``VERIFY_X509_STRICT``, accept them).
- The server certificate names ``mx.mailrelay.test``, ``localhost``, ``127.0.0.1`` and ``::1``
  in its subjectAltName (RFC 6125 §6.4: clients match the SAN, not the CN), so a client that
  verifies against :attr:`TLSFiles.ca_file` can connect by any of those names.
- A second, self-signed certificate with the same names (``untrusted_*``) is made too: a
  server using it fails verification, which is how tests provoke a certificate error.
- Keys are ECDSA P-256: generated in milliseconds, and every peer here (Postfix, aiosmtpd,
  Python's ssl) accepts them.

The session fixture ``tls_files`` makes one set per test run in a temporary directory.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import attrs
import pytest

SERVER_NAMES = ("mx.mailrelay.test", "localhost")
SERVER_ADDRESSES = ("127.0.0.1", "::1")

_OPENSSL_TIMEOUT = 30.0


@attrs.frozen(kw_only=True)
class TLSFiles:
    """Paths of the PEM files made by :func:`make_tls_files`.

    Attributes:
        directory: Where the files live.
        ca_file: The CA certificate clients should trust.
        cert_file: The server certificate, signed by the CA.
        key_file: The server certificate's private key (unencrypted).
        untrusted_cert_file: A self-signed certificate with the same names (not trusted).
        untrusted_key_file: Its private key.
    """

    directory: Path
    ca_file: Path
    cert_file: Path
    key_file: Path
    untrusted_cert_file: Path
    untrusted_key_file: Path

    def server_context(self, *, trusted: bool = True) -> ssl.SSLContext:
        """A server-side TLS context loaded with the CA-signed (or the untrusted) certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if trusted:
            context.load_cert_chain(self.cert_file, self.key_file)
        else:
            context.load_cert_chain(self.untrusted_cert_file, self.untrusted_key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A client-side TLS context that verifies servers against :attr:`ca_file`."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def _openssl(*args: str | Path, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail(
            "the `openssl` command is needed to make test certificates: "
            "apt-get install -y --no-install-recommends openssl",
            pytrace=False,
        )
    result = subprocess.run(
        [openssl, *(str(a) for a in args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=_OPENSSL_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")


def make_tls_files(directory: Path) -> TLSFiles:
    """Make a CA, a server certificate it signs, and an untrusted self-signed one.

    Args:
        directory: An existing directory to write the PEM files into.

    Returns:
        The paths of the files written.
    """
    san = ",".join(
        [f"DNS:{name}" for name in SERVER_NAMES] + [f"IP:{addr}" for addr in SERVER_ADDRESSES]
    )
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-days", "3650",
        "-subj", "/O=mailrelay tests/CN=mailrelay test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", "ca.key", "-out", "ca.pem",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "req", *ec, "-subj", "/CN=mx.mailrelay.test",
        "-keyout", "server.key", "-out", "server.csr",
        cwd=directory,
    )  # fmt: skip
    (directory / "server.ext").write_text(
        f"subjectAltName={san}\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "3650", "-extfile", "server.ext", "-out", "server.pem",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "req", "-x509", *ec, "-days", "3650", "-subj", "/CN=mx.mailrelay.test",
        "-addext", f"subjectAltName={san}",
        "-keyout", "untrusted.key", "-out", "untrusted.pem",
        cwd=directory,
    )  # fmt: skip
    for key in ("ca.key", "server.key", "untrusted.key"):
        (directory / key).chmod(0o600)
    return TLSFiles(
        directory=directory,
        ca_file=directory / "ca.pem",
        cert_file=directory / "server.pem",
        key_file=directory / "server.key",
        untrusted_cert_file=directory / "untrusted.pem",
        untrusted_key_file=directory / "untrusted.key",
    )


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """One CA and server certificate for the whole test run (see :class:`TLSFiles`)."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))
