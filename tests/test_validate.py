"""RecipientValidator and AsyncRecipientValidator, against the real unbound test zone."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.address import Address
from mailrelay.resolver import AsyncResolver, MailHosts, Resolver
from mailrelay.validate import (
    DEFAULT_SPECIAL_USE,
    AsyncRecipientValidator,
    Reason,
    RecipientValidator,
    Validation,
    Verdict,
)
from tests.peers.unbound import BULK_DOMAINS, UnboundServer

pytestmark = pytest.mark.unbound

T = TypeVar("T")

#: The test zone lives under .test, a special-use name: the tests allow it.
ALLOW_TEST = DEFAULT_SPECIAL_USE - {"test"}

DELIVERABLE, UNDELIVERABLE, UNKNOWN = Verdict.DELIVERABLE, Verdict.UNDELIVERABLE, Verdict.UNKNOWN


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion in a fresh event loop."""
    return asyncio.run(coro)


class CountingResolver(Resolver):
    """A resolver that counts ``mail_hosts`` calls per domain."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: Counter[str] = Counter()

    def mail_hosts(self, domain: str) -> MailHosts:
        self.calls[domain] += 1
        return super().mail_hosts(domain)


class CountingAsyncResolver(AsyncResolver):
    """An async resolver that counts ``mail_hosts`` calls per domain."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: Counter[str] = Counter()

    async def mail_hosts(self, domain: str) -> MailHosts:
        self.calls[domain] += 1
        return await super().mail_hosts(domain)


def counting(unbound: UnboundServer, **kwargs: Any) -> CountingResolver:
    kwargs.setdefault("timeout", 0.5)
    return CountingResolver(nameservers=[unbound.host], port=unbound.port, **kwargs)


def counting_async(unbound: UnboundServer, **kwargs: Any) -> CountingAsyncResolver:
    kwargs.setdefault("timeout", 0.5)
    return CountingAsyncResolver(nameservers=[unbound.host], port=unbound.port, **kwargs)


def validate(unbound: UnboundServer, mode: str, address: str, **kwargs: Any) -> Validation:
    kwargs.setdefault("special_use", ALLOW_TEST)
    if mode == "sync":
        return RecipientValidator(counting(unbound), **kwargs, refused_networks=()).validate(
            address
        )
    return run(
        AsyncRecipientValidator(counting_async(unbound), **kwargs, refused_networks=()).validate(
            address
        )
    )


