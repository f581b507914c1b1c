"""The ``mailrelay`` command line (mailrelay/cli.py), against real peers.

``main([...])`` runs in-process with pytest's ``capsys`` for most cases; two tests run
``python -m mailrelay`` as a child process (standard input closed, environment passed) to
prove the entry point, one of them stopping ``tracker run --forever`` with SIGTERM.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import mailrelay
from mailrelay import cli
from mailrelay.envelope import Envelope
from mailrelay.message import Message
from mailrelay.reply import Reply
from mailrelay.resolver import Resolver
from mailrelay.results import Outcome
from mailrelay.tracker import DeliveryTracker, SQLiteStore, State, parse_dsn
from mailrelay.transport import MemoryTransport
from mailrelay.validate import DEFAULT_SPECIAL_USE, RecipientValidator
from tests.peers.aiosmtpd_server import AiosmtpdServer, TokenTable
from tests.peers.postfix import USERS
from tests.peers.scripted import free_port
from tests.peers.unbound import DKIM_ED25519, DKIM_RSA_2048, UnboundServer

REPO = Path(__file__).resolve().parent.parent
SISIMAI = REPO / "tests" / "data" / "sisimai" / "maildir"
USER = "alice@mailrelay.test"
PASSWORD = USERS[USER]
#: Bounds for the waits on child processes (hang guards, not speed checks).
CHILD_TIMEOUT = 60.0

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """``run(*argv, stdin=None)`` -> (status, stdout, stderr) of ``cli.main`` in-process."""
    monkeypatch.delenv(cli.URL_VARIABLE, raising=False)
    monkeypatch.delenv(cli.PASSWORD_VARIABLE, raising=False)

    def invoke(*argv: str, stdin: bytes | None = None) -> tuple[int, str, str]:
        capsys.readouterr()
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        status = cli.main(list(argv))
        out, err = capsys.readouterr()
        return status, out, err

    return invoke


def write_message(path: Path, *, to: str = "bob@mailrelay.test", extra: str = "") -> Path:
    path.write_bytes(
        (
            f"From: Alice <{USER}>\r\nTo: {to}\r\n{extra}Subject: cli test\r\n"
            "Message-ID: <cli-test@mailrelay.test>\r\n\r\nHello from the command line.\r\n"
        ).encode()
    )
    return path


def rows(out: str) -> list[list[str]]:
    return [line.split("\t") for line in out.splitlines()]


def smtp_url(server: AiosmtpdServer, *, user: str | None = None, tls: str = "starttls") -> str:
    userinfo = "" if user is None else user.replace("@", "%40") + "@"
    return f"smtp://{userinfo}{server.host}:{server.port}?tls={tls}"


# -- the command line itself -----------------------------------------------------------------


def test_version(run: Run) -> None:
    assert run("--version") == (0, f"mailrelay {mailrelay.__version__}\n", "")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["send", "--bogus"],
        ["send", "--ret", "SOME", "m.eml"],
        ["validate", "--port", "0", "a@mailrelay.test"],
        ["validate", "--timeout", "-1", "a@mailrelay.test"],
        ["validate", "--refused-networks", "loopback,bogus", "a@mailrelay.test"],
        ["validate"],
        ["parse-dsn"],
        ["tracker", "list"],
        ["tracker", "--db", "x.sqlite"],
        ["tracker", "--db", "x.sqlite", "list", "--older-than", "soon"],
        ["tracker", "--db", "x.sqlite", "list", "--state", "lost"],
        ["send", "m.eml"],  # no --url and no $MAILRELAY_URL
    ],
)
def test_bad_arguments_exit_64_with_a_usage_line(run: Run, argv: list[str]) -> None:
    status, out, err = run(*argv)
    assert status == cli.EX_USAGE
    assert out == ""
    assert err.startswith("usage: mailrelay")
    assert "error:" in err


def test_help_exits_0(run: Run) -> None:
    status, out, _ = run("send", "--help")
    assert status == 0
    assert "--password-env" in out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain text", "plain text"),
        ("a\tb", "a\\tb"),
        ("line\r\nRCPT TO:<x@y>", "line\\r\\nRCPT TO:<x@y>"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("caf\u00e9 \u202eevil", "caf\u00e9 \\u202eevil"),
    ],
)
def test_printable_escapes_what_could_forge_output(text: str, expected: str) -> None:
    assert cli.printable(text) == expected


@given(st.text())
def test_printable_output_is_one_field_on_one_line(text: str) -> None:
    shown = cli.printable(text)
    assert shown.isprintable()
    assert "\t" not in shown
    assert "\n" not in shown
    if text.isprintable():
        assert shown == text


@given(st.lists(st.text(max_size=30).map(lambda t: t + "@example.com"), min_size=1, max_size=5))
def test_any_address_text_gives_exactly_one_row_of_five_fields(addresses: list[str]) -> None:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        # "--": an address may start with "-"; example.com is special-use: no DNS is asked.
        status = cli.main(["validate", "--", *addresses])
    assert (status, err.getvalue()) == (1, "")
    lines = rows(out.getvalue())
    assert [line[0] for line in lines] == [cli.printable(a) for a in addresses]
    assert all(len(line) == 5 for line in lines)
    assert {line[1] for line in lines} == {"undeliverable"}


# -- send ------------------------------------------------------------------------------------


DKIM_KEYS = REPO / "tests" / "data" / "dkim"


def dkim_records(name: bytes | str, timeout: int = 5) -> bytes:
    """dkimpy's key lookup, answered from the test zone's records (the keys are static)."""
    text = name.decode() if isinstance(name, bytes) else name
    records = {
        "sel-rsa._domainkey.dkim.test.": DKIM_RSA_2048,
        "sel-ed._domainkey.dkim.test.": DKIM_ED25519,
    }
    return records[text].encode()


@pytest.mark.parametrize(
    ("selector", "key"), [("sel-rsa", "rsa2048.pem"), ("sel-ed", "ed25519.pem")]
)
def test_send_signs_with_dkim(run: Run, tmp_path: Path, selector: str, key: str) -> None:
    import dkim  # type: ignore[import-untyped]  # dkimpy ships no type information

    source = write_message(tmp_path / "m.eml")
    outbox = tmp_path / "outbox"
    status, out, err = run(
        "send", "--url", outbox.as_uri(), "--dkim-key", str(DKIM_KEYS / key),
        "--dkim-domain", "dkim.test", "--dkim-selector", selector, str(source),
    )  # fmt: skip
    assert (status, err) == (0, "")
    assert [r[1] for r in rows(out)] == ["accepted"]
    (eml,) = outbox.glob("*.eml")
    signed = eml.read_bytes()
    assert signed.startswith(b"DKIM-Signature: ")
    assert signed.endswith(Message.from_file(source).as_bytes())
    assert dkim.verify(signed, dnsfunc=dkim_records)
    assert not dkim.verify(signed.replace(b"Hello", b"Jello"), dnsfunc=dkim_records)


@pytest.mark.parametrize(
    ("options", "status", "text"),
    [
        (["--dkim-key", "{keys}/rsa2048.pem"], cli.EX_USAGE, "needs --dkim-key, --dkim-domain"),
        (["--dkim-domain", "dkim.test", "--dkim-selector", "s"], cli.EX_USAGE, "needs --dkim-key"),
        (
            [
                "--dkim-key",
                "{keys}/missing.pem",
                "--dkim-domain",
                "dkim.test",
                "--dkim-selector",
                "s",
            ],
            cli.EX_NOINPUT,
            "cannot read the DKIM key",
        ),
        (
            [
                "--dkim-key",
                "{keys}/README.md",
                "--dkim-domain",
                "dkim.test",
                "--dkim-selector",
                "s",
            ],
            cli.EX_CONFIG,
            "ConfigurationError",
        ),
        (
            [
                "--dkim-key",
                "{keys}/rsa512.pem",
                "--dkim-domain",
                "dkim.test",
                "--dkim-selector",
                "s",
            ],
            cli.EX_CONFIG,
            "ConfigurationError",
        ),
    ],
)
def test_dkim_options_are_checked_before_sending(
    run: Run, tmp_path: Path, options: list[str], status: int, text: str
) -> None:
    source = write_message(tmp_path / "m.eml")
    outbox = tmp_path / "outbox"
    argv = [o.format(keys=DKIM_KEYS) for o in options]
    got, out, err = run("send", "--url", outbox.as_uri(), *argv, str(source))
    assert (got, out) == (status, "")
    assert text in err
    assert not list(outbox.glob("*.eml"))


def test_an_unsignable_message_is_bad_input(run: Run, tmp_path: Path) -> None:
    source = tmp_path / "m.eml"
    source.write_bytes(b"Sender: a@dkim.test\r\nTo: b@dkim.test\r\n\r\nno From\r\n")
    outbox = tmp_path / "outbox"
    status, out, err = run(
        "send", "--url", outbox.as_uri(), "--dkim-key", str(DKIM_KEYS / "ed25519.pem"),
        "--dkim-domain", "dkim.test", "--dkim-selector", "sel-ed", str(source),
    )  # fmt: skip
    assert (status, out) == (cli.EX_DATAERR, "")
    assert "MessageError" in err
    assert "From" in err
    assert not list(outbox.glob("*.eml"))


def test_dkim_without_the_extra_says_what_to_install(tmp_path: Path) -> None:
    source = write_message(tmp_path / "m.eml")
    argv = [
        "send", "--url", (tmp_path / "outbox").as_uri(), "--dkim-key",
        str(DKIM_KEYS / "ed25519.pem"), "--dkim-domain", "dkim.test", "--dkim-selector",
        "sel-ed", str(source),
    ]  # fmt: skip
    code = (
        "import sys; sys.modules['cryptography'] = None\n"
        "from mailrelay import cli\n"
        f"sys.exit(cli.main({argv!r}))\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=CHILD_TIMEOUT,
        check=False,
    )
    assert child.returncode == cli.EX_CONFIG, child.stderr
    assert 'pip install "mailrelay[dkim]"' in child.stderr
    assert "Traceback" not in child.stderr


def test_send_to_files_derives_the_envelope_and_requests_dsns(run: Run, tmp_path: Path) -> None:
    source = write_message(
        tmp_path / "m.eml", extra="Cc: carol@mailrelay.test\r\nBcc: dan@x.test\r\n"
    )
    outbox = tmp_path / "outbox"
    status, out, err = run(
        "send", "--url", outbox.as_uri(), "--notify", "SUCCESS,FAILURE", "--ret", "hdrs",
        "--envid", "cli-42", "--requiretls", str(source),
    )  # fmt: skip
    assert (status, err) == (0, "")
    assert [r[:4] for r in rows(out)] == [
        [address, "accepted", "250", "2.0.0"]
        for address in ("bob@mailrelay.test", "carol@mailrelay.test", "dan@x.test")
    ]
    (record,) = outbox.glob("*.json")
    envelope = json.loads(record.read_text())
    assert envelope["sender"] == USER
    assert [r["address"] for r in envelope["recipients"]] == [
        "bob@mailrelay.test",
        "carol@mailrelay.test",
        "dan@x.test",
    ]
    assert (envelope["ret"], envelope["envid"], envelope["requiretls"]) == ("HDRS", "cli-42", True)
    assert all(r["notify"] == ["SUCCESS", "FAILURE"] for r in envelope["recipients"])
    eml = record.with_suffix(".eml").read_bytes()
    assert eml == Message.from_file(source).as_bytes()
    assert b"dan@x.test" not in eml  # Bcc stays in the envelope


def test_send_reads_standard_input_and_takes_the_envelope_from_options(
    run: Run, tmp_path: Path
) -> None:
    raw = write_message(tmp_path / "m.eml").read_bytes()
    outbox = tmp_path / "outbox"
    status, out, _ = run(
        "send", "--url", outbox.as_uri(), "--from", "", "--to", "zed@mailrelay.test", "--json",
        stdin=raw,
    )  # fmt: skip
    assert status == 0
    document = json.loads(out)
    assert document["ok"] is True
    assert [r["address"] for r in document["recipients"]] == ["zed@mailrelay.test"]
    (record,) = outbox.glob("*.json")
    envelope = json.loads(record.read_text())
    assert envelope["sender"] is None  # --from "" is the null reverse-path
    assert record.with_suffix(".eml").read_bytes() == Message.from_bytes(raw).as_bytes()


@pytest.mark.parametrize(
    "head",
    [
        b"From: Alice <alice@mailrelay.test>\r\n",  # no To at all
        b"From: Alice <alice@mailrelay.test>\r\nTo: not really an address\r\n",
        b"Sender: alice@mailrelay.test\r\nFrom: Team <team@mailrelay.test>\r\nTo: x@y.test\r\n",
    ],
)
def test_send_with_only_to_takes_the_sender_from_the_headers(
    run: Run, tmp_path: Path, head: bytes
) -> None:
    source = tmp_path / "m.eml"
    source.write_bytes(head + b"Subject: x\r\n\r\nbody\r\n")
    outbox = tmp_path / "outbox"
    status, _, err = run("send", "--url", outbox.as_uri(), "--to", "bob@x.test", str(source))
    assert (status, err) == (0, "")
    (record,) = outbox.glob("*.json")
    envelope = json.loads(record.read_text())
    assert envelope["sender"] == USER
    assert [r["address"] for r in envelope["recipients"]] == ["bob@x.test"]


@pytest.mark.parametrize(
    ("local_parts", "status"),
    [
        (["bob"], 0),
        (["bob", "tempfail"], cli.EX_TEMPFAIL),
        (["bob", "reject"], cli.EX_NOUSER),
        (["tempfail", "reject"], cli.EX_NOUSER),
    ],
)
def test_send_over_smtp_reports_each_recipient(
    run: Run, tmp_path: Path, aiosmtpd_server: AiosmtpdServer, local_parts: list[str], status: int
) -> None:
    recipients = [f"{local}@mailrelay.test" for local in local_parts]
    source = write_message(tmp_path / "m.eml", to=", ".join(recipients))
    got, out, err = run(
        "send", "--url", smtp_url(aiosmtpd_server), "--ca-file", str(aiosmtpd_server.ca_file),
        "--json", str(source),
    )  # fmt: skip
    assert (got, err) == (status, "")
    document = json.loads(out)
    by_address = {r["address"]: r for r in document["recipients"]}
    assert list(by_address) == recipients
    expected = {"bob": ("accepted", 2), "tempfail": ("transient", 4), "reject": ("permanent", 5)}
    for local, address in zip(local_parts, recipients, strict=True):
        outcome, klass = expected[local]
        assert by_address[address]["outcome"] == outcome
        assert by_address[address]["code"] // 100 == klass
        assert by_address[address]["enhanced"].startswith(f"{klass}.")
    accepted = [a for a, r in by_address.items() if r["outcome"] == "accepted"]
    if accepted:
        (received,) = aiosmtpd_server.messages
        assert list(received.rcpt_tos) == accepted
        assert received.tls
        assert received.content == Message.from_file(source).as_bytes()
    else:
        assert aiosmtpd_server.messages == []


def test_send_text_output_has_one_line_per_recipient(
    run: Run, tmp_path: Path, aiosmtpd_server: AiosmtpdServer
) -> None:
    source = write_message(tmp_path / "m.eml", to="bob@mailrelay.test, reject@mailrelay.test")
    status, out, _ = run(
        "send", "--url", smtp_url(aiosmtpd_server), "--ca-file", str(aiosmtpd_server.ca_file),
        str(source),
    )  # fmt: skip
    assert status == cli.EX_NOUSER
    (bob, reject) = rows(out)
    assert bob[:3] == ["bob@mailrelay.test", "accepted", "250"]
    assert reject[:4] == ["reject@mailrelay.test", "permanent", "550", "5.1.1"]
    assert "No such user" in reject[4]


def test_send_over_lmtp_reports_each_recipients_final_reply(
    run: Run, tmp_path: Path, aiosmtpd_lmtp: AiosmtpdServer
) -> None:
    recipients = ["bob@mailrelay.test", "later@mailrelay.test", "fail@mailrelay.test"]
    source = write_message(tmp_path / "m.eml", to=", ".join(recipients))
    url = f"lmtp://{aiosmtpd_lmtp.host}:{aiosmtpd_lmtp.port}"
    status, out, err = run("send", "--url", url, str(source))
    assert (status, err) == (cli.EX_NOUSER, "")
    assert [r[:4] for r in rows(out)] == [
        ["bob@mailrelay.test", "accepted", "250", "2.0.0"],
        ["later@mailrelay.test", "transient", "452", "4.2.2"],
        ["fail@mailrelay.test", "permanent", "550", "5.1.1"],
    ]
    assert list(aiosmtpd_lmtp.messages[0].rcpt_tos) == recipients


def test_ca_file_problems(run: Run, tmp_path: Path) -> None:
    source = write_message(tmp_path / "m.eml")
    url = "smtp://mx.mailrelay.test"
    status, _, err = run("send", "--url", url, "--ca-file", str(tmp_path / "none.pem"), str(source))
    assert status == cli.EX_NOINPUT
    assert "none.pem" in err
    status, _, err = run("send", "--url", url, "--ca-file", str(source), str(source))
    assert status == cli.EX_CONFIG
    assert err.startswith("mailrelay: ConfigurationError: not a CA certificate file")


def forms_of(password: str) -> list[str]:
    """The password and the encodings AUTH PLAIN / LOGIN would carry it in."""
    plain = f"\0{USER}\0{password}".encode()
    return [
        password,
        base64.b64encode(plain).decode(),
        base64.b64encode(password.encode()).decode(),
    ]


@pytest.mark.parametrize("user_in", ["url", "option"])
def test_send_authenticates_with_a_password_from_the_environment_and_never_shows_it(
    run: Run,
    tmp_path: Path,
    *,
    aiosmtpd_server: AiosmtpdServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    user_in: str,
) -> None:
    monkeypatch.setenv("CLI_TEST_SECRET", PASSWORD)
    source = write_message(tmp_path / "m.eml")
    user_args = ["--user", USER] if user_in == "option" else []
    url = smtp_url(aiosmtpd_server, user=USER if user_in == "url" else None)
    with caplog.at_level("DEBUG", logger="mailrelay"):
        status, out, err = run(
            "send", "--url", url, *user_args, "--password-env", "CLI_TEST_SECRET",
            "--ca-file", str(aiosmtpd_server.ca_file), "--debug", str(source),
        )  # fmt: skip
    assert status == 0, err
    (received,) = aiosmtpd_server.messages
    assert received.auth_login == USER
    assert "AUTH" in caplog.text  # the wire trace ran, and was logged
    assert "AUTH" in err  # ... to stderr too
    for form in forms_of(PASSWORD):
        assert form not in out
        assert form not in err
        assert form not in caplog.text


def test_send_takes_mailrelay_password_by_default(
    run: Run, tmp_path: Path, aiosmtpd_server: AiosmtpdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cli.PASSWORD_VARIABLE, PASSWORD)
    monkeypatch.setenv(cli.URL_VARIABLE, smtp_url(aiosmtpd_server, user=USER))
    source = write_message(tmp_path / "m.eml")
    status, _, err = run("send", "--ca-file", str(aiosmtpd_server.ca_file), str(source))
    assert (status, err) == (0, "")
    assert aiosmtpd_server.messages[0].auth_login == USER


def test_a_password_in_the_url_works_with_a_warning_that_hides_it(
    run: Run, tmp_path: Path, aiosmtpd_server: AiosmtpdServer
) -> None:
    url = smtp_url(aiosmtpd_server, user=f"{USER}:{PASSWORD}")
    source = write_message(tmp_path / "m.eml")
    status, out, err = run(
        "send", "--url", url, "--ca-file", str(aiosmtpd_server.ca_file), str(source)
    )
    assert status == 0
    assert "warning" in err
    assert "process list" in err
    assert ":***@" in err
    assert PASSWORD not in out + err
    assert aiosmtpd_server.messages[0].auth_login == USER


def test_a_wrong_password_is_an_authentication_error(
    run: Run, tmp_path: Path, aiosmtpd_server: AiosmtpdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLI_TEST_SECRET", "not-the-password")
    source = write_message(tmp_path / "m.eml")
    status, out, err = run(
        "send", "--url", smtp_url(aiosmtpd_server, user=USER), "--password-env",
        "CLI_TEST_SECRET", "--ca-file", str(aiosmtpd_server.ca_file), str(source),
    )  # fmt: skip
    assert status == cli.EX_NOPERM
    assert out == ""
    assert err.startswith("mailrelay: AuthenticationError: ")
    assert len(err.splitlines()) == 1
    assert "not-the-password" not in err
    assert aiosmtpd_server.messages == []


@pytest.mark.parametrize(
    "url",
    [
        "smtp://alice:s3\uff03cret@mx.mailrelay.test",  # urllib's own error quotes the netloc
        "smtp://alice:s3%23cret@mx.mailrelay.test:99999",
        "smtp://alice:s3#cret@mx.mailrelay.test?tls=sometimes",
    ],
)
def test_a_debug_traceback_never_shows_the_urls_password(
    run: Run, tmp_path: Path, url: str
) -> None:
    source = write_message(tmp_path / "m.eml")
    status, out, err = run("send", "--debug", "--url", url, str(source))
    assert status == cli.EX_CONFIG
    assert "Traceback" in err
    assert "ConfigurationError" in err
    for form in ("s3\uff03cret", "s3%23cret", "s3#cret", "cret"):
        assert form not in out + err


def test_certificates_are_verified_by_default(
    run: Run, tmp_path: Path, aiosmtpd_server: AiosmtpdServer
) -> None:
    source = write_message(tmp_path / "m.eml")
    status, _, err = run("send", "--url", smtp_url(aiosmtpd_server), str(source))
    assert status == cli.EX_PROTOCOL
    assert err.startswith("mailrelay: TLSError: ")
    assert aiosmtpd_server.messages == []


def test_an_unreachable_server_is_unavailable_with_a_traceback_only_in_debug(
    run: Run, tmp_path: Path
) -> None:
    source = write_message(tmp_path / "m.eml")
    url = f"smtp://127.0.0.1:{free_port()}?tls=none&timeout=5"
    status, out, err = run("send", "--url", url, str(source))
    assert (status, out) == (cli.EX_UNAVAILABLE, "")
    assert err.startswith("mailrelay: ConnectError: ")
    assert "Traceback" not in err
    status, _, err = run("send", "--url", url, "--debug", str(source))
    assert status == cli.EX_UNAVAILABLE
    assert "Traceback (most recent call last)" in err
    assert err.rstrip().splitlines()[-1].startswith("mailrelay: ConnectError: ")


@pytest.mark.parametrize(
    ("content", "options", "status", "error"),
    [
        (b"", [], cli.EX_DATAERR, "MessageError"),
        (
            b"From: alice@mailrelay.test\r\nSubject: x\r\n\r\nno recipient\r\n",
            [],
            65,
            "MessageError",
        ),
        (b"Subject: x\r\n\r\nno sender\r\n", ["--to", "bob@x.test"], 65, "MessageError"),
        (
            b"From: a@b.test\r\nTo: b@b.test\r\n\r\nx\r\n",
            ["--to", "not an address"],
            65,
            "InvalidAddress",
        ),
        (
            b"From: a@b.test\r\nTo: b@b.test\r\n\r\nx\r\n",
            ["--notify", "SOMETIMES"],
            65,
            "MessageError",
        ),
    ],
)
def test_bad_input_is_a_data_error(
    run: Run, tmp_path: Path, *, content: bytes, options: list[str], status: int, error: str
) -> None:
    source = tmp_path / "m.eml"
    source.write_bytes(content)
    outbox = tmp_path / "outbox"
    got, out, err = run("send", "--url", outbox.as_uri(), *options, str(source))
    assert (got, out) == (status, "")
    assert err.startswith(f"mailrelay: {error}: ")
    assert not outbox.exists() or not list(outbox.glob("*.json"))


def test_a_missing_message_file_is_no_input(run: Run, tmp_path: Path) -> None:
    status, _, err = run("send", "--url", "memory://", str(tmp_path / "nowhere.eml"))
    assert status == cli.EX_NOINPUT
    assert "nowhere.eml" in err


@pytest.mark.parametrize(
    ("url", "options", "status"),
    [
        ("smtp://alice:s3cret@mx.mailrelay.test?tls=sometimes", [], cli.EX_CONFIG),
        ("gopher://mx.mailrelay.test", [], cli.EX_CONFIG),
        ("smtp://alice@mx.mailrelay.test", [], cli.EX_CONFIG),  # a user without a password
        ("smtp://mx.mailrelay.test", ["--password-env", "CLI_TEST_UNSET"], cli.EX_CONFIG),
        ("memory://", ["--user", "alice"], cli.EX_USAGE),
        ("memory://", ["--ca-file", "ca.pem"], cli.EX_USAGE),
    ],
)
def test_configuration_errors(
    run: Run, tmp_path: Path, url: str, options: list[str], status: int
) -> None:
    source = write_message(tmp_path / "m.eml")
    got, out, err = run("send", "--url", url, *options, str(source))
    assert (got, out) == (status, "")
    assert "s3cret" not in err
    if status == cli.EX_CONFIG:
        assert "ConfigurationError: " in err


# -- validate --------------------------------------------------------------------------------


def dns_options(unbound: UnboundServer) -> list[str]:
    return [
        "--nameserver", unbound.host, "--port", str(unbound.port), "--timeout", "2",
        "--allow-special", "test", "--refused-networks", "none",
    ]  # fmt: skip


def expected_validations(unbound: UnboundServer, addresses: list[str]) -> list[Any]:
    resolver = Resolver(nameservers=[unbound.host], port=unbound.port, timeout=2)
    validator = RecipientValidator(
        resolver, special_use=DEFAULT_SPECIAL_USE - {"test"}, refused_networks=()
    )
    return validator.validate_many(addresses)


@pytest.mark.unbound
@pytest.mark.parametrize(
    ("addresses", "status"),
    [
        (["user@mailrelay.test", "user@mx2.test"], 0),
        (["user@mailrelay.test", "user@nullmx.test"], 1),
        (["user@nx.test"], 1),
        (["not an address"], 1),
        (["user@mailrelay.test", "user@[127.0.0.1]"], cli.EX_TEMPFAIL),
        (["user@[127.0.0.1]", "user@nullmx.test"], 1),
    ],
)
def test_validate_exit_status(
    run: Run, unbound: UnboundServer, addresses: list[str], status: int
) -> None:
    got, out, err = run("validate", *dns_options(unbound), *addresses)
    assert (got, err) == (status, "")
    assert len(rows(out)) == len(addresses)


@pytest.mark.unbound
def test_validate_prints_verdict_reason_and_mail_hosts(run: Run, unbound: UnboundServer) -> None:
    addresses = [
        "user@mailrelay.test",
        "user@mx2.test",
        "user@nullmx.test",
        "user@nx.test",
        "us er@mailrelay.test",
        "user@mailrelay.test\r\nRCPT TO:<x@y.test>",
    ]
    status, out, _ = run("validate", *dns_options(unbound), *addresses)
    assert status == 1
    expected = expected_validations(unbound, addresses)
    lines = rows(out)
    assert len(lines) == len(addresses)  # the injected CR LF did not make a line of its own
    for line, address, want in zip(lines, addresses, expected, strict=True):
        assert line[0] == cli.printable(address)
        assert line[1:3] == [want.verdict.value, want.reason.value]
        hosts = {h.name for h in want.mail_hosts.hosts} if want.mail_hosts else set()
        assert set(line[3].split(",")) - {"-"} == hosts
    assert lines[0][1:4] == ["deliverable", "ok", "mx.mailrelay.test"]
    assert [line[2] for line in lines[2:]] == [
        "null-mx",
        "no-such-domain",
        "bad-syntax",
        "bad-syntax",
    ]
    assert lines[5][0] == "user@mailrelay.test\\r\\nRCPT TO:<x@y.test>"


@pytest.mark.unbound
def test_validate_reads_a_file_and_prints_json(
    run: Run, unbound: UnboundServer, tmp_path: Path
) -> None:
    addresses = ["User@MailRelay.TEST", "user@a-only.test", "user@nomail.test"]
    listing = tmp_path / "addresses.txt"
    listing.write_text("\n".join(["", *addresses, "   "]) + "\n", encoding="utf-8")
    status, out, _ = run("validate", *dns_options(unbound), "--json", "--file", str(listing))
    assert status == 1
    document = json.loads(out)
    expected = expected_validations(unbound, addresses)
    assert [d["input"] for d in document] == addresses
    for got, want in zip(document, expected, strict=True):
        assert (got["verdict"], got["reason"], got["detail"]) == (
            want.verdict.value,
            want.reason.value,
            want.detail,
        )
        assert got["address"] == (None if want.address is None else str(want.address))
    assert document[0]["address"] == "User@mailrelay.test"
    assert document[1]["implicit_mx"] is True
    assert [h["name"] for h in document[0]["mail_hosts"]] == ["mx.mailrelay.test"]
    assert set(document[0]["mail_hosts"][0]["addresses"]) == {"127.0.0.1", "::1"}


def test_validate_without_allow_special_refuses_test_names_without_dns(run: Run) -> None:
    # No name server is asked at all for a special-use name (and none is reachable here).
    status, out, _ = run("validate", "--nameserver", "127.0.0.1", "--port", str(free_port()),
                         "user@mailrelay.test")  # fmt: skip
    assert status == 1
    assert rows(out)[0][1:3] == ["undeliverable", "special-use-domain"]


def test_validate_reads_standard_input(run: Run) -> None:
    status, out, _ = run("validate", "--file", "-", stdin=b"bad\nuser@example.com\n")
    assert status == 1
    assert [r[2] for r in rows(out)] == ["bad-syntax", "special-use-domain"]


def test_validate_a_file_that_is_not_utf8_is_a_data_error(run: Run, tmp_path: Path) -> None:
    listing = tmp_path / "latin1.txt"
    listing.write_bytes("j\u00f6rg@example.com\n".encode("latin-1"))
    status, _, err = run("validate", "--file", str(listing))
    assert status == cli.EX_DATAERR
    assert err.startswith("mailrelay: UnicodeDecodeError: ")


# -- parse-dsn -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "bsd/rfc3464-01.eml",
        "bsd/lhost-postfix-01.eml",
        "bsd/arf-01.eml",
        "not/is-not-bounce-01.eml",
    ],
)
def test_parse_dsn_prints_what_parse_dsn_found(run: Run, name: str) -> None:
    path = SISIMAI / name
    report = parse_dsn(path.read_bytes())
    status, out, _ = run("parse-dsn", str(path))
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == f"kind: {report.kind.value}"
    assert lines[1] == f"format: {report.format}"
    assert lines[2] == f"envid: {report.envid or '-'}"
    assert lines[3] == f"original-message-id: {report.original_message_id or '-'}"
    recipient_rows = rows("\n".join(lines[5:]))
    assert len(recipient_rows) == len(report.recipients)
    for row, r in zip(recipient_rows, report.recipients, strict=True):
        assert row[:3] == [r.address, r.action.value, r.status or "-"]
        assert row[4] == (r.remote_mta or "-")

    status, out, _ = run("parse-dsn", "--json", str(path))
    document = json.loads(out)
    assert document["kind"] == report.kind.value
    assert document["original_message_id"] == report.original_message_id
    assert [
        (r["address"], r["action"], r["status"], r["diagnostic"]) for r in document["recipients"]
    ] == [(r.address, r.action.value, r.status, r.diagnostic) for r in report.recipients]


def test_parse_dsn_reads_standard_input(run: Run) -> None:
    raw = (SISIMAI / "bsd" / "rfc3464-01.eml").read_bytes()
    status, out, _ = run("parse-dsn", "-", stdin=raw)
    assert status == 0
    assert out.splitlines()[0] == "kind: bounce"
    assert "userunknown@bouncehammer.jp\tfailed\t5.1.1\thard\tmx.bouncehammer.jp\t" in out


# -- tracker ---------------------------------------------------------------------------------


SCRIPT = {
    "later@mailrelay.test": Reply.of(450, "4.2.1 try again later"),
    "gone@mailrelay.test": Reply.of(550, "5.1.1 no such user"),
}


def scripted(message: Message, envelope: Envelope) -> dict[str, Outcome | Reply]:
    """Refuse later@ for now and gone@ for good; accept the others."""
    here = {str(r.address) for r in envelope.recipients}
    return {address: reply for address, reply in SCRIPT.items() if address in here}


@pytest.fixture
def tracked(tmp_path: Path) -> tuple[Path, list[str]]:
    """A store with two messages sent once through a scripted MemoryTransport: the first
    has a delivered and a deferred recipient, the second a delivered and a bounced one."""
    db = tmp_path / "tracker.sqlite"
    tracker = DeliveryTracker(MemoryTransport(scripted), SQLiteStore(db))
    ids = [
        tracker.submit(Message.build(sender=USER, to=["bob@mailrelay.test", other], subject=str(n)))
        for n, other in enumerate(["later@mailrelay.test", "gone@mailrelay.test"])
    ]
    tracker.run_pending()
    tracker.close()
    return db, ids


def test_tracker_status_shows_each_recipient(run: Run, tracked: tuple[Path, list[str]]) -> None:
    db, ids = tracked
    store = SQLiteStore(db)
    records = [store.get(i) for i in ids]
    store.close()
    for tracking_id, record in zip(ids, records, strict=True):
        assert record is not None
        status, out, _ = run("tracker", "--db", str(db), "status", tracking_id)
        assert status == 0
        head = dict(
            line.split(": ", 1) for line in out.splitlines() if ": " in line and "\t" not in line
        )
        assert head["id"] == tracking_id
        assert head["sender"] == USER
        recipient_rows = [line for line in rows(out) if len(line) > 1]
        assert [(r[0], r[1], int(r[2])) for r in recipient_rows] == [
            (str(r.address), r.state.value, len(r.attempts)) for r in record.recipients
        ]
    status, out, _ = run("tracker", "--db", str(db), "status", "--json", ids[1])
    document = json.loads(out)
    by_address = {r["address"]: r for r in document["recipients"]}
    assert by_address["gone@mailrelay.test"]["state"] == "bounced"
    assert by_address["gone@mailrelay.test"]["attempts"][0]["code"] == 550
    assert by_address["gone@mailrelay.test"]["attempts"][0]["enhanced"] == "5.1.1"
    assert by_address["bob@mailrelay.test"]["state"] == "delivered"


def test_tracker_list_filters(run: Run, tracked: tuple[Path, list[str]]) -> None:
    db, ids = tracked
    base = ("tracker", "--db", str(db), "list")
    status, out, _ = run(*base)
    assert status == 0
    assert [r[0] for r in rows(out)] == ids
    assert rows(out)[0][2] == "delivered=1,deferred=1"
    assert [r[0] for r in rows(run(*base, "--state", "deferred")[1])] == [ids[0]]
    assert [r[0] for r in rows(run(*base, "--state", "bounced")[1])] == [ids[1]]
    assert run(*base, "--state", "queued")[1] == ""
    assert [r[0] for r in rows(run(*base, "--limit", "1")[1])] == [ids[0]]
    assert run(*base, "--older-than", "1w")[1] == ""  # submitted just now
    assert [r[0] for r in rows(run(*base, "--older-than", "0s")[1])] == ids
    document = json.loads(run(*base, "--json")[1])
    assert [d["id"] for d in document] == ids
    assert document[1]["states"] == {State.DELIVERED.value: 1, State.BOUNCED.value: 1}


def test_tracker_reports_missing_things_as_no_input(run: Run, tmp_path: Path) -> None:
    missing = tmp_path / "missing.sqlite"
    status, _, err = run("tracker", "--db", str(missing), "list")
    assert status == cli.EX_NOINPUT
    assert "no tracker database" in err
    assert not missing.exists()  # a mistyped path does not create an empty store
    SQLiteStore(tmp_path / "empty.sqlite").close()
    status, _, err = run("tracker", "--db", str(tmp_path / "empty.sqlite"), "status", "nope")
    assert status == cli.EX_NOINPUT
    assert "nope" in err


def test_tracker_run_sends_what_is_due(run: Run, tmp_path: Path) -> None:
    db = tmp_path / "tracker.sqlite"
    tracker = DeliveryTracker(MemoryTransport(), SQLiteStore(db))
    tracking_id = tracker.submit(Message.build(sender=USER, to=["bob@mailrelay.test"], subject="q"))
    tracker.close()
    outbox = tmp_path / "outbox"
    status, out, err = run("tracker", "--db", str(db), "run", "--url", outbox.as_uri())
    assert (status, err) == (0, "")
    event, summary = out.splitlines()
    assert event.split("\t")[:4] == [tracking_id, "bob@mailrelay.test", "delivered", "250"]
    assert summary == "messages=1 delivered=1 deferred=0 bounced=0 expired=0 postponed=0"
    assert len(list(outbox.glob("*.eml"))) == 1
    store = SQLiteStore(db)
    record = store.get(tracking_id)
    store.close()
    assert record is not None
    assert [r.state for r in record.recipients] == [State.DELIVERED]
    status, out, _ = run("tracker", "--db", str(db), "run", "--url", outbox.as_uri(), "--json")
    assert status == 0
    assert json.loads(out) == {
        "messages": 0, "delivered": 0, "deferred": 0, "bounced": 0, "expired": 0, "postponed": 0,
    }  # fmt: skip


# -- the entry point, as a real process ------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILRELAY_")}
    env.update(extra)
    return env


def test_python_m_mailrelay_sends_with_the_url_from_the_environment(tmp_path: Path) -> None:
    source = write_message(tmp_path / "m.eml")
    outbox = tmp_path / "outbox"
    done = subprocess.run(
        [sys.executable, "-m", "mailrelay", "send", str(source)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=child_env(MAILRELAY_URL=outbox.as_uri()),
        cwd=tmp_path,
        timeout=CHILD_TIMEOUT,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, b"")
    assert rows(done.stdout.decode())[0][:2] == ["bob@mailrelay.test", "accepted"]
    assert len(list(outbox.glob("*.json"))) == 1

    # Standard input closed (empty): there is no message to send.
    done = subprocess.run(
        [sys.executable, "-m", "mailrelay", "send"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=child_env(MAILRELAY_URL=outbox.as_uri()),
        cwd=tmp_path,
        timeout=CHILD_TIMEOUT,
        check=False,
    )
    assert done.returncode == cli.EX_DATAERR
    assert done.stderr.startswith(b"mailrelay: MessageError: ")


def test_tracker_run_forever_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    db = tmp_path / "tracker.sqlite"
    tracker = DeliveryTracker(MemoryTransport(), SQLiteStore(db))
    tracking_id = tracker.submit(Message.build(sender=USER, to=["bob@mailrelay.test"], subject="f"))
    tracker.close()
    outbox = tmp_path / "outbox"
    child = subprocess.Popen(
        [sys.executable, "-m", "mailrelay", "tracker", "--db", str(db), "run", "--forever",
         "--url", outbox.as_uri()],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
        cwd=tmp_path,
    )  # fmt: skip
    try:
        # Bounded wait for the message to be written (a hang guard, not a speed check).
        deadline = time.monotonic() + CHILD_TIMEOUT
        while not list(outbox.glob("*.json")) and child.poll() is None:
            assert time.monotonic() < deadline, "tracker run --forever sent nothing"
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=CHILD_TIMEOUT)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=CHILD_TIMEOUT)
    assert child.returncode == 0, err
    assert err == b""
    (line,) = out.decode().splitlines()  # the delivery, printed before the loop stopped
    assert line.split("\t")[:3] == [tracking_id, "bob@mailrelay.test", "delivered"]
    assert len(list(outbox.glob("*.eml"))) == 1
    store = SQLiteStore(db)
    record = store.get(tracking_id)
    store.close()
    assert record is not None
    assert [r.state for r in record.recipients] == [State.DELIVERED]


# -- docs/cli.md stays true ------------------------------------------------------------------

DOC = REPO / "docs" / "cli.md"


def doc_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", DOC.read_text(encoding="utf-8"), re.M | re.S)


def test_the_console_examples_print_what_the_doc_shows(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)  # the examples name files under tests/data
    blocks = doc_blocks("console")
    assert blocks
    for block in blocks:
        status = None
        for command, *expected in (chunk.split("\n") for chunk in block.split("$ ")[1:]):
            want = [re.split(r"\t| {2,}", line) for line in expected if line]
            if command == "echo $?":
                assert [[str(status)]] == want
                continue
            argv = shlex.split(command)
            assert argv[0] == "mailrelay"
            status, out, _ = run(*argv[1:])
            assert rows(out) == want, command


def doc_commands() -> list[list[str]]:
    """The argument lists of every ``mailrelay`` command in the doc's examples."""
    commands = []
    for block in doc_blocks("sh") + doc_blocks("console"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.removeprefix("$ "), comments=True)
            if words[:1] == ["mailrelay"]:
                cut = [i for i, w in enumerate(words) if w in {"<", "|", ">"}]
                commands.append(words[1 : cut[0] if cut else None])
    return commands


