"""``mailrelay tracker`` init, submit, cancel, ingest and run's tracker options
(mailrelay/cli_tracker.py), against a real SMTP server on loopback.

``main([...])`` runs in-process with pytest's ``capsys``, as in ``tests/test_cli.py``. The
tracker's clock cannot be injected from the command line, so nothing here waits on it:
reports are made on the first attempt (a permanent refusal; a deferral with
``--delay-warning 0s``), and retries are scheduled minutes away, so one ``run`` makes one
attempt per recipient.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import io
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailrelay import cli
from mailrelay.address import Address
from mailrelay.envelope import Notify, Ret
from mailrelay.testing.server import Parameters, SMTPTestServer
from mailrelay.tracker import (
    DSNKind,
    DSNRecipient,
    MessageRecord,
    SQLiteStore,
    State,
    build_dsn,
    parse_dsn,
)

SENDER = "alice@shop.example"
SCRIPT = {
    "later@example.org": (450, "4.2.1 try again later"),
    "gone@example.org": (550, "5.1.1 no such user"),
}

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


def scripted(address: str, params: Parameters) -> tuple[int, str] | None:
    """Refuse later@ for now and gone@ for good; accept the others."""
    return SCRIPT.get(address)


@pytest.fixture
def server() -> Iterator[SMTPTestServer]:
    with SMTPTestServer(rcpt=scripted, timeout=30.0) as smtp:
        yield smtp


def url(server: SMTPTestServer) -> str:
    return f"smtp://{server.host}:{server.port}?tls=none&timeout=30"


@pytest.fixture
def db(tmp_path: Path, run: Run) -> Path:
    """An empty store, made by ``tracker init``."""
    path = tmp_path / "queue.sqlite"
    assert run("tracker", "--db", str(path), "init") == (0, f"created\t{path}\n", "")
    return path


def message_bytes(*to: str, message_id: str = "cli-tracker@shop.example") -> bytes:
    return (
        f"From: Alice <{SENDER}>\r\nTo: {', '.join(to)}\r\nSubject: tracked\r\n"
        f"Message-ID: <{message_id}>\r\n\r\nHello from the tracker.\r\n"
    ).encode()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def rows(out: str) -> list[list[str]]:
    return [line.split("\t") for line in out.splitlines()]


def record(db: Path, tracking_id: str) -> MessageRecord:
    store = SQLiteStore(db)
    try:
        found = store.get(tracking_id)
    finally:
        store.close()
    assert found is not None
    return found


def states(db: Path, tracking_id: str) -> dict[str, State]:
    return {str(r.address): r.state for r in record(db, tracking_id).recipients}


def submit(run: Run, db: Path, source: Path, *options: str) -> str:
    status, out, err = run("tracker", "--db", str(db), "submit", *options, str(source))
    assert (status, err) == (0, ""), err
    ((tracking_id, *_),) = rows(out)
    return tracking_id


def dsn_files(directory: Path) -> list[tuple[dict[str, Any], bytes]]:
    """What a file:// transport wrote: each message's envelope record and bytes."""
    return [
        (json.loads(meta.read_text()), meta.with_suffix(".eml").read_bytes())
        for meta in sorted(directory.glob("*.json"))
    ]


# -- init ------------------------------------------------------------------------------------


