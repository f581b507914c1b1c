"""The ``mailrelay tracker`` commands: create, feed, inspect and run a delivery tracker's
SQLite store without writing Python. ``docs/cli.md`` (section ``tracker``) is their manual.

Rules of this module (the rules of :mod:`mailrelay.cli`, whose helpers, exit statuses and
error handling these commands share, apply too):

* ``--db`` names a store that must exist: a mistyped path is :data:`~mailrelay.cli.EX_NOINPUT`,
  never a new empty database that no runner reads. Only ``init`` creates one.
* Each option maps onto one :class:`~mailrelay.tracker.DeliveryTracker` argument, on the
  command where that argument takes effect. DSN requests (``--request-dsn``, ``--notify``,
  ``--ret``, ``--envid``) and the VERP sender shape the envelope a message is *stored* with,
  so they belong to ``submit``; retries, generated reports, splitting and leases are decided
  when *sending*, so they belong to ``run``; ``ingest`` takes ``--verp`` to recognise a
  report by the address it came back to.
* ``submit`` stores all its files or none: every message and envelope is read and checked
  first, then one ``submit_many`` commit stores them (an unparsable file is
  :data:`~mailrelay.cli.EX_DATAERR`, naming the file, and nothing is stored).
* ``cancel`` and ``ingest`` go on past an unknown id or an unreadable file, say so on
  stderr, and end with :data:`~mailrelay.cli.EX_NOINPUT`; a report that matches nothing
  is an answer (status 0), not an error.
* A value the tracker would refuse (a zero lease, a zero retry delay, a delay warning
  without a transport for it) is a usage error here, naming the option, before anything
  is opened.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import re
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from mailrelay.address import Address
from mailrelay.cli import (
    _AUTH_SCHEMES,
    _NETWORK_SCHEMES,
    EX_NOINPUT,
    EX_OK,
    InputError,
    UsageError,
    _describe,
    _duration,
    _emit_json,
    _envelope,
    _field,
    _message_from,
    _one_line,
    _open_transport,
    _positive_float,
    _positive_int,
    _report_json,
    _row,
    _time,
    _transport_options,
    read_input,
)
from mailrelay.envelope import Envelope
from mailrelay.errors import InvalidAddress, MessageError
from mailrelay.message import Message
from mailrelay.tracker import (
    VERP,
    DeliveryTracker,
    DSNKind,
    DSNMatch,
    DSNReport,
    MessageRecord,
    RetryPolicy,
    SQLiteStore,
    State,
    TrackerEvent,
    verp_encode,
)
from mailrelay.tracker.store import Attempt, RecipientRecord
from mailrelay.transport import MemoryTransport, Transport, TransportURL

__all__ = ["add_parser"]

log = logging.getLogger(__name__)

#: The ``--dsn-url`` value that sends reports through the ``--url`` transport.
SAME_TRANSPORT = "same"
# A host name for Reporting-MTA and MAILER-DAEMON@: ASCII labels (A-labels for an IDN).
_HOST_NAME = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
# The longest AGE an option takes: 100 years, longer than any mail is kept.
_MAX_AGE = dt.timedelta(days=36_500)
# DSN kinds the tracker never folds into a record: not about a delivery.
_IGNORED_KINDS = frozenset({DSNKind.AUTO_REPLY, DSNKind.FEEDBACK, DSNKind.NOT_A_REPORT})


# -- option values -------------------------------------------------------------------------


def _age(text: str) -> dt.timedelta:
    """An AGE of at most :data:`_MAX_AGE` (a longer one, added to or taken from a date,
    would leave the calendar: an OverflowError in the middle of a command)."""
    try:
        value = _duration(text)
    except OverflowError:
        value = _MAX_AGE + _MAX_AGE
    if value > _MAX_AGE:
        raise argparse.ArgumentTypeError(f"must be at most {_MAX_AGE.days}d: {text!r}")
    return value


def _positive_duration(text: str) -> dt.timedelta:
    """An AGE that must be more than nothing (a retry delay, a lease, a maximum age)."""
    value = _age(text)
    if value <= dt.timedelta(0):
        raise argparse.ArgumentTypeError(f"must be longer than 0s: {text!r}")
    return value


def _host_name(text: str) -> str:
    if not _HOST_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"not a host name: {text!r} (ASCII letters, digits, hyphens and dots; "
            "an IDN in its xn-- form)"
        )
    return text.rstrip(".")


def _verp(text: str) -> VERP:
    """``--verp local@domain``: the bounce mailbox whose ``local+ID@domain`` addresses
    carry tracking ids."""
    try:
        address = Address.parse(text)
        # Made once now with the longest id, so that a local part that cannot carry one
        # (a separator in it, too long) is refused here rather than at every submit.
        verp_encode(address.local_part, address.ascii_domain, "0" * 32)
    except InvalidAddress as exc:
        raise argparse.ArgumentTypeError(f"not a usable VERP mailbox: {exc}") from None
    return VERP(local=address.local_part, domain=address.ascii_domain)


# -- the parser ----------------------------------------------------------------------------


def add_parser(
    commands: argparse._SubParsersAction[Any],
    common: argparse.ArgumentParser,
) -> None:
    """Add ``tracker`` and its actions to ``mailrelay``'s subcommands.

    Args:
        commands: the top-level subparsers.
        common: the parent parser holding ``--json`` and ``--debug``.
    """
    tracker = commands.add_parser(
        "tracker",
        help="create, feed, inspect or run a delivery tracker's SQLite store",
        description="Create (init), feed (submit, cancel, ingest), inspect (status, list) "
        "or run a delivery tracker's SQLite store.",
    )
    tracker.add_argument("--db", required=True, metavar="PATH", help="the SQLite store")
    actions = tracker.add_subparsers(dest="action", metavar="ACTION", required=True)

    init = actions.add_parser(
        "init", parents=[common], help="create the store (an existing one is left as it is)"
    )
    init.set_defaults(parser=init, handler=_cmd_init)

    status = actions.add_parser(
        "status", parents=[common], help="one message's recipients and attempts"
    )
    status.add_argument("tracking_id", metavar="ID")
    status.set_defaults(parser=status, handler=_cmd_status)

    listing = actions.add_parser("list", parents=[common], help="tracked messages, oldest first")
    listing.add_argument(
        "--state",
        choices=[s.value for s in State],
        help="only messages with a recipient in this state",
    )
    listing.add_argument(
        "--older-than",
        type=_age,
        metavar="AGE",
        help="only messages submitted more than AGE ago (90s, 15m, 2h, 5d, 1w)",
    )
    listing.add_argument("--limit", type=_positive_int, metavar="N", help="at most N messages")
    listing.set_defaults(parser=listing, handler=_cmd_list)

    submit = actions.add_parser(
        "submit", parents=[common], help="store messages for delivery; print their tracking ids"
    )
    _submit_options(submit)
    submit.set_defaults(parser=submit, handler=_cmd_submit)

    cancel = actions.add_parser(
        "cancel", parents=[common], help="cancel the recipients of messages not yet resolved"
    )
    cancel.add_argument("tracking_ids", nargs="+", metavar="ID")
    cancel.set_defaults(parser=cancel, handler=_cmd_cancel)

    ingest = actions.add_parser(
        "ingest",
        parents=[common],
        help="fold returned bounces and DSNs into the tracked messages they are about",
    )
    ingest.add_argument(
        "--verp",
        type=_verp,
        metavar="LOCAL@DOMAIN",
        help="also match reports by the VERP address they came back to (as submit's --verp)",
    )
    ingest.add_argument(
        "files", nargs="+", metavar="FILE", help="a returned message; - is standard input"
    )
    ingest.set_defaults(parser=ingest, handler=_cmd_ingest)

    run = actions.add_parser(
        "run", parents=[common], help="send what is due through a transport URL"
    )
    _transport_options(run)
    _run_options(run)
    run.set_defaults(parser=run, handler=_cmd_run)


def _submit_options(submit: argparse.ArgumentParser) -> None:
    submit.add_argument(
        "--sender",
        "--from",
        dest="sender",
        metavar="ADDR",
        help='envelope sender (MAIL FROM); "" is the null sender <>; default: the headers',
    )
    submit.add_argument(
        "--to",
        action="append",
        default=[],
        metavar="ADDR",
        help="envelope recipient (RCPT TO); repeat for more; default: To, Cc and Bcc",
    )
    submit.add_argument(
        "--request-dsn",
        action="store_true",
        help="ask servers for DSNs: ENVID = the tracking id, NOTIFY=SUCCESS,FAILURE,DELAY "
        "and RET=HDRS unless --envid, --notify, --ret say otherwise",
    )
    submit.add_argument(
        "--notify",
        metavar="LIST",
        help="DSN NOTIFY for every recipient: NEVER, or some of SUCCESS,FAILURE,DELAY",
    )
    submit.add_argument("--ret", choices=["FULL", "HDRS"], type=str.upper, help="DSN RET")
    submit.add_argument("--envid", metavar="ID", help="DSN ENVID, echoed in the reports")
    submit.add_argument(
        "--requiretls", action="store_true", help="REQUIRETLS (RFC 8689): TLS on every hop"
    )
    submit.add_argument(
        "--verp",
        type=_verp,
        metavar="LOCAL@DOMAIN",
        help="send from LOCAL+ID@DOMAIN, ID being the tracking id, so that any bounce names "
        "its message (not for a null sender)",
    )
    submit.add_argument(
        "files", nargs="+", metavar="FILE", help="an RFC 5322 message; - is standard input"
    )


def _run_options(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "--forever",
        action="store_true",
        help="keep running, sleeping until work is due, until SIGINT or SIGTERM",
    )
    run.add_argument(
        "--idle",
        type=_positive_float,
        default=60.0,
        metavar="S",
        help="with --forever: look for work from other processes at least this often (60 s)",
    )
    run.add_argument(
        "--dsn-url",
        metavar="URL",
        help="generate failure reports (RFC 3464) to the sender and send them through this "
        f"transport URL; {SAME_TRANSPORT!r} uses --url's transport",
    )
    run.add_argument(
        "--reporting-mta",
        type=_host_name,
        metavar="NAME",
        help="our host name in generated reports (Reporting-MTA; default localhost)",
    )
    run.add_argument(
        "--delay-warning",
        type=_age,
        metavar="AGE",
        help="with --dsn-url: warn the sender once (Action: delayed) about a recipient still "
        "deferred when its message is AGE old",
    )
    run.add_argument(
        "--max-age",
        type=_positive_duration,
        metavar="AGE",
        help="give up on (expire) a recipient still deferred AGE after submission (5d)",
    )
    run.add_argument(
        "--retry-initial",
        type=_positive_duration,
        metavar="AGE",
        help="the first retry's delay (5m); each further one doubles",
    )
    run.add_argument(
        "--retry-max-delay",
        type=_positive_duration,
        metavar="AGE",
        help="the longest delay between retries (4h)",
    )
    run.add_argument(
        "--split-by-domain",
        action="store_true",
        help="one transaction per recipient domain (for mx://); default: one per message",
    )
    run.add_argument(
        "--worker-id",
        metavar="NAME",
        help="this runner's name in leases; a fixed name takes back at start what a dead "
        "runner of that name held (never give two live runners the same name)",
    )
    run.add_argument(
        "--lease",
        type=_positive_duration,
        metavar="AGE",
        help="how long a claim is held before another runner may take it over (15m)",
    )


# -- shared --------------------------------------------------------------------------------


def _open_store(path: str) -> SQLiteStore:
    """An existing store (a mistyped path must not create an empty database)."""
    if not Path(path).is_file():
        raise InputError(f"no tracker database at {path!r}")
    return SQLiteStore(path)


def _offline_tracker(store: SQLiteStore, **settings: Any) -> DeliveryTracker:
    """A tracker for the commands that only touch the store (submit, cancel, ingest).

    ``DeliveryTracker`` needs a transport; these commands never send, so it gets one that
    keeps nothing (the messages go when ``tracker run`` claims them).
    """
    try:
        return DeliveryTracker(MemoryTransport(), store, **settings)
    except BaseException:
        store.close()
        raise


def _read_bytes(name: str) -> bytes:
    """The bytes of file ``name`` (``-``: standard input); :class:`InputError` if unreadable."""
    try:
        # Bounded (MAX_INPUT_BYTES): a mailbox of gigabytes piped to ``ingest -`` is
        # refused, not held in memory.
        return read_input(name, "message")
    except OSError as exc:
        raise InputError(f"cannot read {name!r}: {exc.strerror or exc}") from exc


def _once_from_stdin(files: Sequence[str]) -> None:
    if list(files).count("-") > 1:
        raise UsageError("standard input (-) can be named only once")


def _sender_text(envelope: Envelope) -> str:
    return "<>" if envelope.sender is None else str(envelope.sender)


def _sender_json(envelope: Envelope) -> str | None:
    return None if envelope.sender is None else str(envelope.sender)


# -- init ----------------------------------------------------------------------------------


def _cmd_init(args: argparse.Namespace) -> int:
    path = Path(args.db)
    existed = path.exists()
    if existed and not path.is_file():
        raise InputError(f"{args.db!r} exists and is not a file")
    SQLiteStore(path).close()  # creates the schema, or checks an existing store's
    if args.json:
        _emit_json({"db": args.db, "created": not existed})
    else:
        print(_row("exists" if existed else "created", args.db))
    return EX_OK


# -- status and list -----------------------------------------------------------------------


def _attempt_json(a: Attempt) -> dict[str, Any]:
    return {
        "at": _time(a.at),
        "source": a.source,
        "host": a.host,
        "code": a.code,
        "enhanced": a.enhanced,
        "text": a.text,
    }


def _recipient_record_json(r: RecipientRecord) -> dict[str, Any]:
    return {
        "address": str(r.address),
        "state": r.state.value,
        "confirmed": r.confirmed,
        "next_attempt_at": _time(r.next_attempt_at),
        "attempts": [_attempt_json(a) for a in r.attempts],
    }


def _states(record: MessageRecord) -> str:
    return ",".join(f"{state.value}={count}" for state, count in record.states().items())


def _record_json(record: MessageRecord, *, attempts: bool) -> dict[str, Any]:
    document: dict[str, Any] = {
        "id": record.id,
        "created_at": _time(record.created_at),
        "message_id": record.message_id,
        "sender": _sender_json(record.envelope),
        "size": record.size,
        "notification": record.notification,
        "states": {state.value: count for state, count in record.states().items()},
    }
    if attempts:
        document["recipients"] = [_recipient_record_json(r) for r in record.recipients]
    return document


def _last_attempt(r: RecipientRecord) -> str | None:
    if not r.attempts:
        return None
    a = r.attempts[-1]
    text = _one_line(a.text)
    # A reply's text usually starts with its enhanced status already: say it once.
    enhanced = "" if not a.enhanced or text.startswith(a.enhanced) else a.enhanced
    words = [str(a.code) if a.code else "", enhanced, text]
    return " ".join(w for w in words if w) or a.source


def _state_text(r: RecipientRecord) -> str:
    return f"{r.state.value}+confirmed" if r.confirmed else r.state.value


def _cmd_status(args: argparse.Namespace) -> int:
    store = _open_store(args.db)
    try:
        record = store.get(args.tracking_id)
    finally:
        store.close()
    if record is None:
        raise InputError(f"no tracked message with id {args.tracking_id!r}")
    if args.json:
        _emit_json(_record_json(record, attempts=True))
        return EX_OK
    for key, value in (
        ("id", record.id),
        ("created", _time(record.created_at)),
        ("message-id", record.message_id),
        ("sender", _sender_text(record.envelope)),
        ("size", record.size),
        ("states", _states(record)),
    ):
        print(f"{key}: {_field(value)}")
    for r in record.recipients:
        print(
            _row(
                r.address,
                _state_text(r),
                len(r.attempts),
                _time(r.next_attempt_at),
                _last_attempt(r),
            )
        )
    return EX_OK


def _cmd_list(args: argparse.Namespace) -> int:
    store = _open_store(args.db)
    try:
        before = None
        if args.older_than is not None:
            before = dt.datetime.now(dt.UTC) - args.older_than
        state = None if args.state is None else State(args.state)
        records = store.find(state=state, created_before=before, limit=args.limit)
    finally:
        store.close()
    if args.json:
        _emit_json([_record_json(r, attempts=False) for r in records])
        return EX_OK
    for record in records:
        print(
            _row(
                record.id,
                _time(record.created_at),
                _states(record),
                _sender_text(record.envelope),
                record.message_id,
            )
        )
    return EX_OK


# -- submit --------------------------------------------------------------------------------


def _read_submission(
    name: str, stack: contextlib.ExitStack[bool | None], args: argparse.Namespace
) -> tuple[Message, Envelope]:
    """The message in ``name`` and its envelope; a bad one names its file."""
    try:
        message: Message = stack.enter_context(_message_from(name))
        return message, _envelope(args, message)
    except (MessageError, InvalidAddress) as exc:
        # Same class (same status), with the file named: several may be given.
        shown = "standard input" if name == "-" else repr(name)
        raise type(exc)(f"{shown}: {exc}") from exc


def _cmd_submit(args: argparse.Namespace) -> int:
    _once_from_stdin(args.files)
    store = _open_store(args.db)
    tracker = _offline_tracker(store, request_dsn=args.request_dsn, verp=args.verp)
    try:
        # Every file read and checked before anything is stored: all or none.
        with contextlib.ExitStack() as stack:
            pairs = [_read_submission(name, stack, args) for name in args.files]
            ids = tracker.submit_many(pairs)
        records = [tracker.status(tracking_id) for tracking_id in ids]
    finally:
        tracker.close()
    if args.json:
        _emit_json(
            [
                {
                    "file": name,
                    "id": record.id,
                    "message_id": record.message_id,
                    "sender": _sender_json(record.envelope),
                    "envid": record.envelope.envid,
                    "recipients": [str(r.address) for r in record.recipients],
                }
                for name, record in zip(args.files, records, strict=True)
            ]
        )
        return EX_OK
    for name, record in zip(args.files, records, strict=True):
        recipients = ",".join(str(r.address) for r in record.recipients)
        print(_row(record.id, name, _sender_text(record.envelope), recipients))
    return EX_OK


# -- cancel --------------------------------------------------------------------------------


def _cmd_cancel(args: argparse.Namespace) -> int:
    store = _open_store(args.db)
    tracker = _offline_tracker(store)
    done: list[tuple[str, tuple[Address, ...]]] = []
    unknown: list[str] = []
    try:
        for tracking_id in args.tracking_ids:
            try:
                done.append((tracking_id, tracker.cancel(tracking_id)))
            except KeyError:
                unknown.append(tracking_id)
                shown = _field(tracking_id)
                print(f"mailrelay: no tracked message with id {shown!r}", file=sys.stderr)
    finally:
        tracker.close()
    if args.json:
        _emit_json(
            {
                "cancelled": [
                    {"id": tracking_id, "recipients": [str(a) for a in addresses]}
                    for tracking_id, addresses in done
                ],
                "unknown": unknown,
            }
        )
    else:
        for tracking_id, addresses in done:
            if not addresses:
                print(_row(tracking_id, None, "nothing-pending"))
            for address in addresses:
                print(_row(tracking_id, address, "cancelled"))
    return EX_NOINPUT if unknown else EX_OK


# -- ingest --------------------------------------------------------------------------------


def _report_entry(report: DSNReport, address: Address) -> tuple[str | None, str | None]:
    """The action and status the report gives ``address`` (as the tracker matches a block:
    the address, Final-Recipient or Original-Recipient, case aside)."""
    wanted = str(address).lower()
    for item in report.recipients:
        for text in (item.address, item.final_recipient, item.original_recipient):
            if text and text.rpartition(";")[2].strip().strip("<>").lower() == wanted:
                return item.action.value, item.status
    return None, None


def _ingest_result(match: DSNMatch) -> str:
    if match.report.kind in _IGNORED_KINDS:
        return "ignored"  # an auto-reply, a feedback report, not a report at all
    if match.tracking_id is None:
        return "unmatched"
    return "matched"


def _ingested_recipients(match: DSNMatch, record: MessageRecord | None) -> list[dict[str, Any]]:
    recipients = []
    for address in match.recipients:
        action, status = _report_entry(match.report, address)
        now = None if record is None else record.recipient(address)
        recipients.append(
            {
                "address": str(address),
                "action": action,
                "status": status,
                "state": None if now is None else now.state.value,
                "confirmed": None if now is None else now.confirmed,
                "changed": address in match.changed,
            }
        )
    return recipients


def _cmd_ingest(args: argparse.Namespace) -> int:
    _once_from_stdin(args.files)
    store = _open_store(args.db)
    tracker = _offline_tracker(store, verp=args.verp)
    documents: list[dict[str, Any]] = []
    unreadable = False
    try:
        for name in args.files:
            try:
                raw = _read_bytes(name)
            except InputError as exc:
                unreadable = True
                print(f"mailrelay: {_describe(exc)}", file=sys.stderr)
                documents.append({"file": name, "result": "unreadable", "error": str(exc)})
                continue
            match = tracker.ingest_dsn(raw)
            record = None if match.tracking_id is None else store.get(match.tracking_id)
            documents.append(
                {
                    "file": name,
                    "result": _ingest_result(match),
                    "kind": match.report.kind.value,
                    "tracking_id": match.tracking_id,
                    "matched_by": match.matched_by,
                    "recipients": _ingested_recipients(match, record),
                    "report": _report_json(match.report),
                }
            )
    finally:
        tracker.close()
    if args.json:
        _emit_json(documents)
    else:
        for document in documents:
            _print_ingested(document)
    return EX_NOINPUT if unreadable else EX_OK


def _print_ingested(document: dict[str, Any]) -> None:
    """One line per recipient the report matched; one line for a report matching none."""
    if document["result"] == "unreadable":
        return  # said on stderr
    head = (document["file"], document["kind"], document["tracking_id"], document["matched_by"])
    if not document["recipients"]:
        result = document["result"]
        shown = "no-recipient" if result == "matched" else result
        print(_row(*head, None, None, None, None, shown))
    for r in document["recipients"]:
        state = f"{r['state']}+confirmed" if r["confirmed"] else r["state"]
        changed = "changed" if r["changed"] else "unchanged"
        print(_row(*head, r["address"], r["action"], r["status"], state, changed))


# -- run -----------------------------------------------------------------------------------


def _run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The DeliveryTracker arguments ``run``'s options give (only those given)."""
    if args.delay_warning is not None and args.dsn_url is None:
        raise UsageError(
            "--delay-warning needs --dsn-url: a delay warning is a report, and --dsn-url says "
            f"how to send reports ({SAME_TRANSPORT!r} for --url's transport)"
        )
    if args.dsn_url == "":
        raise UsageError(f"--dsn-url is empty: give a transport URL or {SAME_TRANSPORT!r}")
    retry = {
        name: value
        for name, value in (
            ("initial", args.retry_initial),
            ("max_delay", args.retry_max_delay),
            ("max_age", args.max_age),
        )
        if value is not None
    }
    settings: dict[str, Any] = {
        "retry": RetryPolicy(**retry),
        "delay_warning_after": args.delay_warning,
        "split_by_domain": args.split_by_domain,
        "worker_id": args.worker_id,
    }
    if args.reporting_mta is not None:
        settings["reporting_mta"] = args.reporting_mta
    if args.lease is not None:
        settings["lease"] = args.lease
    return settings


