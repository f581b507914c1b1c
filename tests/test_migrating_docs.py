"""docs/migrating.md stays true, and its comparisons with smtplib and aiosmtplib are real.

- Every ```python block runs, in order, in one namespace, against the page's own
  ``SMTPTestServer`` (given the two TLS contexts and the SOCKS5 proxy, microsocks, the page
  says the suite provides); the smtplib and aiosmtplib "before" code runs against the same
  server, and what the proxy, inline-image and forwarding examples sent is checked as it
  arrived.
- The ```py blocks compile and their imports resolve; the Django backend runs against a
  test server with stand-ins for the two Django names it imports (Django is not a
  dependency), so what the page says about Bcc, the count and ``fail_silently`` is checked.
- Every row of the exception table is provoked with smtplib, aiosmtplib and mailrelay, and
  what each library did must be what the row says.
"""

from __future__ import annotations

import ast
import asyncio
import email.mime.text
import logging
import smtplib
import ssl
import sys
import types
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import attrs
import pytest

from mailrelay import TLS, DeliveryResult, Message, Outcome, SMTPTransport, Timeouts
from mailrelay.errors import ConnectError, DeliveryError, TLSError
from mailrelay.testing.server import Fault, SMTPTestServer
from tests.peers.proxies import ProxyFactory
from tests.peers.scripted import free_port
from tests.peers.tls import TLSFiles
from tests.transport.test_docs import python_blocks, server_blocks

DOC = Path(__file__).resolve().parents[1] / "docs" / "migrating.md"
USER, PASSWORD = "app@example.com", "s3cret"
TIMEOUT = 2.0  # seconds each client waits in the "server stops answering" row
PROXIED_FROM = "127.0.0.2"  # where the page's SOCKS5 proxy connects from


def _text() -> str:
    return DOC.read_text(encoding="utf-8")


# -- the runnable examples --------------------------------------------------------------------


def test_every_example_runs(
    tls_files: TLSFiles,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_proxy: ProxyFactory,
) -> None:
    monkeypatch.chdir(tmp_path)
    # The proxy's outgoing connections come from 127.0.0.2, so the server can tell what
    # came through it.
    proxy = make_proxy("socks5", username="relay", password="pa@ss", bind=PROXIED_FROM)
    namespace: dict[str, object] = {
        "__name__": "docs_migrating",
        "server_tls": tls_files.server_context(),
        "client_tls": tls_files.client_context(),
        "socks_proxy": proxy.url(),
    }
    blocks = python_blocks(_text())
    assert len(blocks) >= 15
    try:
        for number, block in enumerate(blocks, start=1):
            exec(compile(block, f"{DOC.name} block {number}", "exec"), namespace)  # our docs
    finally:
        server = namespace.get("server")
        if isinstance(server, SMTPTestServer):
            server.stop()  # idempotent: the page's last block stops it too
    assert isinstance(server, SMTPTestServer)
    received = server.messages
    # Both libraries delivered through the page's server, and none of it reached the
    # mailbox the server refuses.
    assert len(received) >= 20
    assert all("nobody@example.net" not in m.rcpt_tos for m in received)
    # Whatever logged in did so over TLS (the page's point about credentials).
    assert all(m.tls for m in received if m.authenticated)
    assert {m.authenticated for m in received} >= {USER}
    # asend_many spread the reminders over the pool's two connections (reminders 3 to 9
    # went only through asend_many; 0 to 2 were sent again by asyncio.gather).
    only_batched = (b"Reminder %d\r\n" % n for n in range(3, 10))
    sessions = {m.session for text in only_batched for m in received if text in m.data}
    assert len(sessions) == 2
    # The "localhost:25" example sent in plain text without logging in.
    assert any(not m.tls and m.authenticated is None for m in received)
    # The proxy example went through the proxy, with TLS and AUTH end to end; the one with
    # the wrong proxy login never reached the server.
    proxied = [m for m in received if m.peer[0] == PROXIED_FROM]
    assert len(proxied) == 1
    assert proxied[0].tls
    assert proxied[0].authenticated == USER
    # The inline images arrived in a multipart/related; the forward carried the report
    # unencoded, byte for byte.
    (forward,) = [m for m in received if b"Content-Type: message/rfc822\r\n" in m.data]
    (report,) = [m for m in received if b"Subject: Weekly report" in m.data and m is not forward]
    assert b'Content-Type: multipart/related; type="text/html"' in report.data
    assert report.data in forward.data


