#!/bin/sh
# Installs Debian's headless-capable chromium and its matching chromedriver for the
# FiftyOne App browser test (tests/test_explore_browser.py). Idempotent: does nothing
# when both binaries exist. Uses the distribution packages because tools that fetch
# their own browser (selenium-manager, playwright) cannot download anything here.
set -eu

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

# apt's chatter goes to a log that is shown only when something fails.
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq && \
       $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver; } >"$LOG" 2>&1; then
    cat "$LOG" >&2
    echo "install-browser.sh: apt-get failed" >&2
    exit 1
fi

if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    echo "install-browser.sh: chromium or chromedriver still missing after apt-get install" >&2
    exit 1
fi
