"""asyncio SMTP and LMTP transports, with a pool of reusable connections.

The asyncio twins of :mod:`mailrelay.transport.smtp`, with the same rules (pooling, NOOP
health checks, idle expiry, the transparent resend on a fresh connection when a reused one
turns out to be dead), plus:

* The pool is task-safe: a connection is used by one task at a time, and at most
  ``pool.size`` are open; tasks beyond that wait for one.
* :meth:`AsyncSMTPTransport.asend_many` spreads a batch over ``pool.size`` connections at
  once, each worker sending a run of items pipelined across messages (a known batch split
  evenly, a streamed one taken a bounded run at a time, so it is never held whole), and
  still returns the results in item order, with the contract of
  :mod:`mailrelay.transport.base` (a ``DeliveryError`` becomes that item's result; any other
  exception cancels the rest of the batch and propagates).
* A pool belongs to one event loop. A keeper task expires idle connections in the background
  and, when the loop ends (``asyncio.run`` cancels it), sends QUIT on every idle connection
  and closes it, so a transport used in a second ``asyncio.run`` starts afresh and no socket
  outlives its loop. The keeper holds the transport only weakly: a transport dropped without
  ``aclose()`` can be collected.
* Closing (``aclose()``, leaving ``async with``) sends QUIT on every idle connection at once
  and waits at most :func:`~mailrelay.transport.pooling.quit_timeout` for the replies (RFC
  5321 §4.1.1.10: wait for QUIT's reply); a failed QUIT is logged, never raised. A connection
  in use while the transport closes gets its QUIT when its task gives it back. A task
  cancelled while it holds a connection aborts that connection (its transaction's state is
  unknown, so there is nothing polite left to say) and frees its slot.
* A transport that opened connections and is collected without ``aclose()`` emits a
  :class:`ResourceWarning` (as asyncio's own transports do) and aborts what it still holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import warnings
import weakref
from collections.abc import AsyncIterable, Iterable, Sequence
from typing import Any, Protocol

from mailrelay._shown import Shown
from mailrelay.envelope import Envelope
from mailrelay.errors import AuthenticationError, ConnectionLost, DeliveryError
from mailrelay.flow import ServerNotes, Session, unsent_positions
from mailrelay.message import Message
from mailrelay.options import TLS, Timeouts
from mailrelay.results import DeliveryResult
from mailrelay.transport.async_driver import AsyncDriver, connect
from mailrelay.transport.base import (
    AsyncBatch,
    AsyncTransport,
    BatchItem,
    failed_result,
    note_progress,
)
from mailrelay.transport.pooling import (
    CHUNK,
    IdleVerdict,
    PooledConnection,
    PoolPolicy,
    answer_lost,
    answers_lost,
    asend_unsent,
    greeting_hint,
    quit_timeout,
    unanswered,
)
from mailrelay.transport.proxy import Proxy
from mailrelay.transport.settings import (
    AsyncPasswordProvider,
    ConnectionSettings,
    PoolSettings,
    mechanisms,
)

__all__ = [
    "AsyncLMTPTransport",
    "AsyncSMTPTransport",
    "KeptPool",
    "PooledSession",
    "keep_pool",
    "quit_all",
]

log = logging.getLogger(__name__)


class PooledSession(PooledConnection[AsyncDriver]):
    """One open session on one asyncio connection, with its bookkeeping (also pooled by
    :class:`~mailrelay.transport.mx_async.AsyncMXTransport`)."""

    async def quit(self) -> None:
        """QUIT politely, then close; errors no longer matter (they are logged).

        Bounded by the driver's ``greeting`` phase limit; cancelling it aborts the connection.
        """
        try:
            if self.usable:
                await self.driver.run(self.session.quit())
        except DeliveryError as exc:
            log.debug("QUIT to %s failed: %s", self.driver.peer, Shown(exc))
        except Exception:  # a bug must not stop the other connections from closing
            log.exception("QUIT to %s failed", self.driver.peer)
        finally:
            self.driver.close()


async def quit_all(connections: Sequence[PooledSession], timeout: float) -> None:
    """QUIT every connection at once and close them all, within ``timeout`` seconds.

    Never raises for a connection's sake: failures are logged, and a connection whose QUIT
    is still unanswered at the deadline is aborted. Cancelling the call aborts them all.
    """
    if not connections:
        return
    tasks = [asyncio.ensure_future(connection.quit()) for connection in connections]
    try:
        await asyncio.wait(tasks, timeout=timeout)
        for connection, task in zip(connections, tasks, strict=True):
            if not task.done():
                log.debug(
                    "QUIT to %s failed: no reply within %.1f s; closing",
                    connection.driver.peer,
                    timeout,
                )
    finally:
        for task in tasks:
            task.cancel()
        for connection in connections:
            connection.driver.close()
    # Collect the cancelled ones (their drivers are closed: nothing is left to wait for).
    await asyncio.gather(*tasks, return_exceptions=True)


class KeptPool(Protocol):
    """What :func:`keep_pool` needs of a pooled asyncio transport."""

    _keeper: asyncio.Task[None] | None

    async def _expire_idle(self) -> None: ...  # pragma: no cover - a protocol

    async def _end_idle(self) -> None: ...  # pragma: no cover - a protocol


async def keep_pool(ref: weakref.ReferenceType[KeptPool], interval: float) -> None:
    """A pool's keeper task: expires idle connections in the background (every
    ``interval`` seconds) and, when cancelled (which is what ``asyncio.run`` does to pending
    tasks as its loop ends), QUITs and closes every idle one, so no socket outlives the loop
    even without ``aclose()``.

    It holds the transport weakly (a strong reference would keep a forgotten transport alive
    for as long as the loop runs) and ends once the transport has been collected.
    """
    try:
        while True:
            await asyncio.sleep(interval)
            transport = ref()
            if transport is None:
                return
            await transport._expire_idle()
            del transport  # not across the next sleep
    except asyncio.CancelledError:
        transport = ref()
        if transport is not None:
            if transport._keeper is asyncio.current_task():
                # The error's traceback holds this frame, hence the transport: the transport
                # must not hold this task in turn, or the two would live on as a cycle.
                transport._keeper = None
            await transport._end_idle()
        raise


class _AsyncSMTPBase(AsyncTransport):
    """The pooled asyncio transport shared by SMTP and LMTP."""

    def __init__(self, settings: ConnectionSettings, pool: PoolSettings) -> None:
        self._settings = settings
        self._pool = pool
        # What this transport's sessions learn of the server, for the next ones.
        self._notes = ServerNotes()
        self._policy = PoolPolicy(pool=pool, peer=settings.peer, logger=log)
        self._idle: list[PooledSession] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Semaphore | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._closed = False
        self._opened = 0

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if getattr(self, "_closed", True) or not self._opened:
            return  # closed, never connected, or never fully constructed
        _warn(f"unclosed transport {self!r}: call aclose()", ResourceWarning, source=self)
        self._drop_idle()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._settings.describe()}>"

    @property
    def settings(self) -> ConnectionSettings:
        """The connection settings (the password is never shown by their ``repr``)."""
        return self._settings

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._slots is None:
            # A new event loop: the old loop's connections cannot be used from this one.
            # (Normally there are none left: the keeper closed them when that loop ended.)
            self._drop_idle()
            self._loop = loop
            self._slots = asyncio.Semaphore(self._pool.size)
            self._keeper = loop.create_task(
                keep_pool(weakref.ref(self), self._pool.idle_timeout / 2),
                name=f"mailrelay pool {self._settings.peer}",
            )
        return self._slots

    def _drop_idle(self) -> None:
        """Abort every idle connection, without QUIT (their loop is gone or going)."""
        idle, self._idle = self._idle, []
        for connection in idle:
            try:
                connection.driver.close()
            except RuntimeError:  # pragma: no cover - the connection's loop is already closed
                log.debug("could not close a connection of a closed event loop")

    async def _expire_idle(self) -> None:
        """QUIT the idle connections older than ``idle_timeout`` (the keeper's tick)."""
        now = time.monotonic()
        expired = [c for c in self._idle if self._policy.expired(c, now)]
        for connection in expired:
            self._idle.remove(connection)
        if expired:
            log.debug("%d idle connection(s) to %s expired", len(expired), self._settings.peer)
            await quit_all(expired, quit_timeout(self._settings.timeouts))

    async def _end_idle(self) -> None:
        """QUIT every idle connection (the keeper, as the event loop ends)."""
        idle, self._idle = self._idle, []
        await quit_all(idle, quit_timeout(self._settings.timeouts))

    async def _open(self) -> PooledSession:
        settings = self._settings
        # A provider is asked for each new connection (a pool reconnecting hours later gets
        # a current token); before connecting, so that its failure leaves nothing open.
        secret = await settings.asecret()
        driver = await connect(
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
            await driver.run(session.open())
            if session.auth_refusal is not None:
                await self._renew(driver, session, secret)
        except ConnectionLost as exc:
            hint = greeting_hint(exc, settings, driver.bytes_received)
            if hint is not None:
                raise hint from exc
            raise
        self._opened += 1
        return PooledSession(driver, session)

    async def _renew(self, driver: AsyncDriver, session: Session, secret: str | None) -> None:
        """The server refused the provider's token: ask once more and, given a different
        one, AUTH again on this connection (RFC 4954 §4); otherwise end it and raise."""
        refusal = session.auth_refusal
        assert refusal is not None
        try:
            fresh = await self._settings.arenew(refusal)
        except AuthenticationError:
            with contextlib.suppress(DeliveryError):
                await driver.run(session.retry_authentication(None))  # QUIT politely
            driver.close()
            raise
        except BaseException:
            # Cancelled (a caller's timeout) while the provider fetched a token: the
            # connection is nobody's now.
            driver.close()
            raise
        if fresh == secret:
            log.debug("the password provider gave the refused token again; not retrying")
            fresh = None
        await driver.run(session.retry_authentication(fresh))

    async def _checkout(self) -> tuple[PooledSession, bool]:
        while True:
            if self._closed:
                raise self._policy.closed_error(type(self).__name__)
            if not self._idle:
                return await self._open(), False
            connection = self._idle.pop()
            verdict = self._policy.idle_verdict(connection, time.monotonic())
            if verdict is IdleVerdict.DISCARD:
                await connection.quit()
                continue
            if connection.driver.has_input():
                self._policy.heard_while_idle()
                connection.driver.close()
                continue
            if verdict is IdleVerdict.CHECK:
                try:
                    healthy = await connection.driver.run(connection.session.noop())
                except DeliveryError:
                    healthy = False
                if not healthy:
                    self._policy.failed_check()
                    connection.driver.close()
                    continue
            return connection, True

    async def _checkin(self, connection: PooledSession) -> None:
        connection.last_used = time.monotonic()
        if self._policy.keeps(connection) and not self._closed:
            self._idle.append(connection)
            return
        await connection.quit()

    async def adeliver(self, message: Message, envelope: Envelope) -> DeliveryResult:
        """Send one message over a pooled connection.

        Raises:
            DeliveryError: a subclass, when the attempt produced no per-recipient answer.
        """
        async with self._semaphore():
            result = await self._deliver_once(message, envelope)
            # A message split over several transactions that ran out of them (RFC 9422
            # MAILMAX, the session ended between them): the rest on other connections.
            return await asend_unsent(message, envelope, result, self._deliver_once)

    async def _deliver_once(self, message: Message, envelope: Envelope) -> DeliveryResult:
        connection, reused = await self._checkout()
        try:
            return await self._send_on(connection, message, envelope)
        except DeliveryError as exc:
            lost = answer_lost(connection.session)
            if not self._policy.resend_on_fresh(exc, reused=reused, answer_lost=lost):
                raise
        connection = await self._open()
        return await self._send_on(connection, message, envelope)

    async def _send_on(
        self, connection: PooledSession, message: Message, envelope: Envelope
    ) -> DeliveryResult:
        try:
            result = await connection.driver.run(connection.session.deliver(message, envelope))
        except BaseException:
            connection.driver.close()
            raise
        connection.messages += 1
        await self._checkin(connection)
        return result

    async def asend_many(
        self, items: Iterable[BatchItem] | AsyncIterable[BatchItem]
    ) -> list[DeliveryResult]:
        """Send many messages over up to ``pool.size`` connections; results in item order.

        Each worker holds one connection and sends a run of items through it pipelined
        across messages (:meth:`Session.deliver_many <mailrelay.flow.Session.deliver_many>`),
        with the resend rules of :meth:`SMTPTransport.send_many
        <mailrelay.transport.smtp.SMTPTransport.send_many>`. See
        :mod:`mailrelay.transport.base` for the contract (a sequence is checked whole
        first; other iterables are streamed, each worker taking items when it is free).
        """
        batch = AsyncBatch(items)
        results: dict[int, DeliveryResult] = {}
        # Split messages with recipients left unsent (see adeliver): result index, pair.
        follow: list[tuple[int, Message, Envelope]] = []
        workers = self._pool.size if batch.total is None else min(self._pool.size, batch.total)
        # Spread a known batch evenly; take a streamed one in bounded runs.
        run_size = CHUNK if not batch.total else max(1, min(CHUNK, -(-batch.total // workers)))

        async def worker() -> None:
            # This worker's items not yet sent: their indices in the batch, and the pairs.
            ours: list[int] = []
            pairs: list[tuple[Message, Envelope]] = []
            stream_error: BaseException | None = None
            exhausted = False
            connection: PooledSession | None = None
            try:
                async with self._semaphore():
                    while True:
                        if not exhausted and len(ours) < run_size:
                            # A sequence: the run at once (no await per item).
                            taken_run = batch.take(run_size - len(ours))
                            if taken_run is not None:
                                start, run = taken_run
                                ours += range(start, start + len(run))
                                pairs += run
                                exhausted = not run
                        while not exhausted and stream_error is None and len(ours) < run_size:
                            try:
                                taken = await batch.next()
                            except Exception as exc:
                                stream_error = exc
                                break
                            if taken is None:
                                exhausted = True
                                break
                            ours.append(taken[0])
                            pairs.append(taken[1:])
                        if not ours:
                            break
                        if connection is None:
                            try:
                                connection, _ = await self._checkout()
                            except DeliveryError as exc:
                                message, envelope = pairs.pop(0)
                                results[ours.pop(0)] = failed_result(message, envelope, exc)
                                continue
                        chunk = pairs[: self._policy.room(connection)]
                        carried = connection.messages
                        unsent = connection.session.left_unsent
                        try:
                            outcome = await connection.driver.run(
                                connection.session.deliver_many(chunk)
                            )
                        except DeliveryError as exc:
                            outcome = unanswered(len(chunk), exc)
                        except BaseException:
                            connection.driver.close()
                            connection = None
                            raise
                        settlement = self._policy.settle(
                            outcome,
                            sent=len(chunk),
                            carried=carried,
                            answer_lost=answers_lost(connection.session)
                            if outcome.error is not None
                            else 0,
                        )
                        settled = settlement.results(chunk)
                        for index, result in zip(ours, settled, strict=False):
                            results[index] = result
                        # As in SMTPTransport.send_many: the session counts results
                        # with recipients it never offered; those go elsewhere below.
                        if connection.session.left_unsent != unsent:
                            follow.extend(
                                (index, *pair)
                                for index, pair, result in zip(ours, chunk, settled, strict=False)
                                if unsent_positions(result)
                            )
                        del ours[: len(settled)]
                        del pairs[: len(settled)]
                        connection.messages += len(settled)
                        if outcome.error is not None:
                            connection.driver.close()
                            connection = None
                        elif self._policy.full(connection):
                            await self._checkin(connection)
                            connection = None
            finally:
                if connection is not None:
                    await self._checkin(connection)
            if stream_error is not None:
                raise stream_error

        tasks = [asyncio.ensure_future(worker()) for _ in range(workers)]
        if not tasks:
            return []
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                exc = task.exception()
                if exc is not None:
                    note_progress(exc, len(results), batch.total)
                    raise exc
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for index, message, envelope in follow:
            async with self._semaphore():
                results[index] = await asend_unsent(
                    message, envelope, results[index], self._deliver_once
                )
        # Every item handed out (the whole batch, once it is exhausted) has its result.
        handed_out = batch.handed_out
        assert sorted(results) == list(range(handed_out)), "every item must have a result"
        assert batch.total is None or handed_out == batch.total, "every item must be sent"
        return [results[index] for index in range(handed_out)]

    async def aclose(self) -> None:
        """QUIT every idle connection (all at once, waiting at most
        :func:`~mailrelay.transport.pooling.quit_timeout`) and close it; a connection in
        use gets its QUIT when it is given back. Later sends raise
        :class:`~mailrelay.errors.TransportClosed`. Never raises for a server's sake;
        idempotent."""
        self._closed = True
        idle, self._idle = self._idle, []
        keeper, self._keeper = self._keeper, None
        if self._loop is not None and self._loop is not asyncio.get_running_loop():
            # Another loop's connections cannot be used from this one: abort them.
            for connection in idle:
                connection.driver.close()
            return
        if keeper is not None:
            keeper.cancel()
            try:
                await asyncio.gather(keeper, return_exceptions=True)
            except BaseException:
                # aclose() itself cancelled before the QUITs went out: the idle connections
                # are ours alone now (neither the pool nor the keeper has them), so abort
                # them rather than leave their sockets to the garbage collector.
                for connection in idle:
                    connection.driver.close()
                raise
        await quit_all(idle, quit_timeout(self._settings.timeouts))
        # Let the transports' close callbacks run, so the sockets are closed even when the
        # event loop ends right after this (as at the end of asyncio.run).
        await asyncio.sleep(0)


class AsyncSMTPTransport(_AsyncSMTPBase):
    """Send through one SMTP server with asyncio; the arguments are
    :class:`~mailrelay.transport.smtp.SMTPTransport`'s, except that a ``password`` provider
    may also be a coroutine function (``async def token() -> str``), awaited each time a new
    connection authenticates.

    Example::

        async with AsyncSMTPTransport("smtp.example.com", username="me", password="...") as smtp:
            result = await smtp.asend(message)
    """

    def __init__(
        self,
        host: str | None = None,
        port: int = 587,
        *,
        path: str | None = None,
        tls: TLS = TLS.STARTTLS,
        username: str | None = None,
        password: str | AsyncPasswordProvider | None = None,
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


class AsyncLMTPTransport(_AsyncSMTPBase):
    """Deliver to a mail store over LMTP with asyncio; the arguments are
    :class:`~mailrelay.transport.smtp.LMTPTransport`'s."""

    def __init__(
        self,
        host: str | None = None,
        port: int = 24,
        *,
        path: str | None = None,
        tls: TLS = TLS.NONE,
        username: str | None = None,
        password: str | AsyncPasswordProvider | None = None,
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
