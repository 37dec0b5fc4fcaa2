#!/usr/bin/env bash
# Set up everything Tally needs on a fresh Debian machine: system packages,
# the Python package (compiling the Cython core and the C library) with its
# test dependencies (with TALLY_SETUP_BROWSER=1, Debian's Chromium for the
# browser tests), and the Apache Pulsar distribution from Maven Central.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need_packages=()
dpkg -s liblmdb-dev >/dev/null 2>&1 || need_packages+=(liblmdb-dev)
command -v cc >/dev/null 2>&1 || need_packages+=(build-essential)
command -v java >/dev/null 2>&1 || need_packages+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || need_packages+=(maven)
# the browser tests' Chromium (tests/test_ui.py): for the test path only
# (scripts/test.sh sets TALLY_SETUP_BROWSER=1); about 2 minutes the first time
if [ "${TALLY_SETUP_BROWSER:-0}" = 1 ]; then
  command -v chromium >/dev/null 2>&1 || need_packages+=(chromium)
fi
if [ ${#need_packages[@]} -gt 0 ]; then
  echo "==> apt-get install ${need_packages[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_packages[@]}"
fi

PYTHON="${PYTHON:-python3}"
echo "==> pip install -e .[test] (builds the Cython core and libtally)"
"$PYTHON" -m pip install -q --upgrade pip setuptools wheel "Cython>=3.0" "numpy>=2.0"
"$PYTHON" -m pip install -q --no-build-isolation -e ".[test]"

echo "==> Apache Pulsar distribution (Maven Central, cached under ~/.cache/tally)"
"$PYTHON" -c "from tally.service.pulsar.distribution import ensure_distribution; print(ensure_distribution())"
