"""A transport that hands each message to the local MTA's ``sendmail`` program.

Postfix, Exim, Sendmail, OpenSMTPD and msmtp all install a ``sendmail``-compatible command
(usually ``/usr/sbin/sendmail``) that reads one message on its standard input and queues it.
Rules of this module:

* The command line is ``[command, *arguments, "-i", "-f", sender, *dsn, "--", *recipients]``
  and runs without a shell (``subprocess`` / ``asyncio.create_subprocess_exec``), with the
  environment left as it is. ``-i``: a line holding a lone ``.`` does not end the message.
  ``-f``: the envelope sender; the null reverse-path goes as ``-f <>``, the form Sendmail,
  Exim and Postfix all accept. ``--`` ends the options, so a recipient can never be read
  as one (Postfix's sendmail(1) asks for exactly this structure). The caller's
  ``arguments`` (for example ``["-C", "/etc/postfix-out"]``, Postfix's configuration
  directory) come first, where the program reads its options.
* Addresses go in their SMTP form (:meth:`Address.smtp_path
  <mailrelay.address.Address.smtp_path>`: A-label domains), and only when the program cannot
  misread them: a dot-atom local part (RFC 5322 §3.2.3 ``atext`` and dots) and a host name
  or address literal, not starting with ``-``. A quoted local part (spaces, commas,
  parentheses, backslashes) is refused, because ``sendmail`` programs parse their arguments
  as RFC 822 address lists: Postfix's turns ``-f "a b <x"`` into ``a@<myhostname>`` with a
  warning and exit status 0. A recipient refused so is a ``PERMANENT`` result with a reason
  (never sent, the others are); a sender refused so refuses every recipient. Nothing is
  spawned for a message without a recipient left.
* Non-ASCII local parts (RFC 6531) go as UTF-8 when ``smtputf8=True`` (the default): Postfix
  3.0 and later detect them itself (``smtputf8_autodetect_classes`` includes ``sendmail`` by
  default); with ``smtputf8=False`` a message whose envelope needs SMTPUTF8 is refused before
  sending, every recipient ``PERMANENT``, as an SMTP server without SMTPUTF8 would have it.
  UTF-8 in the message's own header fields is the MTA's business (Postfix detects it too).
* DSN (RFC 3461): the envelope's RET goes as ``-Rfull|hdrs``, its ENVID as ``-Venvid``
  and the recipients' NOTIFY as ``-Nsuccess,failure,delay`` (or ``never``), each value
  attached to its option; Postfix's, Sendmail's and OpenSMTPD's sendmail take
  these options in either form. Exim's does not: a lone ``-N`` is its "do not deliver"
  debugging option (open to any caller submitting a message; it exits 0, a silent loss),
  ``-R`` starts a queue run. So a program whose real path (links followed) is named
  ``exim...`` gets no DSN options, as an SMTP server without DSN gets no DSN parameters;
  and the values are attached so that an Exim not recognised so refuses the command
  loudly ("unknown, malformed, or incomplete option") instead. msmtp (a relay-only
  sendmail, no queue of its own) gets none either: it knows no ``-V`` (exit 64: a message
  with an ENVID, as the tracker sends, would be refused for good) and, given ``-N`` or
  ``-R``, refuses the whole message when its server does not offer DSN (exit 69), where
  an SMTP client would just not ask. ``-N`` holds for the whole command, so
  recipients asking for different NOTIFY values are handed over by one process each (in
  the order their values first appear). ORCPT has no command-line option and is not passed.
  REQUIRETLS (RFC 8689) cannot be asked of the program, so such an envelope is refused
  before sending (every recipient ``PERMANENT``), since RFC 8689 §4.1 forbids sending
  it on without the guarantee.
* The message is streamed from :meth:`Message.chunks() <mailrelay.message.Message.chunks>`
  to the program's standard input with LF line ends (the local convention every
  ``sendmail`` reads; Postfix also accepts CRLF), never joined in memory. Standard output
  and error are read at the same time, so a chatty program never blocks on a full pipe,
  and at most :data:`OUTPUT_LIMIT` bytes of each are kept.
* Exit status 0: every recipient handed over is ``ACCEPTED`` with a reason saying that the
  message was *queued by the local MTA*, not delivered (the MTA reports later failures as
  bounces to the sender); whatever the program wrote is logged as a warning (Postfix's
  sendmail warns there about options it ignored). Any other status raises
  :class:`~mailrelay.errors.LocalMTAError` with the status's ``sysexits.h`` name and the
  program's (bounded) standard error. It is transient for ``EX_TEMPFAIL`` (75),
  ``EX_OSERR`` (71) and ``EX_IOERR`` (74) — the statuses Sendmail itself queues on — for
  death by a signal and for statuses outside ``sysexits.h`` (a crash or a misconfiguration
  someone can fix: the recipients are not shown to be bad); permanent for the other
  ``sysexits.h`` statuses (``EX_NOUSER`` 67, ``EX_DATAERR`` 65, ``EX_NOPERM`` 77, ...).
  Except where msmtp (which has no queue and relays at once) quotes its server's reply
  (``server message: 450 ...``): the reply decides, 4xx transient, 5xx permanent, since
  msmtp exits 69 (``EX_UNAVAILABLE``) for a 450 as for a refusal.
  A program that exits with 0 but stopped reading before the end of the message (a broken
  pipe) raises a transient ``LocalMTAError``: it cannot have queued the message we gave
  it. Postfix's own sendmail exits with 75 for most of its fatal errors (a missing
  ``main.cf`` included), so that mail is retried rather than lost.
* With several NOTIFY groups, a group that fails while another was queued does not raise
  (that would hide the queued one, and a retry would send it twice): its recipients carry
  the error as their result (outcome by ``is_transient``, ``reason`` naming the error), as
  ``send_many`` does for a whole message. The error is raised only when no recipient got
  an answer at all.
* ``timeout`` bounds one whole hand-over (start, writing, exit). Past it the program gets
  SIGTERM, then SIGKILL after :data:`TERMINATE_GRACE` seconds, and the send raises a
  transient :class:`~mailrelay.errors.DeliveryTimeout`. A program that has exited is not
  waited for beyond :data:`EXIT_GRACE` seconds to close pipes a child of it still holds;
  a message not written to its end by then was not read by the program (transient
  ``LocalMTAError``, as for a broken pipe), whatever its status.
  Cancelled (``asend``), the program is stopped the same way before the cancellation goes
  on. Only the process this module started is ever signalled.
* The program is looked up at construction (``ConfigurationError`` when it is missing or
  not executable); if it cannot be started at send time,
  :class:`~mailrelay.errors.ConnectError` (transient).
* Delivery through a local MTA is at-least-once: a program killed by the timeout after
  queueing the message, but before exiting, leaves a message that a retry sends again.
* One process per message (per NOTIFY group, and per 128 KiB of recipients on its
  command line: a longer list would pass the system's ``ARG_MAX``, so it goes in several
  runs, failing as NOTIFY groups do): ``send_many`` / ``asend_many`` are the base
  class's, so a failed message becomes its result's ``error`` and the batch goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Final

from mailrelay._shown import Shown
from mailrelay.address import Address
from mailrelay.envelope import Envelope, Notify, Recipient
from mailrelay.errors import ConfigurationError, ConnectError, DeliveryTimeout, LocalMTAError
from mailrelay.message import Message
from mailrelay.reply import EnhancedStatus, Reply
from mailrelay.results import DeliveryResult, Outcome, RecipientResult, error_status
from mailrelay.transport.base import AsyncTransport, Transport
from mailrelay.transport.file import _to_lf

__all__ = [
    "DEFAULT_COMMAND",
    "DEFAULT_TIMEOUT",
    "EXIT_GRACE",
    "OUTPUT_LIMIT",
    "TERMINATE_GRACE",
    "SendmailTransport",
    "exit_is_transient",
]

log = logging.getLogger(__name__)

#: Where Postfix, Exim, Sendmail, OpenSMTPD and msmtp install their sendmail command.
DEFAULT_COMMAND = "/usr/sbin/sendmail"
#: Seconds one hand-over may take by default (RFC 5321 §4.5.3.2 gives 10 minutes to the
#: end of data; a local queue is faster, but a large message still takes its time).
DEFAULT_TIMEOUT = 600.0
#: Bytes of standard output and of standard error kept per process; the rest is read and
#: dropped, so a broken or hostile program cannot use unbounded memory.
OUTPUT_LIMIT = 16_384
#: Seconds between SIGTERM and SIGKILL for a program past its timeout (or cancelled).
TERMINATE_GRACE = 2.0
#: Seconds to wait, once the program has exited, for its pipes to close (a child of it
#: may still hold them).
EXIT_GRACE = 1.0
# Seconds to wait for the exit of a program sent SIGKILL (it cannot ignore it).
_KILLED_EXIT = 10.0
# Bytes of recipients on one command line: far below Linux's ARG_MAX (2 MiB, shared with
# the environment); a longer list goes in several runs of the program (execve's E2BIG
# would make the message impossible to hand over, at every retry).
_ARGV_BUDGET = 131_072
# The stderr text shown in an error message, in characters.
_SHOWN_OUTPUT = 2000
_READ_SIZE = 65_536

# sysexits.h (BSD, also in glibc): the statuses a sendmail program exits with.
_SYSEXITS = {
    64: "EX_USAGE: command line usage error",
    65: "EX_DATAERR: data format error",
    66: "EX_NOINPUT: cannot open input",
    67: "EX_NOUSER: addressee unknown",
    68: "EX_NOHOST: host name unknown",
    69: "EX_UNAVAILABLE: service unavailable",
    70: "EX_SOFTWARE: internal software error",
    71: "EX_OSERR: system error",
    72: "EX_OSFILE: critical OS file missing",
    73: "EX_CANTCREAT: can't create output file",
    74: "EX_IOERR: input/output error",
    75: "EX_TEMPFAIL: temporary failure",
    76: "EX_PROTOCOL: remote error in protocol",
    77: "EX_NOPERM: permission denied",
    78: "EX_CONFIG: configuration error",
}
# Sendmail queues (rather than bounces) on these when a mailer exits with them.
_TRANSIENT_EXITS = frozenset({71, 74, 75})

# RFC 5322 §3.2.3 atext, plus "." (a dot-atom; Address.parse has checked the dots).
_ATEXT = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~."
)
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
_LITERAL = re.compile(r"\[[A-Za-z0-9.:]+\]")

_NOTIFY_ORDER = (Notify.NEVER, Notify.SUCCESS, Notify.FAILURE, Notify.DELAY)


#: How msmtp reports its server's refusal on standard error ("msmtp: server message: 450
#: 4.2.1 ..."): the reply code's first digit, and the rest of the line (where an enhanced
#: status starts, read by EnhancedStatus.search).
_RELAY_REPLY: Final = re.compile(r"^msmtp: server message: ([45])\d\d[ -](.*)$", re.MULTILINE)


def exit_is_transient(status: int) -> bool:
    """Whether trying again later can help after the program exited with ``status``.

    Transient: ``EX_TEMPFAIL``, ``EX_OSERR``, ``EX_IOERR``, death by a signal (negative,
    as :mod:`subprocess` reports it) and any status outside ``sysexits.h``; permanent: the
    other ``sysexits.h`` statuses (64 to 78).
    """
    if status in _TRANSIENT_EXITS or status < 0:
        return True
    return status not in _SYSEXITS


def _describe_exit(status: int) -> str:
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"was killed by {name}"
    meaning = _SYSEXITS.get(status)
    return f"exited with status {status}" + (f" ({meaning})" if meaning else "")


def _unsafe(path: str, smtputf8: bool) -> str | None:
    """Why the SMTP path ``path`` cannot go on a sendmail command line, or None."""
    if path.startswith("-"):
        return "it starts with '-' and could be read as an option"
    local, _, domain = path.rpartition("@")
    for char in local:
        if char in _ATEXT:
            continue
        if smtputf8 and not char.isascii() and char.isprintable():
            continue
        return (
            f"its local part holds {char!r}, which a sendmail program could read as "
            "address syntax (only dot-atom local parts are passed)"
        )
    if not (_HOST.fullmatch(domain) or _LITERAL.fullmatch(domain)):
        return "its domain is neither a host name nor an address literal"
    return None


def _path(address: Address) -> str:
    """The address as it goes on the command line: the SMTP path with an A-label domain
    (a non-ASCII local part stays UTF-8, so only it makes the MTA use SMTPUTF8)."""
    if not address.needs_smtputf8:
        return address.smtp_path(False)  # A-labels already
    text = address.smtp_path(True)  # the local part, "@", the U-label domain
    local = text[: len(text) - len(address.domain) - 1]
    return f"{local}@{address.ascii_domain}"


def _notify_option(notify: frozenset[Notify] | None) -> list[str]:
    if notify is None:
        return []
    # Attached to its option: Exim reads a lone "-N" as "do not deliver" (see the module
    # docstring); getopt-based programs read both forms alike.
    return ["-N" + ",".join(n.value.lower() for n in _NOTIFY_ORDER if n in notify)]


def _takes_dsn_options(command: str) -> bool:
    """Whether the program at ``command`` is one that takes ``-N``, ``-R`` and ``-V`` as
    DSN options: not Exim (``/usr/sbin/sendmail`` is a link to ``exim4`` on Debian), for
    which ``-N`` means "do not deliver" and ``-R`` a queue run; not msmtp (``msmtp-mta``
    links it there), which refuses ``-V`` (exit 64, every message with an ENVID lost) and
    fails the whole message when its server does not offer DSN (exit 69)."""
    name = os.path.basename(os.path.realpath(command)).lower()
    return not name.startswith(("exim", "msmtp"))


def _argv_runs(paths: Sequence[str]) -> Iterator[tuple[int, int]]:
    """``paths`` cut into runs (start, end) of at most :data:`_ARGV_BUDGET` bytes each on a
    command line (at least one path per run)."""
    start = size = 0
    for index, path in enumerate(paths):
        # The string, its NUL and its pointer in argv (execve(2) counts all three).
        cost = len(path.encode("utf-8", "surrogateescape")) + 1 + 8
        if index > start and size + cost > _ARGV_BUDGET:
            yield start, index
            start, size = index, 0
        size += cost
    if start < len(paths):
        yield start, len(paths)


class _Plan:
    """One message's hand-over: the results known before sending and a command per group."""

    def __init__(self) -> None:
        self.final: list[RecipientResult | None] = []
        # (positions in the envelope, argv) per process to run.
        self.groups: list[tuple[list[int], list[str]]] = []


