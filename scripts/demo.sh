#!/usr/bin/env bash
# Install alpnre and run the whole main job on this machine (no Redis, no Docker):
# simulate NGC 1275 spectra, train the ratio estimator, infer the ALP parameters of a
# mock observation. Extra arguments go to 'alpnre demo' (e.g. --n-simulations 5000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/alpnre demo --output demo-output "$@"