def test_every_command_in_the_doc_parses() -> None:
    commands = doc_commands()
    assert len(commands) >= 8
    for argv in commands:
        cli.build_parser().parse_args(argv)  # raises UsageError when an example is stale


def leaf_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield sub
                yield from leaf_parsers(sub)


def test_every_option_is_documented() -> None:
    text = DOC.read_text(encoding="utf-8")
    options = {
        option
        for leaf in leaf_parsers(cli.build_parser())
        for action in leaf._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }
    assert len(options) > 15
    assert sorted(o for o in options if f"`{o}" not in text) == []


def test_the_exit_status_table_matches_the_code() -> None:
    table = re.findall(r"^\| (\d+) \| `(EX_\w+)` \|", DOC.read_text(encoding="utf-8"), re.M)
    assert {name: int(number) for number, name in table} == {
        name: getattr(cli, name) for name in cli.__all__ if name.startswith("EX_")
    }


# -- OAuth 2.0: --auth-mechanism and --oauth2-token-command ------------------------------------


def token_command(tmp_path: Path, *tokens: str, status: int = 0) -> str:
    """A command printing the next of ``tokens`` each run (the last repeats), or exiting
    with ``status``; it counts its runs in ``runs``."""
    script = tmp_path / "token.py"
    script.write_text(
        "import pathlib, sys\n"
        f"runs = pathlib.Path({str(tmp_path / 'runs')!r})\n"
        "count = int(runs.read_text()) if runs.exists() else 0\n"
        "runs.write_text(str(count + 1))\n"
        f"if {status}:\n"
        "    print('token service unreachable', file=sys.stderr)\n"
        f"    sys.exit({status})\n"
        f"tokens = {list(tokens)!r}\n"
        "print(tokens[min(count, len(tokens) - 1)])\n",
        encoding="utf-8",
    )
    return shlex.join([sys.executable, str(script)])


