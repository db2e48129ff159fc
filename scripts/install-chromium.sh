#!/usr/bin/env bash
# Make sure Debian's headless-capable Chromium is installed (/usr/bin/chromium): the browser
# test of the custodian's page drives it with Playwright. Never a browser download.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "Chromium is not installed and apt-get is unavailable: install Debian's chromium package by hand" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
echo "==> installing Debian's chromium package (for the browser test of the pod's page)"
if [ -n "${CI:-}" ]; then  # quiet in CI logs; apt's own progress otherwise
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null
else
  $sudo apt-get update
  $sudo apt-get install -y --no-install-recommends chromium
fi
