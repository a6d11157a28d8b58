#!/usr/bin/env bash
# Create .venv (if missing) and install alpnre with its pinned dependencies into it.
# Usage: bash scripts/install.sh            (uses python3.11+ found on PATH)
#        PYTHON=/path/to/python3.12 bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "alpnre needs Python >= 3.11; set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is pinned (torch==2.13.0) in pyproject.toml, like every dependency with a known
# incompatibility; the editable install keeps configs/ next to the package.
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/alpnre --help > /dev/null
echo "alpnre installed in $(pwd)/.venv; activate it with: source .venv/bin/activate"