def test_init_creates_a_store_once(run: Run, tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite"
    assert run("tracker", "--db", str(path), "init", "--json") == (
        0,
        json.dumps({"db": str(path), "created": True}, indent=2) + "\n",
        "",
    )
    assert path.is_file()
    assert run("tracker", "--db", str(path), "init") == (0, f"exists\t{path}\n", "")
    assert run("tracker", "--db", str(path), "list") == (0, "", "")
    status, _, err = run("tracker", "--db", str(tmp_path), "init")
    assert status == cli.EX_NOINPUT
    assert "not a file" in err


# -- submit, run, status ---------------------------------------------------------------------


def test_submit_then_run_over_smtp_delivers(
    run: Run, db: Path, tmp_path: Path, server: SMTPTestServer
) -> None:
    source = write(tmp_path / "m.eml", message_bytes("bob@example.org", "ann@example.org"))
    status, out, err = run("tracker", "--db", str(db), "submit", str(source))
    assert (status, err) == (0, "")
    ((tracking_id, name, sender, recipients),) = rows(out)
    assert (name, sender, recipients) == (str(source), SENDER, "bob@example.org,ann@example.org")
    assert set(states(db, tracking_id).values()) == {State.QUEUED}
    assert server.messages == []  # submit stores, never sends

    status, out, err = run("tracker", "--db", str(db), "run", "--url", url(server))
    assert (status, err) == (0, ""), err
    *events, summary = rows(out)
    assert sorted((e[0], e[1], e[2], e[3]) for e in events) == [
        (tracking_id, "ann@example.org", "delivered", "250"),
        (tracking_id, "bob@example.org", "delivered", "250"),
    ]
    assert summary == ["messages=1 delivered=2 deferred=0 bounced=0 expired=0 postponed=0"]
    (received,) = server.messages
    assert received.mail_from == SENDER
    assert sorted(received.rcpt_tos) == ["ann@example.org", "bob@example.org"]

    status, out, _ = run("tracker", "--db", str(db), "status", tracking_id)
    assert status == 0
    assert [(r[0], r[1], r[2]) for r in rows(out) if len(r) > 1] == [
        ("bob@example.org", "delivered", "1"),
        ("ann@example.org", "delivered", "1"),
    ]


def test_submit_stdin_with_envelope_options_dsn_request_and_verp(
    run: Run, db: Path, tmp_path: Path
) -> None:
    files = [write(tmp_path / "a.eml", message_bytes("bob@example.org", message_id="a@shop"))]
    status, out, err = run(
        "tracker", "--db", str(db), "submit", "--json", "--request-dsn", "--notify", "failure",
        "--verp", "bounces@shop.example", "--to", "carol@example.org", "--to", "dan@example.org",
        str(files[0]), "-",
        stdin=message_bytes("erin@example.org", message_id="stdin@shop"),
    )  # fmt: skip
    assert (status, err) == (0, "")
    first, second = json.loads(out)
    assert (first["file"], second["file"]) == (str(files[0]), "-")
    assert (first["message_id"], second["message_id"]) == ("a@shop", "stdin@shop")
    for document in (first, second):
        tracking_id = document["id"]
        assert document["sender"] == f"bounces+{tracking_id}@shop.example"
        assert document["envid"] == tracking_id  # --request-dsn: the id comes back in DSNs
        assert document["recipients"] == ["carol@example.org", "dan@example.org"]
        envelope = record(db, tracking_id).envelope
        assert {str(r.address): r.notify for r in envelope.recipients} == {
            "carol@example.org": frozenset({Notify.FAILURE}),
            "dan@example.org": frozenset({Notify.FAILURE}),
        }
        assert envelope.ret is Ret.HDRS  # DSNRequest's default, --ret not given

    # --sender '' is the null reverse-path; --envid wins over the tracking id.
    status, out, _ = run(
        "tracker", "--db", str(db), "submit", "--sender", "", "--envid", "order-7",
        "--request-dsn", "--ret", "full", str(files[0]),
    )  # fmt: skip
    assert status == 0
    ((tracking_id, _, sender, _),) = rows(out)
    assert sender == "<>"
    envelope = record(db, tracking_id).envelope
    assert (envelope.sender, envelope.envid, envelope.ret) == (None, "order-7", Ret.FULL)


@pytest.mark.parametrize(
    ("content", "status", "said"),
    [
        (b"", cli.EX_DATAERR, "empty message"),
        (b"Subject: no sender or recipients\r\n\r\nbody\r\n", cli.EX_DATAERR, "MessageError"),
        (b"From: <not an address>\r\nTo: bob@example.org\r\n\r\nx\r\n", cli.EX_DATAERR, "bad.eml"),
        (None, cli.EX_NOINPUT, "cannot read"),
    ],
)
def test_submit_refuses_a_bad_file_and_stores_nothing(
    run: Run, db: Path, tmp_path: Path, *, content: bytes | None, status: int, said: str
) -> None:
    good = write(tmp_path / "good.eml", message_bytes("bob@example.org"))
    bad = tmp_path / "bad.eml"
    if content is not None:
        bad.write_bytes(content)
    got, out, err = run("tracker", "--db", str(db), "submit", str(good), str(bad))
    assert (got, out) == (status, "")
    assert err.startswith("mailrelay: ")
    assert said in err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1
    assert run("tracker", "--db", str(db), "list") == (0, "", "")  # all or none


def test_submit_from_empty_standard_input_is_a_data_error(run: Run, db: Path) -> None:
    status, out, err = run("tracker", "--db", str(db), "submit", "-", stdin=b"")
    assert (status, out) == (cli.EX_DATAERR, "")
    assert err == "mailrelay: MessageError: standard input: empty message\n"


def test_submit_needs_an_existing_store(run: Run, tmp_path: Path) -> None:
    source = write(tmp_path / "m.eml", message_bytes("bob@example.org"))
    missing = tmp_path / "missing.sqlite"
    status, _, err = run("tracker", "--db", str(missing), "submit", str(source))
    assert status == cli.EX_NOINPUT
    assert "no tracker database" in err
    assert not missing.exists()


# -- run: generated reports ------------------------------------------------------------------


def test_run_with_dsn_url_reports_a_permanent_refusal_to_the_sender(
    run: Run, db: Path, tmp_path: Path, server: SMTPTestServer
) -> None:
    source = write(tmp_path / "m.eml", message_bytes("bob@example.org", "gone@example.org"))
    tracking_id = submit(run, db, source)
    reports = tmp_path / "reports"
    status, out, err = run(
        "tracker", "--db", str(db), "run", "--url", url(server),
        "--dsn-url", reports.as_uri(), "--reporting-mta", "mx.shop.example",
    )  # fmt: skip
    assert (status, err) == (0, ""), err
    *events, summary = rows(out)
    assert sorted((e[1], e[2], e[3], e[4]) for e in events) == [
        ("bob@example.org", "delivered", "250", "2.0.0"),
        ("gone@example.org", "bounced", "550", "5.1.1"),
    ]
    # The report is a message of its own, sent in the same run: counted (its delivery too),
    # but with no event line.
    assert summary == ["messages=2 delivered=2 deferred=0 bounced=1 expired=0 postponed=0"]
    assert states(db, tracking_id) == {
        "bob@example.org": State.DELIVERED,
        "gone@example.org": State.BOUNCED,
    }
    ((meta, raw),) = dsn_files(reports)
    assert meta["sender"] is None  # RFC 3461 §6.2: from the null reverse-path
    assert [r["address"] for r in meta["recipients"]] == [SENDER]
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    assert parsed["To"] == SENDER
    assert parsed["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.shop.example"
    report = parse_dsn(raw)
    assert report.kind is DSNKind.BOUNCE
    assert report.reporting_mta == "mx.shop.example"
    assert [(r.address, r.action.value, r.status) for r in report.recipients] == [
        ("gone@example.org", "failed", "5.1.1")
    ]
    assert len(server.messages) == 1  # the report went to the DSN transport only


def test_dsn_url_same_sends_reports_through_the_sending_transport(
    run: Run, db: Path, tmp_path: Path, server: SMTPTestServer
) -> None:
    tracking_id = submit(run, db, write(tmp_path / "m.eml", message_bytes("gone@example.org")))
    status, out, err = run(
        "tracker", "--db", str(db), "run", "--url", url(server), "--dsn-url", "same", "--json"
    )
    assert (status, err) == (0, ""), err
    assert json.loads(out)["bounced"] == 1
    (report,) = server.messages  # the message itself was refused; its report was not
    assert (report.mail_from, report.rcpt_tos) == ("", (SENDER,))
    parsed = parse_dsn(report.data)
    assert parsed.kind is DSNKind.BOUNCE
    assert parsed.original_message_id == record(db, tracking_id).message_id


def test_delay_warning_reports_a_deferral(
    run: Run, db: Path, tmp_path: Path, server: SMTPTestServer
) -> None:
    source = write(tmp_path / "m.eml", message_bytes("later@example.org", "bob@example.org"))
    tracking_id = submit(run, db, source)
    reports = tmp_path / "reports"
    status, out, err = run(
        "tracker", "--db", str(db), "run", "--url", url(server), "--dsn-url", reports.as_uri(),
        "--delay-warning", "0s", "--retry-initial", "1h", "--max-age", "2d",
    )  # fmt: skip
    assert (status, err) == (0, ""), err
    *events, summary = rows(out)
    assert sorted((e[1], e[2]) for e in events) == [
        ("bob@example.org", "delivered"),
        ("later@example.org", "deferred"),
    ]
    # The warning's delivery is counted too.
    assert summary == ["messages=2 delivered=2 deferred=1 bounced=0 expired=0 postponed=0"]
    later = record(db, tracking_id).recipient(Address.parse("later@example.org"))
    assert later.state is State.DEFERRED
    assert later.delay_warned
    assert later.next_attempt_at is not None
    # --retry-initial 1h, with the policy's jitter (10 % either way).
    wait = later.next_attempt_at - later.attempts[-1].at
    assert 0.9 * 3600 <= wait.total_seconds() <= 1.1 * 3600
    ((meta, raw),) = dsn_files(reports)
    assert (meta["sender"], [r["address"] for r in meta["recipients"]]) == (None, [SENDER])
    report = parse_dsn(raw)
    assert report.kind is DSNKind.DELAY
    assert [(r.address, r.action.value, r.status) for r in report.recipients] == [
        ("later@example.org", "delayed", "4.2.1")
    ]
    assert b"Action: delayed" in raw
    assert b"Will-Retry-Until:" in raw

    # Once per recipient: a second run (nothing due) warns nobody again.
    status, out, _ = run(
        "tracker", "--db", str(db), "run", "--url", url(server), "--dsn-url", reports.as_uri(),
        "--delay-warning", "0s",
    )  # fmt: skip
    assert (status, rows(out)[-1]) == (
        0,
        ["messages=0 delivered=0 deferred=0 bounced=0 expired=0 postponed=0"],
    )
    assert len(dsn_files(reports)) == 1


def test_max_age_expires_a_deferred_recipient_and_reports_it(
    run: Run, db: Path, tmp_path: Path, server: SMTPTestServer
) -> None:
    tracking_id = submit(run, db, write(tmp_path / "m.eml", message_bytes("later@example.org")))
    reports = tmp_path / "reports"
    options = ["--url", url(server), "--dsn-url", reports.as_uri(), "--max-age", "2s"]
    status, first, _ = run("tracker", "--db", str(db), "run", *options)
    assert status == 0
    # The tracker's clock is the real one here: wait (bounded) for the deadline, which the
    # policy makes the last retry's due time. (A slow first run may have reached it already.)
    later = record(db, tracking_id).recipient(Address.parse("later@example.org"))
    due = later.next_attempt_at if later.state is State.DEFERRED else None
    deadline = time.monotonic() + 30
    while due is not None and dt.datetime.now(dt.UTC) <= due:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    status, second, err = run("tracker", "--db", str(db), "run", *options)
    assert (status, err) == (0, ""), err
    events = [r[1:4] for r in rows(first)[:-1] + rows(second)[:-1]]
    assert events == [
        ["later@example.org", "deferred", "450"],
        ["later@example.org", "expired", "450"],
    ]
    assert states(db, tracking_id) == {"later@example.org": State.EXPIRED}
    ((meta, raw),) = dsn_files(reports)  # no --delay-warning: the expiry's report only
    assert [r["address"] for r in meta["recipients"]] == [SENDER]
    report = parse_dsn(raw)
    assert report.kind is DSNKind.BOUNCE
    assert [(r.address, r.action.value, r.status) for r in report.recipients] == [
        ("later@example.org", "failed", "4.2.1")
    ]


def test_split_by_domain_sends_one_transaction_per_domain(
    run: Run, db: Path, tmp_path: Path, server: SMTPTestServer
) -> None:
    source = write(
        tmp_path / "m.eml", message_bytes("a@one.example", "b@two.example", "c@one.example")
    )
    submit(run, db, source)
    status, _, err = run(
        "tracker", "--db", str(db), "run", "--url", url(server), "--split-by-domain",
        "--worker-id", "cli-test", "--lease", "10m",
    )  # fmt: skip
    assert (status, err) == (0, ""), err
    assert sorted(sorted(m.rcpt_tos) for m in server.messages) == [
        ["a@one.example", "c@one.example"],
        ["b@two.example"],
    ]


def test_a_fixed_worker_id_takes_back_what_a_dead_runner_of_that_name_held(
    run: Run, db: Path, tmp_path: Path, server: SMTPTestServer
) -> None:
    tracking_id = submit(run, db, write(tmp_path / "m.eml", message_bytes("bob@example.org")))
    store = SQLiteStore(db)
    try:  # a runner named "runner-1" claimed the message, then died
        (claim,) = store.claim(
            worker="runner-1", now=dt.datetime.now(dt.UTC), lease=dt.timedelta(hours=1), limit=10
        )
    finally:
        store.close()
    assert claim.tracking_id == tracking_id
    base = ("tracker", "--db", str(db), "run", "--url", url(server), "--worker-id")
    status, out, _ = run(*base, "runner-2")  # another name waits for the lease
    assert (status, rows(out)[-1][0].split()[0]) == (0, "messages=0")
    assert states(db, tracking_id) == {"bob@example.org": State.SENDING}
    status, out, _ = run(*base, "runner-1")
    assert (status, rows(out)[0][:3]) == (0, [tracking_id, "bob@example.org", "delivered"])
    assert len(server.messages) == 1


# -- cancel ----------------------------------------------------------------------------------


def test_cancel_reports_what_was_pending(
    run: Run, db: Path, tmp_path: Path, server: SMTPTestServer
) -> None:
    first = submit(run, db, write(tmp_path / "1.eml", message_bytes("bob@example.org")))
    second = submit(
        run, db, write(tmp_path / "2.eml", message_bytes("ann@example.org", "carl@example.org"))
    )
    status, out, err = run("tracker", "--db", str(db), "cancel", second)
    assert (status, err) == (0, "")
    assert rows(out) == [
        [second, "ann@example.org", "cancelled"],
        [second, "carl@example.org", "cancelled"],
    ]
    status, out, err = run("tracker", "--db", str(db), "cancel", second, "no-such-id", first)
    assert status == cli.EX_NOINPUT
    assert err == "mailrelay: no tracked message with id 'no-such-id'\n"
    assert rows(out) == [
        [second, "-", "nothing-pending"],
        [first, "bob@example.org", "cancelled"],
    ]
    assert set(states(db, first).values()) == set(states(db, second).values()) == {State.CANCELLED}
    status, out, _ = run("tracker", "--db", str(db), "run", "--url", url(server))
    assert rows(out) == [["messages=0 delivered=0 deferred=0 bounced=0 expired=0 postponed=0"]]
    assert server.messages == []
    status, out, _ = run("tracker", "--db", str(db), "cancel", "--json", first, "nope")
    assert status == cli.EX_NOINPUT
    assert json.loads(out) == {"cancelled": [{"id": first, "recipients": []}], "unknown": ["nope"]}


def test_cancel_after_a_partial_delivery_cancels_only_the_deferred(
    run: Run, db: Path, tmp_path: Path, server: SMTPTestServer
) -> None:
    source = write(tmp_path / "m.eml", message_bytes("bob@example.org", "later@example.org"))
    tracking_id = submit(run, db, source)
    assert run("tracker", "--db", str(db), "run", "--url", url(server))[0] == 0
    status, out, _ = run("tracker", "--db", str(db), "cancel", tracking_id)
    assert (status, rows(out)) == (0, [[tracking_id, "later@example.org", "cancelled"]])
    assert states(db, tracking_id) == {
        "bob@example.org": State.DELIVERED,
        "later@example.org": State.CANCELLED,
    }


# -- ingest ----------------------------------------------------------------------------------


def delivered_message(run: Run, db: Path, tmp_path: Path, server: SMTPTestServer) -> str:
    """A message submitted with --request-dsn and accepted by the server."""
    source = write(tmp_path / "m.eml", message_bytes("bob@example.org", "ann@example.org"))
    tracking_id = submit(run, db, source, "--request-dsn")
    assert run("tracker", "--db", str(db), "run", "--url", url(server))[0] == 0
    assert set(states(db, tracking_id).values()) == {State.DELIVERED}
    return tracking_id


def returned_report(tmp_path: Path, name: str, *, envid: str | None, action: str) -> Path:
    """A report from a downstream server, built with mailrelay's own DSN builder."""
    raw = build_dsn(
        original=message_bytes("bob@example.org", message_id=f"other-{name}@shop.example"),
        envelope_sender=SENDER,
        recipients=[
            DSNRecipient(
                address="bob@example.org",
                action=action,
                status="5.2.2" if action == "failed" else "2.0.0",
                diagnostic="552 5.2.2 mailbox full" if action == "failed" else None,
                remote_mta="mx.example.org",
            )
        ],
        reporting_mta="relay.example.org",
        envid=envid,
    )
    return write(tmp_path / name, raw)


@pytest.mark.parametrize(
    ("action", "state", "kind"),
    [("failed", "bounced", "bounce"), ("delivered", "delivered+confirmed", "delivered")],
)
def test_ingest_folds_a_report_into_its_message(
    run: Run,
    db: Path,
    tmp_path: Path,
    server: SMTPTestServer,
    *,
    action: str,
    state: str,
    kind: str,
) -> None:
    tracking_id = delivered_message(run, db, tmp_path, server)
    report = returned_report(tmp_path, "returned.eml", envid=tracking_id, action=action)
    status, out, err = run("tracker", "--db", str(db), "ingest", str(report))
    assert (status, err) == (0, "")
    assert rows(out) == [
        [str(report), kind, tracking_id, "envid", "bob@example.org", action,
         "5.2.2" if action == "failed" else "2.0.0", state, "changed"],
    ]  # fmt: skip
    recipients = {str(r.address): r for r in record(db, tracking_id).recipients}
    assert recipients["bob@example.org"].state.value == state.split("+", maxsplit=1)[0]
    assert recipients["bob@example.org"].attempts[-1].source == "dsn"
    assert recipients["ann@example.org"].state is State.DELIVERED  # not named in the report
    # The same report again: matched, but nothing changes.
    status, out, _ = run("tracker", "--db", str(db), "ingest", str(report))
    assert (status, rows(out)[0][-2:]) == (0, [state, "unchanged"])


def test_ingest_reads_standard_input_and_says_what_matched_nothing(
    run: Run, db: Path, tmp_path: Path, server: SMTPTestServer
) -> None:
    tracking_id = delivered_message(run, db, tmp_path, server)
    stranger = returned_report(tmp_path, "stranger.eml", envid="unknown-envid", action="failed")
    auto_reply = write(
        tmp_path / "ooo.eml",
        b"From: bob@example.org\r\nTo: alice@shop.example\r\nSubject: Out of office\r\n"
        b"Auto-Submitted: auto-replied\r\n\r\nI am away.\r\n",
    )
    matching = returned_report(tmp_path, "matching.eml", envid=tracking_id, action="failed")
    status, out, err = run(
        "tracker", "--db", str(db), "ingest", str(stranger), str(auto_reply),
        str(tmp_path / "missing.eml"), "-",
        stdin=matching.read_bytes(),
    )  # fmt: skip
    assert status == cli.EX_NOINPUT  # one file could not be read; the others were
    assert (
        err
        == f"mailrelay: cannot read {str(tmp_path / 'missing.eml')!r}: No such file or directory\n"
    )
    assert [(r[0], r[1], r[2], r[-1]) for r in rows(out)] == [
        (str(stranger), "bounce", "-", "unmatched"),
        (str(auto_reply), "auto-reply", "-", "ignored"),
        ("-", "bounce", tracking_id, "changed"),
    ]
    assert all(len(r) == 9 for r in rows(out))
    assert states(db, tracking_id)["bob@example.org"] is State.BOUNCED

    status, out, _ = run("tracker", "--db", str(db), "ingest", "--json", str(matching))
    assert status == 0
    (document,) = json.loads(out)
    assert (document["result"], document["tracking_id"], document["matched_by"]) == (
        "matched",
        tracking_id,
        "envid",
    )
    assert document["recipients"] == [
        {
            "address": "bob@example.org",
            "action": "failed",
            "status": "5.2.2",
            "state": "bounced",
            "confirmed": False,
            "changed": False,
        }
    ]
    assert document["report"]["kind"] == "bounce"


def test_ingest_with_verp_matches_by_the_address_the_report_came_back_to(
    run: Run, db: Path, tmp_path: Path, server: SMTPTestServer
) -> None:
    source = write(tmp_path / "m.eml", message_bytes("bob@example.org"))
    tracking_id = submit(run, db, source, "--verp", "bounces@shop.example")
    assert run("tracker", "--db", str(db), "run", "--url", url(server))[0] == 0
    (sent,) = server.messages
    assert sent.mail_from == f"bounces+{tracking_id}@shop.example"
    # A report with no ENVID, about a Message-ID the store does not know: only the
    # address it was sent to names the message.
    raw = build_dsn(
        original=message_bytes("bob@example.org", message_id="rewritten@relay.example.org"),
        envelope_sender=sent.mail_from,
        recipients=[DSNRecipient(address="bob@example.org", action="failed", status="5.1.1")],
        reporting_mta="relay.example.org",
    )
    report = write(tmp_path / "verp.eml", raw)
    status, out, _ = run("tracker", "--db", str(db), "ingest", str(report))
    assert (status, rows(out)[0][1:4]) == (0, ["bounce", "-", "-"])  # without --verp: unmatched
    assert rows(out)[0][-1] == "unmatched"
    status, out, _ = run(
        "tracker", "--db", str(db), "ingest", "--verp", "bounces@shop.example", str(report)
    )
    assert (status, rows(out)) == (
        0,
        [[str(report), "bounce", tracking_id, "verp", "bob@example.org", "failed", "5.1.1",
          "bounced", "changed"]],
    )  # fmt: skip


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_ingest_answers_one_line_for_any_bytes(
    tmp_path_factory: pytest.TempPathFactory, raw: bytes
) -> None:
    path = tmp_path_factory.mktemp("ingest") / "queue.sqlite"
    SQLiteStore(path).close()
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw)))
        status = cli.main(["tracker", "--db", str(path), "ingest", "-"])
    assert (status, err.getvalue()) == (0, "")
    ((*fields, result),) = rows(out.getvalue())
    assert len(fields) == 8
    assert result in {"unmatched", "ignored"}  # the store is empty: nothing to match


