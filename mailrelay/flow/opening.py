"""Opening a session: greeting, EHLO (HELO/LHLO), STARTTLS per the TLS policy, AUTH.

Rules: the RFC sections are cited where they are enforced; a TLS policy that cannot be met
and unsafe AUTH end the session politely (QUIT) and raise. No I/O here: only requests.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress

from mailrelay.errors import (
    AuthenticationError,
    DeliveryError,
    LocalProtocolError,
    RemoteProtocolError,
    ServerProtocolError,
    SessionRefused,
    TLSError,
)
from mailrelay.flow.bookkeeping import (
    _SessionClosed,
)
from mailrelay.flow.core import _SessionCore, log
from mailrelay.flow.requests import StartTLS, Step
from mailrelay.options import TLS
from mailrelay.protocol import (
    Auth,
    AuthAbort,
    AuthContinue,
    ConnectionClosed,
    Ehlo,
    Greeting,
    Helo,
    Lhlo,
)
from mailrelay.protocol import StartTLS as StartTLSCommand
from mailrelay.protocol.sasl import (
    BEARER_MECHANISMS,
    Mechanism,
    candidate_mechanisms,
    oauth_error_details,
)
from mailrelay.reply import Reply

# RFC 5321 §4.1.4: EHLO refused with one of these means "try HELO".
_HELO_FALLBACK = frozenset({500, 501, 502, 504, 550})
# RFC 4954 §6: 534 "mechanism too weak"; 504 "mechanism not supported" (some servers).
_NEXT_MECHANISM = frozenset({504, 534})
# RFC 4954 §6: the replies of a login attempted and failed (temporary failure, mechanism too
# weak, credentials invalid, encryption required), never of an AUTH refused for a login
# that stands (503, RFC 4954 §4).
_LOGIN_FAILED = frozenset({454, 534, 535, 538})


def _hello_name(name: str) -> str:
    """RFC 5321 §4.1.3: an IP address goes in EHLO as an address literal."""
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return name
    if address.version == 6:
        return f"[IPv6:{address.compressed}]"
    return f"[{address}]"


class _Opening(_SessionCore):
    """Opening the session: greeting, EHLO/HELO/LHLO, STARTTLS, AUTH."""

    # -- open ----------------------------------------------------------------------------------

    def open(self) -> Step[None]:
        """Greeting, EHLO (or HELO/LHLO), STARTTLS per policy, EHLO again, AUTH.

        Raises:
            SessionRefused: the greeting refused the session, or the server sent 421.
            TLSError: the TLS policy cannot be met, or the handshake failed.
            AuthenticationError: AUTH failed or would have been unsafe.
            ConnectionLost: the server closed the connection.
            ServerProtocolError: the server broke the protocol.
        """
        return (yield from self._guarded(self._open_step()))

    def _open_step(self) -> Step[None]:
        self._ensure_open()
        if self.greeting is not None:
            raise LocalProtocolError("open() runs once per session")
        try:
            yield from self._open()
        except _SessionClosed as closed:
            raise self._refuse(closed.reply, "while opening the session") from None

    def _open(self) -> Step[None]:
        event = yield from self._event("greeting")
        if isinstance(event, ConnectionClosed):
            yield from self._closed()
            raise _SessionClosed(None)
        if not isinstance(event, Greeting):
            raise AssertionError(f"the first event is always the greeting, not {event}")
        self.greeting = event.reply
        # Dovecot's submission service (2.3.19, Debian 12) crashes when the next message's
        # MAIL/RCPT/DATA follow the end of the data in one group, as RFC 2920 §3.1 allows:
        # each message was relayed, its 250 never sent, and a retry sends it twice. A batch
        # to it sends each message alone (pipelined within its transaction). Its LMTP
        # service takes pipelined batches. (A greeting an administrator changed hides it;
        # so deliver_many also takes an EHLO offering BURL, RFC 4468, which Dovecot's
        # submission service offers and few other servers do, as a sign.)
        self._each_alone = not self.config.lmtp and "dovecot" in event.reply.text.lower()
        if event.reply.code != 220:
            # RFC 5321 §3.1: a 554 greeting refuses the session; the server then waits for
            # QUIT. 421 (and any other code) also means "not now".
            if event.reply.code == 421:
                yield from self._closed()
            else:
                yield from self._abort()
            raise SessionRefused(
                f"the server refused the session: {event.reply}",
                reply=event.reply,
                host=self.config.peer,
            )
        # RFC 5321 §3.1: the client waits for the greeting, so nothing is owed after it; a
        # reply beyond it would answer EHLO, and every reply after it the wrong command.
        yield from self._nothing_more("the greeting")
        yield from self._hello()
        if self._wants_starttls():
            yield from self._starttls()
        if self.config.username is not None:
            yield from self._authenticate()
        # A reply beyond the last one asked for would answer the first transaction's MAIL.
        unasked = yield from self._close_if_unsolicited("while opening the session")
        if unasked is not None:
            refusal, self.auth_refusal = self.auth_refusal, None
            if refusal is not None:
                # AUTH was refused, then the server hung up: no retry can follow, and the
                # refusal is the news (as for a password that is not renewable).
                raise refusal from unasked
            raise unasked

    def _hello(self) -> Step[None]:
        # Each opening command is alone in flight: a reply beyond its own, already received
        # with it, would answer the next one (STARTTLS, AUTH: a session going on
        # unauthenticated, whose MAIL then gets AUTH's refusal), so it ends the session.
        name = _hello_name(self.config.local_hostname)
        if self.config.lmtp:
            # RFC 2033 §4.1: LHLO only; an LMTP server refusing it is not an SMTP server.
            yield from self._write(Lhlo(hostname=name), phase="greeting")
            reply = yield from self._opening_reply("LHLO")
            yield from self._check_hello(reply, "LHLO")
            return
        yield from self._write(Ehlo(hostname=name), phase="greeting")
        reply = yield from self._opening_reply("EHLO")
        if reply.code in _HELO_FALLBACK:
            log.debug("EHLO refused with %d; falling back to HELO", reply.code)
            yield from self._write(Helo(hostname=name), phase="greeting")
            reply = yield from self._opening_reply("HELO")
            yield from self._check_hello(reply, "HELO")
            self._extensions = None
            return
        yield from self._check_hello(reply, "EHLO")

    def _opening_reply(self, verb: str) -> Step[Reply]:
        """The reply to ``verb``, the one command in flight (see :meth:`_hello`). A refusal
        that ends the session stays the news, whatever came after it."""
        reply = yield from self._reply("greeting")
        if reply.is_positive or (verb == "EHLO" and reply.code in _HELO_FALLBACK):
            yield from self._nothing_more(f"{verb} while opening the session")
        return reply

    def _check_hello(self, reply: Reply, verb: str) -> Step[None]:
        if not reply.is_positive:
            yield from self._abort()
            raise SessionRefused(
                f"the server refused {verb}: {reply}", reply=reply, host=self.config.peer
            )
        if verb != "HELO":
            self._extensions = self._conn.extensions

    def _hello_after_auth(self) -> Step[None]:
        """EHLO (LHLO) once more after AUTH, for what the server offers only to a client that
        has logged in; called before the first message that needs something the server has
        not offered (see ``_Delivery._unlocked_by_auth``), at most once a session.

        RFC 4954 §4 asks for a new EHLO only after a SASL security layer, which no mechanism
        here negotiates; but a server may offer more once it knows who is sending: Dovecot's
        submission service offers DSN only after AUTH (it learns its relay's extensions
        then). Asking only when a message would otherwise lose something (its DSN requests
        dropped, or the message refused for SMTPUTF8, 8BITMIME or REQUIRETLS) spares every
        other session the round trip, and the servers that mishandle an EHLO after AUTH the
        risk. A refusal (some servers answer 503) keeps what the server offered before.
        Sessions that share :class:`~mailrelay.flow.ServerNotes` (``SessionConfig.notes``)
        stop asking once one was refused, ended the session, or changed nothing.

        Raises:
            _SessionClosed: the server answered 421 or hung up.
            AuthenticationError: the server had forgotten the login and refused it again
                (:meth:`_authenticate_again`).
        """
        self._hello_after_auth_due = False
        gained = False
        try:
            gained = yield from self._hello_again()
        finally:
            notes = self.config.notes
            if notes is not None and not gained:
                # Refused, the session ended, or the same offer as before login: later
                # sessions to this server spare the round trip (and the risk).
                notes.ehlo_after_auth = False

    def _hello_again(self) -> Step[bool]:
        """:meth:`_hello_after_auth`'s exchange: whether the server's offer changed."""
        if self._needs_rset:
            # A transaction left open (MAIL taken, every RCPT refused, no DATA): EHLO
            # would reset it too (RFC 5321 §4.1.4), but the connection sends no EHLO
            # inside a transaction; RSET closes it first.
            yield from self._rset()
        name = _hello_name(self.config.local_hostname)
        verb = "LHLO" if self.config.lmtp else "EHLO"
        command = Lhlo(hostname=name) if self.config.lmtp else Ehlo(hostname=name)
        yield from self._write(command, phase="greeting")
        # Alone in flight, between transactions: a reply beyond its own would answer MAIL.
        reply = yield from self._sole_reply("greeting", f"{verb} after AUTH")
        if reply.is_positive:
            before = self.extensions
            self._extensions = self._conn.extensions
            self._needs_rset = False  # RFC 5321 §4.1.4: EHLO resets as RSET does
            offered = " ".join(sorted(self.extensions.keywords))
            log.debug("%s after AUTH: the server now offers %s", verb, offered)
            if self.extensions != before:
                return True
            if self.extensions.auth:
                # The same reply as before login, AUTH mechanisms and all: it says nothing
                # of whether the server kept the login, and some forget it on EHLO (their
                # MAIL then gets 530). AUTH again tells: RFC 4954 §4 has a server that kept
                # it refuse a second AUTH (503); one that forgot takes it.
                yield from self._authenticate_again()
            return False
        log.info(
            "%s refused %s after AUTH (%d): going on with what it offered before",
            self.config.peer,
            verb,
            reply.code,
        )
        return False

    def _authenticate_again(self) -> Step[None]:
        """AUTH once more after :meth:`_hello_after_auth`, with the mechanism and password
        that succeeded: accepted, the server had forgotten the login (now renewed); refused
        (503, as RFC 4954 §4 asks of a server that kept it, or anything else), the session
        goes on as it was, unless the refusal is that of a failed login (454, 534, 535,
        538: the server had forgotten the first one too).

        Raises:
            AuthenticationError: that failed login (the session is ended with QUIT).
        """
        assert self._login is not None
        assert self.config.username is not None
        mechanism, password = self._login
        try:
            reply, _ = yield from self._sasl(
                mechanism, self.config.username, password, "AUTH again after EHLO"
            )
        except AuthenticationError:
            # An unusable challenge this time: the session is over (QUIT sent), and the
            # message was not sent, which is not the credentials' fault.
            raise _SessionClosed(None) from None
        # Alone in flight: a reply beyond it would answer MAIL.
        yield from self._nothing_more("AUTH again after EHLO")
        if reply is None:
            log.info("%s forgot the login on EHLO after AUTH; logged in again", self.config.peer)
        elif reply.code in _LOGIN_FAILED:
            # Not 503: the server took this AUTH for a login (RFC 4954 §4), and refused it,
            # so it had forgotten the first one; its MAIL would get 530, and every
            # recipient would be refused for a failed login (PERMANENT).
            yield from self._abort()
            raise AuthenticationError(
                f"the server forgot the login on EHLO after AUTH and refused it again: {reply}",
                reply=reply,
                host=self.config.peer,
            )
        else:
            log.debug("AUTH again after EHLO refused with %d: the login stands", reply.code)

    def _wants_starttls(self) -> bool:
        policy = self.config.tls
        if policy in (TLS.NONE, TLS.IMPLICIT):
            return False
        return policy is TLS.STARTTLS or self.extensions.starttls

    def _starttls(self) -> Step[None]:
        required = self.config.tls is TLS.STARTTLS
        if not self.extensions.starttls:
            yield from self._abort()
            raise TLSError(
                "TLS is required but the server does not offer STARTTLS",
                host=self.config.peer,
            )
        yield from self._write(StartTLSCommand(), phase="greeting")
        reply = yield from self._reply("greeting")
        if reply.code != 220:
            if not required:
                # RFC 3207 §4: the client may go on without TLS when the server cannot start it.
                # (A reply beyond the refusal would answer the next command. After a 220,
                # bytes that came with it are refused by tls_established() below.)
                yield from self._nothing_more("STARTTLS while opening the session")
                log.debug("STARTTLS refused (%d); going on in plain text", reply.code)
                return
            yield from self._abort()
            raise TLSError(
                f"TLS is required but the server refused STARTTLS: {reply}",
                reply=reply,
                host=self.config.peer,
            )
        try:
            yield StartTLS(server_hostname=self.config.server_hostname)
        except Exception as exc:
            yield from self._closed()
            transient = not required or (isinstance(exc, DeliveryError) and exc.is_transient)
            raise TLSError(
                f"the TLS handshake failed: {exc}", is_transient=transient, host=self.config.peer
            ) from exc
        try:
            self._conn.tls_established()
        except RemoteProtocolError as exc:
            # RFC 3207 §4.2: bytes that came with the 220 are a response-injection attempt.
            yield from self._closed()
            raise ServerProtocolError(str(exc), host=self.config.peer) from exc
        self.encrypted = True
        self._extensions = None
        # RFC 3207 §4.2: forget what the server said before TLS and ask again.
        yield from self._hello()

    # -- AUTH ----------------------------------------------------------------------------------

    #: After :meth:`open` with a renewable password (``SessionConfig.password_renewable``):
    #: the error the server's refusal would have raised, while the connection stays open for
    #: :meth:`retry_authentication`; ``None`` otherwise.
    auth_refusal: AuthenticationError | None = None

    def _ensure_ready(self) -> None:
        """Open, and not left unauthenticated by a refused AUTH that waits for
        :meth:`retry_authentication`: mail is never sent on such a session, whatever the
        caller forgot (the refusal is raised instead)."""
        self._ensure_open()
        if self.auth_refusal is not None:
            raise self.auth_refusal

    def retry_authentication(self, password: str | None) -> Step[None]:
        """AUTH once more after :attr:`auth_refusal`, with a renewed password (a fresh token).

        ``None`` means there is nothing new to try: the session ends politely (QUIT) and the
        refusal is raised. A second refusal always raises: one retry per connection, never a
        loop.

        Raises:
            AuthenticationError: the refusal, or the new password's.
            LocalProtocolError: there is no refusal to retry.
        """
        return (yield from self._guarded(self._retry_authentication(password)))

    def _retry_authentication(self, password: str | None) -> Step[None]:
        self._ensure_open()
        refusal, self.auth_refusal = self.auth_refusal, None
        if refusal is None:
            raise LocalProtocolError("no refused AUTH to retry")
        if password is None:
            yield from self._abort()
            raise refusal
        try:
            yield from self._authenticate(password, final=True)
        except _SessionClosed as closed:
            # As in open(): the internal signal never leaves the dialogue.
            raise self._refuse(closed.reply, "during AUTH") from None
        unasked = yield from self._close_if_unsolicited("after AUTH")
        if unasked is not None:
            raise unasked

    def _authenticate(self, password: str | None = None, *, final: bool = False) -> Step[None]:
        username = self.config.username
        if password is None:
            password = self.config.password
        assert username is not None
        assert password is not None
        if not self.encrypted and not self.config.allow_insecure_auth:
            yield from self._abort()
            raise AuthenticationError(
                "refusing to send credentials over an unencrypted connection "
                "(use TLS, or allow_insecure_auth=True)",
                host=self.config.peer,
            )
        try:
            mechanisms = candidate_mechanisms(
                self.extensions.auth, preferred=self.config.auth_mechanisms
            )
        except AuthenticationError as exc:
            exc.host = self.config.peer
            yield from self._abort()
            raise
        if not mechanisms:
            yield from self._abort()
            offered = ", ".join(sorted(self.extensions.auth)) or "no AUTH at all"
            raise AuthenticationError(
                f"no usable SASL mechanism in common with the server (it offers {offered})",
                host=self.config.peer,
            )
        last: Reply | None = None
        detail: str | None = None
        when = "AUTH" if final else "AUTH while opening the session"
        for index, mechanism in enumerate(mechanisms):
            if index:
                # A reply beyond the last refusal would answer this mechanism's AUTH.
                yield from self._nothing_more(when)
            reply, detail = yield from self._sasl(mechanism, username, password, when)
            if reply is None:
                self.authenticated = True
                notes = self.config.notes
                self._hello_after_auth_due = notes is None or notes.ehlo_after_auth
                self._login = (mechanism, password)
                return
            last = reply
            if reply.code not in _NEXT_MECHANISM:
                break
            log.debug(
                "AUTH %s refused with %d; trying the next mechanism", mechanism.name, reply.code
            )
        assert last is not None
        # RFC 7628 §3.2.2: the server's JSON error (status, scope) says why a token failed.
        why = f" ({detail})" if detail else ""
        refusal = AuthenticationError(
            f"the server refused authentication: {last}{why}", reply=last, host=self.config.peer
        )
        if not final and self.config.password_renewable and _renewable(last):
            # An expired token looks like bad credentials (535) or a temporary failure
            # (454): the transport may ask its provider for a fresh one and retry once on
            # this connection (RFC 4954 §4 allows AUTH again after a failed exchange).
            log.debug("AUTH refused with %d; the password may be renewed", last.code)
            self.auth_refusal = refusal
            return
        yield from self._abort()
        raise refusal

    def _sasl(
        self, mechanism: Mechanism, username: str, password: str, when: str
    ) -> Step[tuple[Reply | None, str | None]]:
        """One AUTH exchange: ``(None, None)`` on success, else the refusing reply and, for a
        bearer-token mechanism, what the server's error challenge said. ``when``: where the
        dialogue is, for the error a reply nobody asked for raises."""
        exchange = mechanism.start(username, password)
        try:
            initial = next(exchange)
        except AuthenticationError as exc:
            exc.host = self.config.peer
            yield from self._abort()
            raise
        yield from self._write(
            Auth(mechanism=mechanism.name, initial_response=initial), phase="auth"
        )
        detail: str | None = None
        while True:
            reply = yield from self._reply("auth")
            if reply.code == 235:
                try:
                    exchange.send(None)
                except StopIteration:
                    return None, None
                except AuthenticationError as exc:
                    exc.host = self.config.peer
                    yield from self._abort()
                    raise
                raise AssertionError("a SASL exchange must end when the server says 235")
            if reply.code != 334:
                exchange.close()
                return reply, detail
            # One AUTH line in flight at a time (RFC 4954 §4): a reply beyond the challenge
            # would answer our response. (After a final reply, the caller looks.)
            yield from self._nothing_more(when)
            try:
                challenge = base64.b64decode(reply.lines[0].strip(), validate=True)
                response = exchange.send(challenge)
            except (binascii.Error, ValueError, AuthenticationError, StopIteration) as exc:
                # RFC 4954 §4: "*" cancels the exchange; the server answers 501.
                yield from self._write(AuthAbort(), phase="auth")
                yield from self._reply("auth")
                yield from self._abort()
                if isinstance(exc, AuthenticationError):
                    exc.host = self.config.peer
                    raise
                raise AuthenticationError(
                    f"AUTH {mechanism.name}: the server sent an unusable challenge",
                    host=self.config.peer,
                ) from None
            if mechanism.name in BEARER_MECHANISMS:
                detail = oauth_error_details(challenge)
            yield from self._write(AuthContinue(data=response or b""), phase="auth")


def _renewable(reply: Reply) -> bool:
    """Whether a fresh password (token) might fix this refusal: RFC 4954 §6's 535
    "credentials invalid" or a transient 4xx such as 454; not 534/538 (mechanism, encryption)."""
    return reply.code == 535 or reply.is_transient