def _django_stand_ins(url: str) -> dict[str, types.ModuleType]:
    """Modules named as Django's, holding only what the page's backend imports.

    ``BaseEmailBackend.__init__(fail_silently=False, **kwargs)`` sets ``fail_silently``, as
    Django's does; ``settings`` holds the one setting the backend reads.
    """

    class BaseEmailBackend:
        def __init__(self, fail_silently: bool = False, **kwargs: object) -> None:
            self.fail_silently = fail_silently

    modules = {
        name: types.ModuleType(name)
        for name in (
            "django",
            "django.conf",
            "django.core",
            "django.core.mail",
            "django.core.mail.backends",
            "django.core.mail.backends.base",
        )
    }
    modules["django.conf"].settings = types.SimpleNamespace(MAILRELAY_URL=url)  # type: ignore[attr-defined]
    modules["django.core.mail.backends.base"].BaseEmailBackend = BaseEmailBackend  # type: ignore[attr-defined]
    return modules


@attrs.frozen(kw_only=True)
class DjangoLikeMessage:
    """The part of ``django.core.mail.EmailMessage`` the backend uses: ``from_email``,
    ``recipients()`` (to + cc + bcc, empty ones dropped) and ``message()``, which, as
    Django's does, writes ``To`` and ``Cc`` but never ``Bcc``."""

    from_email: str
    to: tuple[str, ...] = ()
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    subject: str = "Hello"
    body: str = "Hello\n"

    def recipients(self) -> list[str]:
        return [address for address in (*self.to, *self.cc, *self.bcc) if address]

    def message(self) -> email.mime.text.MIMEText:
        built = email.mime.text.MIMEText(self.body)
        built["Subject"] = self.subject
        built["From"] = self.from_email
        if self.to:
            built["To"] = ", ".join(self.to)
        if self.cc:
            built["Cc"] = ", ".join(self.cc)
        return built


def _rcpt(address: str, params: object) -> tuple[int, str] | None:
    if address.startswith("nobody@"):
        return (550, "5.1.1 no such user")
    if address.startswith("full@"):
        return (452, "4.2.2 mailbox full")
    return None


@pytest.fixture
def django_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[SMTPTestServer, Callable[..., Any], list[object]]]:
    """The page's Django backend class, wired to a plain-text test server."""
    with SMTPTestServer(rcpt=_rcpt) as server:
        for name, module in _django_stand_ins(server.url).items():
            monkeypatch.setitem(sys.modules, name, module)
        registered: list[object] = []
        monkeypatch.setattr("atexit.register", registered.append)
        (block,) = [b for b in server_blocks(_text()) if "class MailrelayBackend" in b]
        namespace: dict[str, Any] = {"__name__": "myproject.mail"}
        exec(compile(block, f"{DOC.name} Django block", "exec"), namespace)  # our docs
        try:
            yield server, namespace["MailrelayBackend"], registered
        finally:
            for close in registered:
                assert callable(close)
                close()
            namespace["shared_transport"].cache_clear()


