"""classify_hard: which failures mean "this address is bad, stop sending to it"."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.tracker import classify_hard

CASES = [
    # (status, diagnostic, context, hard)
    ("5.1.1", "550 5.1.1 <a@example.org>: Recipient address rejected: User unknown", None, True),
    ("5.1.2", "Host or domain name not found", None, True),
    ("5.1.6", "551 not our user; moved", None, True),
    ("5.1.10", "556 5.1.10 domain does not accept mail (null MX)", None, True),
    ("5.0.0", "550 No such user here", None, True),
    (None, "Sorry, no mailbox here by that name. (#5.1.1)", None, True),
    (None, "Sorry, I couldn't find a mail exchanger or IP address. (#5.4.4)", None, True),
    ("5.0.0", "554 This user doesn't have a example.com account", None, True),
    # The address is fine; something else failed.
    ("5.2.2", "552 5.2.2 Mailbox full", None, False),
    ("5.2.1", "550 5.2.1 Mailbox disabled, not accepting messages", None, False),
    ("5.7.1", "554 5.7.1 Message rejected as spam", None, False),
    ("5.7.26", "550 5.7.26 Unauthenticated email is not accepted (DMARC policy)", None, False),
    ("5.3.4", "552 5.3.4 Message too big for system", None, False),
    ("5.1.1", "550 5.1.1 Blocked by policy: listed at a DNSBL", None, False),
    ("5.1.8", "553 5.1.8 Domain of sender address does not exist", None, False),
    ("5.0.0", "SMTP error after MAIL FROM:<me@shop.example>: 550 No such domain", None, False),
    # A transient status never makes a hard bounce, whatever the words.
    ("4.1.1", "450 4.1.1 User unknown in virtual alias table", None, False),
    ("4.4.7", "Delivery time expired", None, False),
    # "User unknown" only after the message text was sent: a filter's verdict.
    ("5.0.0", "550 : User unknown", ">>> DATA <<< 550 : User unknown", False),
    ("5.0.0", "550 Unknown user (in reply to end of DATA command)", None, False),
    # ... unless the server put an X.1.1 on it.
    ("5.1.1", "550 5.1.1 User unknown", ">>> DATA <<< 550 5.1.1 User unknown", True),
    # No diagnostic: the prose about the recipient decides.
    ("5.0.0", None, "The email account that you tried to reach does not exist.", True),
    ("5.0.0", None, "Service unavailable", False),
    # "filtered@example.org" is an address, not a filter.
    ("5.1.1", "550 5.1.1 <filtered@example.org>... User Unknown", None, True),
]


@pytest.mark.parametrize(("status", "diagnostic", "context", "hard"), CASES)
def test_classify(
    status: str | None, diagnostic: str | None, context: str | None, hard: bool
) -> None:
    assert classify_hard(status, diagnostic, permanent=True, context=context) is hard


@given(
    st.none() | st.from_regex(r"\A[245]\.[0-9]{1,3}\.[0-9]{1,3}\Z"),
    st.none() | st.text(max_size=200),
)
def test_not_permanent_is_never_hard(status: str | None, diagnostic: str | None) -> None:
    assert classify_hard(status, diagnostic, permanent=False) is False


@given(st.from_regex(r"\A[24]\.[0-9]{1,3}\.[0-9]{1,3}\Z"), st.text(max_size=200))
def test_non_5xx_status_is_never_hard(status: str, diagnostic: str) -> None:
    assert classify_hard(status, diagnostic, permanent=True) is False
