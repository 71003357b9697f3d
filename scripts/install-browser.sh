#!/bin/sh
# Install Debian's chromium for the browser tests (tests/test_browser.py) when it is missing.
# Playwright drives this system browser; we never run `playwright install`.
set -eu

CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ]; then
    echo "chromium already installed: $CHROMIUM"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "error: $CHROMIUM is missing and installing it needs root (or sudo)." >&2
        echo "run as root: apt-get update && apt-get install -y chromium" >&2
        exit 1
    fi
fi

echo "installing Debian chromium with apt ..."
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y chromium
"$CHROMIUM" --version