CASES = [
    ("user@mailrelay.test", DELIVERABLE, Reason.OK),
    ("User.Name+tag@MailRelay.TEST", DELIVERABLE, Reason.OK),
    ('"quoted local"@mx2.test', DELIVERABLE, Reason.OK),
    ("user@failover.test", DELIVERABLE, Reason.OK),
    ("user@samepref.test", DELIVERABLE, Reason.OK),
    ("user@a-only.test", DELIVERABLE, Reason.OK),
    ("user@aaaa-only.test", DELIVERABLE, Reason.OK),
    ("user@halfdangling.test", DELIVERABLE, Reason.OK),
    ("user@mxcname.test", DELIVERABLE, Reason.OK),
    ("user@cname.test", DELIVERABLE, Reason.OK),
    ("user@café.test", DELIVERABLE, Reason.OK),
    ("usér@xn--caf-dma.test", DELIVERABLE, Reason.OK),
    ("user@dom59.test", DELIVERABLE, Reason.OK),
    ("user@nullmx.test", UNDELIVERABLE, Reason.NULL_MX),
    ("user@nx.test", UNDELIVERABLE, Reason.NO_SUCH_DOMAIN),
    ("user@nomail.test", UNDELIVERABLE, Reason.NO_MAIL_HOST),
    ("user@dangling.test", UNDELIVERABLE, Reason.NO_MAIL_HOST),
    ("user@timeout.test", UNKNOWN, Reason.TEMPFAIL),
    ("user@servfail.test", UNKNOWN, Reason.TEMPFAIL),
    ("user@refused.test", UNKNOWN, Reason.TEMPFAIL),
    ("user@slowmx.test", UNKNOWN, Reason.TEMPFAIL),
    ("user@[127.0.0.1]", UNKNOWN, Reason.ADDRESS_LITERAL),
    ("user@[IPv6:::1]", UNKNOWN, Reason.ADDRESS_LITERAL),
    ("user@example.com", UNDELIVERABLE, Reason.SPECIAL_USE_DOMAIN),
    ("user@mail.example.org", UNDELIVERABLE, Reason.SPECIAL_USE_DOMAIN),
    ("user@printer.local", UNDELIVERABLE, Reason.SPECIAL_USE_DOMAIN),
    ("user@localhost", UNDELIVERABLE, Reason.SPECIAL_USE_DOMAIN),
    ("user@x.invalid", UNDELIVERABLE, Reason.SPECIAL_USE_DOMAIN),
    ("user@hidden.onion", UNDELIVERABLE, Reason.SPECIAL_USE_DOMAIN),
    ("user@nas.home.arpa", UNDELIVERABLE, Reason.SPECIAL_USE_DOMAIN),
    ("user", UNDELIVERABLE, Reason.BAD_SYNTAX),
    ("", UNDELIVERABLE, Reason.BAD_SYNTAX),
    ("user@@mailrelay.test", UNDELIVERABLE, Reason.BAD_SYNTAX),
    ("us er@mailrelay.test", UNDELIVERABLE, Reason.BAD_SYNTAX),
    ("user@mailrelay.test\r\nRCPT TO:<x@y>", UNDELIVERABLE, Reason.BAD_SYNTAX),
    ("<user@mailrelay.test>", UNDELIVERABLE, Reason.BAD_SYNTAX),
    ("user@-bad-.test", UNDELIVERABLE, Reason.BAD_SYNTAX),
]


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(("address", "verdict", "reason"), CASES, ids=[c[0] for c in CASES])
def test_verdicts(
    unbound: UnboundServer, mode: str, address: str, verdict: Verdict, reason: Reason
) -> None:
    result = validate(unbound, mode, address)
    assert (result.verdict, result.reason) == (verdict, reason)
    assert result.input == address
    assert result.is_deliverable is (verdict is DELIVERABLE)
    if reason is Reason.BAD_SYNTAX:
        assert result.address is None
        assert result.detail
    else:
        assert result.address == Address.parse(address)
    if reason in {Reason.BAD_SYNTAX, Reason.SPECIAL_USE_DOMAIN, Reason.ADDRESS_LITERAL}:
        assert result.mail_hosts is None  # decided without the DNS
    elif reason is Reason.TEMPFAIL:
        # The MX lookup failed (nothing learnt), or only the exchangers' lookups did.
        assert (result.mail_hosts is None) is (address != "user@slowmx.test")
    else:
        assert result.mail_hosts is not None
    if reason is Reason.OK:
        assert result.mail_hosts is not None
        assert result.mail_hosts.usable_hosts


@pytest.mark.parametrize(
    "address",
    ["not an address", "user@example.com", "user@foo.test", "user@[192.0.2.1]", "a@localhost"],
)
def test_no_dns_query_is_made_when_syntax_or_policy_decides(
    unbound: UnboundServer, address: str
) -> None:
    resolver = counting(unbound)
    RecipientValidator(resolver, refused_networks=()).validate(
        address
    )  # the default policy: .test is special use
    assert not resolver.calls


def test_special_use_is_a_policy(unbound: UnboundServer) -> None:
    strict = RecipientValidator(counting(unbound), refused_networks=())
    assert strict.validate("user@mailrelay.test").reason is Reason.SPECIAL_USE_DOMAIN
    lenient = RecipientValidator(counting(unbound), special_use=ALLOW_TEST, refused_networks=())
    assert lenient.validate("user@mailrelay.test").reason is Reason.OK
    custom = RecipientValidator(
        counting(unbound), special_use={"Mailrelay.Test."}, refused_networks=()
    )
    assert custom.validate("user@sub.mailrelay.test").reason is Reason.SPECIAL_USE_DOMAIN
    assert custom.validate("user@mx2.test").reason is Reason.OK


def test_dns_trouble_is_never_undeliverable(unbound: UnboundServer) -> None:
    validator = RecipientValidator(
        counting(unbound, timeout=0.3), special_use=ALLOW_TEST, refused_networks=()
    )
    for address in ("a@timeout.test", "a@servfail.test", "a@refused.test", "a@slowmx.test"):
        result = validator.validate(address)
        assert result.verdict is UNKNOWN
        assert (
            "timeout" in result.detail or "servfail" in result.detail or "refused" in result.detail
        )


def test_a_verdict_must_follow_from_its_reason() -> None:
    with pytest.raises(ValueError, match="does not follow"):
        Validation(reason=Reason.NULL_MX, verdict=Verdict.DELIVERABLE, input="a@b.test")
    assert all(reason.verdict in Verdict for reason in Reason)