def _open_dsn_transport(args: argparse.Namespace, transport: Transport) -> Transport | None:
    """The transport for generated reports: none, ``--url``'s (``same``), or its own URL.

    Its own URL takes ``--ca-file`` and, when it names a user, the password as ``--url``
    does (``--password-env`` or ``$MAILRELAY_PASSWORD``, else the URL's); ``--user``,
    ``--auth-mechanism``, ``--oauth2-token-command`` and DKIM signing are ``--url``'s only.
    """
    if args.dsn_url is None:
        return None
    if args.dsn_url == SAME_TRANSPORT:
        return transport  # closing it twice is harmless (Transport.close is idempotent)
    parsed = TransportURL.parse(args.dsn_url)
    own = argparse.Namespace(**vars(args))  # shares ``secrets``: redaction covers both
    own.url = args.dsn_url
    own.user = own.auth_mechanism = own.oauth2_token_command = None
    own.dkim_key = own.dkim_domain = own.dkim_selector = None
    if not (parsed.scheme in _AUTH_SCHEMES and parsed.username):
        own.password_env = None
    if parsed.scheme not in _NETWORK_SCHEMES:
        own.ca_file = None
    return _open_transport(own)


def _print_event(event: TrackerEvent, out: TextIO) -> None:
    attempt = event.attempt
    recipient = event.recipient
    line = _row(
        event.tracking_id,
        None if recipient is None else recipient.address,
        event.kind.value,
        None if attempt is None else attempt.code,
        None if attempt is None else attempt.enhanced,
        None if attempt is None else _one_line(attempt.text),
    )
    print(line, file=out, flush=True)


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Set ``stop`` on SIGINT and SIGTERM while the block runs (main thread only; elsewhere
    the caller's own signal handling stays as it is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        log.info("%s: stopping after the attempt in progress", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _open_tracker(args: argparse.Namespace) -> DeliveryTracker:
    """The tracker ``run`` drives: the store, ``--url``'s transport, ``--dsn-url``'s, and
    the settings of ``run``'s options (checked before anything is opened)."""
    settings = _run_settings(args)
    store = _open_store(args.db)
    transport: Transport | None = None
    dsn_transport: Transport | None = None
    try:
        transport = _open_transport(args)
        dsn_transport = _open_dsn_transport(args, transport)
        return DeliveryTracker(transport, store, dsn_transport=dsn_transport, **settings)
    except BaseException:
        store.close()
        for opened in (transport, dsn_transport):
            if opened is not None:
                opened.close()
        raise


def _cmd_run(args: argparse.Namespace) -> int:
    tracker = _open_tracker(args)
    try:
        if args.worker_id is not None:
            # A fixed name: what a runner of this name held when it died is due again now,
            # not when its leases expire.
            released = tracker.release_leases()
            if released:
                log.info("took back %d recipients leased to %s", released, args.worker_id)
        if not args.json:
            out = sys.stdout
            for kind in ("delivered", "deferred", "bounced", "expired"):
                tracker.on(kind, lambda event: _print_event(event, out))
        if args.forever:
            stop = threading.Event()
            with _stop_on_signals(stop):
                tracker.run_forever(stop, idle=args.idle)
            return EX_OK
        summary = tracker.run_pending()
    finally:
        tracker.close()
    counts = {
        "messages": summary.messages,
        "delivered": summary.delivered,
        "deferred": summary.deferred,
        "bounced": summary.bounced,
        "expired": summary.expired,
        "postponed": summary.postponed,
    }
    if args.json:
        _emit_json(counts)
    else:
        print(" ".join(f"{key}={value}" for key, value in counts.items()))
    return EX_OK
