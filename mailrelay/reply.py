"""SMTP replies and RFC 3463 enhanced status codes, as values.

A :class:`Reply` is what a server said in answer to one command: a three-digit
code (RFC 5321 §4.2), one or more lines of text, and, when the server speaks
ENHANCEDSTATUSCODES (RFC 2034), the enhanced status code that starts the text.
Parsing the bytes off the wire is the protocol core's job
(:mod:`mailrelay.protocol`); this module only holds the parsed result.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import attrs

__all__ = ["EnhancedStatus", "Reply"]

# RFC 3463 §2: class "." subject "." detail; class is 2, 4 or 5; subject and
# detail are 1 to 3 digits without leading zeros (we accept a lone 0).
_ENHANCED = re.compile(r"([245])\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})")


@attrs.frozen(kw_only=True, order=False)
class EnhancedStatus:
    """An RFC 3463 enhanced mail system status code such as ``5.1.1``.

    Attributes:
        klass: 2 (success), 4 (persistent transient failure) or 5 (permanent failure).
        subject: the subject sub-code (1 addressing, 2 mailbox, 3 mail system, ...).
        detail: the detail sub-code.
    """

    klass: int = attrs.field(validator=attrs.validators.in_((2, 4, 5)))
    subject: int = attrs.field(validator=[attrs.validators.ge(0), attrs.validators.le(999)])
    detail: int = attrs.field(validator=[attrs.validators.ge(0), attrs.validators.le(999)])

    @classmethod
    def parse(cls, text: str) -> EnhancedStatus:
        """Parse ``"5.1.1"``; raise ``ValueError`` when the text is not exactly that shape."""
        match = _ENHANCED.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"not an RFC 3463 enhanced status code: {text!r}")
        return cls(klass=int(match[1]), subject=int(match[2]), detail=int(match[3]))

    @classmethod
    def search(cls, text: str) -> EnhancedStatus | None:
        """Return the enhanced status code that *starts* ``text``, if any.

        RFC 2034 §3 puts the code first on each line of a reply, followed by a space.
        """
        # RFC 3463 §2: every code starts with its class digit and a dot; most texts
        # fail this cheap test, and need no regex.
        if text[1:2] != "." or text[:1] not in ("2", "4", "5"):
            return None
        match = _ENHANCED.match(text)
        if match is None:
            return None
        end = match.end()
        if end < len(text) and not text[end].isspace():
            return None
        return cls(klass=int(match[1]), subject=int(match[2]), detail=int(match[3]))

    @property
    def is_transient(self) -> bool:
        """True for class 4 (trying again later may succeed)."""
        return self.klass == 4

    @property
    def is_permanent(self) -> bool:
        """True for class 5."""
        return self.klass == 5

    def __str__(self) -> str:
        return f"{self.klass}.{self.subject}.{self.detail}"


def _to_lines(value: Iterable[str]) -> tuple[str, ...]:
    lines = tuple(value)
    return lines or ("",)


def _check_code(instance: Reply, attribute: attrs.Attribute[int], value: int) -> None:
    # RFC 5321 §4.2: the first digit is 2-5; we hold any code from 200 to 599.
    if not 200 <= value <= 599:
        raise ValueError(f"reply code out of range 200-599: {value}")


@attrs.frozen(kw_only=True)
class Reply:
    """A server's reply to one command.

    Attributes:
        code: the three-digit reply code.
        lines: the text of each line, without the code and separator; a bare
            ``250`` reply has one empty line.
        enhanced: the enhanced status code from the first line, when present.
    """

    code: int = attrs.field(validator=_check_code)
    lines: tuple[str, ...] = attrs.field(default=("",), converter=_to_lines)
    enhanced: EnhancedStatus | None = None

    @classmethod
    def of(cls, code: int, *lines: str, enhanced: bool = True) -> Reply:
        """A convenience for tests and fakes: ``Reply.of(550, "5.1.1 no such user")``.

        When ``enhanced`` is true, an enhanced status at the start of the first line is parsed.
        """
        text_lines = lines or ("",)
        status = EnhancedStatus.search(text_lines[0]) if enhanced else None
        return cls(code=code, lines=text_lines, enhanced=status)

    @property
    def text(self) -> str:
        """All lines joined with newlines."""
        return "\n".join(self.lines)

    @property
    def is_positive(self) -> bool:
        """2xx: the command succeeded."""
        return 200 <= self.code <= 299

    @property
    def is_intermediate(self) -> bool:
        """3xx: go on (DATA's 354, AUTH's 334)."""
        return 300 <= self.code <= 399

    @property
    def is_transient(self) -> bool:
        """4xx: refused for now; trying again later may succeed."""
        return 400 <= self.code <= 499

    @property
    def is_permanent(self) -> bool:
        """5xx: refused; trying again will not help."""
        return 500 <= self.code <= 599

    def __str__(self) -> str:
        return "\n".join(f"{self.code} {line}".rstrip() for line in self.lines)
