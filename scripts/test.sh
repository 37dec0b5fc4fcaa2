#!/usr/bin/env bash
# Set up and run the test suite (unit, property and real-broker integration
# tests). Extra arguments go to pytest, e.g. scripts/test.sh -k arena.
set -euo pipefail
export TALLY_SETUP_BROWSER=1        # the browser tests run in CI
source "$(dirname "$0")/setup.sh" test
exec "$PYTHON" -m pytest -m "not slow" --timeout 900 "$@"
