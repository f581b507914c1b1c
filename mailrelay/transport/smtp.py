"""Blocking SMTP and LMTP transports, with a pool of reusable connections.

Rules of this module:

* :class:`SMTPTransport` sends through one server (a smart host, a submission port) with
  the dialogue of :mod:`mailrelay.flow` run by the blocking driver
  (:mod:`mailrelay.transport.sync_driver`). :class:`LMTPTransport` does the same in LMTP
  (RFC 2033), over TCP or a unix socket.
* Connections are pooled (:class:`~mailrelay.transport.settings.PoolSettings`): after a
  message the session stays open for the next one (the dialogue sends RSET first when a
  transaction was left open); a connection is replaced after ``max_messages``; one idle for
  longer than ``idle_timeout`` is closed instead of reused; one idle for longer than
  ``health_check_after`` is checked with NOOP first. At most ``size`` connections are open;
  threads beyond that wait for one. The pool is thread-safe: a connection is used by one
  thread at a time.
* **Never lose a message to a stale connection** (the bug behind lettre#743, nodemailer#511,
  aiosmtplib#243): when a *reused* connection turns out to be dead while sending (the server
  closed it: EOF, reset, or a 421), the message is sent again at once on a fresh connection.
  The server had not taken the message (no final reply), so this is what a caller's retry
  would do, minus the wait. A fresh connection failing is reported, never retried here; so
  is a connection that ended after the whole message went out, with its final reply still
  owed: the server may have taken it (RFC 1047), and sending it again could deliver it twice.
* ``send_many`` sends a batch through one connection at a time, pipelined across messages
  (:meth:`Session.deliver_many <mailrelay.flow.Session.deliver_many>`), taking a streamed
  batch :data:`CHUNK` items at a time. Messages left without any final answer when the
  connection ends are sent again on a fresh one under the rule above (the connection had
  carried messages before them); otherwise the first of them gets the error as its result.
* Closing (``close()``, leaving ``with``) sends QUIT on every idle connection at once (one
  thread each when there are several) and waits for the replies, each bounded by the
  ``quit`` phase limit (:attr:`Timeouts.quit <mailrelay.options.Timeouts.quit>`, 10 s by
  default) the dialogue writes QUIT and reads its reply under (RFC 5321 §4.1.1.10: wait for
  the reply); a failed QUIT is logged, never raised. A connection in use while the
  transport closes gets its QUIT when its thread gives it back. A transport that opened
  connections and is collected without ``close()`` emits a :class:`ResourceWarning` and
  closes the sockets it still holds (without QUIT: no blocking I/O in a finalizer).
* Errors: only :class:`~mailrelay.errors.DeliveryError` subclasses, raised when the attempt
  produced no per-recipient answer; :class:`~mailrelay.errors.TransportClosed` after
  ``close()``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import ssl
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from mailrelay._shown import Shown
from mailrelay.envelope import Envelope
from mailrelay.errors import AuthenticationError, ConfigurationError, ConnectionLost, DeliveryError
from mailrelay.flow import BatchOutcome, ServerNotes, Session, unsent_positions
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.results import DeliveryResult
from mailrelay.transport.base import (
    BatchItem,
    Transport,
    failed_result,
    iter_pairs,
    note_progress,
)
from mailrelay.transport.pooling import (
    CHUNK,
    IdleVerdict,
    PooledConnection,
    PoolPolicy,
    answer_lost,
    answers_lost,
    greeting_hint,
    is_stale_connection_error,  # noqa: F401 -- defined here before; still importable
    send_unsent,
    unanswered,
)
from mailrelay.transport.proxy import Proxy
from mailrelay.transport.settings import (
    ConnectionSettings,
    PasswordProvider,
    PoolSettings,
    is_async_provider,
    mechanisms,
)
from mailrelay.transport.sync_driver import SyncDriver, connect

__all__ = ["LMTPTransport", "PooledSession", "SMTPTransport", "quit_all"]

log = logging.getLogger(__name__)


class _Batch:
    """The items of a pipelined ``send_many`` not yet answered, taken from the stream in
    bounded chunks."""

    def __init__(self, pairs: Iterator[tuple[Message, Envelope]]) -> None:
        self._pairs: Iterator[tuple[Message, Envelope]] | None = pairs
        self.pending: deque[tuple[Message, Envelope]] = deque()
        self.stream_error: BaseException | None = None

    def fill(self, size: int) -> bool:
        """Take items until ``size`` are pending; whether any are pending. An exception from
        the stream ends the taking (it is raised after the pending items are sent)."""
        while self._pairs is not None and len(self.pending) < size:
            try:
                pair = next(self._pairs, None)
            except Exception as exc:
                self.stream_error = exc
                pair = None
            if pair is None:
                self._pairs = None
                break
            self.pending.append(pair)
        return bool(self.pending)

    def take(self, room: int) -> list[tuple[Message, Envelope]]:
        return list(itertools.islice(self.pending, max(1, room)))

    def fail_first(self, error: DeliveryError) -> DeliveryResult:
        message, envelope = self.pending.popleft()
        return failed_result(message, envelope, error)

    def settle(
        self,
        chunk: list[tuple[Message, Envelope]],
        outcome: BatchOutcome,
        carried: int,
        results: list[DeliveryResult],
        policy: PoolPolicy,
        *,
        lost: int,
    ) -> int:
        """Move the results of ``chunk`` that are settled (:meth:`PoolPolicy.settle
        <mailrelay.transport.pooling.PoolPolicy.settle>`) to ``results``; returns how many.
        A message to be sent again on a fresh connection stays pending; ``lost``: how many
        final replies to whole messages were lost (``answers_lost`` in
        :mod:`mailrelay.transport.pooling`)."""
        settlement = policy.settle(outcome, sent=len(chunk), carried=carried, answer_lost=lost)
        settled = settlement.results(chunk)
        results += settled
        for _ in settled:
            self.pending.popleft()
        return len(settled)


class PooledSession(PooledConnection[SyncDriver]):
    """One open session on one socket, with its bookkeeping (also pooled by
    :class:`~mailrelay.transport.mx.MXTransport`)."""

    def quit(self) -> None:
        """QUIT politely, then close; errors no longer matter (they are logged).

        Bounded by the ``quit`` phase limit (:attr:`Timeouts.quit
        <mailrelay.options.Timeouts.quit>`).
        """
        try:
            if self.usable:
                self.driver.run(self.session.quit())
        except DeliveryError as exc:
            log.debug("QUIT to %s failed: %s", self.driver.peer, Shown(exc))
        except Exception:  # a bug must not stop the other connections from closing
            log.exception("QUIT to %s failed", self.driver.peer)
        finally:
            self.driver.close()


def quit_all(connections: Sequence[PooledSession]) -> None:
    """QUIT every connection and close them all, at once: one thread per connection when
    there are several, so closing waits for the slowest QUIT, not for their sum. Never
    raises for a connection's sake (each QUIT is bounded by its driver's timeouts)."""
    if len(connections) <= 1:
        for connection in connections:
            connection.quit()
        return
    threads = [
        threading.Thread(target=c.quit, name=f"mailrelay QUIT {c.driver.peer}", daemon=True)
        for c in connections
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


class _SMTPBase(Transport):
    """The pooled, blocking transport shared by SMTP and LMTP."""

    def __init__(self, settings: ConnectionSettings, pool: PoolSettings) -> None:
        if is_async_provider(settings.password):
            raise ConfigurationError(
                f"{type(self).__name__} cannot await a coroutine password provider: "
                "use a plain callable, or the Async transport"
            )
        self._settings = settings
        self._pool = pool
        # What this transport's sessions learn of the server, for the next ones.
        self._notes = ServerNotes()
        self._policy = PoolPolicy(pool=pool, peer=settings.peer, logger=log)
        self._idle: list[PooledSession] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(pool.size)
        self._closed = False
        self._opened = 0

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if getattr(self, "_closed", True) or not self._opened:
            return  # closed, never connected, or never fully constructed
        _warn(f"unclosed transport {self!r}: call close()", ResourceWarning, source=self)
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.driver.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._settings.describe()}>"

    @property
    def settings(self) -> ConnectionSettings:
        """The connection settings (the password is never shown by their ``repr``)."""
        return self._settings

    # -- connections ---------------------------------------------------------------------------

    def _open(self) -> PooledSession:
        settings = self._settings
        # A provider is asked for each new connection (a pool reconnecting hours later gets
        # a current token); before connecting, so that its failure leaves nothing open.
        secret = settings.secret()
        driver = connect(
            settings.host,
            settings.port,
            timeouts=settings.timeouts,
            implicit_tls=settings.tls is TLS.IMPLICIT,
            ssl_context=settings.context(),
            server_hostname=settings.server_hostname,
            unix_path=settings.unix_path,
            source_address=settings.source_address,
            proxy=settings.proxy,
        )
        session = Session(
            settings.session_config(driver.local_address, secret=secret, notes=self._notes)
        )
        try:
            driver.run(session.open())
            if session.auth_refusal is not None:
                self._renew(driver, session, secret)
        except ConnectionLost as exc:
            hint = greeting_hint(exc, settings, driver.bytes_received)
            if hint is not None:
                raise hint from exc
            raise
        log.debug("connected to %s", settings.peer)
        self._opened += 1
        return PooledSession(driver, session)

    def _renew(self, driver: SyncDriver, session: Session, secret: str | None) -> None:
        """The server refused the provider's token: ask once more and, given a different
        one, AUTH again on this connection (RFC 4954 §4); otherwise end it and raise."""
        refusal = session.auth_refusal
        assert refusal is not None
        try:
            fresh = self._settings.renew(refusal)
        except AuthenticationError:
            with contextlib.suppress(DeliveryError):
                driver.run(session.retry_authentication(None))  # QUIT politely
            driver.close()
            raise
        except BaseException:
            driver.close()  # interrupted while the provider fetched a token
            raise
        if fresh == secret:
            log.debug("the password provider gave the refused token again; not retrying")
            fresh = None
        driver.run(session.retry_authentication(fresh))

    def _checkout(self) -> tuple[PooledSession, bool]:
        """A connection to use, and whether it was reused."""
        while True:
            with self._lock:
                if self._closed:
                    raise self._policy.closed_error(type(self).__name__)
                connection = self._idle.pop() if self._idle else None
            if connection is None:
                return self._open(), False
            verdict = self._policy.idle_verdict(connection, time.monotonic())
            if verdict is IdleVerdict.DISCARD:
                connection.quit()
                continue
            if connection.driver.has_input():
                self._policy.heard_while_idle()
                connection.driver.close()
                continue
            if verdict is IdleVerdict.CHECK:
                try:
                    healthy = connection.driver.run(connection.session.noop())
                except DeliveryError:
                    healthy = False
                if not healthy:
                    self._policy.failed_check()
                    connection.driver.close()
                    continue
            return connection, True

    def _checkin(self, connection: PooledSession) -> None:
        connection.last_used = time.monotonic()
        if self._policy.keeps(connection):
            with self._lock:
                if not self._closed:
                    self._idle.append(connection)
                    return
        connection.quit()

    # -- sending -------------------------------------------------------------------------------

    def deliver(self, message: Message, envelope: Envelope) -> DeliveryResult:
        """Send one message over a pooled connection (see the module docstring).

        Raises:
            DeliveryError: a subclass, when the attempt produced no per-recipient answer.
        """
        self._slots.acquire()
        try:
            result = self._deliver_once(message, envelope)
            # A message split over several transactions that ran out of them (RFC 9422
            # MAILMAX, the session ended between them): the rest on other connections.
            return send_unsent(message, envelope, result, self._deliver_once)
        finally:
            self._slots.release()

    def _deliver_once(self, message: Message, envelope: Envelope) -> DeliveryResult:
        connection, reused = self._checkout()
        try:
            return self._send_on(connection, message, envelope)
        except DeliveryError as exc:
            lost = answer_lost(connection.session)
            if not self._policy.resend_on_fresh(exc, reused=reused, answer_lost=lost):
                raise
        connection = self._open()
        return self._send_on(connection, message, envelope)

    def _send_on(
        self, connection: PooledSession, message: Message, envelope: Envelope
    ) -> DeliveryResult:
        try:
            result = connection.driver.run(connection.session.deliver(message, envelope))
        except BaseException:
            connection.driver.close()
            raise
        connection.messages += 1
        self._checkin(connection)
        return result

    def send_many(self, items: Iterable[BatchItem]) -> list[DeliveryResult]:
        """Send many messages over one pooled connection at a time, pipelined across
        messages (:meth:`Session.deliver_many <mailrelay.flow.Session.deliver_many>`);
        results in item order, with the contract of :mod:`mailrelay.transport.base`.

        Messages that got no final answer because the connection ended (421, end of file)
        are sent again on a fresh connection when the connection had carried messages
        before (the stale-connection rule of :meth:`deliver`); otherwise the first of them
        gets the error as its result and the rest go on a fresh connection.
        """
        pairs, total = iter_pairs(items)
        results: list[DeliveryResult] = []
        batch = _Batch(pairs)
        # Split messages with recipients left unsent (see deliver): result index, pair.
        follow: list[tuple[int, Message, Envelope]] = []
        self._slots.acquire()
        connection: PooledSession | None = None
        try:
            while batch.fill(CHUNK):
                if connection is None:
                    try:
                        connection, _ = self._checkout()
                    except DeliveryError as exc:
                        results.append(batch.fail_first(exc))
                        continue
                chunk = batch.take(self._policy.room(connection))
                carried = connection.messages
                session = connection.session
                unsent = session.left_unsent
                try:
                    outcome = connection.driver.run(session.deliver_many(chunk))
                except DeliveryError as exc:
                    outcome = unanswered(len(chunk), exc)
                except BaseException:
                    connection.driver.close()
                    raise
                lost = answers_lost(session) if outcome.error is not None else 0
                done = batch.settle(chunk, outcome, carried, results, self._policy, lost=lost)
                # Results with recipients the server never took the message for (a
                # split message cut short, or refused as one too many in a batch that
                # ended early) are counted by the session: those go elsewhere below.
                if session.left_unsent != unsent:
                    first = len(results) - done
                    follow += [
                        (first + offset, *chunk[offset])
                        for offset in range(done)
                        if unsent_positions(results[first + offset])
                    ]
                connection.messages += done
                if outcome.error is not None:
                    connection.driver.close()
                    connection = None
                elif self._policy.full(connection):
                    self._checkin(connection)
                    connection = None
            if connection is not None:
                self._checkin(connection)
                connection = None
            for index, message, envelope in follow:
                results[index] = send_unsent(message, envelope, results[index], self._deliver_once)
        except BaseException as exc:
            note_progress(exc, len(results), total)
            raise
        finally:
            if connection is not None:
                self._checkin(connection)
            self._slots.release()
        if batch.stream_error is not None:
            note_progress(batch.stream_error, len(results), total)
            raise batch.stream_error
        return results

    def close(self) -> None:
        """QUIT every idle connection (all at once) and close it; a connection in use gets
        its QUIT when it is given back. Later sends raise
        :class:`~mailrelay.errors.TransportClosed`. Never raises for a server's sake;
        idempotent."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        quit_all(idle)


