#!/usr/bin/env bash
# Install fedpod into .venv and run the demo (local broker, three pods, federated SQL).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/fedpod demo "$@"
