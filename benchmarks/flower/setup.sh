#!/usr/bin/env bash
# A separate virtual environment with Flower 1.42 beside fedpod, for the benchmarks that
# measure Flower in the same run (flwr is never a dependency of fedpod itself).
# flwr 1.42.0 asks for a certifi release newer than some package indexes carry, so its other
# dependencies are installed first and flwr itself with --no-deps (only `pip check` minds).
# fedpod goes in too, so that Flower's ClientApp trains with exactly fedpod's model code.
set -euo pipefail
cd "$(dirname "$0")"
root=$(cd ../.. && pwd)
python=${PYTHON:-$root/.venv/bin/python}
venv=.venv
[ -x $venv/bin/flower-superlink ] && [ -x $venv/bin/fedpod ] && exit 0
"$python" -m venv --clear $venv 2>/dev/null || "$python" -m venv $venv
pip() { $venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
pip --upgrade pip
pip -c "$root/constraints.txt" -e "$root" certifi \
  "numpy>=1.26.0,<3" "grpcio>=1.70.0,<2" "grpcio-health-checking>=1.70.0,<2" "protobuf>=5.28.0,<7" \
  "cryptography>=50.0.0,<51" "pycryptodome>=3.18.0,<4" "iterators>=0.0.2,<0.0.3" "typer>=0.13.0,<0.21" \
  "uv>=0.13.5,<0.14" "tomli>=2.0.1,<3" "tomli-w>=1.0.0,<2" "pathspec>=1.0.4,<2" "prompt-toolkit>=3.0.52,<4" \
  "rich>=14.0.0,<15" "pyyaml>=6.0.2,<7" "requests>=2.33.0,<3" "httpx>=0.28.1,<1" "click>=8.0.0,<9" \
  "packaging>=24.0,<26" "sqlalchemy[asyncio]>=2.0.45,<3" "alembic>=1.18.1,<2" "uvicorn[standard]>=0.49.0,<0.50" \
  "fastapi>=0.138.0,<0.139" "starlette>=1.3.1,<1.4" psutil
pip --no-deps flwr==1.42.0