def runs(tmp_path: Path) -> int:
    return int((tmp_path / "runs").read_text())


@pytest.mark.parametrize(
    ("options", "mechanism"),
    [([], "XOAUTH2"), (["--auth-mechanism", "oauthbearer"], "OAUTHBEARER")],
)
def test_send_with_an_oauth2_token_command(
    run: Run,
    tmp_path: Path,
    *,
    make_aiosmtpd: Callable[..., AiosmtpdServer],
    caplog: pytest.LogCaptureFixture,
    options: list[str],
    mechanism: str,
) -> None:
    tokens = TokenTable({USER: {"ya29.cli-token"}})
    server = make_aiosmtpd(oauth_tokens=tokens)
    source = write_message(tmp_path / "m.eml")
    with caplog.at_level("DEBUG", logger="mailrelay"):
        status, out, err = run(
            "send", "--url", smtp_url(server, user=USER), *options,
            "--oauth2-token-command", token_command(tmp_path, "ya29.cli-token"),
            "--ca-file", str(server.ca_file), "--debug", str(source),
        )  # fmt: skip
    assert status == 0, err
    assert server.messages[0].auth_login == USER
    assert [name for name, _ in tokens.responses] == [mechanism]
    assert runs(tmp_path) == 1
    assert f"AUTH {mechanism}" in err
    for form in ["ya29.cli-token", *(base64.b64encode(r).decode() for _, r in tokens.responses)]:
        assert form not in out
        assert form not in err
        assert form not in caplog.text


