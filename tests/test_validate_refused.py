"""A domain whose mail hosts are all loopback is UNDELIVERABLE (REFUSED_MAIL_HOST), as
MXTransport refuses to deliver there; ``refused_networks`` says which addresses do not count."""

from __future__ import annotations

from typing import Any

import pytest

from mailrelay import cli
from mailrelay.errors import ConfigurationError
from mailrelay.resolver import AsyncResolver, Resolver
from mailrelay.transport.mx import LOOPBACK_NETWORKS, PRIVATE_NETWORKS
from mailrelay.validate import (
    DEFAULT_SPECIAL_USE,
    AsyncRecipientValidator,
    Reason,
    RecipientValidator,
    Validation,
    Verdict,
)
from tests.peers.unbound import UnboundServer
from tests.test_cli import Run, run  # noqa: F401 -- the fixture
from tests.test_validate import run as run_coroutine

ALLOW_TEST = DEFAULT_SPECIAL_USE - {"test"}


def validate(unbound: UnboundServer, mode: str, address: str, **kwargs: Any) -> Validation:
    resolver_options: dict[str, Any] = {
        "nameservers": [unbound.host],
        "port": unbound.port,
        "timeout": 1.0,
    }
    if mode == "sync":
        validator = RecipientValidator(
            Resolver(**resolver_options), special_use=ALLOW_TEST, **kwargs
        )
        return validator.validate(address)
    avalidator = AsyncRecipientValidator(
        AsyncResolver(**resolver_options), special_use=ALLOW_TEST, **kwargs
    )
    return run_coroutine(avalidator.validate(address))


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(
    ("address", "kwargs", "reason"),
    [
        # MX 10 mx.mailrelay.test: 127.0.0.1 and ::1.
        ("user@mailrelay.test", {}, Reason.REFUSED_MAIL_HOST),
        # The implicit MX (RFC 5321 §5.1): the domain's own A record, 127.0.0.1.
        ("user@a-only.test", {}, Reason.REFUSED_MAIL_HOST),
        ("user@aaaa-only.test", {}, Reason.REFUSED_MAIL_HOST),
        # mx2.test: 127.0.0.1/::1, then 127.0.0.2: one address is enough.
        ("user@mx2.test", {"refused_networks": ("127.0.0.1/32", "::1/128")}, Reason.OK),
        (
            "user@mx2.test",
            {"refused_networks": LOOPBACK_NETWORKS + PRIVATE_NETWORKS},
            Reason.REFUSED_MAIL_HOST,
        ),
        ("user@mailrelay.test", {"refused_networks": ()}, Reason.OK),
        ("user@mailrelay.test", {"refused_networks": ("10.0.0.0/8",)}, Reason.OK),
        # What the DNS says otherwise is unchanged.
        ("user@nullmx.test", {}, Reason.NULL_MX),
        ("user@dangling.test", {}, Reason.NO_MAIL_HOST),
        ("user@timeout.test", {}, Reason.TEMPFAIL),
    ],
)
def test_refused_mail_hosts(
    unbound: UnboundServer, mode: str, address: str, kwargs: dict[str, Any], reason: Reason
) -> None:
    result = validate(unbound, mode, address, **kwargs)
    assert result.reason is reason, result
    if reason is Reason.REFUSED_MAIL_HOST:
        assert result.verdict is Verdict.UNDELIVERABLE
        assert result.detail is not None
        assert "refused_networks" in result.detail
        assert "127.0.0.1" in result.detail or "::1" in result.detail


def test_the_reason_is_undeliverable() -> None:
    assert Reason.REFUSED_MAIL_HOST.verdict is Verdict.UNDELIVERABLE


@pytest.mark.parametrize("value", ["127.0.0.0/8", ("bogus",)])
def test_nonsense_refused_networks(value: Any) -> None:
    for make in (RecipientValidator, AsyncRecipientValidator):
        with pytest.raises(ConfigurationError, match="refused_networks"):
            make(refused_networks=value)


@pytest.mark.unbound
@pytest.mark.parametrize(
    ("option", "reason"), [([], "refused-mail-host"), (["--refused-networks", "none"], "ok")]
)
def test_the_command_line(
    run: Run,  # noqa: F811 -- the fixture
    unbound: UnboundServer,
    option: list[str],
    reason: str,
) -> None:
    dns = ["--nameserver", unbound.host, "--port", str(unbound.port), "--allow-special", "test"]
    status, out, err = run("validate", *dns, *option, "--json", "user@mailrelay.test")
    assert err == ""
    assert status == (cli.EX_OK if reason == "ok" else 1)
    assert f'"{reason}"' in out
