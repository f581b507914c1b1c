"""Hypothesis properties of ClientConnection: splitting, garbage, and a rule-based state machine."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from mailrelay.address import Address
from mailrelay.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from mailrelay.protocol import (
    NEED_DATA,
    Auth,
    AuthAbort,
    AuthContinue,
    Bdat,
    ClientConnection,
    Command,
    ConnectionClosed,
    Data,
    DataChunk,
    Ehlo,
    EndOfData,
    Event,
    Greeting,
    Helo,
    Lhlo,
    LMTPResponse,
    MailFrom,
    Noop,
    Quit,
    RcptTo,
    Response,
    Rset,
    ServiceClosing,
    StartTLS,
    State,
    Vrfy,
)
from mailrelay.protocol.transitions import (
    LMTP_ONLY,
    PIPELINE_CONTINUES,
    PIPELINE_JOINS,
    SEND,
    SMTP_ONLY,
)

A = Address.parse("a@example.org")
B = Address.parse("b@example.org")
RECIPIENTS = [Address.parse(f"r{i}@example.org") for i in range(5)]

Outcome = list[Event] | type[ProtocolError]


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted(c % (len(data) + 1) for c in cuts)
    split = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    return [piece for piece in split if piece]  # b"" would mean end of file


def take(conn: ClientConnection) -> list[Event]:
    out: list[Event] = []
    for _ in range(100):
        event = conn.next_event()
        if event is NEED_DATA:
            break
        out.append(event)
        if isinstance(event, ConnectionClosed):
            break
    return out


GREETING = b"220-mx.example ESMTP\r\n220 ready\r\n"
EHLO = b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"
LHLO = b"250-mx.example\r\n250 PIPELINING\r\n"


@given(
    lmtp=st.booleans(),
    replies=st.lists(
        st.sampled_from(
            [b"250 2.1.5 ok\r\n", b"550 5.1.1 no\r\n", b"250-a\n250 b\n", b"451 later\r\n"]
        ),
        min_size=4,
        max_size=4,
    ),
    final=st.sampled_from([b"250 ok\r\n", b"250 a\r\n250 b\r\n", b"", b"421 bye\r\n"]),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
)
def test_events_do_not_depend_on_how_server_bytes_are_split(
    lmtp: bool, replies: list[bytes], final: bytes, cuts: list[int]
) -> None:
    # One pipelined transaction where every reply is scripted: the events must
    # be the same whether the server's bytes arrive at once, in any pieces, or
    # one byte at a time.
    commands: list[Command] = [MailFrom(A), RcptTo(A), RcptTo(B), Bdat(b"body\r\n", last=True)]
    stream = b"".join(replies) + final

    def run(split: list[bytes]) -> tuple[list[Event], State] | type[ProtocolError]:
        conn = ClientConnection(lmtp=lmtp)
        conn.receive_data(GREETING)
        take(conn)
        conn.send(Lhlo("client.example") if lmtp else Ehlo("client.example"))
        conn.receive_data(LHLO if lmtp else EHLO)
        take(conn)
        for command in commands:
            conn.send(command)
        events: list[Event] = []
        try:
            for piece in split:
                conn.receive_data(piece)
                events.extend(take(conn))
            conn.receive_data(b"")
            events.extend(take(conn))
        except RemoteProtocolError:
            return RemoteProtocolError
        return events, conn.state

    whole = run([stream])
    assert run(pieces(stream, cuts)) == whole
    assert run([bytes([b]) for b in stream]) == whole


# What a reader of replies saw: ("reply", reply) for a plain Response, the event itself
# otherwise, and the error class that ended it, if any.
Seen = list[object]


@given(
    lmtp=st.booleans(),
    messages=st.integers(1, 3),
    recipients=st.integers(1, 3),
    replies=st.lists(
        st.sampled_from(
            [
                b"250 2.1.5 ok\r\n",
                b"550 5.1.1 no\r\n",
                b"250-a\n250 b\n",
                b"451 later\r\n",
                b"354 go\r\n",
                b"421 4.3.2 bye\r\n",
                b"503 5.5.1 sequence\r\n",
                b"xyz\r\n",
            ]
        ),
        max_size=16,
    ),
    eof=st.booleans(),
    limits=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 10_000), max_size=6),
)
def test_batch_fast_paths_change_nothing(
    *,
    lmtp: bool,
    messages: int,
    recipients: int,
    replies: list[bytes],
    eof: bool,
    limits: list[int],
    cuts: list[int],
) -> None:
    # send_group() and next_replies() (with next_event() for the rest) must give what
    # send() of each command and next_event() alone give: the same wire bytes, the
    # same replies in the same order, the same errors and the same state.
    stream = b"".join(replies)

    def run(fast: bool) -> tuple[list[bytes], Seen, State, tuple[Command, ...]]:
        conn = ClientConnection(lmtp=lmtp)
        conn.receive_data(GREETING)
        take(conn)
        conn.send(Lhlo("client.example") if lmtp else Ehlo("client.example"))
        conn.receive_data(LHLO if lmtp else EHLO)
        take(conn)
        wire: list[bytes] = []
        seen: Seen = []
        try:
            for number in range(messages):
                # Earlier messages end in BDAT LAST, which may stay in flight; the last
                # ends in DATA, which must end the pipelined group (RFC 2920 §3.1).
                end: Command = Data() if number == messages - 1 else Bdat(b"x\r\n", last=True)
                rcpts = [RcptTo(address) for address in RECIPIENTS[:recipients]]
                group: list[Command] = [MailFrom(A), *rcpts, end]
                if number:
                    group.insert(0, Rset())
                if fast:
                    wire.append(conn.send_group(group))
                else:
                    wire.append(b"".join(conn.send(command) for command in group))
        except LocalProtocolError:
            seen.append(LocalProtocolError)
        try:
            for index, piece in enumerate([*pieces(stream, cuts), *([b""] if eof else [])]):
                conn.receive_data(piece)
                for _ in range(100):
                    if fast:
                        ready = conn.next_replies(limits[index % len(limits)])
                        if ready:
                            seen.extend(("reply", reply) for reply in ready)
                            continue
                    event = conn.next_event()
                    if event is NEED_DATA:
                        break
                    seen.append(("reply", event.reply) if type(event) is Response else event)
                    if isinstance(event, ConnectionClosed):
                        break
        except ProtocolError as exc:
            seen.append(type(exc))
        return wire, seen, conn.state, conn.pending

    assert run(fast=True) == run(fast=False)


@given(
    lmtp=st.booleans(),
    garbage=st.binary(max_size=200)
    | st.lists(
        st.sampled_from(
            [b"250", b"-", b" ", b"\r\n", b"\n", b"354", b"421", b"x", b"2.0.0", b"\xff", b"550"]
        ),
        max_size=30,
    ).map(b"".join),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
    commands=st.integers(0, 3),
)
def test_arbitrary_server_bytes_only_yield_events_or_remote_errors(
    lmtp: bool, garbage: bytes, cuts: list[int], commands: int
) -> None:
    sent: list[Command] = [MailFrom(A), RcptTo(A), Data()][:commands]
    hello = b"250-mx\r\n250 PIPELINING\r\n"

    def run(split: list[bytes]) -> Outcome:
        conn = ClientConnection(lmtp=lmtp)
        events: list[Event] = []
        try:
            conn.receive_data(b"220 hi\r\n")
            events.extend(take(conn))
            conn.send(Lhlo("c.example") if lmtp else Ehlo("c.example"))
            conn.receive_data(hello)
            events.extend(take(conn))
            for command in sent:
                conn.send(command)
            for piece in split:
                conn.receive_data(piece)
                events.extend(take(conn))
            conn.receive_data(b"")
            events.extend(take(conn))
        except RemoteProtocolError:
            assert conn.state is State.ERROR
            return RemoteProtocolError
        # Anything else (LocalProtocolError, ValueError, UnicodeDecodeError, ...) fails the test.
        return events

    whole = run([garbage] if garbage else [])
    assert run(pieces(garbage, cuts)) == whole


# -- the rule-based state machine ----------------------------------------------------------------

COMMANDS: dict[str, Callable[[], Command]] = {
    "EHLO": lambda: Ehlo("client.example"),
    "LHLO": lambda: Lhlo("client.example"),
    "HELO": lambda: Helo("client.example"),
    "STARTTLS": StartTLS,
    "AUTH": lambda: Auth("LOGIN"),
    "AUTH-CONTINUE": lambda: AuthContinue(b"x"),
    "AUTH-ABORT": AuthAbort,
    "MAIL": lambda: MailFrom(A),
    "RCPT": lambda: RcptTo(B),
    "DATA": Data,
    "DATA-CHUNK": lambda: DataChunk(b".x\r\n"),
    "END-OF-DATA": EndOfData,
    "BDAT": lambda: Bdat(b"abc"),
    "BDAT-LAST": lambda: Bdat(b"abc", last=True),
    "RSET": Rset,
    "NOOP": Noop,
    "QUIT": Quit,
    "VRFY": lambda: Vrfy("postmaster"),
}

REPLIES = [
    b"220 go\r\n",
    b"235 ok\r\n",
    b"250 2.0.0 ok\r\n",
    b"250-mx\r\n250 PIPELINING\r\n",
    b"334 VXNlcm5hbWU6\r\n",
    b"354 go ahead\r\n",
    b"421 4.3.2 bye\r\n",
    b"451 4.3.0 later\r\n",
    b"503 5.5.1 bad sequence\r\n",
    b"550 5.1.1 no\r\n",
]


PROGRESS = {
    State.CONNECTED: ["EHLO"],
    State.READY: ["MAIL"],
    State.MAIL: ["RCPT", "RCPT", "DATA", "BDAT", "BDAT-LAST"],
    State.BDAT: ["BDAT", "BDAT-LAST"],
    State.DATA: ["DATA-CHUNK", "END-OF-DATA"],
}

SENSIBLE = {
    "EHLO": b"250-mx\r\n250 PIPELINING\r\n",
    "LHLO": b"250-mx\r\n250 PIPELINING\r\n",
    "STARTTLS": b"220 go\r\n",
    "AUTH": b"334 VXNlcm5hbWU6\r\n",
    "AUTH-CONTINUE": b"235 ok\r\n",
    "AUTH-ABORT": b"501 cancelled\r\n",
    "DATA": b"354 go ahead\r\n",
    "QUIT": b"221 bye\r\n",
}


class ConversationMachine(RuleBasedStateMachine):
    """Commands and scripted replies in any order: every reply goes to the oldest
    command awaiting one (for LMTP, one per accepted recipient after the data, in
    RCPT order), and ERROR and CLOSED never let go."""

    def __init__(self) -> None:
        super().__init__()
        self.conn = ClientConnection()
        self.awaiting: list[Command] = []  # the model of conn.pending
        self.greeted = False
        self.failed = False
        self.closed = False
        self.closing = False
        self.chaos = False
        self.lmtp = False
        self.rcpts = 0
        # The LMTP model: recipients accepted in the transaction being answered,
        # and those still owed a final reply once the data's replies began.
        self.accepted: list[Address] = []
        self.owed: list[Address] | None = None

    @initialize(chaos=st.booleans(), lmtp=st.booleans())
    def choose_mood(self, chaos: bool, lmtp: bool) -> None:
        # Half the runs include illegal commands and garbage (which end in ERROR
        # quickly); the other half stay legal so they reach deep states.
        self.chaos = chaos
        self.lmtp = lmtp
        self.conn = ClientConnection(lmtp=lmtp)

    def check_failed_call(self, call: Callable[[], object]) -> None:
        try:
            call()
        except ProtocolError:
            return
        raise AssertionError("a call on a failed connection did not raise")

    def take_events(self) -> None:
        try:
            for _ in range(50):
                event = self.conn.next_event()
                if event is NEED_DATA:
                    return
                self.check_event(event)
                if isinstance(event, ConnectionClosed):
                    return
        except RemoteProtocolError:
            self.failed = True

    def check_event(self, event: Event) -> None:
        assert not self.closed or isinstance(event, ConnectionClosed)
        if isinstance(event, Greeting):
            assert not self.greeted
            self.greeted = True
        elif isinstance(event, Response | LMTPResponse):
            assert self.awaiting, "a reply matched to nothing"
            head = self.awaiting[0]
            assert event.command is head, "replies are matched in order"
            kind = self.kind(head)
            if self.lmtp and kind in ("END-OF-DATA", "BDAT-LAST"):
                if self.owed is None:
                    self.owed, self.accepted = self.accepted, []
                if self.owed:
                    assert isinstance(event, LMTPResponse)
                    assert event.recipient == self.owed.pop(0), "LMTP replies in RCPT order"
                else:
                    assert isinstance(event, Response)
                if not self.owed:
                    self.owed = None
                    self.awaiting.pop(0)
            else:
                assert isinstance(event, Response)
                self.awaiting.pop(0)
                if isinstance(head, RcptTo) and event.reply.code < 300:
                    self.accepted.append(head.recipient)
                elif kind in ("MAIL", "RSET"):
                    self.accepted = []
        elif isinstance(event, ServiceClosing):
            assert not self.awaiting
        else:
            assert event.pending == tuple(self.awaiting)
            final = self.awaiting and self.kind(self.awaiting[0]) in ("END-OF-DATA", "BDAT-LAST")
            if self.lmtp and final:
                expected = self.owed if self.owed is not None else self.accepted
                assert event.unanswered == tuple(expected)
            else:
                assert event.unanswered == ()
            self.closed = True
        if not isinstance(event, ConnectionClosed) and event.reply.code == 421:
            self.closing = True

    @precondition(lambda self: self.chaos)
    @rule(kind=st.sampled_from(sorted(COMMANDS)))
    def send_anything(self, kind: str) -> None:
        self.send(COMMANDS[kind]())

    @precondition(lambda self: not self.failed)
    @rule(data=st.data())
    def send_legal(self, data: st.DataObject) -> None:
        # Bias towards commands the tables allow, so runs go deep into the protocol.
        state = self.conn.state
        other = SMTP_ONLY if self.lmtp else LMTP_ONLY
        kinds = sorted(
            kind
            for (source, kind) in SEND
            if source is state and kind in COMMANDS and kind not in other
        )
        self.send_legal_from(kinds, data)

    @precondition(lambda self: self.failed)
    @rule()
    def failed_stays_failed(self) -> None:
        self.check_failed_call(self.conn.next_event)

    @precondition(lambda self: not self.failed and self.conn.state in PROGRESS)
    @rule(data=st.data())
    def send_towards_delivery(self, data: st.DataObject) -> None:
        # A nudge along the usual path (EHLO, MAIL, RCPT, DATA, ...), pipelined or not.
        kinds = PROGRESS[self.conn.state]
        if self.lmtp and kinds == ["EHLO"]:
            kinds = ["LHLO"]
        self.send_legal_from(kinds, data)

    def send_legal_from(self, kinds: list[str], data: st.DataObject) -> None:
        conn = self.conn
        pending = conn.pending
        if pending:
            ext = conn.extensions
            if ext is None or not ext.pipelining:
                return
            if self.kind(pending[-1]) not in PIPELINE_CONTINUES:
                return
            kinds = [kind for kind in kinds if kind in PIPELINE_JOINS]
        if kinds:
            self.send(COMMANDS[data.draw(st.sampled_from(kinds))]())

    @staticmethod
    def kind(command: Command) -> str:
        if isinstance(command, Bdat) and command.last:
            return "BDAT-LAST"
        return command.verb

    def send(self, command: Command) -> None:
        if isinstance(command, RcptTo):
            # Distinct recipients, so LMTP replies can be told apart.
            command = RcptTo(RECIPIENTS[self.rcpts % len(RECIPIENTS)])
            self.rcpts += 1
        if self.failed:
            self.check_failed_call(lambda: self.conn.send(command))
            return
        try:
            self.conn.send(command)
        except LocalProtocolError:
            assert self.conn.state is State.ERROR
            self.failed = True
            return
        assert not self.closing, "nothing may be sent after a 421 or QUIT"
        assert not self.closed
        if not isinstance(command, DataChunk):
            self.awaiting.append(command)
        if isinstance(command, Quit):
            self.closing = True

    @precondition(lambda self: self.chaos or self.awaiting)
    @rule(index=st.integers(0, len(REPLIES) - 1), split=st.integers(0, 40))
    def server_replies(self, index: int, split: int, data: bytes = b"") -> None:
        data = data or REPLIES[index]
        if self.failed:
            self.check_failed_call(lambda: self.conn.receive_data(data))
            return
        if self.closed:
            return
        split %= len(data) + 1
        for piece in (data[:split], data[split:]):
            if piece:
                self.conn.receive_data(piece)
                self.take_events()
                if self.failed:
                    return

    @precondition(lambda self: self.chaos and not self.failed and not self.closed)
    @rule(garbage=st.binary(min_size=1, max_size=20))
    def server_sends_garbage(self, garbage: bytes) -> None:
        self.conn.receive_data(garbage)
        self.take_events()

    @precondition(lambda self: not self.failed and not self.closed)
    @rule(split=st.integers(0, 40))
    def server_answers_sensibly(self, split: int) -> None:
        if not self.greeted:
            data = b"220 mx.example\r\n"
        elif self.awaiting:
            data = SENSIBLE.get(self.kind(self.awaiting[0]), b"250 2.0.0 ok\r\n")
        else:
            return
        self.server_replies(REPLIES.index(data) if data in REPLIES else -1, split, data)

    @precondition(lambda self: self.chaos or self.conn.state is State.TLS_PENDING)
    @rule()
    def tls_handshake_done(self) -> None:
        if self.failed:
            self.check_failed_call(self.conn.tls_established)
            return
        before = self.conn.state
        try:
            self.conn.tls_established()
        except ProtocolError:
            self.failed = True
            return
        assert before is State.TLS_PENDING
        assert self.conn.extensions is None

    @precondition(lambda self: self.chaos or self.closing)
    @rule()
    def server_closes(self) -> None:
        if self.failed:
            self.check_failed_call(lambda: self.conn.receive_data(b""))
            return
        self.conn.receive_data(b"")
        self.take_events()
        if not self.failed:
            assert self.closed

    @invariant()
    def pending_matches_the_model(self) -> None:
        if not self.failed:
            assert self.conn.pending == tuple(self.awaiting)
            assert all(a is b for a, b in zip(self.conn.pending, self.awaiting, strict=True))

    @invariant()
    def error_and_closed_are_absorbing(self) -> None:
        if self.failed:
            assert self.conn.state is State.ERROR
        elif self.closed:
            assert self.conn.state is State.CLOSED
        elif self.closing:
            assert self.conn.state in (State.CLOSING, State.CLOSED)


# Examples come from the active Hypothesis profile (dev / ci / fuzz); runs are long
# enough to reach DATA and BDAT through pipelined groups.
ConversationMachine.TestCase.settings = settings(stateful_step_count=50, deadline=None)
TestConversation = ConversationMachine.TestCase