def test_an_expired_token_from_the_command_is_renewed(
    run: Run, tmp_path: Path, make_aiosmtpd: Callable[..., AiosmtpdServer]
) -> None:
    tokens = TokenTable({USER: {"fresh"}})
    server = make_aiosmtpd(oauth_tokens=tokens)
    status, _, err = run(
        "send", "--url", smtp_url(server, user=USER),
        "--oauth2-token-command", token_command(tmp_path, "stale", "fresh"),
        "--ca-file", str(server.ca_file), str(write_message(tmp_path / "m.eml")),
    )  # fmt: skip
    assert (status, err) == (0, "")
    assert runs(tmp_path) == 2
    assert len(server.messages) == 1


def test_a_failing_token_command_is_a_temporary_failure(
    run: Run, tmp_path: Path, make_aiosmtpd: Callable[..., AiosmtpdServer]
) -> None:
    server = make_aiosmtpd(oauth_tokens=TokenTable({}))
    status, out, err = run(
        "send", "--url", smtp_url(server, user=USER),
        "--oauth2-token-command", token_command(tmp_path, status=3),
        "--ca-file", str(server.ca_file), str(write_message(tmp_path / "m.eml")),
    )  # fmt: skip
    assert status == cli.EX_TEMPFAIL
    assert out == ""
    assert err.splitlines()[-1].startswith("mailrelay: AuthenticationError: ")
    assert "exited with status 3" in err
    assert server.messages == []


