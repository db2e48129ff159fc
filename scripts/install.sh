#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install fedpod into it. Usage: scripts/install.sh [extra]
# `extra` is a pip extra such as "test". torch, when a later feature needs it, is pinned to the
# CPU build by constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      python=$candidate; break
    fi
  done
fi
[ -n "$python" ] || { echo "fedpod needs Python >= 3.11" >&2; exit 1; }
# Progress is shown (pip's own) unless CI is set, where logs want quiet.
quiet=()
[ -n "${CI:-}" ] && quiet=(--quiet)
[ -x .venv/bin/python ] || { echo "==> creating .venv with $python"; "$python" -m venv .venv; }
.venv/bin/python -m pip install ${quiet[@]+"${quiet[@]}"} --disable-pip-version-check --upgrade pip
target="."
[ -n "${1:-}" ] && target=".[$1]"
echo "==> installing fedpod${1:+ with its [$1] extra} into .venv (the first time: a few minutes)"
.venv/bin/python -m pip install ${quiet[@]+"${quiet[@]}"} --disable-pip-version-check -c constraints.txt -e "$target"
echo "==> done: .venv/bin/fedpod"
