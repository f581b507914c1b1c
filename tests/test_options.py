"""Tests for mailrelay.options: the TLS policy and per-phase timeouts."""

from __future__ import annotations

import math
import pickle

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.errors import ConfigurationError
from mailrelay.options import TLS, Timeouts

PHASES = ("connect", "greeting", "mail", "rcpt", "data_init", "data_block", "data_end", "quit")


def test_defaults_are_the_rfc_5321_values() -> None:
    # RFC 5321 §4.5.3.2; connect and quit are ours (the RFC sets no limit for them).
    assert Timeouts() == Timeouts(
        connect=30,
        greeting=300,
        mail=300,
        rcpt=300,
        data_init=120,
        data_block=180,
        data_end=600,
        quit=10,
    )
    assert [Timeouts().for_phase(p) for p in PHASES] == [30, 300, 300, 300, 120, 180, 600, 10]


def test_fields_are_exactly_the_phases() -> None:
    assert tuple(f.name for f in attrs.fields(Timeouts)) == PHASES


@given(st.floats(min_value=0.001, max_value=1e6, allow_nan=False))
def test_all_sets_every_phase(seconds: float) -> None:
    timeouts = Timeouts.all(seconds)
    assert {timeouts.for_phase(p) for p in PHASES} == {seconds}


@pytest.mark.parametrize("bad", [0, -1, -0.5, math.inf, math.nan])
def test_non_positive_or_non_finite_refused(bad: float) -> None:
    with pytest.raises(ConfigurationError, match="positive"):
        Timeouts(rcpt=bad)


@pytest.mark.parametrize("bad", [True, "30", None])
def test_non_numbers_refused(bad: object) -> None:
    with pytest.raises(TypeError):
        Timeouts(mail=bad)  # type: ignore[arg-type]


def test_ints_become_floats() -> None:
    value = Timeouts(greeting=7).greeting
    assert value == 7.0
    assert isinstance(value, float)


def test_unknown_phase_refused() -> None:
    with pytest.raises(ConfigurationError, match="unknown dialogue phase"):
        Timeouts().for_phase("lunch")


def test_frozen_and_picklable() -> None:
    timeouts = Timeouts.all(5)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        timeouts.mail = 1  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(timeouts)) == timeouts


@pytest.mark.parametrize(
    ("text", "policy"),
    [
        ("none", TLS.NONE),
        ("opportunistic", TLS.OPPORTUNISTIC),
        ("STARTTLS", TLS.STARTTLS),
        (" implicit ", TLS.IMPLICIT),
    ],
)
def test_tls_parse(text: str, policy: TLS) -> None:
    assert TLS.parse(text) is policy


def test_tls_parse_refuses_unknown_names() -> None:
    with pytest.raises(ConfigurationError, match="unknown TLS policy 'ssl'"):
        TLS.parse("ssl")


def test_tls_members() -> None:
    assert [m.name for m in TLS] == ["NONE", "OPPORTUNISTIC", "STARTTLS", "IMPLICIT"]
