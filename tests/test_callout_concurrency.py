"""One callout shared by many threads or tasks, against real exchangers and the test DNS.

Apps check bulk lists with one :class:`~mailrelay.callout.Callout` shared by worker threads,
or one :class:`~mailrelay.callout.AsyncCallout` shared by tasks, some of which are cancelled
or time out. The name server is unbound serving the test zone (``tests/peers/unbound.py``);
the exchangers are :class:`Exchanger`, a small threaded SMTP server listening on the
zone's exchanger addresses (127.0.0.1, 127.0.0.2, 127.0.1.1 and ::1, one port for all;
127.0.0.3 and 127.0.1.2 are down), whose answer to each RCPT depends on the address alone
(its local part, and the domain for the catch-all decoy), so a single-threaded run says
what every run must say.
What must hold however the calls overlap:

- every verdict equals the one a single-threaded run on a fresh callout gives;
- ACCEPTED only with a 2xx, REFUSED only with a 5xx, that the server gave that very RCPT;
- DATA is never sent;
- every call ends within a bound derived from its timeouts (a hang guard, not a speed test);
- no session leaks: once the callers are done, no connection is open at the exchanger, and
  no socket is left to the garbage collector (ResourceWarning);
- a probe cancelled at any moment (or under ``asyncio.timeout``) leaves nothing that makes a
  later probe read another probe's replies: the probes after the storm give the reference
  verdicts again.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import attrs
import pytest

from mailrelay.callout import AsyncCallout, Callout, CalloutResult, CalloutStatus, acallout
from mailrelay.options import TLS, Timeouts
from tests.peers.unbound import UnboundServer
from tests.transport.helpers import run

#: Threads sharing one Callout.
THREADS = 8
#: Tasks sharing one AsyncCallout.
TASKS = 24
#: Every phase's timeout (the exchangers answer at once, after SLOW seconds, or never).
TIMEOUTS = attrs.evolve(Timeouts.all(2), rcpt=0.5)
#: How long the exchanger waits before answering a ``slow-`` recipient.
SLOW = 0.05
#: Added to every hang guard: start-up, a loaded machine, the garbage collector.
MARGIN = 10.0
#: Exchanger addresses in the test zone that a server listens on (127.0.0.3 stays down).
LISTEN = ("127.0.0.1", "127.0.0.2", "127.0.1.1", "::1")

#: Domains of the test zone whose exchangers are on the LISTEN addresses (or down).
DOMAINS = (
    "mailrelay.test",  # 127.0.0.1 and ::1
    "mx2.test",  # 127.0.0.1, then 127.0.0.2
    "failover.test",  # 127.0.0.3 (down), then 127.0.0.1
    "a-only.test",  # implicit MX
    "both.test",  # 127.0.0.1 and ::1: RCPTs here are never answered
    "dom00.test",  # 127.0.1.1: a catch-all
    "dom01.test",  # 127.0.1.2: nobody listens
    "nullmx.test",  # RFC 7505: no server to ask
    "nosuchdomain.test",  # NXDOMAIN
)
#: Local parts and what the exchanger answers them (dom00.test accepts everything).
LOCAL_PARTS = ("ok1", "ok2", "no1", "no2", "grey1", "slow-ok", "slow-no")


def answer(address: str) -> bytes | None:
    """The exchanger's reply to ``RCPT TO:<address>``: a function of the address alone
    (``None``: no reply, ever)."""
    local, _, domain = address.lower().rpartition("@")
    if domain == "both.test":
        return None
    if domain == "dom00.test" or local.endswith("ok") or local.startswith("ok"):
        return b"250 2.1.5 Ok\r\n"
    if local.startswith("grey"):
        return b"450 4.2.0 Greylisted, try again later\r\n"
    return b"550 5.1.1 No such user\r\n"


class Exchanger:
    """A threaded SMTP server on every LISTEN address at one port; it records what it said.

    Attributes:
        rcpts: ``(address, code)`` of every RCPT answered, lower-cased.
        data: how many DATA commands arrived (must stay 0).
        connections: connections accepted in all.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rcpts: list[tuple[str, int]] = []
        self.data = 0
        self.connections = 0
        self._open = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.listeners, self.port = self._bind()
        for listener in self.listeners:
            self._spawn(self._accept, listener)

    @staticmethod
    def _bind() -> tuple[list[socket.socket], int]:
        for _ in range(50):  # a port free on every address
            first = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            first.bind((LISTEN[0], 0))
            port: int = first.getsockname()[1]
            listeners = [first]
            try:
                for host in LISTEN[1:]:
                    family = socket.AF_INET6 if ":" in host else socket.AF_INET
                    other = socket.socket(family, socket.SOCK_STREAM)
                    listeners.append(other)
                    other.bind((host, port))
            except OSError:
                for listener in listeners:
                    listener.close()
                continue
            for listener in listeners:
                listener.listen(64)
                listener.settimeout(0.1)
            return listeners, port
        raise RuntimeError("no port free on every exchanger address")

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self.lock:
            self._threads.append(thread)
        thread.start()

    @property
    def open_now(self) -> int:
        """Connections accepted whose client has not closed them yet."""
        with self.lock:
            return self._open

    def wait_idle(self, timeout: float = MARGIN) -> bool:
        """Wait (bounded) until no connection is open; whether that happened."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.open_now == 0:
                return True
            time.sleep(0.01)
        return self.open_now == 0

    def codes(self, address: str) -> set[int]:
        """Every code this server gave a RCPT for ``address``."""
        with self.lock:
            return {code for rcpt, code in self.rcpts if rcpt == address.lower()}

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.connections += 1
                self._open += 1
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(MARGIN)  # a hang guard: the client always speaks or closes
            reader = conn.makefile("rb")
            try:
                conn.sendall(b"220 mx.test ESMTP\r\n")
                self._dialogue(conn, reader)
            finally:
                reader.close()
        except OSError:
            pass
        finally:
            conn.close()
            with self.lock:
                self._open -= 1

    def _dialogue(self, conn: socket.socket, reader: Any) -> None:
        for _ in range(10_000):
            line: bytes = reader.readline(4096)
            if not line:
                return
            command = line.decode("ascii", "replace").strip()
            verb = command[:4].upper()
            if verb in ("EHLO", "HELO"):
                conn.sendall(b"250-mx.test\r\n250 ENHANCEDSTATUSCODES\r\n")
            elif verb == "MAIL":
                conn.sendall(b"250 2.1.0 Ok\r\n")
            elif verb == "RCPT":
                address = command.partition("<")[2].rpartition(">")[0].lower()
                reply = answer(address)
                if reply is None:
                    continue  # mute: the client must time out, then close
                if address.startswith("slow"):
                    time.sleep(SLOW)
                with self.lock:
                    self.rcpts.append((address, int(reply[:3])))
                conn.sendall(reply)
            elif verb == "DATA":
                with self.lock:
                    self.data += 1
                conn.sendall(b"554 5.5.1 No DATA in a callout test\r\n")
            elif verb in ("RSET", "NOOP"):
                conn.sendall(b"250 2.0.0 Ok\r\n")
            elif verb == "QUIT":
                conn.sendall(b"221 2.0.0 Bye\r\n")
                return
            else:
                conn.sendall(b"502 5.5.2 Unknown command\r\n")

    def stop(self) -> None:
        self._stop.set()
        for listener in self.listeners:
            listener.close()
        with self.lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(MARGIN)


@pytest.fixture(scope="module")
def exchanger() -> Iterator[Exchanger]:
    """One exchanger for the module: what it records only grows, and the checks allow that."""
    server = Exchanger()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def expected(exchanger: Exchanger, unbound: UnboundServer) -> dict[str, CalloutResult]:
    """Each address's verdict from a single-threaded run on a fresh callout, one at a time."""
    callout = Callout(
        unbound.resolver(timeout=1.0), **options(exchanger.port, 0), refused_networks=()
    )
    return {address: callout.probe(address) for address in everything()}


