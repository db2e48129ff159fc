#!/usr/bin/env bash
# Install fedpod with its test tools (and PostgreSQL, for the PostgreSQL dataset tests), then
# run the whole test suite: unit, integration over a real NATS server, end-to-end CLI tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
bash scripts/install-postgres.sh
.venv/bin/ruff check src tests
.venv/bin/mypy src
exec .venv/bin/python -m pytest -q "$@"
