#!/bin/sh
# Create the project's virtualenv, installing Debian's venv support first if the
# system Python lacks it (a fresh Debian ships python3 without ensurepip).
set -eu
PYTHON=${1:-python3}
VENV=${2:-.venv}
if [ -x "$VENV/bin/python" ]; then
    exit 0
fi
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    echo "bootstrap: installing python3-venv with apt-get" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check --upgrade pip