def options(port: int, seed: int) -> dict[str, Any]:
    return {
        "port": port,
        "tls": TLS.NONE,
        "timeouts": TIMEOUTS,
        "local_hostname": "probe.test",
        "sender": "probe@client.test",
        "random": random.Random(seed),
        "max_recipients": 3,  # several transactions per session, RSET between
    }


def everything() -> list[str]:
    """Every address the tests probe (two at the mute domain: each costs two RCPT timeouts)."""
    return [
        f"{local}@{domain}"
        for domain in DOMAINS
        for local in (LOCAL_PARTS[:3] if domain == "both.test" else LOCAL_PARTS)
    ]


def bound(addresses: list[str]) -> float:
    """A hang guard for one probe_many: every exchanger of every domain, every phase."""
    domains = {a.rpartition("@")[2] for a in addresses}
    per_session = TIMEOUTS.connect + TIMEOUTS.greeting + TIMEOUTS.mail + 8 * TIMEOUTS.rcpt
    return MARGIN + len(domains) * (2.0 + 3 * per_session)


def check(results: list[CalloutResult], addresses: list[str], expected: Any, server: Any) -> None:
    """The verdicts are the reference ones, and each rests on a reply the server gave."""
    assert [str(r.address) for r in results] == addresses
    for address, result in zip(addresses, results, strict=True):
        want = expected[address]
        assert (result.status, result.reply, result.catch_all, result.host) == (
            want.status,
            want.reply,
            want.catch_all,
            want.host,
        ), f"{address}: {result} != {want}"
        if result.status is CalloutStatus.ACCEPTED:
            assert result.reply is not None
            assert result.reply.is_positive
            assert result.reply.code in server.codes(address)
        elif result.status is CalloutStatus.REFUSED:
            assert result.reply is not None
            assert result.reply.is_permanent
            assert result.reply.code in server.codes(address)


