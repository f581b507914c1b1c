"""Text from outside (a server's replies, DNS records, a program's output) made safe to show.

A server controls the text of its replies, and a DNS zone the text of its records: shown
as they are, a bare CR or LF in them forges a line of a log file, and an escape sequence
drives the terminal that displays it. :func:`printable` escapes every character that is
not printable; :class:`Shown` does it for a log call's argument, only when the record is
formatted (a call below the logger's level costs one small object, nothing more).
"""

from __future__ import annotations

__all__ = ["Shown", "printable"]


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped (``\\r``, ``\\n``, ``\\t``,
    ``\\x1b``, ...); spaces and printable non-ASCII characters stay."""
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )


class Shown:
    """``str(value)`` escaped by :func:`printable` when formatted: the argument to give a
    log call for text from outside (``log.info("... failed: %s", Shown(error))``)."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __str__(self) -> str:
        return printable(str(self.value))

    def __repr__(self) -> str:
        return f"Shown({self.value!r})"
