"""The tracker's hot-path shortcuts give exactly what the slow paths give.

The fast record builders in :mod:`mailrelay.tracker.store` fill attrs slots directly;
the batch id maker and the message cache's ``put_many`` do per batch what was done per
message; the SQLite store binds fewer parameters. Each is held equal to the plain way (or
a model of it) here.
"""

from __future__ import annotations

import datetime as dt
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
from attrs import AttrsInstance
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelay.address import Address
from mailrelay.envelope import Envelope
from mailrelay.message import Message
from mailrelay.tracker.cache import MAX_KEPT, MessageCache
from mailrelay.tracker.core import _new_id, _new_ids
from mailrelay.tracker.events import EventKind
from mailrelay.tracker.sqlite_store import _COPY_LIMIT, SQLiteStore
from mailrelay.tracker.store import (
    DUE_STATES,
    Attempt,
    Change,
    Claim,
    MessageRecord,
    RecipientRecord,
    State,
    apply_change,
    new_change,
    new_claim,
    queued_record,
    to_micros,
)

ADDRESSES = [Address.parse(text) for text in ("a@example.org", "b@x.example", "Ünï@bücher.example")]
ZONES = st.sampled_from(
    [dt.UTC, dt.timezone(dt.timedelta(hours=2)), dt.timezone(dt.timedelta(hours=-7, minutes=-30))]
)
TIMES = st.datetimes(min_value=dt.datetime(1971, 1, 1), timezones=ZONES)
ATTEMPT = st.builds(
    Attempt,
    at=TIMES,
    host=st.sampled_from([None, "mx.example:25"]),
    code=st.sampled_from([None, 250, 451]),
    text=st.text(max_size=5),
    source=st.sampled_from(["reply", "error", "dsn"]),
)
ATTEMPTS = st.none() | ATTEMPT


def _same(fast: AttrsInstance, slow: AttrsInstance) -> None:
    """Equal, of the same class, with every field equal in value and type."""
    assert type(fast) is type(slow)
    assert fast == slow
    for field in attrs.fields(type(slow)):
        a, b = getattr(fast, field.name), getattr(slow, field.name)
        assert type(a) is type(b), field.name
        assert a == b, field.name
        if isinstance(b, dt.datetime):
            assert a.tzinfo is b.tzinfo is dt.UTC, field.name


@given(
    st.lists(st.sampled_from(ADDRESSES), min_size=1, max_size=3, unique=True),
    TIMES,
    st.sampled_from([None, "id@example.org"]),
    st.integers(min_value=0, max_value=1 << 20),
    st.booleans(),
)
def test_queued_record_equals_the_constructors(
    addresses: list[Address], now: dt.datetime, message_id: str | None, size: int, note: bool
) -> None:
    envelope = Envelope("sender@example.org", addresses)
    fast = queued_record(
        id="t1",
        created_at=now,
        envelope=envelope,
        message_id=message_id,
        size=size,
        addresses=addresses,
        notification=note,
    )
    slow = MessageRecord(
        id="t1",
        created_at=now,
        envelope=envelope,
        message_id=message_id,
        size=size,
        recipients=tuple(
            RecipientRecord(address=a, state=State.QUEUED, next_attempt_at=now) for a in addresses
        ),
        notification=note,
    )
    _same(fast, slow)
    assert len(fast.recipients) == len(slow.recipients)
    for fast_recipient, slow_recipient in zip(fast.recipients, slow.recipients, strict=True):
        _same(fast_recipient, slow_recipient)
    assert hash(fast) == hash(slow)


@given(st.sampled_from(ADDRESSES), st.sampled_from(list(State)), ATTEMPTS, st.none() | TIMES)
def test_new_change_equals_the_constructor(
    address: Address, state: State, attempt: Attempt | None, when: dt.datetime | None
) -> None:
    fast = new_change(address, state, attempt, when)
    slow = Change(address=address, state=state, attempt=attempt, next_attempt_at=when)
    _same(fast, slow)
    assert hash(fast) == hash(slow)


@given(st.lists(st.sampled_from(ADDRESSES), max_size=3), TIMES, st.booleans())
def test_new_claim_equals_the_constructor(
    addresses: list[Address], until: dt.datetime, fresh: bool
) -> None:
    fast = new_claim("t1", "w", until, tuple(addresses), fresh)
    slow = Claim(
        tracking_id="t1", worker="w", lease_until=until, addresses=tuple(addresses), fresh=fresh
    )
    _same(fast, slow)


