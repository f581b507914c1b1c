"""Test-suite wide set-up: Hypothesis profiles and the real peers' fixtures."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

pytest_plugins = [
    # Imported in dependency order (a plugin module must not be imported before it is
    # registered, or pytest cannot rewrite its asserts).
    "tests.peers.tls",
    "tests.peers.scripted",
    "tests.peers.proxies",
    "tests.peers.postfix",
    "tests.peers.sink",
    "tests.peers.aiosmtpd_server",
    "tests.peers.unbound",
    "tests.peers.postgres",
    "tests.peers.dovecot",
    "tests.peers.dovecot_submission",
]

# Profiles: `dev` for quick local runs, `ci` (chosen when CI=true) for a deeper
# but bounded run, `fuzz` for long local searches. HYPOTHESIS_PROFILE overrides.
settings.register_profile("dev", max_examples=100, deadline=None)
settings.register_profile(
    "ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("fuzz", max_examples=20_000, deadline=None)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") == "true" else "dev")
)
