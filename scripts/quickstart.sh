#!/usr/bin/env bash
# The quick start: set up (Tally alone, without the test extras), start a
# local broker, stream reading events through Tally and print sample lookups
# and the events/s reached. Arguments go to `tally quickstart` (--help).
set -euo pipefail
source "$(dirname "$0")/setup.sh" quickstart
exec "$PYTHON" -m tally quickstart "$@"