NAIVE = dt.datetime(2030, 1, 1)


@pytest.mark.parametrize(
    "build",
    [
        lambda: queued_record(
            id="t",
            created_at=NAIVE,
            envelope=Envelope(None, "a@example.org"),
            message_id=None,
            size=0,
            addresses=[ADDRESSES[0]],
        ),
        lambda: new_change(ADDRESSES[0], State.DEFERRED, None, NAIVE),
        lambda: new_claim("t", "w", NAIVE, (), True),
    ],
    ids=["queued_record", "new_change", "new_claim"],
)
def test_the_fast_builders_refuse_naive_times_as_the_constructors_do(
    build: Callable[[], object],
) -> None:
    with pytest.raises(ValueError, match="aware"):
        build()


@given(TIMES, st.integers(min_value=0, max_value=50))
def test_batch_ids_have_the_single_ids_form(now: dt.datetime, count: int) -> None:
    ids = _new_ids(now, count)
    single = _new_id(now)
    assert len(ids) == count
    assert len(set(ids)) == count  # 72 random bits each: a repeat would be a bug
    for tracking_id in [*ids, single]:
        assert re.fullmatch(r"[0-9a-f]{32}", tracking_id)
        assert tracking_id[:14] == single[:14] == f"{to_micros(now) & (1 << 56) - 1:014x}"


def _message(size: int, tag: int) -> Message:
    return Message.build(
        sender="s@example.org", to=["r@example.org"], subject=f"m{tag}", text="x" * size
    )


@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=4), st.integers(0, 2000)),
        max_size=12,
    ),
    st.integers(min_value=0, max_value=8000),
)
def test_put_many_keeps_what_puts_one_by_one_keep(
    entries: list[tuple[int, int]], max_bytes: int
) -> None:
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    pairs = []
    for tag, (key, size) in enumerate(entries):
        message = _message(size, tag)
        record = queued_record(
            id=f"id{key}",
            created_at=now,
            envelope=Envelope.from_message(message),
            message_id=message.message_id,
            size=message.size,
            addresses=[ADDRESSES[0]],
        )
        pairs.append((message, record))
    # The rule put one message at a time (as MessageCache.put did before put_many): keep it
    # if it fits and is in memory, then evict the oldest until the total fits.
    model: dict[str, Message] = {}
    for message, record in pairs:
        if message.size <= min(max_bytes, MAX_KEPT):
            model.pop(record.id, None)
            model[record.id] = message
            while sum(m.size for m in model.values()) > max_bytes:
                del model[next(iter(model))]
    cache = MessageCache(max_bytes)
    cache.put_many(pairs)
    assert len(cache) == len(model)
    for key in range(5):
        taken = cache.take(f"id{key}")
        assert (None if taken is None else taken[0]) is model.get(f"id{key}")


def test_put_many_evicts_as_each_put_would_when_an_id_comes_again_smaller() -> None:
    # Found by the property above: evicting only once at the end would keep ``first``,
    # since the total fits once ``again`` replaces ``second``; one put at a time evicts
    # ``first`` when ``second`` arrives.
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    first, second, again = _message(1000, 0), _message(100, 1), _message(0, 2)
    assert again.size < second.size

    def record(tracking_id: str, message: Message) -> MessageRecord:
        return queued_record(
            id=tracking_id,
            created_at=now,
            envelope=Envelope.from_message(message),
            message_id=None,
            size=message.size,
            addresses=[ADDRESSES[0]],
        )

    cache = MessageCache(first.size + again.size)
    cache.put_many([(first, record("a", first)), (second, record("b", second))])
    cache.put_many([(again, record("b", again))])
    batched = MessageCache(first.size + again.size)
    batched.put_many(
        [(first, record("a", first)), (second, record("b", second)), (again, record("b", again))]
    )
    for kept in (cache, batched):
        assert kept.take("a") is None
        taken = kept.take("b")
        assert taken is not None
        assert taken[0] is again


@pytest.mark.parametrize("member", [*State, *EventKind], ids=str)
def test_states_and_event_kinds_are_found_in_sets_and_dicts_however_obtained(
    member: State | EventKind,
) -> None:
    # They hash by identity (see State): every way of getting a member gives the one object.
    kind = type(member)
    for same in (kind(member.value), kind[member.name], pickle.loads(pickle.dumps(member))):
        assert same is member
        assert same in {member}
        assert {member: 1}[same] == 1
    assert member not in {other for other in kind if other is not member}