@contextlib.contextmanager
def no_leaked_sockets() -> Iterator[None]:
    """Fail when a socket is left for the garbage collector to close."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield
        gc.collect()
    leaked = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaked, [str(w.message) for w in leaked]


def test_the_reference_covers_every_verdict(
    exchanger: Exchanger, unbound: UnboundServer, expected: dict[str, CalloutResult]
) -> None:
    statuses = {r.status for r in expected.values()}
    assert statuses == set(CalloutStatus)
    assert {r.catch_all for r in expected.values()} == {True, False, None}
    assert expected["ok1@failover.test"].host is not None
    assert "127.0.0.1" in expected["ok1@failover.test"].host
    assert exchanger.wait_idle()
    assert exchanger.data == 0


def test_one_callout_shared_by_threads(
    exchanger: Exchanger, unbound: UnboundServer, expected: dict[str, CalloutResult]
) -> None:
    shared = Callout(
        unbound.resolver(timeout=1.0), **options(exchanger.port, 1), refused_networks=()
    )
    rng = random.Random(7)
    jobs = [rng.sample(everything(), rng.randint(1, 9)) for _ in range(THREADS * 4)]
    outcomes: dict[int, list[CalloutResult] | BaseException] = {}

    def worker(first: int) -> None:
        for index in range(first, len(jobs), THREADS):
            try:
                outcomes[index] = shared.probe_many(jobs[index])
            except BaseException as exc:  # reported below, with the job
                outcomes[index] = exc

    with no_leaked_sockets():
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
        for thread in threads:
            thread.start()
        guard = sum(bound(job) for job in jobs)
        deadline = time.monotonic() + guard
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "a probe outlived its hang guard"
    for index, job in enumerate(jobs):
        outcome = outcomes[index]
        assert not isinstance(outcome, BaseException), (job, outcome)
        check(outcome, job, expected, exchanger)
    assert exchanger.wait_idle(), "a session is still open at the exchanger"
    assert exchanger.data == 0


@pytest.mark.parametrize("seed", [1, 2])
def test_one_async_callout_shared_by_tasks_some_cancelled(
    seed: int, exchanger: Exchanger, unbound: UnboundServer, expected: dict[str, CalloutResult]
) -> None:
    rng = random.Random(seed)
    jobs = [rng.sample(everything(), rng.randint(1, 6)) for _ in range(TASKS)]
    # Per task: run to the end, be cancelled after a delay, or run under asyncio.timeout.
    fates = [rng.choice(["finish", "cancel", "timeout"]) for _ in jobs]
    delays = [rng.uniform(0.0, 0.08) for _ in jobs]
    # Each cancellation also lands after a random number of loop turns, so early ones hit
    # the lookups and connects, later ones the dialogue.
    turns = [rng.randint(0, 40) for _ in jobs]

    async def timed(job: list[str], delay: float) -> list[CalloutResult]:
        async with asyncio.timeout(delay):
            return await shared.probe_many(job)

    async def cancel_later(task: asyncio.Task[list[CalloutResult]], index: int) -> None:
        for _ in range(turns[index]):
            await asyncio.sleep(0)
        await asyncio.sleep(delays[index])
        task.cancel()

    async def main() -> list[list[CalloutResult] | BaseException]:
        tasks: list[asyncio.Task[list[CalloutResult]]] = []
        cancellers = []
        for index, (job, fate) in enumerate(zip(jobs, fates, strict=True)):
            if fate == "timeout":
                tasks.append(asyncio.create_task(timed(job, delays[index])))
            else:
                tasks.append(asyncio.create_task(shared.probe_many(job)))
            if fate == "cancel":
                cancellers.append(asyncio.create_task(cancel_later(tasks[-1], index)))
        async with asyncio.timeout(sum(bound(job) for job in jobs)):
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*cancellers)
            # After the storm, the probes again, one after the other, on the same callout
            # (one at the mute domain: each costs two RCPT timeouts).
            again = [a for a in everything() if not a.endswith("@both.test")]
            for address in [*again, "ok1@both.test"]:
                check(await shared.probe_many([address]), [address], expected, exchanger)
        return outcomes

    with no_leaked_sockets():
        shared = AsyncCallout(
            unbound.async_resolver(timeout=1.0), **options(exchanger.port, 2), refused_networks=()
        )
        outcomes = run(main())
    for job, fate, outcome in zip(jobs, fates, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            assert fate != "finish", (job, outcome)
            kinds = asyncio.CancelledError if fate == "cancel" else TimeoutError
            assert isinstance(outcome, kinds), (job, fate, outcome)
        else:
            check(outcome, job, expected, exchanger)
    assert exchanger.wait_idle(), "a session is still open at the exchanger"
    assert exchanger.data == 0


def test_one_off_acallouts_at_once(
    exchanger: Exchanger, unbound: UnboundServer, expected: dict[str, CalloutResult]
) -> None:

    async def main() -> list[CalloutResult]:
        resolver = unbound.async_resolver(timeout=1.0)
        async with asyncio.timeout(bound(everything())):
            return await asyncio.gather(
                *(
                    acallout(address, resolver, **options(exchanger.port, 3), refused_networks=())
                    for address in everything()
                )
            )

    with no_leaked_sockets():
        results = run(main())
    check(results, everything(), expected, exchanger)
    assert exchanger.wait_idle()
    assert exchanger.data == 0
