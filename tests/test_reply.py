"""Reply and EnhancedStatus values."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.reply import EnhancedStatus, Reply


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5.1.1", (5, 1, 1)),
        ("4.7.0", (4, 7, 0)),
        ("2.0.0", (2, 0, 0)),
        ("5.999.999", (5, 999, 999)),
        (" 4.2.2 ", (4, 2, 2)),
    ],
)
def test_parse_enhanced_status(text: str, expected: tuple[int, int, int]) -> None:
    status = EnhancedStatus.parse(text)
    assert (status.klass, status.subject, status.detail) == expected


@pytest.mark.parametrize("text", ["3.1.1", "5.1", "5.01.1", "5.1.1000", "x.1.1", "", "5.1.1 x"])
def test_parse_rejects_malformed_status(text: str) -> None:
    with pytest.raises(ValueError, match="enhanced status"):
        EnhancedStatus.parse(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5.1.1 No such user", "5.1.1"),
        ("2.0.0", "2.0.0"),
        ("5.1.1x no", None),
        ("No such user 5.1.1", None),
        ("", None),
    ],
)
def test_search_finds_only_a_leading_code(text: str, expected: str | None) -> None:
    found = EnhancedStatus.search(text)
    assert (str(found) if found else None) == expected


@given(st.integers(2, 5).filter(lambda k: k != 3), st.integers(0, 999), st.integers(0, 999))
def test_enhanced_status_round_trips(klass: int, subject: int, detail: int) -> None:
    status = EnhancedStatus(klass=klass, subject=subject, detail=detail)
    assert EnhancedStatus.parse(str(status)) == status


@pytest.mark.parametrize(
    ("code", "positive", "intermediate", "transient", "permanent"),
    [
        (250, True, False, False, False),
        (354, False, True, False, False),
        (421, False, False, True, False),
        (550, False, False, False, True),
    ],
)
def test_reply_classes(
    code: int, positive: bool, intermediate: bool, transient: bool, permanent: bool
) -> None:
    reply = Reply.of(code, "text")
    assert (reply.is_positive, reply.is_intermediate, reply.is_transient, reply.is_permanent) == (
        positive,
        intermediate,
        transient,
        permanent,
    )


@pytest.mark.parametrize("code", [199, 600, 0, -250])
def test_reply_code_out_of_range_is_refused(code: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        Reply(code=code, lines=("x",))


def test_reply_text_and_str() -> None:
    reply = Reply.of(550, "5.1.1 No such user", "Try another")
    assert reply.enhanced == EnhancedStatus.parse("5.1.1")
    assert reply.text == "5.1.1 No such user\nTry another"
    assert str(reply) == "550 5.1.1 No such user\n550 Try another"


def test_bare_reply_has_one_empty_line() -> None:
    assert Reply(code=250, lines=()).lines == ("",)
    assert str(Reply.of(250)) == "250"
