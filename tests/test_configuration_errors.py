"""Settings that make no sense raise ``ConfigurationError`` (a ``ValueError``) from the
``mailrelay.errors`` tree, never a bare ``ValueError``, wherever they are given."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable

import pytest

from mailrelay.callout import Callout
from mailrelay.dkim import canonicalize_body, canonicalize_header
from mailrelay.dnscache import DNSCache
from mailrelay.errors import ConfigurationError
from mailrelay.resolver import Resolver
from mailrelay.tracker.async_engine import AsyncDeliveryTracker
from mailrelay.tracker.cache import MessageCache
from mailrelay.tracker.engine import DeliveryTracker
from mailrelay.tracker.retry import RetryPolicy
from mailrelay.tracker.store import MemoryStore
from mailrelay.transport.memory import MemoryTransport
from mailrelay.validate import AsyncRecipientValidator, RecipientValidator


def tracker(**options: object) -> None:
    DeliveryTracker(MemoryTransport(), MemoryStore(), **options)  # type: ignore[arg-type]


def arun_pending_with_no_concurrency() -> None:
    async def main() -> None:
        await AsyncDeliveryTracker(MemoryTransport(), MemoryStore()).arun_pending(concurrency=0)

    asyncio.run(main())


def validate_many_with_no_time() -> None:
    RecipientValidator(resolver=Resolver(), refused_networks=()).validate_many(
        ["a@example.com"], timeout=0
    )


CASES: dict[str, Callable[[], object]] = {
    "tracker lease": lambda: tracker(lease=dt.timedelta(0)),
    "tracker batch_size": lambda: tracker(batch_size=0),
    "tracker commit_batch": lambda: tracker(commit_batch=0),
    "tracker commit_interval": lambda: tracker(commit_interval=dt.timedelta(seconds=-1)),
    "tracker delay warning without a DSN transport": lambda: tracker(
        delay_warning_after=dt.timedelta(hours=4)
    ),
    "tracker negative delay warning": lambda: tracker(
        dsn_transport=MemoryTransport(), delay_warning_after=dt.timedelta(hours=-1)
    ),
    "async runner concurrency": arun_pending_with_no_concurrency,
    "retry initial": lambda: RetryPolicy(initial=0),
    "retry max_age": lambda: RetryPolicy(max_age=-5),
    "message cache": lambda: MessageCache(max_bytes=-1),
    "validator concurrency": lambda: RecipientValidator(
        resolver=Resolver(), concurrency=0, refused_networks=()
    ),
    "async validator concurrency": lambda: AsyncRecipientValidator(
        concurrency=0, refused_networks=()
    ),
    "validate_many timeout": validate_many_with_no_time,
    "DNS cache size": lambda: DNSCache(max_size=0),
    "callout recipients": lambda: Callout(Resolver(), max_recipients=0, refused_networks=()),
    "resolver timeout": lambda: Resolver(timeout=0),
    "resolver queries in flight": lambda: Resolver(max_in_flight=0),
    "TLSA port": lambda: Resolver().tlsa("mx.example.com", port=0),
    "DKIM header canonicalization": lambda: canonicalize_header(b"a: b\r\n", "strict"),
    "DKIM body canonicalization": lambda: canonicalize_body(b"x\r\n", "strict"),
}


@pytest.mark.parametrize("make", CASES.values(), ids=CASES.keys())
def test_nonsense_settings_are_configuration_errors(make: Callable[[], object]) -> None:
    with pytest.raises(ConfigurationError):
        make()
