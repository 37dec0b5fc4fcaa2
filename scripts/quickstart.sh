#!/usr/bin/env bash
# The quick start: set up, start a local broker, stream reading events through
# Tally and print sample lookups and the events/s reached.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m tally quickstart "$@"
