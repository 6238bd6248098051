#!/bin/sh
# Install the Debian packages the test suite and benchmarks talk to, when missing.
# Real components, not mocks: every daemon here is started by the tests themselves, on
# loopback, with private configuration (no service is enabled or started by this script).
#   swaks                     a real SMTP client
#   postfix                   smtp-sink / smtp-source (SMTP peer, load generator); installed
#                             with "No configuration", so no Postfix daemon is set up
#   openssl                   certificate tooling
#   redis-server              the shared state backend (greylisting, rate limits)
#   clamav-daemon, clamav     clamd and sigtool (virus scanning against a test signature)
#   spamassassin, spamd       SpamAssassin's spamd (GTUBE)
#   rspamd                    rspamd (GTUBE)
#   opendkim-tools            an independent DKIM verifier (opendkim-testmsg)
#   dovecot-core              Dovecot's auth service (AUTH and user lookups for submission)
#   unbound                   a DNSSEC-validating resolver (and the authority for the zones
#                             the DANE tests sign)
#   bind9-utils               dnssec-keygen and dnssec-signzone, to sign those zones
#   iproute2, util-linux      ip and unshare, for the private network namespace that test uses
#   chromium, chromium-driver headless Chromium and its chromedriver, for the web console's
#                             browser tests (selenium drives /usr/bin/chromedriver)
#   postgresql                the console's index shared by several nodes (tests/postgres.py
#                             runs a private cluster with initdb; no service is started)
set -eu
need() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }
missing=""
need swaks || missing="$missing swaks"
need smtp-sink || missing="$missing postfix"
need openssl || missing="$missing openssl"
need redis-server || missing="$missing redis-server"
need clamd || missing="$missing clamav-daemon"
need sigtool || missing="$missing clamav"
need spamd || missing="$missing spamd spamassassin"
need rspamd || missing="$missing rspamd"
need opendkim-testmsg || missing="$missing opendkim-tools"
need dovecot || missing="$missing dovecot-core"
need unbound || missing="$missing unbound"
need dnssec-signzone || missing="$missing bind9-utils"
need ip || missing="$missing iproute2"
need unshare || missing="$missing util-linux"
need chromium || missing="$missing chromium"
need chromedriver || missing="$missing chromium-driver"
# PostgreSQL's server programs are under /usr/lib/postgresql/<version>/bin, not on PATH
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing="$missing postgresql"
[ -z "$missing" ] && exit 0
echo "install-system-deps: installing$missing with apt-get" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq $missing >/dev/null