class SendmailTransport(Transport, AsyncTransport):
    """Hands each message to the local MTA's ``sendmail`` program, which queues it.

    Example::

        with SendmailTransport() as transport:
            result = transport.send(message)
        # result.ok: the local MTA queued the message for every recipient

    Args:
        command: the sendmail program, a path or a name looked up on ``PATH``.
        arguments: extra arguments put first on its command line, for example
            ``["-C", "/etc/postfix-out"]`` for another Postfix configuration directory.
        timeout: seconds one hand-over may take before the program is killed.
        smtputf8: pass non-ASCII local parts as UTF-8 (Postfix 3.0 and later handle them);
            ``False`` refuses such messages before sending.

    Raises:
        ConfigurationError: the program is missing or not executable, ``arguments`` is not a
            sequence of strings without NUL, or ``timeout`` is not a positive number.
    """

    def __init__(
        self,
        command: str | os.PathLike[str] = DEFAULT_COMMAND,
        *,
        arguments: Sequence[str] = (),
        timeout: float = DEFAULT_TIMEOUT,
        smtputf8: bool = True,
    ) -> None:
        given = os.fspath(command)
        found = shutil.which(given) if given else None
        if found is None:
            raise ConfigurationError(
                f"the sendmail program {given!r} does not exist or is not executable"
            )
        if isinstance(arguments, str | bytes) or not all(
            isinstance(a, str) and "\0" not in a for a in arguments
        ):
            raise ConfigurationError(
                "SendmailTransport arguments must be a sequence of strings without NUL "
                f"(for example ['-C', '/etc/postfix']), not {arguments!r}"
            )
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            raise ConfigurationError(
                f"SendmailTransport timeout must be a positive number of seconds: {timeout!r}"
            )
        #: The program's path, as found at construction.
        self.command = os.path.abspath(found)
        #: The extra arguments, put first on every command line.
        self.arguments = tuple(arguments)
        #: Seconds one hand-over may take.
        self.timeout = float(timeout)
        #: Whether non-ASCII local parts are passed (as UTF-8).
        self.smtputf8 = bool(smtputf8)
        #: Whether the envelope's DSN requests are passed (``-N``, ``-R``, ``-V``): not
        #: to Exim, which reads those options otherwise.
        self.dsn = _takes_dsn_options(self.command)
        self._queued = Reply.of(250, f"2.0.0 Ok: queued by the local MTA ({self.command})")

    def __repr__(self) -> str:
        return f"<SendmailTransport {self.command!r} arguments={list(self.arguments)!r}>"

    # -- planning (no I/O) ---------------------------------------------------------------

    def _plan(self, envelope: Envelope) -> _Plan:
        plan = _Plan()
        recipients = envelope.recipients
        plan.final = [None] * len(recipients)
        refusal = self._refusal(envelope)
        if refusal is not None:
            plan.final = [self._refused(r, refusal) for r in recipients]
            return plan
        sender = "<>" if envelope.sender is None else _path(envelope.sender)
        common = [self.command, *self.arguments, "-i", "-f", sender]
        if self.dsn and envelope.ret is not None:
            common.append("-R" + envelope.ret.value.lower())
        if self.dsn and envelope.envid is not None:
            common.append("-V" + envelope.envid)
        groups: dict[frozenset[Notify] | None, tuple[list[int], list[str]]] = {}
        for index, recipient in enumerate(recipients):
            path = _path(recipient.address)
            problem = _unsafe(path, self.smtputf8)
            if problem is not None:
                plan.final[index] = self._refused(
                    recipient, f"not passed to the sendmail program: {problem}"
                )
                continue
            notify = recipient.notify if self.dsn else None
            positions, paths = groups.setdefault(notify, ([], []))
            positions.append(index)
            paths.append(path)
        for notify, (positions, paths) in groups.items():
            head = [*common, *_notify_option(notify), "--"]
            for start, end in _argv_runs(paths):
                plan.groups.append((positions[start:end], [*head, *paths[start:end]]))
        return plan

    def _refusal(self, envelope: Envelope) -> str | None:
        """Why the whole envelope cannot be handed over, or None."""
        if envelope.requiretls:
            # RFC 8689 §4.1: REQUIRETLS must not be dropped; a sendmail program cannot be
            # asked for it.
            return "REQUIRETLS (RFC 8689) cannot be requested through a sendmail program"
        if envelope.needs_smtputf8 and not self.smtputf8:
            # RFC 6531 §3.4: a non-ASCII address needs SMTPUTF8 all the way.
            return "an address needs SMTPUTF8 (RFC 6531) and smtputf8=False"
        if envelope.sender is not None:
            problem = _unsafe(_path(envelope.sender), self.smtputf8)
            if problem is not None:
                return (
                    f"the sender {envelope.sender} is not passed to the sendmail program: {problem}"
                )
        return None

    @staticmethod
    def _refused(recipient: Recipient, reason: str) -> RecipientResult:
        return RecipientResult(address=recipient.address, outcome=Outcome.PERMANENT, reason=reason)

    def _queued_result(self, address: Address) -> RecipientResult:
        return RecipientResult(
            address=address,
            outcome=Outcome.ACCEPTED,
            reply=self._queued,
            reason=f"handed to the local MTA ({self.command}), which queued it; not yet delivered",
        )

    def _finish(
        self,
        message: Message,
        envelope: Envelope,
        plan: _Plan,
        failures: list[tuple[list[int], LocalMTAError | DeliveryTimeout | ConnectError]],
    ) -> DeliveryResult:
        """The result once every group has run; raises when nothing has an answer."""
        final = plan.final
        if failures and len(failures) == len(plan.groups) and all(r is None for r in final):
            # Nothing was queued or refused: the attempt produced no answer per recipient.
            raise failures[0][1]
        for positions, error in failures:
            # Another group was queued: raising would hide that (and a retry would send it
            # twice), so the failed group's recipients carry the error, as send_many does.
            outcome = Outcome.TRANSIENT if error.is_transient else Outcome.PERMANENT
            reason = f"{type(error).__name__}: {error}"
            enhanced = error_status(error)
            for index in positions:
                final[index] = RecipientResult(
                    address=envelope.recipients[index].address,
                    outcome=outcome,
                    reason=reason,
                    enhanced=enhanced,
                )
        results = []
        for result in final:
            assert result is not None
            results.append(result)
        return DeliveryResult(recipients=tuple(results), message_id=message.message_id)

    def _error(self, status: int, broken: bool, output: bytes, dropped: bool) -> LocalMTAError:
        text = output.decode("utf-8", errors="replace").strip()
        if len(text) > _SHOWN_OUTPUT or dropped:
            text = text[:_SHOWN_OUTPUT] + " [output truncated]"
        said = f": {text}" if text else " (no output)"
        if status == 0:
            return LocalMTAError(
                f"{self.command} exited before reading the whole message{said}",
                is_transient=True,
                exit_status=None,
            )
        early = " before reading the whole message" if broken else ""
        transient = exit_is_transient(status)
        detail: tuple[int, int] | None = None
        relayed = _RELAY_REPLY.findall(text)
        if relayed and status > 0:
            # A relay-only sendmail (msmtp) says what its server answered; its status does
            # not (msmtp exits 69, "unavailable", for a 450 as for a 451 after the data).
            # RFC 5321 §4.2.1: the reply's first digit decides, and the reply's enhanced
            # status (when its class agrees) says more than the exit status's.
            digit, rest = relayed[-1]
            transient = digit == "4"
            found = EnhancedStatus.search(rest)
            if found is not None and str(found.klass) == digit:
                detail = (found.subject, found.detail)
        return LocalMTAError(
            f"{self.command} {_describe_exit(status)}{early}{said}",
            is_transient=transient,
            exit_status=status,
            status_detail=detail,
        )

    def _warn(self, output: bytes) -> None:
        # A program that queued the message may still have said something (Postfix's
        # sendmail warns about an option it ignored): worth a line in the log.
        if output.strip():
            text = output.decode("utf-8", errors="replace").strip()[:_SHOWN_OUTPUT]
            log.warning("%s queued the message but said: %s", self.command, Shown(text))

    def _timeout_error(self) -> DeliveryTimeout:
        return DeliveryTimeout(
            f"{self.command} did not finish within {self.timeout:g} s and was killed",
            is_transient=True,
        )

    def _start_error(self, exc: OSError) -> ConnectError:
        return ConnectError(
            f"could not start {self.command}: {exc.strerror or exc}", is_transient=True
        )

    # -- blocking ------------------------------------------------------------------------

    def deliver(self, message: Message, envelope: Envelope) -> DeliveryResult:
        """Hand the message to the program (one process per NOTIFY group) and wait for it.

        Returns:
            Recipients handed over ``ACCEPTED`` (queued by the local MTA); recipients that
            cannot be passed safely ``PERMANENT`` with a reason.

        Raises:
            LocalMTAError: the program exited with a non-zero status (or stopped reading).
            DeliveryTimeout: the program outlasted ``timeout`` and was killed.
            ConnectError: the program could not be started.
        """
        plan = self._plan(envelope)
        failures: list[tuple[list[int], LocalMTAError | DeliveryTimeout | ConnectError]] = []
        for positions, argv in plan.groups:
            try:
                self._run(argv, message)
            except (LocalMTAError, DeliveryTimeout, ConnectError) as error:
                failures.append((positions, error))
                continue
            for index in positions:
                plan.final[index] = self._queued_result(envelope.recipients[index].address)
        return self._finish(message, envelope, plan, failures)

    def _run(self, argv: list[str], message: Message) -> None:
        log.debug("running %s", argv)
        deadline = time.monotonic() + self.timeout
        try:
            process = subprocess.Popen(  # noqa: S603 -- the configured program, argv, no shell
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except OSError as exc:
            raise self._start_error(exc) from exc
        try:
            broken, output, dropped = _pump(process, _to_lf(message.chunks()), deadline)
            status = process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _terminate(process)
            raise self._timeout_error() from None
        except BaseException:
            _terminate(process)
            raise
        finally:
            for pipe in (process.stdin, process.stdout, process.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        if status == 0 and not broken:
            self._warn(output)
            return
        raise self._error(status, broken, output, dropped)

    # -- asyncio -------------------------------------------------------------------------

    async def adeliver(self, message: Message, envelope: Envelope) -> DeliveryResult:
        """Like :meth:`deliver`, with :func:`asyncio.create_subprocess_exec`.

        Cancelled, it stops the program (SIGTERM, then SIGKILL) before the cancellation
        goes on.
        """
        plan = self._plan(envelope)
        failures: list[tuple[list[int], LocalMTAError | DeliveryTimeout | ConnectError]] = []
        for positions, argv in plan.groups:
            try:
                await self._arun(argv, message)
            except (LocalMTAError, DeliveryTimeout, ConnectError) as error:
                failures.append((positions, error))
                continue
            for index in positions:
                plan.final[index] = self._queued_result(envelope.recipients[index].address)
        return self._finish(message, envelope, plan, failures)

    async def _arun(self, argv: list[str], message: Message) -> None:
        log.debug("running %s", argv)
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise self._start_error(exc) from exc
        assert process.stdout is not None
        assert process.stderr is not None
        readers = [
            asyncio.ensure_future(_adrain(process.stdout)),
            asyncio.ensure_future(_adrain(process.stderr)),
        ]
        try:
            async with asyncio.timeout(self.timeout):
                broken = await _afeed_while_running(process, _to_lf(message.chunks()))
                status = await _aexited(process, readers)
        except TimeoutError:
            await _aterminate(process)
            raise self._timeout_error() from None
        except BaseException:
            await _aterminate(process)
            raise
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.wait(readers)
        stderr = readers[1].result() if not readers[1].cancelled() else (b"", False)
        stdout = readers[0].result() if not readers[0].cancelled() else (b"", False)
        output, dropped = stderr if stderr[0] else stdout
        if status == 0 and not broken:
            self._warn(output)
            return
        raise self._error(status, broken, output, dropped)


# -- the blocking pump ---------------------------------------------------------------------


def _pump(
    process: subprocess.Popen[bytes], chunks: Iterator[bytes], deadline: float
) -> tuple[bool, bytes, bool]:
    """Write ``chunks`` to the program's stdin while reading its stdout and stderr.

    Returns:
        whether stdin broke before the end, the output to show (stderr, else stdout), and
        whether some of it was dropped.

    Raises:
        subprocess.TimeoutExpired: past ``deadline``.
    """
    assert process.stdin is not None
    assert process.stdout is not None
    assert process.stderr is not None
    stdin, stdout, stderr = process.stdin, process.stdout, process.stderr
    kept = {stdout.fileno(): bytearray(), stderr.fileno(): bytearray()}
    dropped = {stdout.fileno(): False, stderr.fileno(): False}
    pending = memoryview(b"")
    broken = False
    exited_at: float | None = None
    stdin_fd = stdin.fileno()
    with selectors.DefaultSelector() as selector:
        for pipe, event in (
            (stdin, selectors.EVENT_WRITE),
            (stdout, selectors.EVENT_READ),
            (stderr, selectors.EVENT_READ),
        ):
            os.set_blocking(pipe.fileno(), False)
            selector.register(pipe.fileno(), event)
        while selector.get_map():
            now = time.monotonic()
            if now >= deadline:
                raise subprocess.TimeoutExpired(process.args, 0)
            if exited_at is None and process.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > EXIT_GRACE:
                # The program is gone; a child of it may hold the pipes. A message not
                # written to the end by now was not read by the program: not handed over.
                if stdin_fd in selector.get_map():
                    broken = True
                break
            for key, _ in selector.select(min(deadline - now, 0.25)):
                fd = key.fd
                if fd in kept:
                    data = os.read(fd, _READ_SIZE)
                    if not data:
                        selector.unregister(fd)
                        continue
                    room = OUTPUT_LIMIT - len(kept[fd])
                    kept[fd] += data[:room]
                    dropped[fd] = dropped[fd] or len(data) > room
                    continue
                if not pending:
                    piece = next(chunks, None)
                    if piece is None:
                        selector.unregister(fd)
                        stdin.close()  # EOF: the end of the message
                        continue
                    pending = memoryview(piece)
                try:
                    written = os.write(fd, pending)
                except BlockingIOError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    # The program stopped reading (it exited, or closed its stdin).
                    broken = True
                    selector.unregister(fd)
                    stdin.close()
                    continue
                pending = pending[written:]
    shown = stderr.fileno() if kept[stderr.fileno()] else stdout.fileno()
    return broken, bytes(kept[shown]), dropped[shown]


def _terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after :data:`TERMINATE_GRACE`; reap the process."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        process.wait(TERMINATE_GRACE)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()


# -- the asyncio pump ----------------------------------------------------------------------


async def _afeed(process: asyncio.subprocess.Process, chunks: Iterable[bytes]) -> bool:
    """Write ``chunks`` to the program's stdin; whether it broke before the end."""
    stdin = process.stdin
    assert stdin is not None
    broken = False
    try:
        for chunk in chunks:
            stdin.write(chunk)
            await stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        # The program stopped reading (it exited, or closed its stdin).
        broken = True
    stdin.close()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        await stdin.wait_closed()
    return broken


async def _afeed_while_running(
    process: asyncio.subprocess.Process, chunks: Iterable[bytes]
) -> bool:
    """:func:`_afeed`, given up :data:`EXIT_GRACE` seconds after the program has exited
    (a child of it may hold its standard input without reading): then the message was not
    read to its end, and the pipe is dropped with what it still buffers."""
    feeder = asyncio.ensure_future(_afeed(process, chunks))
    try:
        pending: set[asyncio.Future[bool]] = {feeder}
        while pending and process.returncode is None:
            _, pending = await asyncio.wait(pending, timeout=0.1)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=EXIT_GRACE)
    finally:
        if not feeder.done():
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
            # Only once the program is gone: an end of file to a running program (this
            # is a timeout or a cancellation then) would let it queue what it has read.
            if process.returncode is not None and process.stdin is not None:
                process.stdin.transport.abort()
    if feeder.cancelled():
        return True
    return feeder.result()


async def _adrain(stream: asyncio.StreamReader) -> tuple[bytes, bool]:
    """Read ``stream`` to its end, keeping at most :data:`OUTPUT_LIMIT` bytes."""
    kept = bytearray()
    dropped = False
    while data := await stream.read(_READ_SIZE):
        room = OUTPUT_LIMIT - len(kept)
        kept += data[:room]
        dropped = dropped or len(data) > room
    return bytes(kept), dropped


async def _aexited(
    process: asyncio.subprocess.Process, readers: Sequence[asyncio.Future[tuple[bytes, bool]]]
) -> int:
    """The program's exit status, once it has exited and its output is read.

    ``Process.wait()`` resolves only when the program has exited *and* every pipe is closed
    (asyncio's ``BaseSubprocessTransport``), so a child of the program that still holds its
    stdout or stderr would hold the send too: once the program has exited, its pipes get
    :data:`EXIT_GRACE` seconds to close, then the transport closes them.
    """
    pending: set[asyncio.Future[tuple[bytes, bool]]] = set(readers)
    while pending and process.returncode is None:
        _, pending = await asyncio.wait(pending, timeout=0.1)
    if pending:
        _, pending = await asyncio.wait(pending, timeout=EXIT_GRACE)
    if pending:
        _close_pipes(process)
    return await process.wait()


def _close_pipes(process: asyncio.subprocess.Process) -> None:
    """Close the pipes to an exited program (``Process.wait()`` waits for them)."""
    transport = getattr(process, "_transport", None)  # no public way to close the pipes
    if transport is not None:
        transport.close()


async def _aexit(process: asyncio.subprocess.Process, within: float) -> bool:
    """Whether the program exits within ``within`` seconds. Its exit status, not
    ``Process.wait()``, which also waits for pipes that a child of it may hold."""
    deadline = time.monotonic() + within
    while process.returncode is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return process.returncode is not None


async def _aterminate(process: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL after :data:`TERMINATE_GRACE`; wait for the process to exit
    (not for pipes a child of it may hold: they are closed).

    Cancelled meanwhile, it kills the process at once before the cancellation goes on, so
    that no process is left running.
    """
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            if not await _aexit(process, TERMINATE_GRACE):
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                if not await _aexit(process, _KILLED_EXIT):
                    log.warning("%s did not exit after SIGKILL", process.pid)
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            _close_pipes(process)
            raise
    # A child of the program may still hold its pipes: they are not waited for.
    _close_pipes(process)