def test_the_django_backend_sends_bcc_and_counts(
    django_backend: tuple[SMTPTestServer, Callable[..., Any], list[object]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, backend_class, registered = django_backend
    invoice = DjangoLikeMessage(
        from_email="Billing <app@example.com>",
        to=("Ann <ann@example.net>", "nobody@example.net"),
        bcc=("audit@example.com",),
    )
    lost = DjangoLikeMessage(from_email="app@example.com", to=("nobody@example.net",))
    no_one = DjangoLikeMessage(from_email="app@example.com")

    with caplog.at_level(logging.WARNING, logger="myproject.mail"):
        sent = backend_class(fail_silently=True).send_messages([invoice, lost, no_one])

    assert sent == 1  # at least one recipient accepted: the invoice only
    (received,) = server.wait_for(1)
    assert received.mail_from == "app@example.com"
    assert received.rcpt_tos == ("ann@example.net", "audit@example.com")  # Bcc via the envelope
    assert b"audit@example.com" not in received.data
    assert sorted(r.getMessage() for r in caplog.records) == [
        "mail to nobody@example.net not accepted: 550 5.1.1 no such user",
        "mail to nobody@example.net not accepted: 550 5.1.1 no such user",
    ]
    # Several send_mail() calls, one transport (one pool), closed at exit.
    assert backend_class().send_messages([invoice]) == 1
    assert len(registered) == 1
    assert backend_class().send_messages([]) == 0


def test_the_django_backend_raises_unless_fail_silently(
    django_backend: tuple[SMTPTestServer, Callable[..., Any], list[object]],
) -> None:
    _, backend_class, _ = django_backend
    ok = DjangoLikeMessage(from_email="app@example.com", to=("ann@example.net",))
    lost = DjangoLikeMessage(from_email="app@example.com", to=("full@example.net",))
    with pytest.raises(smtplib.SMTPException, match="1 of 2 messages") as info:
        backend_class().send_messages([ok, lost])
    assert info.value.__cause__ is None  # the server answered: nothing failed outright
    assert backend_class(fail_silently=True).send_messages([ok, lost]) == 1


def test_the_django_backend_chains_the_failure_that_stopped_a_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No server at all: each message's attempt fails with a ConnectError, which
    # send_many keeps in result.error and the backend chains to its SMTPException.
    url = f"smtp://127.0.0.1:{free_port()}?tls=none&timeout=5"
    for name, module in _django_stand_ins(url).items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr("atexit.register", lambda close: None)
    (block,) = [b for b in server_blocks(_text()) if "class MailrelayBackend" in b]
    namespace: dict[str, Any] = {"__name__": "myproject.mail"}
    exec(compile(block, f"{DOC.name} Django block", "exec"), namespace)  # our docs
    message = DjangoLikeMessage(from_email="app@example.com", to=("ann@example.net",))
    try:
        with pytest.raises(smtplib.SMTPException, match="1 of 1 messages") as info:
            namespace["MailrelayBackend"]().send_messages([message])
    finally:
        namespace["shared_transport"]().close()
        namespace["shared_transport"].cache_clear()
    assert isinstance(info.value.__cause__, ConnectError)


def test_server_examples_compile_and_their_imports_resolve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, module in _django_stand_ins("memory://").items():
        monkeypatch.setitem(sys.modules, name, module)
    blocks = server_blocks(_text())
    assert len(blocks) >= 2
    for number, block in enumerate(blocks, start=1):
        label = f"{DOC.name} server block {number}"
        tree = ast.parse(block, label)
        imports = ast.Module(
            body=[node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)],
            type_ignores=[],
        )
        exec(compile(imports, label, "exec"), {})


# -- what the page says about defaults ----------------------------------------------------------


def test_smtplib_debug_output_shows_the_password(
    tls_files: TLSFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    """The security table: ``set_debuglevel(1)`` prints the AUTH exchange, whose base64
    holds the password (mailrelay's redacted trace is checked by the page itself)."""
    with (
        SMTPTestServer(tls=tls_files.server_context(), auth={USER: PASSWORD}) as server,
        smtplib.SMTP(server.host, server.port) as smtp,
    ):
        smtp.set_debuglevel(1)
        smtp.starttls(context=tls_files.client_context())
        smtp.login(USER, PASSWORD)
    shown = capsys.readouterr().err
    assert "AUTH PLAIN AGFwcEBleGFtcGxlLmNvbQBzM2NyZXQ=" in shown  # base64 of \0user\0password


def test_aiosmtplib_default_sends_in_plain_text_where_mailrelay_refuses() -> None:
    """The aiosmtplib table: ``start_tls=None`` (its default) goes on without TLS when the
    server offers none; mailrelay's default requires it."""
    message = EmailMessage()
    message["From"] = USER
    message["To"] = "ann@example.net"
    message.set_content("Hello\n")
    with SMTPTestServer() as server:
        asyncio.run(aiosmtplib.send(message, hostname=server.host, port=server.port))
        (received,) = server.wait_for(1)
        assert not received.tls
        with (
            SMTPTransport(server.host, server.port) as smtp,
            pytest.raises(TLSError, match="does not offer STARTTLS"),
        ):
            smtp.send(Message.from_email(message))
    assert len(server.messages) == 1


# -- the exception table --------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Case:
    """One situation of the table: the server's behaviour and what the client does."""

    server: dict[str, Any] = attrs.field(factory=dict)
    tls: str | None = None  # the server's certificate: "trusted", "untrusted" or None
    starttls: bool = False  # the clients ask for STARTTLS
    password: str | None = None  # the clients log in as USER with it
    to: tuple[str, ...] = ("ann@example.net",)
    body: str = "Hello\n"
    closed_port: bool = False


_BAD_HELLO = [Fault.reply("EHLO", 550, "5.7.1 no", times=None)]
CASES = {
    "some recipients refused at `RCPT`": Case(
        to=("ann@example.net", "nobody@example.net", "full@example.net")
    ),
    "every recipient refused at `RCPT`": Case(to=("nobody@example.net", "full@example.net")),
    "`MAIL FROM` refused": Case(
        server={"faults": [Fault.reply("MAIL", 553, "5.7.1 sender refused", times=None)]}
    ),
    "message larger than the server's `SIZE`": Case(server={"max_size": 300}, body="x" * 500),
    "`DATA`, or the message after it, refused": Case(
        server={"data": lambda message, recipient: (554, "5.7.1 spam")}
    ),
    "non-ASCII address, server without SMTPUTF8": Case(
        server={"extensions": ["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "SIZE"]},
        to=("jörg@example.net",),
    ),
    "password refused (535)": Case(
        server={"auth": {USER: PASSWORD}}, tls="trusted", starttls=True, password="wrong"
    ),
    "server offers no AUTH (over TLS)": Case(tls="trusted", starttls=True, password=PASSWORD),
    "credentials over plain text": Case(
        server={"auth": {USER: PASSWORD}, "allow_insecure_auth": True}, password=PASSWORD
    ),
    "STARTTLS asked for, not offered": Case(starttls=True),
    "certificate not trusted": Case(tls="untrusted", starttls=True),
    "connection refused": Case(closed_port=True),
    "`554` greeting": Case(server={"faults": [Fault.greeting(554, "5.3.2 no", times=None)]}),
    "`421` greeting": Case(server={"faults": [Fault.greeting(421, "4.3.2 busy", times=None)]}),
    "`421` at `RCPT` (server shutting down)": Case(
        server={"faults": [Fault.shutdown("RCPT", times=None)]},
        to=("ann@example.net", "bob@example.net"),
    ),
    "`EHLO` and `HELO` refused": Case(
        server={"faults": [*_BAD_HELLO, Fault.reply("HELO", 550, "5.7.1 no", times=None)]}
    ),
    "server hangs up before answering": Case(
        server={"faults": [Fault.disconnect("DATA", times=None)]}
    ),
    "server stops answering": Case(server={"faults": [Fault.silence("MAIL", times=None)]}),
}


def _table() -> dict[str, tuple[str, str, str]]:
    """The exception table's rows: situation -> (smtplib, aiosmtplib, mailrelay) cells."""
    lines = _text().split("| situation | smtplib | aiosmtplib | mailrelay |\n", 1)[1]
    rows: dict[str, tuple[str, str, str]] = {}
    for line in lines.splitlines()[1:]:
        if not line.startswith("|"):
            break
        situation, *cells = (cell.strip() for cell in line.strip().strip("|").split("|"))
        assert len(cells) == 3, line
        rows[situation] = (cells[0], cells[1], cells[2])
    return rows


def test_the_table_has_a_case_for_every_row() -> None:
    assert list(_table()) == list(CASES)


def _email(case: Case) -> EmailMessage:
    message = EmailMessage()
    message["From"] = USER
    message["To"] = ", ".join(case.to)
    message["Subject"] = "Hello"
    message.set_content(case.body)
    return message


def _with_smtplib(
    case: Case, host: str, port: int, context: ssl.SSLContext | None
) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP(host, port, timeout=TIMEOUT) as smtp:
        if case.starttls:
            smtp.starttls(context=context)
        if case.password is not None:
            smtp.login(USER, case.password)
        return smtp.send_message(_email(case))


def _with_aiosmtplib(case: Case, host: str, port: int, context: ssl.SSLContext) -> object:
    return asyncio.run(
        aiosmtplib.send(
            _email(case),
            hostname=host,
            port=port,
            timeout=TIMEOUT,
            start_tls=case.starttls,
            tls_context=context,
            username=USER if case.password is not None else None,
            password=case.password,
        )
    )


def _with_mailrelay(case: Case, host: str, port: int, context: ssl.SSLContext) -> DeliveryResult:
    with SMTPTransport(
        host,
        port,
        tls=TLS.STARTTLS if case.starttls else TLS.NONE,
        ssl_context=context,
        timeouts=Timeouts.all(TIMEOUT),
        username=USER if case.password is not None else None,
        password=case.password,
    ) as smtp:
        return smtp.send(Message.from_email(_email(case)))


def _observe(call: Callable[[], object]) -> tuple[str, object]:
    """("returns", value) or ("sent", value) when the call returned, else the exception's
    class name and the exception."""
    try:
        value = call()
    except Exception as exc:
        return type(exc).__name__, exc
    refused = value[0] if isinstance(value, tuple) else value
    return ("returns" if refused else "sent"), value


def _assert_library_cell(cell: str, observed: str) -> None:
    if observed in {"returns", "sent"}:
        assert cell.startswith(observed), (cell, observed)
    else:
        assert f"`{observed}`" in cell, (cell, observed)


@pytest.mark.parametrize("situation", list(CASES))
def test_the_exception_table_row(situation: str, tls_files: TLSFiles) -> None:
    case = CASES[situation]
    smtplib_cell, aiosmtplib_cell, mailrelay_cell = _table()[situation]
    context = tls_files.client_context()
    server_options = dict(case.server)
    if case.tls is not None:
        server_options["tls"] = tls_files.server_context(trusted=case.tls == "trusted")
    with SMTPTestServer(rcpt=_rcpt, timeout=TIMEOUT * 2, **server_options) as server:
        host, port = server.host, free_port() if case.closed_port else server.port

        observed, _ = _observe(lambda: _with_smtplib(case, host, port, context))
        _assert_library_cell(smtplib_cell, observed)
        if case.tls == "untrusted":  # smtplib's own default context checks nothing
            observed, _ = _observe(lambda: _with_smtplib(case, host, port, None))
            assert observed == "sent"
            assert "accepted by `starttls()` without `context=`" in smtplib_cell

        observed, _ = _observe(lambda: _with_aiosmtplib(case, host, port, context))
        _assert_library_cell(aiosmtplib_cell, observed)

        observed, outcome = _observe(lambda: _with_mailrelay(case, host, port, context))
    if isinstance(outcome, DeliveryError):
        assert mailrelay_cell.startswith(f"`{observed}`"), (mailrelay_cell, observed)
        if "(not transient" in mailrelay_cell:
            assert not outcome.is_transient
        elif "(transient" in mailrelay_cell:
            assert outcome.is_transient
    else:
        assert isinstance(outcome, DeliveryResult), outcome  # mailrelay raised nothing else
        assert mailrelay_cell.startswith("result:")
        outcomes = [r.outcome for r in outcome.recipients]
        assert len(outcomes) == len(case.to)
        for named in outcomes:
            assert f"`{named.name}`" in mailrelay_cell, (mailrelay_cell, named)
        if "before sending" in mailrelay_cell:
            assert all(r.reply is None and r.reason for r in outcome.recipients)
            assert not any(m.rcpt_tos for m in server.messages)


def test_the_some_refused_row_tells_4xx_from_5xx(tls_files: TLSFiles) -> None:
    """The first row in detail: smtplib lumps 452 and 550 together, mailrelay does not."""
    case = CASES["some recipients refused at `RCPT`"]
    with SMTPTestServer(rcpt=_rcpt) as server:
        refused = _with_smtplib(case, server.host, server.port, None)
        result = _with_mailrelay(case, server.host, server.port, tls_files.client_context())
    assert refused == {
        "nobody@example.net": (550, b"5.1.1 no such user"),
        "full@example.net": (452, b"4.2.2 mailbox full"),
    }
    assert [r.outcome for r in result.recipients] == [
        Outcome.ACCEPTED,
        Outcome.PERMANENT,
        Outcome.TRANSIENT,
    ]


def test_aiosmtplib_421_at_the_only_recipient(tls_files: TLSFiles) -> None:
    """The ``421`` at ``RCPT`` row's aside: with a single recipient aiosmtplib reports the 421
    as a refused recipient; smtplib does so whatever the count."""
    case = attrs.evolve(CASES["`421` at `RCPT` (server shutting down)"], to=("ann@example.net",))
    _, aiosmtplib_cell, _ = _table()["`421` at `RCPT` (server shutting down)"]
    context = tls_files.client_context()
    with SMTPTestServer(**case.server) as server:
        observed, _ = _observe(lambda: _with_aiosmtplib(case, server.host, server.port, context))
        smtplib_observed, _ = _observe(lambda: _with_smtplib(case, server.host, server.port, None))
    assert observed == smtplib_observed == "SMTPRecipientsRefused"
    assert "(`SMTPRecipientsRefused` for a single recipient)" in aiosmtplib_cell
