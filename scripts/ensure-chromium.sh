#!/usr/bin/env bash
# The browser tests drive Debian's chromium (Playwright cannot download browsers here).
set -eu
if [ -x /usr/bin/chromium ]; then exit 0; fi
echo "installing Debian chromium for the browser tests"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
