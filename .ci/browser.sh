#!/usr/bin/env bash
# CI: Debian's chromium for the real-browser test of `attrib report` (pytest -m browser).
# Installs it with apt-get when /usr/bin/chromium is missing; does nothing otherwise.
set -euo pipefail
[ -x /usr/bin/chromium ] && exit 0
command -v apt-get >/dev/null || { echo "error: /usr/bin/chromium is missing and apt-get is not available; install chromium, or leave ATTRIB_REQUIRE_BROWSER unset to skip the browser test" >&2; exit 1; }
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
[ -x /usr/bin/chromium ] || { echo "error: apt-get did not install /usr/bin/chromium" >&2; exit 1; }
