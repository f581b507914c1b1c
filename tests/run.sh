#!/usr/bin/env bash
# Run the whole mailrelay test suite, with its real peers.
#
#   bash tests/run.sh [pytest args...]
#
# The tests start their own throw-away servers on loopback (Postfix, unbound,
# aiosmtpd, smtp-sink, PostgreSQL) and stop them by PID; those need the Debian packages
# below. Run as root, this script installs whatever is missing; otherwise it
# prints the exact command to run and stops. Nothing is skipped: a missing
# peer fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(postfix sasl2-bin libsasl2-modules unbound openssl postgresql locales microsocks tinyproxy msmtp dovecot-lmtpd dovecot-submissiond)
missing=()
for cmd in postfix:postfix saslpasswd2:sasl2-bin unbound:unbound openssl:openssl \
    microsocks:microsocks tinyproxy:tinyproxy msmtp:msmtp dovecot:dovecot-lmtpd; do
    bin="${cmd%%:*}"
    if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$bin" ]; then
        missing+=("${cmd#*:}")
    fi
done
for service in lmtp:dovecot-lmtpd submission:dovecot-submissiond; do
    if [ ! -x "/usr/lib/dovecot/${service%%:*}" ]; then
        missing+=("${service#*:}")
    fi
done
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    missing+=(postgresql)
fi
if [ ! -d /usr/share/i18n/locales ]; then
    missing+=(locales)  # locale sources: a test compiles de_DE with localedef
fi
if [ ! -d /usr/lib/x86_64-linux-gnu/sasl2 ] && [ ! -d /usr/lib/aarch64-linux-gnu/sasl2 ] \
    && ! compgen -G "/usr/lib/*/sasl2/libsasldb*" >/dev/null; then
    missing+=(libsasl2-modules)
fi

if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "tests/run.sh: installing test peers: ${PACKAGES[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
    else
        echo "tests/run.sh: the test suite needs these Debian packages: ${missing[*]}" >&2
        echo "Install them (as root) with:" >&2
        echo "  echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections" >&2
        echo "  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${PACKAGES[*]}" >&2
        exit 2
    fi
fi

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

status=0
"$PYTHON" -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "tests/run.sh: pytest collected no tests: that is a failure" >&2
    exit 1
fi
exit "$status"
