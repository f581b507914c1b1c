"""SendmailTransport with msmtp (Debian's ``msmtp``, a relay-only sendmail) in front of a real
server (aiosmtpd): the second sendmail implementation the transport is tested against, after
Postfix's. msmtp knows no ``-V`` and fails a whole message for ``-N``/``-R`` when its server
offers no DSN, so it is given no DSN options."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mailrelay.envelope import Envelope, Notify, Recipient, Ret
from mailrelay.errors import LocalMTAError
from mailrelay.message import Message
from mailrelay.results import DeliveryResult, Outcome, error_status
from mailrelay.transport.sendmail import SendmailTransport
from tests.peers.aiosmtpd_server import AiosmtpdFactory, AiosmtpdServer
from tests.transport.helpers import FLAVOURS, Flavour, run

MSMTP = shutil.which("msmtp") or "/usr/bin/msmtp"


@pytest.fixture
def relay(make_aiosmtpd: AiosmtpdFactory) -> AiosmtpdServer:
    return make_aiosmtpd(starttls=False, auth=False)


@pytest.fixture
def msmtp_config(tmp_path: Path, relay: AiosmtpdServer) -> Path:
    """An msmtp account for the relay (msmtp refuses a config others can read)."""
    path = tmp_path / "msmtprc"
    path.write_text(
        f"account default\nhost {relay.host}\nport {relay.port}\ntls off\nauth off\n"
        "from fallback@mailrelay.test\n"
    )
    path.chmod(0o600)
    return path


def send(flavour: Flavour, config: Path, message: Message, envelope: Envelope) -> DeliveryResult:
    transport = SendmailTransport(command=MSMTP, arguments=["-C", str(config)], timeout=20)
    if flavour == "sync":
        return transport.send(message, envelope)
    return run(transport.asend(message, envelope))


def message_to(*recipients: str) -> Message:
    return Message.build(
        sender="ann@mailrelay.test",
        to=list(recipients),
        subject="through msmtp",
        text="a line\n.\n..two dots\nthe end\n",
    )


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_message_asking_for_dsns_goes_through_msmtp(
    flavour: Flavour, relay: AiosmtpdServer, msmtp_config: Path
) -> None:
    """The tracker's envelopes carry an ENVID and NOTIFY: msmtp refused them (exit 64 for
    -V; exit 69 for -N when the server has no DSN), a permanent error for every message."""
    message = message_to("bob@mailrelay.test", "cy@mailrelay.test")
    envelope = Envelope(
        "ann@mailrelay.test",
        [
            Recipient("bob@mailrelay.test", notify=frozenset({Notify.SUCCESS, Notify.FAILURE})),
            Recipient("cy@mailrelay.test", notify=frozenset({Notify.SUCCESS, Notify.FAILURE})),
        ],
        ret=Ret.HDRS,
        envid="tracking-id-1",
    )
    result = send(flavour, msmtp_config, message, envelope)
    assert [r.outcome for r in result.recipients] == [Outcome.ACCEPTED, Outcome.ACCEPTED]
    (received,) = relay.messages
    assert received.mail_from == "ann@mailrelay.test"
    assert list(received.rcpt_tos) == ["bob@mailrelay.test", "cy@mailrelay.test"]
    assert received.content == message.as_bytes()  # dot lines and all, byte for byte


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_the_null_sender(flavour: Flavour, relay: AiosmtpdServer, msmtp_config: Path) -> None:
    message = message_to("bob@mailrelay.test")
    result = send(flavour, msmtp_config, message, Envelope(None, ["bob@mailrelay.test"]))
    assert result.ok
    (received,) = relay.messages
    assert received.mail_from in ("", "<>")  # MAIL FROM:<> (aiosmtpd's spelling of it)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(("local", "transient"), [("reject", False), ("tempfail", True)])
def test_a_refusal_is_a_local_mta_error_of_the_right_class(
    flavour: Flavour, relay: AiosmtpdServer, msmtp_config: Path, local: str, transient: bool
) -> None:
    """msmtp has no queue: the relay's refusal is its exit status, mapped by sysexits."""
    message = message_to(f"{local}@mailrelay.test")
    with pytest.raises(LocalMTAError) as caught:
        send(flavour, msmtp_config, message, Envelope.from_message(message))
    assert caught.value.is_transient is transient
    # The relay's own enhanced status (450 4.2.1, 550 5.1.1), not msmtp's exit status's.
    assert str(error_status(caught.value)) == ("4.2.1" if transient else "5.1.1")
    assert relay.messages == []
