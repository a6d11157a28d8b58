#!/usr/bin/env bash
# Install alpnre (if needed) and run the test suite.
# Real CTA IRFs are used when GAMMAPY_DATA points at them (tests that need them are
# skipped otherwise). Extra arguments go to pytest, e.g. -m "not slow" for the fast set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if [ -z "${GAMMAPY_DATA:-}" ] && [ -d ../shared/data/gammapy-data ]; then
    export GAMMAPY_DATA="$(cd ../shared/data/gammapy-data && pwd)"
fi
exec .venv/bin/python -m pytest "$@"
