"""The README's example, run exactly as written against a real Postfix on localhost:587.

The example uses the submission port with STARTTLS required and the certificate verified
against the system's trust store. The test starts a second throw-away Postfix whose
submission service listens on 127.0.0.1:587 and points OpenSSL's default trust store at the
test CA (``SSL_CERT_FILE``), then runs the README's first ``python`` block unchanged.
"""

from __future__ import annotations

import errno
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailrelay.transport import settings as transport_settings
from tests.peers.postfix import PostfixInstance
from tests.peers.tls import TLSFiles

README = Path(__file__).resolve().parent.parent / "README.md"
SUBMISSION_PORT = 587


def readme_example() -> str:
    """The first fenced ``python`` block of README.md."""
    match = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    assert match is not None, "README.md has no python example"
    return match[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


@pytest.fixture
def postfix_on_587(postfix: PostfixInstance, tls_files: TLSFiles) -> Iterator[PostfixInstance]:
    if not _port_is_free(SUBMISSION_PORT):
        pytest.fail(
            f"127.0.0.1:{SUBMISSION_PORT} is taken (or needs root): the README example is run "
            "against a test Postfix on that port; stop the local MTA or run the tests as root"
        )
    # Not tmp_path: pytest's base directory is 0700, and virtual(8) delivers as nobody.
    root = Path(tempfile.mkdtemp(prefix="mailrelay-postfix-"))
    instance = PostfixInstance(root, tls_files)
    instance.submission_port = SUBMISSION_PORT
    instance.setup()
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.postfix
def test_readme_example_sends_through_postfix(
    postfix_on_587: PostfixInstance,
    tls_files: TLSFiles,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.ca_file))
    # The transports build their verifying default context once per process; start from
    # none and put the old one back, so the test CA is trusted by this test alone.
    monkeypatch.setattr(transport_settings, "_DEFAULT_CONTEXT", None)
    namespace: dict[str, object] = {}
    exec(compile(readme_example(), str(README), "exec"), namespace)

    printed = capsys.readouterr().out
    assert printed.startswith("bob@mailrelay.test Outcome.ACCEPTED 250")
    delivered = postfix_on_587.wait_for_message("bob", b"Hello from mailrelay", timeout=10.0)
    assert b"It works." in delivered
    assert b"From: alice@mailrelay.test" in delivered
