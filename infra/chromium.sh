#!/usr/bin/env bash
# Debian's chromium for the web-map browser test (tests/test_web_map.py drives it with Playwright;
# no browser is downloaded).  Installs it when missing; exits non-zero if it cannot.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
    echo "chromium.sh: /usr/bin/chromium is missing; as root: apt-get install -y chromium" >&2
    exit 1
fi
echo "chromium.sh: installing chromium (Debian package)" >&2
apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >&2
