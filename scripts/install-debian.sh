#!/usr/bin/env bash
# Make sure a Debian package a test needs is installed; installs it with apt when missing.
# Usage: scripts/install-debian.sh PACKAGE PROBE WHY
#   PROBE: a path (glob allowed) or command name whose presence means the package is there.
# Used for `postgresql` (the tests start their own throw-away server with initdb/pg_ctl) and
# `chromium` (the browser test of the pod's page; never a browser download).
set -euo pipefail
package=$1 probe=$2 why=$3
if compgen -G "$probe" >/dev/null || command -v "$probe" >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "$package is not installed and apt-get is unavailable: install Debian's $package package by hand ($why)" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
echo "==> installing Debian's $package package ($why)"
if [ -n "${CI:-}" ]; then  # quiet in CI logs; apt's own progress otherwise
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "$package" >/dev/null
else
  $sudo apt-get update
  $sudo apt-get install -y --no-install-recommends "$package"
fi
