#!/bin/sh
# Install the Debian packages the test suite and benchmarks talk to, when missing:
#   swaks       a real SMTP client (tests)
#   postfix     for smtp-sink / smtp-source (real SMTP peers, load generator);
#               installed with "No configuration", so no Postfix daemon is started
#   openssl     certificate tooling used by TLS tests
set -eu
missing=""
command -v swaks >/dev/null 2>&1 || missing="$missing swaks"
command -v smtp-sink >/dev/null 2>&1 || [ -x /usr/sbin/smtp-sink ] || missing="$missing postfix"
command -v openssl >/dev/null 2>&1 || missing="$missing openssl"
[ -z "$missing" ] && exit 0
echo "install-system-deps: installing$missing with apt-get" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq $missing >/dev/null
