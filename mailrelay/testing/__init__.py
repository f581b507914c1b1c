"""Tools for the tests of applications that use mailrelay.

:mod:`mailrelay.testing.strategies` holds `Hypothesis <https://hypothesis.works>`_
strategies for property tests of SMTP edge cases: valid and invalid envelope
addresses, envelopes with DSN parameters, messages whose bytes stress the wire
(dot lines, bare CR and LF, long lines, 8-bit bodies), and server replies paired
with the :class:`~mailrelay.reply.Reply` they parse to. See ``docs/test-tools.md``.

Hypothesis is not a dependency of mailrelay itself; install it with the extra::

    pip install "mailrelay[testing]"

This package imports without Hypothesis: only ``import mailrelay.testing.strategies``
(or reading the ``strategies`` attribute here) needs it, and raises an
:class:`ImportError` naming that install line when it is missing.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["strategies"]


def __getattr__(name: str) -> ModuleType:
    # PEP 562: load the strategies (and Hypothesis) only when they are asked for.
    if name == "strategies":
        return importlib.import_module("mailrelay.testing.strategies")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