class SMTPTransport(_SMTPBase):
    """Send through one SMTP server: a smart host or a submission port.

    Example::

        with SMTPTransport("smtp.example.com", 587, username="me", password="...") as smtp:
            result = smtp.send(message)

    Args:
        host: the server's name or address (or ``None`` with ``path``).
        port: 587 (submission, STARTTLS), 465 (implicit TLS), 25 (relay).
        path: a unix socket path instead of ``host``/``port`` (a local MTA's listener; as
            aiosmtplib's ``socket_path``). TLS and AUTH rules are the same as over TCP:
            STARTTLS checks the certificate against ``server_hostname`` (default
            ``localhost``); give ``tls=TLS.NONE`` for a plain-text local socket.
        tls: the TLS policy; ``TLS.STARTTLS`` (required) by default, ``TLS.IMPLICIT`` for 465.
        username, password: credentials for AUTH (sent only over TLS unless
            ``allow_insecure_auth``). Never shown in ``repr``, logs or errors. ``password``
            may be a callable returning the secret (a *token provider* for OAuth 2.0 with
            ``auth_mechanisms=["XOAUTH2"]`` or ``["OAUTHBEARER"]``): it is called each time
            a new connection authenticates, and once more when the server refuses what it
            gave (an expired token; AUTH is retried once if the new secret differs). A
            provider that raises makes the attempt fail with a transient
            :class:`~mailrelay.errors.AuthenticationError`.
        ssl_context: the TLS context; by default one that verifies certificates against the
            system's CAs and checks the host name.
        timeouts: per-phase limits (RFC 5321 §4.5.3.2).
        local_hostname: the name to announce in EHLO; by default our address, as a literal.
        server_hostname: the name to check the certificate against (default ``host``).
        source_address: the local IP address to connect from (a host with several, e.g. to
            send from the address the EHLO name and SPF record belong to); only the
            server's addresses of its family are tried. Not with a unix socket. With a
            ``proxy``, the address the connection to the proxy goes from.
        proxy: reach the server through an outbound proxy: a
            :class:`~mailrelay.transport.proxy.Proxy` or its URL (``socks5://``: we
            resolve ``host``; ``socks5h://``: the proxy does; ``http://``: an HTTP CONNECT
            tunnel), with ``user:password@`` when the proxy wants a login. TLS runs end to
            end through the tunnel, checked against ``server_hostname`` or ``host``. The
            EHLO literal is still our own address: give ``local_hostname`` when it matters.
            Not with a unix socket.
        auth_mechanisms: SASL mechanisms to use, in order (default: strongest in common).
        allow_insecure_auth: allow AUTH over plain text (for test servers only).
        pipelining: use PIPELINING when offered (RFC 2920).
        chunking: use BDAT when offered (RFC 3030).
        pool: connection reuse settings.

    Raises:
        ConfigurationError: when the settings cannot work.
    """

    def __init__(
        self,
        host: str | None = None,
        port: int = 587,
        *,
        path: str | None = None,
        tls: TLS = TLS.STARTTLS,
        username: str | None = None,
        password: str | PasswordProvider | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeouts: Timeouts = Timeouts(),  # noqa: B008 -- an immutable value
        local_hostname: str | None = None,
        server_hostname: str | None = None,
        source_address: str | None = None,
        proxy: Proxy | str | None = None,
        auth_mechanisms: Sequence[str] | None = None,
        allow_insecure_auth: bool = False,
        pipelining: bool = True,
        chunking: bool = False,
        pool: PoolSettings = PoolSettings(),  # noqa: B008 -- an immutable value
    ) -> None:
        settings = ConnectionSettings(
            host=host,
            port=None if path is not None else port,
            unix_path=path,
            tls=tls,
            ssl_context=ssl_context,
            timeouts=timeouts,
            local_hostname=local_hostname,
            server_hostname=server_hostname,
            source_address=source_address,
            proxy=proxy,
            username=username,
            password=password,
            auth_mechanisms=mechanisms(auth_mechanisms),
            allow_insecure_auth=allow_insecure_auth,
            pipelining=pipelining,
            chunking=chunking,
        )
        super().__init__(settings, pool)


