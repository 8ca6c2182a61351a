#!/usr/bin/env bash
# Makes sure Debian's chromium is installed for the browser tests (Playwright drives it through
# executable_path; the project never downloads Playwright's own browsers).
set -euo pipefail
CHROMIUM="${CHROMIUM_PATH:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium
[ -x "$CHROMIUM" ] || { echo "chromium was not installed at $CHROMIUM" >&2; exit 1; }
