#!/usr/bin/env bash
# Make sure PostgreSQL's server binaries (initdb, pg_ctl) are installed; the tests start their
# own throw-away server with them. Installs Debian's `postgresql` package when missing.
set -euo pipefail
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "PostgreSQL is not installed and apt-get is unavailable: install PostgreSQL's server by hand" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
echo "==> installing Debian's postgresql package (for the PostgreSQL dataset tests)"
if [ -n "${CI:-}" ]; then  # quiet in CI logs; apt's own progress otherwise
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends postgresql >/dev/null
else
  $sudo apt-get update
  $sudo apt-get install -y --no-install-recommends postgresql
fi