def recipients_of(address: Address) -> st.SearchStrategy[RecipientRecord]:
    """Records of ``address`` in any state, with or without attempts and a lease."""
    return st.builds(
        RecipientRecord,
        address=st.just(address),
        state=st.sampled_from(list(State)),
        attempts=st.lists(ATTEMPT, max_size=2).map(tuple),
        next_attempt_at=st.none() | TIMES,
        confirmed=st.booleans(),
        lease_owner=st.none() | st.just("worker-1"),
        lease_until=st.none() | TIMES,
    )


RECIPIENTS = st.sampled_from(ADDRESSES).flatmap(recipients_of)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.sampled_from(ADDRESSES), min_size=1, max_size=3, unique=True).flatmap(
                lambda addresses: st.tuples(*map(recipients_of, addresses)).map(list)
            ),
            st.sampled_from([0, 1, 700, _COPY_LIMIT, _COPY_LIMIT + 1, 20_000]),
            st.sampled_from([None, "env-1"]),
        ),
        min_size=1,
        max_size=4,
    ),
    st.booleans(),
)
def test_sqlite_add_stores_every_record_and_content_exactly(
    shapes: list[tuple[list[RecipientRecord], int, str | None]], one_by_one: bool
) -> None:
    # SQLiteStore binds small contents as bytearrays and writes an unleased recipient's
    # NULLs in its SQL (see _COPY_LIMIT): records with and without leases, attempts and
    # contents on either side of the limit come back as given.
    entries = []
    for index, (recipients, size, envid) in enumerate(shapes):
        envelope = Envelope("s@example.org", [r.address for r in recipients], envid=envid)
        record = MessageRecord(
            id=f"m{index}",
            created_at=dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
            envelope=envelope,
            message_id=None if envid is None else f"<{index}@example.org>",
            size=size,
            recipients=tuple(recipients),
        )
        entries.append((record, bytes(range(256)) * (size // 256) + b"x" * (size % 256)))
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "t.db")
        try:
            if one_by_one:
                for record, data in entries:
                    store.add(record, [data])
            else:
                store.add_many([(record, [data]) for record, data in entries])
            for record, data in entries:
                assert store.get(record.id) == record
                assert store.content(record.id) == data
            # The ENVID column (bound as "" when absent, stored as NULL) finds what it should.
            with_envid = [record.id for record, _ in entries if record.envelope.envid]
            assert store.lookup(envid="env-1") == with_envid
            assert store.lookup(envid="") == []
        finally:
            store.close()


def _apply_change_by_evolve(
    record: RecipientRecord, change: Change, *, worker: str | None
) -> tuple[RecipientRecord, bool]:
    """apply_change as written before its fast builder: attrs.evolve throughout."""
    attempts = record.attempts + ((change.attempt,) if change.attempt is not None else ())
    if worker is not None:
        allowed = record.state is State.SENDING and record.lease_owner == worker
    elif change.expect is not None:
        allowed = record.state in change.expect
    else:
        allowed = not record.state.is_final
    if not allowed:
        return attrs.evolve(record, attempts=attempts), False
    return (
        attrs.evolve(
            record,
            state=change.state,
            attempts=attempts,
            next_attempt_at=change.next_attempt_at if change.state in DUE_STATES else None,
            confirmed=record.confirmed if change.confirmed is None else change.confirmed,
            lease_owner=None,
            lease_until=None,
        ),
        True,
    )


@given(
    RECIPIENTS,
    st.builds(
        Change,
        address=st.sampled_from(ADDRESSES),
        state=st.sampled_from(list(State)),
        attempt=ATTEMPTS,
        next_attempt_at=st.none() | TIMES,
        confirmed=st.none() | st.booleans(),
        expect=st.none() | st.frozensets(st.sampled_from(list(State))),
    ),
    st.sampled_from([None, "worker-1", "worker-2"]),
)
def test_apply_change_equals_its_evolve_form(
    record: RecipientRecord, change: Change, worker: str | None
) -> None:
    fast, fast_did = apply_change(record, change, worker=worker)
    slow, slow_did = _apply_change_by_evolve(record, change, worker=worker)
    assert fast_did == slow_did
    _same(fast, slow)
