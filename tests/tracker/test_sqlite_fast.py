"""SQLiteStore's fast path for a worker's results, held equal to the slow path.

``apply_many`` with a ``worker`` writes the results of recipients its own ``claim``
leased without reading them first; whenever that does not fit it rolls back and takes
the slow path. These tests run the same operations on a store whose fast path is off
and compare what each returns and every stored row, attempts included.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelay.address import Address
from mailrelay.envelope import Envelope
from mailrelay.tracker import sqlite_store
from mailrelay.tracker.sqlite_store import SQLiteStore
from mailrelay.tracker.store import (
    Attempt,
    Change,
    Claim,
    MessageRecord,
    RecipientRecord,
    State,
)

T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
LEASE = dt.timedelta(minutes=5)
ADDRESSES = ("a@example.org", "b@example.net", "c@example.com")


class SlowStore(SQLiteStore):
    """The reference: every batch takes the slow path (read, apply in Python, write)."""

    def _fast_rows(self, batch: Sequence[tuple[str, Sequence[Change]]], worker: str) -> None:
        return None


class CountingStore(SQLiteStore):
    """Counts the batches each path wrote."""

    fast = 0
    slow = 0

    def _apply_fast(self, *args: Any) -> list[tuple[Address, ...]]:
        self.fast += 1
        return super()._apply_fast(*args)

    def _apply_batch(self, *args: Any) -> list[tuple[Address, ...]]:
        self.slow += 1
        return super()._apply_batch(*args)


def make_record(tracking_id: str, recipients: Sequence[str] = ADDRESSES[:2]) -> MessageRecord:
    envelope = Envelope("sender@example.com", tuple(recipients))
    return MessageRecord(
        id=tracking_id,
        created_at=T0,
        envelope=envelope,
        size=5,
        recipients=tuple(
            RecipientRecord(address=r.address, state=State.QUEUED, next_attempt_at=T0)
            for r in envelope.recipients
        ),
    )


def rows(store: SQLiteStore) -> tuple[list[Any], list[Any]]:
    """Every recipient row and every attempt row, in key order."""
    with sqlite3.connect(store.path) as conn:
        recipients = conn.execute("SELECT * FROM recipients ORDER BY message, position").fetchall()
        attempts = conn.execute("SELECT * FROM attempts ORDER BY message, position, seq").fetchall()
    conn.close()
    return recipients, attempts


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[CountingStore, SlowStore]]:
    fast, slow = CountingStore(tmp_path / "fast.db"), SlowStore(tmp_path / "slow.db")
    for store in (fast, slow):
        store.add_many([(make_record(f"m{i}"), [b"12345"]) for i in range(3)])
    yield fast, slow
    fast.close()
    slow.close()


def both(pair: tuple[SQLiteStore, SQLiteStore], name: str, *args: Any, **kwargs: Any) -> Any:
    """Call ``name`` on both stores; assert they return the same and store the same."""
    outcomes = []
    for store in pair:
        try:
            outcomes.append(("ok", getattr(store, name)(*args, **kwargs)))
        except KeyError as exc:
            outcomes.append(("KeyError", exc.args))
    assert outcomes[0] == outcomes[1]
    assert rows(pair[0]) == rows(pair[1])
    return outcomes[0][1]


def delivered(address: str, at: dt.datetime = T0, text: str = "ok") -> Change:
    return Change(
        address=Address.parse(address),
        state=State.DELIVERED,
        attempt=Attempt(at=at, code=250, text=text),
    )


def test_a_worker_s_own_results_take_the_fast_path(
    pair: tuple[CountingStore, SlowStore],
) -> None:
    claims = both(pair, "claim", worker="w", now=T0, lease=LEASE, limit=10)
    deferred = Change(
        address=claims[1].addresses[1],
        state=State.DEFERRED,
        attempt=Attempt(at=T0, code=451, text="later"),
        next_attempt_at=T0 + LEASE,
    )
    batch = [
        (claims[0].tracking_id, [delivered(str(a)) for a in claims[0].addresses]),
        (claims[1].tracking_id, [delivered(str(claims[1].addresses[0])), deferred]),
        (
            claims[2].tracking_id,
            [
                Change(address=a, state=State.QUEUED, next_attempt_at=T0 + 2 * LEASE)
                for a in claims[2].addresses
            ],
        ),
    ]
    changed = both(pair, "apply_many", batch, worker="w")
    assert (pair[0].fast, pair[0].slow) == (1, 0)
    # The changes' own addresses come back, in order.
    assert all(
        got[i] is change.address
        for got, (_, changes) in zip(changed, batch, strict=True)
        for i, change in enumerate(changes)
    )
    # The next result for a recipient of m1 needs a new claim: the entry was used.
    again = both(pair, "claim", worker="w", now=T0 + LEASE, lease=LEASE, limit=10)
    assert [c.tracking_id for c in again] == ["m1"]
    both(pair, "apply_many", [("m1", [delivered("b@example.net")])], worker="w")
    assert (pair[0].fast, pair[0].slow) == (2, 0)


def test_a_lease_lost_mid_batch_gives_the_slow_path_s_results(
    pair: tuple[CountingStore, SlowStore],
) -> None:
    claims = both(pair, "claim", worker="old", now=T0, lease=LEASE, limit=10)
    assert [c.tracking_id for c in claims] == ["m0", "m1", "m2"]
    # The leases expire and another worker takes m1 over.
    taken = both(pair, "claim", worker="new", now=T0 + LEASE, lease=LEASE, limit=1)
    assert [c.tracking_id for c in taken] == ["m0"]
    batch = [
        (claim.tracking_id, [delivered(str(a), text=claim.tracking_id) for a in claim.addresses])
        for claim in claims
    ]
    changed = both(pair, "apply_many", batch, worker="old")
    addresses = tuple(Address.parse(a) for a in ADDRESSES[:2])
    assert changed == [(), addresses, addresses]
    # The fast path tried, found changes short, and rolled everything back.
    assert (pair[0].fast, pair[0].slow) == (1, 1)
    recipients, attempts = rows(pair[0])
    assert [(r[0], r[3], r[6]) for r in recipients if r[0] == "m0"] == [
        ("m0", "sending", "new")
    ] * 2
    assert [(a[0], a[2], a[7]) for a in attempts] == [
        (tracking_id, 0, tracking_id) for tracking_id in ("m0", "m0", "m1", "m1", "m2", "m2")
    ]


@pytest.mark.parametrize("late_first", [True, False])
def test_a_stale_worker_s_late_attempt_keeps_the_sequence(tmp_path: Path, late_first: bool) -> None:
    # Each worker has its own store (another process, say), so each its own claims.
    outcomes = []
    for kind in (CountingStore, SlowStore):
        path = tmp_path / f"{kind.__name__}.db"
        stale, live = kind(path), kind(path)
        stale.add(make_record("m0"), [b"12345"])
        stale.claim(worker="stale", now=T0, lease=LEASE, limit=10)
        live.claim(worker="live", now=T0 + LEASE, lease=LEASE, limit=10)
        late = [delivered(a, text="late") for a in ADDRESSES[:2]]
        fresh = [delivered(a, at=T0 + LEASE, text="live") for a in ADDRESSES[:2]]
        steps = [(stale, "stale", late), (live, "live", fresh)]
        changed = [
            store.apply("m0", changes, worker=worker)
            for store, worker, changes in (steps if late_first else steps[::-1])
        ]
        outcomes.append((changed, rows(live)))
        if isinstance(live, CountingStore):
            # The live worker's result tries the fast path; after a late attempt, the
            # sequence number its claim counted is taken, so the slow path records it.
            assert (live.fast, live.slow) == (1, 1 if late_first else 0)
        stale.close()
        live.close()
    assert outcomes[0] == outcomes[1]
    changed, (_, attempts) = outcomes[0]
    addresses = tuple(Address.parse(a) for a in ADDRESSES[:2])
    assert changed == ([(), addresses] if late_first else [addresses, ()])
    texts = ["late", "live"] if late_first else ["live", "late"]
    assert [(a[1], a[2], a[7]) for a in attempts] == [
        (position, seq, text) for position in (0, 1) for seq, text in enumerate(texts)
    ]


def test_a_report_recorded_after_the_claim_keeps_the_sequence(
    pair: tuple[CountingStore, SlowStore],
) -> None:
    claims = both(pair, "claim", worker="w", now=T0, lease=LEASE, limit=1)
    note = Attempt(at=T0, text="DSN delayed", source="dsn")
    a = claims[0].addresses[0]
    history = Change(address=a, state=State.QUEUED, attempt=note, expect=frozenset())
    assert both(pair, "apply", "m0", [history]) == ()
    results = [delivered(str(address)) for address in claims[0].addresses]
    assert both(pair, "apply", "m0", results, worker="w") == claims[0].addresses
    _, attempts = rows(pair[0])
    assert [(row[1], row[2], row[8]) for row in attempts] == [
        (0, 0, "dsn"),
        (0, 1, "reply"),
        (1, 0, "reply"),
    ]
    assert (pair[0].fast, pair[0].slow) == (1, 2)


def test_changes_the_fast_path_does_not_take(pair: tuple[CountingStore, SlowStore]) -> None:
    both(pair, "claim", worker="w", now=T0, lease=LEASE, limit=10)
    a = Address.parse("a@example.org")
    unknown = Change(address=Address.parse("z@example.org"), state=State.DELIVERED)
    confirmed = Change(address=a, state=State.DELIVERED, confirmed=True)
    twice = [delivered("b@example.net"), delivered("b@example.net", text="again")]
    both(pair, "apply_many", [("m0", [unknown])], worker="w")
    both(pair, "apply_many", [("m1", [confirmed])], worker="w")
    both(pair, "apply_many", [("m2", twice)], worker="w")
    both(pair, "apply_many", [("nope", [])], worker="w")
    assert pair[0].fast == 1  # m2: tried, one change short, rolled back
    assert pair[0].slow == 4


def test_claims_past_the_limit_are_forgotten_and_take_the_slow_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "_CLAIMED_LIMIT", 2)
    fast, slow = CountingStore(tmp_path / "fast.db"), SlowStore(tmp_path / "slow.db")
    try:
        for store in (fast, slow):
            store.add_many([(make_record(f"m{i}", ADDRESSES[:1]), [b"12345"]) for i in range(3)])
        pair = (fast, slow)
        both(pair, "claim", worker="w", now=T0, lease=LEASE, limit=2)
        # A third remembered claim would pass the limit: the first two are forgotten.
        both(pair, "claim", worker="w", now=T0, lease=LEASE, limit=1)
        assert list(fast._claimed) == ["m2"]
        for tracking_id in ("m0", "m1", "m2"):
            both(pair, "apply", tracking_id, [delivered(ADDRESSES[0])], worker="w")
        assert (fast.fast, fast.slow) == (1, 2)
    finally:
        fast.close()
        slow.close()


def test_workers_on_threads_share_one_store(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "t.db")
    try:
        store.add_many([(make_record(f"m{i:02}"), [b"12345"]) for i in range(40)])
        errors: list[BaseException] = []

        def work(worker: str) -> None:
            try:
                for _ in range(50):  # bounded; 40 messages in batches of 3 need fewer
                    claims = store.claim(worker=worker, now=T0, lease=LEASE, limit=3)
                    if not claims:
                        return
                    store.apply_many(
                        [
                            (
                                claim.tracking_id,
                                [delivered(str(a), text=worker) for a in claim.addresses],
                            )
                            for claim in claims
                        ],
                        worker=worker,
                    )
            except BaseException as exc:  # reported below, on the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors
        assert not any(thread.is_alive() for thread in threads)
        recipients, attempts = rows(store)
        assert len(recipients) == 80
        assert {r[3] for r in recipients} == {"delivered"}
        # One attempt each (seq 0), all written by the fast path.
        assert len(attempts) == 80
        assert {a[2] for a in attempts} == {0}
        assert store.slow == 0
    finally:
        store.close()


_CHANGES = st.lists(
    st.tuples(
        st.sampled_from(["m0", "m1", "m2", "m5", "nope"]),
        st.lists(
            st.tuples(
                st.sampled_from(ADDRESSES),
                st.sampled_from(list(State)),
                st.booleans(),  # with an attempt
                st.sampled_from([None, True, False]),  # confirmed
                st.sampled_from([None, frozenset({State.SENDING})]),  # expect
            ),
            max_size=3,
        ),
    ),
    min_size=1,
    max_size=4,
)
_RESULTS = st.tuples(
    st.just("results"),
    st.sampled_from(["w1", "w2"]),
    st.lists(  # one per claim, in order
        st.tuples(
            st.sampled_from(list(State)),
            st.booleans(),  # with an attempt
            st.sampled_from([0, 0, 0, 1, 2, 5]),  # addresses left out (bits)
        ),
        min_size=1,
        max_size=6,
    ),
)
_OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("claim"),
            st.sampled_from(["w1", "w2"]),
            st.integers(min_value=0, max_value=20),  # minutes after T0
            st.integers(min_value=1, max_value=6),  # limit
        ),
        st.tuples(st.just("apply"), st.sampled_from(["w1", "w2", None]), _CHANGES),
        # Results for what the worker's last claim leased (what the fast path takes),
        # drawn twice as often as the other operations.
        _RESULTS,
        _RESULTS,
    ),
    max_size=16,
)


@settings(max_examples=150, deadline=None)
@given(_OPS)
def test_fast_and_slow_paths_agree(ops: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        stores = (CountingStore(Path(tmp) / "fast.db"), SlowStore(Path(tmp) / "slow.db"))
        try:
            for store in stores:
                store.add_many(
                    [(make_record(f"m{i}", ADDRESSES[: 1 + i % 3]), [b"12345"]) for i in range(4)]
                )
            last: dict[str, list[Claim]] = {}
            for step, op in enumerate(ops):
                if op[0] == "claim":
                    _, worker, minutes, limit = op
                    now = T0 + dt.timedelta(minutes=minutes)
                    last[worker] = both(
                        stores, "claim", worker=worker, now=now, lease=LEASE, limit=limit
                    )
                    continue
                if op[0] == "results":
                    _, worker, picks = op
                    claims = last.get(worker)
                    if not claims:
                        continue
                    results = [
                        (
                            claim.tracking_id,
                            [
                                Change(
                                    address=address,
                                    state=state,
                                    attempt=(
                                        Attempt(at=T0, code=250 + step, text=f"{step}")
                                        if attempt
                                        else None
                                    ),
                                    next_attempt_at=T0 + dt.timedelta(minutes=step),
                                )
                                for j, address in enumerate(claim.addresses)
                                if not left_out >> j & 1
                            ],
                        )
                        for claim, (state, attempt, left_out) in zip(claims, picks, strict=False)
                    ]
                    both(stores, "apply_many", results, worker=worker)
                    continue
                _, worker, entries = op
                batch = [
                    (
                        tracking_id,
                        [
                            Change(
                                address=Address.parse(address),
                                state=state,
                                attempt=(
                                    Attempt(at=T0, code=250 + step, text=f"{step}")
                                    if attempt
                                    else None
                                ),
                                next_attempt_at=T0 + dt.timedelta(minutes=step),
                                confirmed=confirmed,
                                expect=expect,
                            )
                            for address, state, attempt, confirmed, expect in changes
                        ],
                    )
                    for tracking_id, changes in entries
                ]
                both(stores, "apply_many", batch, worker=worker)
        finally:
            for store in stores:
                store.close()


@given(
    st.lists(
        st.one_of(
            st.text(),
            st.text(alphabet='0123456789abcdef", \\\x7f\né'),
            st.from_regex(r"[0-9a-f]{32}", fullmatch=True),
        ),
        max_size=5,
    )
)
def test_the_ids_json_is_json_dumps_own(ids: list[str]) -> None:
    assert sqlite_store._json_ids(ids) == json.dumps(ids)