class LMTPTransport(_SMTPBase):
    """Deliver to a mail store over LMTP (RFC 2033): TCP, or a unix socket with ``path``.

    LMTP gives one final reply per accepted recipient, so one message can be delivered to some
    mailboxes and refused (or deferred) for others; the result says which.

    Args:
        host: the LMTP server (or ``None`` with ``path``).
        port: the TCP port (default 24, RFC 2033 §5).
        path: a unix socket path instead of ``host``/``port``.
        tls: the TLS policy; ``TLS.NONE`` by default (LMTP is for trusted local links).
        Other arguments: as :class:`SMTPTransport`.
    """

    def __init__(
        self,
        host: str | None = None,
        port: int = 24,
        *,
        path: str | None = None,
        tls: TLS = TLS.NONE,
        username: str | None = None,
        password: str | PasswordProvider | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeouts: Timeouts = Timeouts(),  # noqa: B008 -- an immutable value
        local_hostname: str | None = None,
        server_hostname: str | None = None,
        source_address: str | None = None,
        proxy: Proxy | str | None = None,
        auth_mechanisms: Sequence[str] | None = None,
        allow_insecure_auth: bool = False,
        pipelining: bool = True,
        chunking: bool = False,
        pool: PoolSettings = PoolSettings(),  # noqa: B008 -- an immutable value
    ) -> None:
        settings = ConnectionSettings(
            host=host,
            port=None if path is not None else port,
            unix_path=path,
            tls=tls,
            ssl_context=ssl_context,
            timeouts=timeouts,
            local_hostname=local_hostname,
            server_hostname=server_hostname,
            source_address=source_address,
            proxy=proxy,
            username=username,
            password=password,
            auth_mechanisms=mechanisms(auth_mechanisms),
            allow_insecure_auth=allow_insecure_auth,
            pipelining=pipelining,
            chunking=chunking,
            lmtp=True,
        )
        super().__init__(settings, pool)
