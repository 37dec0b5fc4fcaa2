#!/usr/bin/env bash
# Set up and run the test suite (unit, property and real-broker integration
# tests). Extra arguments go to pytest, e.g. scripts/test.sh -k arena.
set -euo pipefail
cd "$(dirname "$0")/.."
TALLY_SETUP_BROWSER=1 bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -m "not slow" --timeout 900 "$@"
