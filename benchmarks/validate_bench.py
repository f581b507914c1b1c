"""Recipient validation throughput: mailrelay vs email-validator, side by side, one run.

Starts its own unbound on loopback (the tests' zone, from ``tests/peers/unbound.py``), then
validates 2,000 and 20,000 distinct addresses spread over 60 domains with:

- email-validator ``validate_email(addr, check_deliverability=True, dns_resolver=...)``,
  cold with a plain dnspython resolver pointed at the loopback unbound (no cache: one MX
  lookup per address), and warm with its ``caching_resolver`` after a warm-up pass;
- mailrelay's ``RecipientValidator.validate_many`` and ``AsyncRecipientValidator.validate_many``
  cold (a new resolver, empty cache) and warm (the same validator again), and the blocking
  ``validate`` called once per address, cold and warm, for comparison without grouping.

unbound answers everything from local data: it never recurses, so its own cache plays no
part and "cold" here means *our* caches are empty. On the Internet a cold lookup waits for
remote servers, which makes per-domain grouping and concurrency count for even more.

Run: ``python benchmarks/validate_bench.py [--sizes 2000 20000] [--repeat 3]``
(needs ``unbound`` and the ``bench`` extra: email-validator).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import dns.resolver
import email_validator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailrelay.resolver import AsyncResolver, Resolver
from mailrelay.validate import (
    DEFAULT_SPECIAL_USE,
    AsyncRecipientValidator,
    RecipientValidator,
    Validation,
    Verdict,
)
from tests.peers.unbound import BULK_DOMAINS, UnboundServer, start_unbound

ALLOW_TEST = DEFAULT_SPECIAL_USE - {"test"}
#: A phase that takes longer than this is reported and the run stops.
PHASE_LIMIT = 300.0


def addresses(count: int) -> list[str]:
    """``count`` distinct addresses over the bulk domains, in a mixed order."""
    domains = BULK_DOMAINS
    return [f"user.{i}+tag@{domains[(i * 7) % len(domains)]}" for i in range(count)]


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    elapsed = time.perf_counter() - start
    if elapsed > PHASE_LIMIT:
        raise SystemExit(f"a phase took {elapsed:.0f} s, over the {PHASE_LIMIT:.0f} s limit")
    return elapsed


def dnspython_resolver(server: UnboundServer) -> dns.resolver.Resolver:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server.host]
    resolver.port = server.port
    resolver.lifetime = 5.0
    return resolver


def email_validator_pass(items: list[str], resolver: dns.resolver.Resolver) -> None:
    for item in items:
        email_validator.validate_email(item, check_deliverability=True, dns_resolver=resolver)


def check_ours(results: list[Validation], count: int) -> None:
    if len(results) != count or any(r.verdict is not Verdict.DELIVERABLE for r in results):
        raise SystemExit("mailrelay gave unexpected verdicts; the figures would mean nothing")


def new_validator(server: UnboundServer) -> RecipientValidator:
    resolver = Resolver(nameservers=[server.host], port=server.port)
    return RecipientValidator(resolver, special_use=ALLOW_TEST, refused_networks=())


# Each contender returns (cold seconds, warm seconds) for one pass over the items each.


def run_email_validator(server: UnboundServer, items: list[str]) -> tuple[float, float]:
    # Cold: a dnspython resolver without cache. Warm: its caching resolver, after a pass.
    cold = timed(partial(email_validator_pass, items, dnspython_resolver(server)))
    caching = email_validator.caching_resolver(dns_resolver=dnspython_resolver(server))
    email_validator_pass(items, caching)
    return cold, timed(partial(email_validator_pass, items, caching))


def run_validate_many(server: UnboundServer, items: list[str]) -> tuple[float, float]:
    validator = new_validator(server)
    results: list[Validation] = []
    cold = timed(lambda: results.extend(validator.validate_many(items)))
    check_ours(results, len(items))
    return cold, timed(partial(validator.validate_many, items))


def run_validate(server: UnboundServer, items: list[str]) -> tuple[float, float]:
    validator = new_validator(server)

    def one_by_one() -> None:
        for item in items:
            validator.validate(item)

    return timed(one_by_one), timed(one_by_one)


def run_async_validate_many(server: UnboundServer, items: list[str]) -> tuple[float, float]:
    validator = AsyncRecipientValidator(
        AsyncResolver(nameservers=[server.host], port=server.port),
        special_use=ALLOW_TEST,
        refused_networks=(),
    )

    async def twice() -> tuple[float, float]:
        start = time.perf_counter()
        check_ours(await validator.validate_many(items), len(items))
        middle = time.perf_counter()
        await validator.validate_many(items)
        return middle - start, time.perf_counter() - middle

    return asyncio.run(twice())


CONTENDERS: dict[str, Callable[[UnboundServer, list[str]], tuple[float, float]]] = {
    "email-validator": run_email_validator,
    "mailrelay validate_many": run_validate_many,
    "mailrelay async validate_many": run_async_validate_many,
    "mailrelay validate": run_validate,
}


def bench(server: UnboundServer, count: int, repeat: int) -> dict[str, float]:
    """Addresses per second for every contender, cold and warm, best of ``repeat`` runs."""
    items = addresses(count)
    rates: dict[str, float] = {}
    for _ in range(repeat):
        for name, contender in CONTENDERS.items():
            cold, warm = contender(server, items)
            for phase, seconds in (("cold", cold), ("warm", warm)):
                key = f"{name} {phase}"
                rates[key] = max(rates.get(key, 0.0), count / seconds)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--repeat", type=int, default=3, help="runs per size (best is shown)")
    args = parser.parse_args()
    # email-validator refuses special-use names such as .test; its documentation says to edit
    # this list to allow one, which the test zone needs.
    email_validator.SPECIAL_USE_DOMAIN_NAMES[:] = [
        name for name in email_validator.SPECIAL_USE_DOMAIN_NAMES if name != "test"
    ]
    with tempfile.TemporaryDirectory(prefix="mailrelay-bench-") as tmp:
        server = start_unbound(Path(tmp))
        try:
            where = f"{server.host}:{server.port}"
            print(f"unbound pid {server.pid} on {where}; {len(BULK_DOMAINS)} domains")
            for size in args.sizes:
                rates = bench(server, size, args.repeat)
                print(f"\n{size:,} addresses (best of {args.repeat}), addresses per second:")
                for name, rate in rates.items():
                    print(f"  {name:36s} {rate:>12,.0f}")
                cold_base = rates["email-validator cold"]
                warm_base = rates["email-validator warm"]
                print("  ratios against email-validator (cold vs cold, warm vs warm):")
                for kind in ("validate_many", "async validate_many", "validate"):
                    cold = rates[f"mailrelay {kind} cold"] / cold_base
                    warm = rates[f"mailrelay {kind} warm"] / warm_base
                    print(f"    {kind:34s} cold x{cold:5.1f}   warm x{warm:5.1f}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