# -- usage errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["run", "--url", "memory://", "--delay-warning", "1h"], "--delay-warning needs --dsn-url"),
        (["run", "--url", "memory://", "--dsn-url", ""], "--dsn-url is empty"),
        (["run", "--url", "memory://", "--lease", "0s"], "argument --lease"),
        (["run", "--url", "memory://", "--retry-initial", "0"], "argument --retry-initial"),
        (["run", "--url", "memory://", "--max-age", "soon"], "argument --max-age"),
        (["run", "--url", "memory://", "--retry-max-delay", "-5m"], "argument --retry-max-delay"),
        (["run", "--url", "memory://", "--reporting-mta", "a b"], "argument --reporting-mta"),
        (["run", "--url", "memory://", "--delay-warning", "1x"], "argument --delay-warning"),
        (["submit", "--verp", "not-an-address", "m.eml"], "argument --verp"),
        (["submit", "--ret", "most", "m.eml"], "argument --ret"),
        (["submit"], "FILE"),
        (["submit", "-", "-"], "standard input (-) can be named only once"),
        (["cancel"], "ID"),
        (["ingest"], "FILE"),
        (["ingest", "-", "-"], "standard input (-) can be named only once"),
        (["ingest", "--verp", "bounces+x@shop.example", "-"], "argument --verp"),
    ],
)
def test_usage_errors_exit_64_with_a_clear_message(
    run: Run, db: Path, argv: list[str], said: str
) -> None:
    status, out, err = run("tracker", "--db", str(db), *argv)
    assert (status, out) == (cli.EX_USAGE, "")
    assert err.startswith(f"usage: mailrelay tracker {argv[0]}")
    assert said in err
    assert "Traceback" not in err
