"""Tools for the tests of applications that use mailrelay.

* :mod:`mailrelay.testing.strategies`: `Hypothesis <https://hypothesis.works>`_
  strategies for property tests of SMTP edge cases: valid and invalid envelope
  addresses, envelopes with DSN parameters, messages whose bytes stress the wire
  (dot lines, bare CR and LF, long lines, 8-bit bodies), and server replies paired
  with the :class:`~mailrelay.reply.Reply` they parse to. See ``docs/test-tools.md``.
* :mod:`mailrelay.testing.server`: an SMTP/LMTP server on loopback that records what
  arrived and misbehaves on cue (standard library only).

Hypothesis is not a dependency of mailrelay itself; install it with the extra::

    pip install "mailrelay[testing]"

This package imports without Hypothesis: only ``import mailrelay.testing.strategies``
(or reading the ``strategies`` attribute here) needs it, and raises an
:class:`ImportError` naming that install line when it is missing. For the same
reason ``__all__`` is empty: ``from mailrelay.testing import *`` must not import
the strategies (and Hypothesis) by surprise; import the modules by name.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__: list[str] = []

# The submodules that an attribute read loads on first use (PEP 562).
_LAZY = frozenset({"server", "strategies"})


def __getattr__(name: str) -> ModuleType:
    # PEP 562: load a submodule (and, for the strategies, Hypothesis) only when asked for.
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