def test_a_static_token_with_auth_mechanism(
    run: Run,
    tmp_path: Path,
    make_aiosmtpd: Callable[..., AiosmtpdServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tokens = TokenTable({USER: {"static-token"}})
    server = make_aiosmtpd(oauth_tokens=tokens)
    monkeypatch.setenv(cli.PASSWORD_VARIABLE, "static-token")
    status, _, err = run(
        "send", "--url", smtp_url(server, user=USER), "--auth-mechanism", "XOAUTH2",
        "--ca-file", str(server.ca_file), str(write_message(tmp_path / "m.eml")),
    )  # fmt: skip
    assert (status, err) == (0, "")
    assert [name for name, _ in tokens.responses] == ["XOAUTH2"]


@pytest.mark.parametrize(
    ("url", "options", "status"),
    [
        ("smtp://a@mx.mailrelay.test", ["--auth-mechanism", "GSSAPI"], cli.EX_USAGE),
        ("memory://", ["--auth-mechanism", "XOAUTH2"], cli.EX_USAGE),
        ("memory://", ["--oauth2-token-command", "true"], cli.EX_USAGE),
        (
            "smtp://a@mx.mailrelay.test",
            ["--oauth2-token-command", "true", "--password-env", "X"],
            cli.EX_USAGE,
        ),
        ("smtp://a@mx.mailrelay.test", ["--oauth2-token-command", "'unclosed"], cli.EX_USAGE),
        ("smtp://a@mx.mailrelay.test", ["--oauth2-token-command", ""], cli.EX_USAGE),
        ("smtp://mx.mailrelay.test", ["--oauth2-token-command", "true"], cli.EX_CONFIG),
    ],
)
def test_oauth2_option_errors(
    run: Run, tmp_path: Path, url: str, options: list[str], status: int
) -> None:
    got, out, _ = run("send", "--url", url, *options, str(write_message(tmp_path / "m.eml")))
    assert (got, out) == (status, "")
