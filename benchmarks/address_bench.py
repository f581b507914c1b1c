"""Compare Address.parse with email-validator on the same 10,000 addresses.

The list is generated deterministically (seeded) and mixes the shapes a mail
system meets: plain, dotted and plus-tagged addresses, quoted local parts,
IDN domains (U-labels and A-labels), UTF-8 local parts, address literals and
some invalid addresses. email-validator (the ``bench`` extra) runs with
``check_deliverability=False`` and is allowed quoted local parts and domain
literals so that both parsers do comparable work.

Prints addresses per second for both, the ratio, and how often they agree.
Both a cold run (empty IDNA cache) and the best of several warm runs are shown.

Run: python benchmarks/address_bench.py
"""

from __future__ import annotations

import random
import string
import sys
import time
from collections.abc import Callable

from mailrelay.address import Address, _a_label, _u_label
from mailrelay.errors import InvalidAddress

SEED = 20261128
COUNT = 10_000
ROUNDS = 5

FIRST = ["john", "mary", "li", "ahmed", "olga", "pierre", "sam", "anna", "wei", "fatima"]
LAST = ["smith", "doe", "garcia", "muller", "tanaka", "kowalski", "okafor", "silva"]
DOMAINS = ["example.com", "mail.example.org", "corp.example.net", "uni.example.edu", "ex.co.uk"]
IDN_DOMAINS = [
    "bücher.de",
    "xn--bcher-kva.de",
    "παράδειγμα.δοκιμή",
    "пример.рф",
    "例え.jp",
    "münchen.de",
]
UTF8_LOCALS = ["δοκιμή", "用户", "пользователь", "josé", "müller", "θσερ.νάμε"]
INVALID = [
    "john..doe@example.com",
    "john.doe@",
    "@example.com",
    "no-at-sign.example.com",
    "john doe@example.com",
    "john@exa mple.com",
    "john@example.com\r\nRCPT TO:<x@y.z>",
    "john@-example.com",
    "john@example..com",
    '"unclosed@example.com',
    "<john@example.com>",
    "a" * 65 + "@example.com",
]


def _word(rng: random.Random) -> str:
    return rng.choice(FIRST) + str(rng.randrange(1000))


def generate(count: int = COUNT, seed: int = SEED) -> list[str]:
    """The benchmark's address list: the same for the same seed."""
    rng = random.Random(seed)
    kinds: list[tuple[int, Callable[[], str]]] = [
        (30, lambda: f"{_word(rng)}@{rng.choice(DOMAINS)}"),
        (20, lambda: f"{rng.choice(FIRST)}.{rng.choice(LAST)}@{rng.choice(DOMAINS)}"),
        (
            15,
            lambda: (
                f"{rng.choice(FIRST)}+{''.join(rng.choices(string.ascii_lowercase, k=6))}"
                f"@{rng.choice(DOMAINS)}"
            ),
        ),
        (5, lambda: f'"{rng.choice(FIRST)} {rng.choice(LAST)}"@{rng.choice(DOMAINS)}'),
        (10, lambda: f"{_word(rng)}@{rng.choice(IDN_DOMAINS)}"),
        (8, lambda: f"{rng.choice(UTF8_LOCALS)}@{rng.choice(DOMAINS + IDN_DOMAINS)}"),
        (
            4,
            lambda: (
                f"postmaster@[192.0.2.{rng.randrange(256)}]"
                if rng.random() < 0.5
                else f"postmaster@[IPv6:2001:db8::{rng.randrange(65536):x}]"
            ),
        ),
        (8, lambda: rng.choice(INVALID)),
    ]
    weights = [weight for weight, _ in kinds]
    makers = [maker for _, maker in kinds]
    return [rng.choices(makers, weights)[0]() for _ in range(count)]


def run_mailrelay(addresses: list[str]) -> int:
    """Parse every address; return how many were accepted."""
    accepted = 0
    for text in addresses:
        try:
            Address.parse(text)
        except InvalidAddress:
            continue
        accepted += 1
    return accepted


def make_email_validator() -> Callable[[list[str]], int]:
    """A runner for email-validator, imported only when the benchmark runs."""
    try:
        from email_validator import EmailNotValidError, validate_email
    except ImportError:
        raise SystemExit("email-validator is missing: pip install 'mailrelay[bench]'") from None

    def run(addresses: list[str]) -> int:
        accepted = 0
        for text in addresses:
            try:
                validate_email(
                    text,
                    check_deliverability=False,
                    allow_quoted_local=True,
                    allow_domain_literal=True,
                )
            except EmailNotValidError:
                continue
            accepted += 1
        return accepted

    return run


def rate(run: Callable[[list[str]], int], addresses: list[str]) -> tuple[float, int]:
    """Addresses per second for one pass, and the number accepted."""
    start = time.perf_counter()
    accepted = run(addresses)
    return len(addresses) / (time.perf_counter() - start), accepted


def main() -> int:
    """Run the comparison and print the figures."""
    addresses = generate()
    theirs = make_email_validator()
    _a_label.cache_clear()
    _u_label.cache_clear()
    cold_ours, accepted_ours = rate(run_mailrelay, addresses)
    cold_theirs, accepted_theirs = rate(theirs, addresses)
    warm_ours = max(rate(run_mailrelay, addresses)[0] for _ in range(ROUNDS))
    warm_theirs = max(rate(theirs, addresses)[0] for _ in range(ROUNDS))

    print(f"{len(addresses)} addresses (seed {SEED}), Python {sys.version.split()[0]}")
    print(f"accepted: mailrelay {accepted_ours}, email-validator {accepted_theirs}")
    print(f"{'':<18}{'cold':>14}{'warm (best of ' + str(ROUNDS) + ')':>22}")
    print(f"{'Address.parse':<18}{cold_ours:>12,.0f}/s{warm_ours:>20,.0f}/s")
    print(f"{'validate_email':<18}{cold_theirs:>12,.0f}/s{warm_theirs:>20,.0f}/s")
    print(f"{'ratio':<18}{cold_ours / cold_theirs:>13.1f}x{warm_ours / warm_theirs:>21.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
