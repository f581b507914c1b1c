"""Where the benchmark's processes run: the client and the server on CPUs of their own, or not.

On a machine with few CPUs, a loopback benchmark's figures depend on whether the kernel
puts the client and the server on the same CPU. On this project's 2-CPU virtual machine
the difference is large and it flips between runs: with both on one CPU, each write
hands the CPU straight to the server (no wake-up of an idle CPU), so every client is
several times faster, but the server's work then also takes the client's CPU time; on
two CPUs, each round trip pays a cross-CPU wake-up, but the server's work runs beside the
client's, as with a server across a network. Left to the scheduler, a run can move from
one to the other halfway through, and the ratios between clients move with it.

So the benchmarks pin their processes (``--placement``):

* ``split`` (the default when at least two CPUs are available): this process, and every
  client process it starts afterwards, on one CPU; the servers on another. The server
  behaves as a peer across a network would: its work never takes the client's CPU.
* ``shared``: everything on one CPU. Each figure then counts the client's and the
  server's work together (a client's own cost weighs less against the server's).
* ``free``: no pinning; the scheduler decides (the figures of earlier runs).

Linux only (``os.sched_setaffinity``); elsewhere every mode is ``free``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

#: The modes, in the order the ``--placement`` option lists them.
MODES = ("split", "shared", "free")


def default_mode() -> str:
    """``split`` where it can be done (Linux, at least two usable CPUs), else ``free``."""
    if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) >= 2:
        return "split"
    return "free"


def place(mode: str, servers: Iterable[int]) -> str:
    """Pin this process and the server processes ``servers`` (PIDs) as ``mode`` says.

    Call it once the servers are running and before starting any client process (those
    inherit this process's CPU). Returns a line that says where everything runs, for the
    benchmark's report.

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in MODES:
        raise ValueError(f"unknown placement {mode!r}; one of {', '.join(MODES)}")
    if mode == "free" or not hasattr(os, "sched_setaffinity"):
        return "placement: free (the scheduler decides where client and server run)"
    cpus = sorted(os.sched_getaffinity(0))
    if mode == "split" and len(cpus) < 2:
        raise ValueError("placement split needs two CPUs")
    client = cpus[0]
    server = cpus[1] if mode == "split" else client
    os.sched_setaffinity(0, {client})
    for pid in servers:
        os.sched_setaffinity(pid, {server})
    if mode == "split":
        return f"placement: split (client processes on CPU {client}, servers on CPU {server})"
    return f"placement: shared (client and servers all on CPU {client})"