def test_concurrency_must_be_positive(unbound: UnboundServer) -> None:
    with pytest.raises(ValueError, match="concurrency"):
        RecipientValidator(counting(unbound), concurrency=0, refused_networks=())


# -- many at once --------------------------------------------------------------------------

MIXED = [
    "a@dom00.test",
    "bad address",
    "b@nx.test",
    "c@dom00.test",
    "d@nullmx.test",
    "e@example.com",
    "f@DOM00.test",
    "g@café.test",
    "h@xn--caf-dma.test",
    "i@timeout.test",
    "j@[127.0.0.1]",
    "k@dom01.test",
    "a@dom00.test",
]


def expected_for(unbound: UnboundServer, addresses: list[str]) -> list[tuple[str, Verdict, Reason]]:
    validator = RecipientValidator(counting(unbound), special_use=ALLOW_TEST, refused_networks=())
    return [(r.input, r.verdict, r.reason) for r in map(validator.validate, addresses)]


def test_validate_many_keeps_order_and_looks_each_domain_up_once(unbound: UnboundServer) -> None:
    resolver = counting(unbound)
    results = RecipientValidator(
        resolver, special_use=ALLOW_TEST, refused_networks=()
    ).validate_many(iter(MIXED))
    assert [(r.input, r.verdict, r.reason) for r in results] == expected_for(unbound, MIXED)
    domains = [
        "dom00.test",
        "nx.test",
        "nullmx.test",
        "xn--caf-dma.test",
        "timeout.test",
        "dom01.test",
    ]
    assert resolver.calls == Counter(dict.fromkeys(domains, 1))


def test_async_validate_many_keeps_order_and_looks_each_domain_up_once(
    unbound: UnboundServer,
) -> None:
    resolver = counting_async(unbound)
    validator = AsyncRecipientValidator(
        resolver, special_use=ALLOW_TEST, concurrency=2, refused_networks=()
    )
    results = run(validator.validate_many(MIXED))
    assert [(r.input, r.verdict, r.reason) for r in results] == expected_for(unbound, MIXED)
    assert set(resolver.calls.values()) == {1}
    assert len(resolver.calls) == 6


def test_validate_many_over_the_bulk_domains(unbound: UnboundServer) -> None:
    addresses = [f"user{i}@{BULK_DOMAINS[i % len(BULK_DOMAINS)]}" for i in range(600)]
    resolver = counting(unbound)
    results = RecipientValidator(
        resolver, special_use=ALLOW_TEST, concurrency=8, refused_networks=()
    ).validate_many(addresses)
    assert [r.input for r in results] == addresses
    assert {r.reason for r in results} == {Reason.OK}
    assert resolver.calls == Counter(dict.fromkeys(BULK_DOMAINS, 1))


def test_validate_many_of_nothing(unbound: UnboundServer) -> None:
    assert RecipientValidator(counting(unbound), refused_networks=()).validate_many([]) == []
    assert (
        run(AsyncRecipientValidator(counting_async(unbound), refused_networks=()).validate_many([]))
        == []
    )


# -- properties ----------------------------------------------------------------------------

ZONE_DOMAINS = [
    "mailrelay.test",
    "mx2.test",
    "nullmx.test",
    "a-only.test",
    "nomail.test",
    "dangling.test",
    "nx.test",
    "café.test",
    "example.com",
    "dom05.test",
]


@given(text=st.text(max_size=80))
def test_any_text_gets_a_validation(unbound: UnboundServer, text: str) -> None:
    result = RecipientValidator(unbound.resolver(timeout=0.5), refused_networks=()).validate(text)
    assert isinstance(result, Validation)
    assert result.input == text
    assert result.verdict is result.reason.verdict
    assert (result.address is None) is (result.reason is Reason.BAD_SYNTAX)


@given(
    addresses=st.lists(
        st.builds(
            "{}@{}".format,
            st.from_regex(r"[a-z0-9.]{0,6}", fullmatch=True),
            st.sampled_from(ZONE_DOMAINS),
        ),
        max_size=20,
    )
)
def test_validate_many_agrees_with_validate(unbound: UnboundServer, addresses: list[str]) -> None:
    validator = RecipientValidator(unbound.resolver(), special_use=ALLOW_TEST, refused_networks=())
    one_by_one = [validator.validate(a) for a in addresses]
    assert validator.validate_many(addresses) == one_by_one
    async_validator = AsyncRecipientValidator(
        unbound.async_resolver(), special_use=ALLOW_TEST, refused_networks=()
    )
    assert run(async_validator.validate_many(addresses)) == one_by_one
