#!/usr/bin/env bash
# Install fedpod with its test tools (PostgreSQL for the PostgreSQL dataset tests, Debian's
# Chromium for the browser test of the pod's page), then run the whole test suite: unit,
# integration over a real NATS server, end-to-end CLI tests, and that browser test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
bash scripts/install-debian.sh postgresql '/usr/lib/postgresql/*/bin/initdb' "the PostgreSQL dataset tests"
bash scripts/install-debian.sh chromium /usr/bin/chromium "the browser test of the pod's page"
.venv/bin/ruff check src tests
.venv/bin/mypy src
exec .venv/bin/python -m pytest -q "$@"
