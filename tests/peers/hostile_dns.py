"""A scripted, in-process DNS server on loopback that can misbehave on purpose.

Theory of operation: :class:`HostileDNS` listens on ``127.0.0.1`` at a port the kernel picks,
on UDP and TCP (the same port number), each in a thread of its own. Every query is parsed
with :mod:`dns.message` and answered from a small zone table (:attr:`HostileDNS.records`),
unless the test scripted a :class:`Fault` for that name and type (:attr:`HostileDNS.faults`):
silence, an error RCODE, a truncated UDP answer, a wrong query id, an answer about another
name, garbage bytes, a TCP connection closed half-way, a delayed answer.

Rules:

- Names are keys in lower case without the final dot; types are their text (``"MX"``).
  A name with records of some type but not the asked one is NODATA, a name with none is
  NXDOMAIN; both carry the ``test.`` SOA (:data:`SOA_TTL`, :data:`SOA_MINIMUM`), so they can
  be cached negatively (RFC 2308 §5).
- A CNAME is answered as an authoritative server would: the alias and then, as far as the
  zone goes, its target's records (RFC 1034 §4.3.2 step 3a); at most :data:`MAX_CHASE`
  links are put in one answer, so a loop ends. With :attr:`HostileDNS.chase_cnames` off
  the answer stops at the first CNAME and the client must follow it.
- UDP answers larger than the client's advertised size (512 without EDNS, RFC 1035 §4.2.1)
  are sent empty with TC set (RFC 2181 §9), as a real server does; the client then asks
  over TCP, where answers up to 65,535 octets fit (RFC 7766).
- Every blocking call has a timeout and every loop is bounded; :meth:`HostileDNS.stop`
  wakes and joins both threads and fails loudly when one does not end. An exception in a
  serving thread is a bug in the test: it is kept in :attr:`HostileDNS.errors`.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple, Self

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

__all__ = ["MAX_CHASE", "SOA_MINIMUM", "SOA_TTL", "Fault", "HostileDNS", "Query"]

HOST = "127.0.0.1"
SOA_TTL = 60
SOA_MINIMUM = 30
#: The name an :attr:`Fault.OTHER_NAME` answer is about.
OTHER_NAME = "someone-else.test."
#: CNAME links an answer may carry (the server's own loop guard).
MAX_CHASE = 8
#: Seconds a delayed answer (:attr:`Fault.SLOW`) waits by default.
DEFAULT_DELAY = 0.1
_POLL = 0.05
_ROOT = dns.name.root  # names in rdata text are absolute
_MAX_TCP_QUERIES = 64  # per connection


class Fault(enum.Enum):
    """How the server misbehaves for one name and type."""

    #: No answer at all.
    SILENCE = "silence"
    #: RCODE 2.
    SERVFAIL = "servfail"
    #: RCODE 5.
    REFUSED = "refused"
    #: RCODE 1 (the server says our query is malformed).
    FORMERR = "formerr"
    #: RCODE 4.
    NOTIMP = "notimp"
    #: RCODE 6, which no answer to a query should carry.
    YXDOMAIN = "yxdomain"
    #: RCODE 3 with the SOA, whatever the zone says.
    NXDOMAIN = "nxdomain"
    #: NOERROR, no answer records, the SOA: "no data", whatever the zone says.
    NODATA = "nodata"
    #: Over UDP an empty answer with TC set; over TCP the zone's answer.
    TRUNCATE = "truncate"
    #: TC over UDP, and over TCP a length prefix followed by only part of the answer.
    TCP_CLOSE = "tcp-close"
    #: The zone's answer under another query id.
    WRONG_ID = "wrong-id"
    #: An answer whose question and records are about another name.
    OTHER_NAME = "other-name"
    #: Bytes that do not parse as a DNS message (starting with the query's id).
    GARBAGE = "garbage"
    #: The zone's answer, after :attr:`HostileDNS.delay` seconds.
    SLOW = "slow"
    #: The zone's answer passed through :attr:`HostileDNS.mangle`, which may change, cut or
    #: extend its bytes; with :attr:`HostileDNS.mangle_over_tcp` UDP gets TC, TCP the bytes.
    MANGLE = "mangle"


_RCODES = {
    Fault.SERVFAIL: dns.rcode.SERVFAIL,
    Fault.REFUSED: dns.rcode.REFUSED,
    Fault.FORMERR: dns.rcode.FORMERR,
    Fault.NOTIMP: dns.rcode.NOTIMP,
    Fault.YXDOMAIN: dns.rcode.YXDOMAIN,
}


class Query(NamedTuple):
    """One query the server received."""

    name: str
    rdtype: str
    tcp: bool


def _key(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


class HostileDNS:
    """The server; use as a context manager or :meth:`start` / :meth:`stop`.

    Attributes:
        port: the UDP and TCP port (known after :meth:`start`).
        records: ``(name, type) -> (ttl, [rdata text, ...])``; edit freely between queries.
        faults: ``(name, type) -> Fault``; the type ``"*"`` matches every type of the name.
        chase_cnames: put a CNAME's target records in the same answer (default True).
        mangle: what :attr:`Fault.MANGLE` does to an answer's bytes (the identity by default).
        mangle_over_tcp: :attr:`Fault.MANGLE` answers UDP with TC, TCP with the bytes.
        glue: ``(name, type, rdata text)`` records put in the additional section of every
            zone answer: unasked-for data a careful client never believes or caches.
        delay: seconds a :attr:`Fault.SLOW` answer waits.
        queries: every query received, in order.
        most_waiting: the most :attr:`Fault.SLOW` UDP queries ever waiting for their answer
            at the same time (1 for a client that asks one thing at a time).
        errors: exceptions raised while serving (a test bug when not empty).
    """

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], tuple[int, list[str]]] = {}
        self.faults: dict[tuple[str, str], Fault] = {}
        self.chase_cnames = True
        self.delay = DEFAULT_DELAY
        self.glue: list[tuple[str, str, str]] = []
        self.mangle: Callable[[bytes], bytes] = bytes
        self.mangle_over_tcp = False
        self.most_waiting = 0
        self._waiting = 0
        self.queries: list[Query] = []
        self._parsed: dict[tuple[dns.name.Name, str], tuple[object, dns.rrset.RRset]] = {}
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._threads: list[threading.Thread] = []
        self._late_threads: list[threading.Thread] = []
        self.port = 0

    # -- scripting -------------------------------------------------------------------------

    def add(self, name: str, rdtype: str, *rdatas: str, ttl: int = 300) -> None:
        """Add records of one type to ``name`` (replacing that type's records)."""
        self.records[name.lower().rstrip("."), rdtype.upper()] = (ttl, list(rdatas))

    def fault(self, name: str, rdtype: str, fault: Fault) -> None:
        """Misbehave with ``fault`` for ``name`` and ``rdtype`` (``"*"``: every type)."""
        self.faults[name.lower().rstrip("."), rdtype.upper()] = fault

    def reset(self) -> None:
        """Forget every record, fault and query (between Hypothesis examples)."""
        with self._lock:
            self.records.clear()
            self.faults.clear()
            self.queries.clear()
            self._parsed.clear()
            self._late_threads = [t for t in self._late_threads if t.is_alive()]
            self.chase_cnames = True
            self.delay = DEFAULT_DELAY
            self.glue.clear()
            self.mangle = bytes
            self.mangle_over_tcp = False
            self.most_waiting = 0

    def count(self, name: str | None = None) -> int:
        """How many queries arrived (for ``name``, when given)."""
        with self._lock:
            return sum(1 for q in self.queries if name is None or q.name == name)

    # -- answering -------------------------------------------------------------------------

    def _soa(self) -> dns.rrset.RRset:
        return dns.rrset.from_text(
            "test.", SOA_TTL, "IN", "SOA", f"ns.test. admin.test. 1 3600 600 86400 {SOA_MINIMUM}"
        )

    def _fill(self, response: dns.message.Message, qname: dns.name.Name, rdtype: str) -> None:
        """The zone's answer for ``qname``/``rdtype`` into ``response``."""
        name = qname
        for _ in range(MAX_CHASE):
            key = _key(name)
            found = self.records.get((key, rdtype))
            if found is not None:
                response.answer.append(self._rrset(name, rdtype, found))
                return
            cname = self.records.get((key, "CNAME"))
            if cname is None or rdtype == "CNAME":
                break
            ttl, (target,) = cname
            response.answer.append(dns.rrset.from_text(name, ttl, "IN", "CNAME", target))
            if not self.chase_cnames:
                return
            name = dns.name.from_text(target)
        else:
            return  # a long chain or a loop: the links so far are the answer
        if not any(key[0] == _key(name) for key in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        response.authority.append(self._soa())

    def _rrset(
        self, name: dns.name.Name, rdtype: str, found: tuple[int, list[str]]
    ) -> dns.rrset.RRset:
        """The records as an RRset, parsed once per table entry (2,000 MX take a while)."""
        cached = self._parsed.get((name, rdtype))
        if cached is None or cached[0] is not found:
            rrset = dns.rrset.from_text_list(
                name, found[0], "IN", rdtype, found[1], origin=_ROOT, relativize=False
            )
            cached = self._parsed[name, rdtype] = (found, rrset)
        return cached[1]

    def respond(self, wire: bytes, *, tcp: bool) -> bytes | None:
        """The bytes to send back for one query (``None``: stay silent)."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if len(query.question) != 1:
            return None
        qname = query.question[0].name
        rdtype = dns.rdatatype.to_text(query.question[0].rdtype)
        with self._lock:
            self.queries.append(Query(_key(qname), rdtype, tcp))
            fault = self.faults.get((_key(qname), rdtype)) or self.faults.get((_key(qname), "*"))
            return self._answer(query, qname, rdtype, fault, tcp=tcp)

    def _answer(
        self,
        query: dns.message.Message,
        qname: dns.name.Name,
        rdtype: str,
        fault: Fault | None,
        *,
        tcp: bool,
    ) -> bytes | None:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if fault is Fault.SILENCE:
            return None
        if fault is Fault.GARBAGE:
            return _framed(wire_id(query) + b"\xff\x00garbage, not a DNS message\x07", tcp=tcp)
        if fault is not None and fault in _RCODES:
            response.set_rcode(_RCODES[fault])
            return _framed(response.to_wire(), tcp=tcp)
        if fault is Fault.NXDOMAIN:
            response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(self._soa())
            return _framed(response.to_wire(), tcp=tcp)
        if fault is Fault.NODATA:
            response.authority.append(self._soa())
            return _framed(response.to_wire(), tcp=tcp)
        truncating = {Fault.TRUNCATE, Fault.TCP_CLOSE} | (
            {Fault.MANGLE} if self.mangle_over_tcp else set()
        )
        if fault in truncating and not tcp:
            response.flags |= dns.flags.TC
            return response.to_wire()
        if fault is Fault.OTHER_NAME:
            # The zone's answer for the asked name, but question and owners say another.
            self._fill(response, qname, rdtype)
            other = dns.name.from_text(OTHER_NAME)
            response.question = [
                dns.rrset.RRset(other, dns.rdataclass.IN, query.question[0].rdtype)
            ]
            for rrset in response.answer:
                rrset.name = other
            return _framed(response.to_wire(), tcp=tcp)
        self._fill(response, qname, rdtype)
        for name, glue_type, rdata in self.glue:
            response.additional.append(
                dns.rrset.from_text_list(
                    name + ".", 3600, "IN", glue_type, [rdata], origin=_ROOT, relativize=False
                )
            )
        if fault is Fault.WRONG_ID:
            response.id = (query.id + 1) % 65536
        if fault is Fault.MANGLE:
            return _framed(self.mangle(response.to_wire()), tcp=tcp)
        if tcp:
            wire = response.to_wire()
            if fault is Fault.TCP_CLOSE:
                return struct.pack("!H", len(wire) + 100) + wire[: len(wire) // 2]
            return _framed(wire, tcp=True)
        limit = max(query.payload, 512) if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            # RFC 2181 §9: too big for the client's buffer: say so, and it retries over TCP.
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.TC | dns.flags.AA
            return truncated.to_wire()

    # -- serving ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind both sockets on one free port and start serving."""
        for _ in range(20):  # the UDP port's TCP twin may be taken; try another
            self._udp.bind((HOST, 0))
            port = self._udp.getsockname()[1]
            try:
                self._tcp.bind((HOST, port))
            except OSError:
                self._udp.close()
                self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                continue
            self.port = port
            break
        else:
            raise RuntimeError("no free port for both UDP and TCP")
        self._udp.settimeout(_POLL)
        self._tcp.settimeout(_POLL)
        self._tcp.listen(16)
        for target in (self._serve_udp, self._serve_tcp):
            thread = threading.Thread(target=self._guard, args=(target,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop both threads and close the sockets."""
        self._stopping.set()
        for thread in self._threads + self._late_threads:
            thread.join(5)
            if thread.is_alive():
                raise RuntimeError("a hostile DNS thread did not stop")
        self._udp.close()
        self._tcp.close()

    def _guard(self, target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:
            self.errors.append(exc)

    def _wait(self, fault_delay: bool) -> None:
        if fault_delay:
            self._stopping.wait(self.delay)

    def _is_slow(self, wire: bytes) -> bool:
        with contextlib.suppress(dns.exception.DNSException):
            query = dns.message.from_wire(wire)
            if len(query.question) == 1:
                key = _key(query.question[0].name)
                rdtype = dns.rdatatype.to_text(query.question[0].rdtype)
                with self._lock:
                    fault = self.faults.get((key, rdtype)) or self.faults.get((key, "*"))
                return fault is Fault.SLOW
        return False

    def _serve_udp(self) -> None:
        while not self._stopping.is_set():
            try:
                wire, peer = self._udp.recvfrom(65535)
            except TimeoutError:
                continue
            if self._is_slow(wire):
                # Late, but without holding up the answers to other queries meanwhile.
                late = threading.Thread(
                    target=self._guard, args=(functools.partial(self._late, wire, peer),)
                )
                late.daemon = True
                late.start()
                self._late_threads.append(late)
            else:
                self._send_udp(wire, peer)

    def _late(self, wire: bytes, peer: tuple[str, int]) -> None:
        with self._lock:
            self._waiting += 1
            self.most_waiting = max(self.most_waiting, self._waiting)
        self._stopping.wait(self.delay)
        with self._lock:
            self._waiting -= 1
        self._send_udp(wire, peer)

    def _send_udp(self, wire: bytes, peer: tuple[str, int]) -> None:
        answer = self.respond(wire, tcp=False)
        if answer is not None:
            with contextlib.suppress(OSError):
                self._udp.sendto(answer, peer)

    def _serve_tcp(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _peer = self._tcp.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._guard_conn, args=(conn,), daemon=True)
            thread.start()

    def _guard_conn(self, conn: socket.socket) -> None:
        try:
            self._serve_conn(conn)
        except OSError:
            pass  # the client went away
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            conn.close()

    def _serve_conn(self, conn: socket.socket) -> None:
        conn.settimeout(_POLL)
        deadline = time.monotonic() + 5.0
        buffer = b""
        for _ in range(_MAX_TCP_QUERIES):
            while len(buffer) < 2 or len(buffer) < 2 + struct.unpack("!H", buffer[:2])[0]:
                if self._stopping.is_set() or time.monotonic() > deadline:
                    return
                try:
                    data = conn.recv(65537)
                except TimeoutError:
                    continue
                if not data:
                    return
                buffer += data
            size = struct.unpack("!H", buffer[:2])[0]
            wire, buffer = buffer[2 : 2 + size], buffer[2 + size :]
            self._wait(self._is_slow(wire))
            answer = self.respond(wire, tcp=True)
            if answer is None:
                continue
            conn.sendall(answer)
            if answer[:2] != struct.pack("!H", len(answer) - 2):
                return  # a TCP_CLOSE answer: hang up half-way


def _framed(wire: bytes, *, tcp: bool) -> bytes:
    """``wire`` as it goes out: with its two-octet length over TCP (RFC 1035 §4.2.2)."""
    return struct.pack("!H", len(wire)) + wire if tcp else wire


def wire_id(query: dns.message.Message) -> bytes:
    """The query's id as it goes on the wire."""
    return struct.pack("!H", query.id)


def mx_records(pairs: Sequence[tuple[int, str]]) -> list[str]:
    """MX rdata text for ``(preference, target)`` pairs."""
    return [f"{preference} {target}" for preference, target in pairs]
