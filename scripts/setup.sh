#!/usr/bin/env bash
# Set up what Tally needs on a fresh Debian 12/13 machine, in a few lines of
# output: system packages, a Python environment holding Tally (its Cython
# core and C library compiled) and the Apache Pulsar distribution from Maven
# Central. Each step is skipped when already done.
#
#   scripts/setup.sh [test|quickstart]
#
# test (the default) also installs the test extras; quickstart only Tally.
# Tally goes into .venv at the repository root, made from python3 (Debian's
# own python3 refuses pip installs outside a virtual environment), unless
# PYTHON names the interpreter to install into (PYTHON=/path/venv/bin/python).
# quickstart.sh and test.sh source this file: it leaves $PYTHON naming the
# interpreter set up. Remove .venv to start afresh. TALLY_SETUP_BROWSER=1
# (test.sh sets it) also installs Debian's Chromium for the browser tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

purpose="${1:-test}"
case "$purpose" in
  test) target=".[test]" ;;
  quickstart) target="." ;;
  *) echo "usage: scripts/setup.sh [test|quickstart]" >&2; exit 2 ;;
esac
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export PIP_DISABLE_PIP_VERSION_CHECK=1

# apt-get's hundreds of lines go to a log, shown only when it fails.
apt_install() {
  echo "==> apt-get install $*"
  local log
  log="$(mktemp)"
  if ! { $SUDO apt-get update -qq &&
         DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
           --no-install-recommends "$@"; } >"$log" 2>&1; then
    cat "$log" >&2
    exit 1
  fi
  rm -f "$log"
}

# The Debian packages missing for the interpreter $1 (a venv's or not):
# Debian splits venv and the C headers out of its python3.
debian_python_packages() {
  local python="$1" version
  dpkg -S "$(readlink -f "$python")" >/dev/null 2>&1 || return 0   # not Debian's
  version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  if [ -z "${PYTHON:-}" ] && ! "$python" -c "import ensurepip" 2>/dev/null; then
    echo "python$version-venv"
  fi
  "$python" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' ||
    echo "python$version-dev"
}

base_python="${PYTHON:-$(command -v python3 || true)}"
need_packages=()
if [ -z "$base_python" ]; then
  need_packages+=(python3 python3-venv python3-dev)
else
  mapfile -t need_packages < <(debian_python_packages "$base_python")
fi
dpkg -s liblmdb-dev >/dev/null 2>&1 || need_packages+=(liblmdb-dev)
command -v cc >/dev/null 2>&1 || need_packages+=(build-essential)
command -v java >/dev/null 2>&1 || need_packages+=(default-jre-headless)   # Pulsar: 17+
command -v mvn >/dev/null 2>&1 || need_packages+=(maven)
# the browser tests' Chromium (tests/test_ui.py): for the test path only
# (scripts/test.sh sets TALLY_SETUP_BROWSER=1); about 2 minutes the first time
if [ "${TALLY_SETUP_BROWSER:-0}" = 1 ]; then
  command -v chromium >/dev/null 2>&1 || need_packages+=(chromium)
fi
if [ ${#need_packages[@]} -gt 0 ]; then apt_install "${need_packages[@]}"; fi
base_python="${base_python:-$(command -v python3)}"

if ! "$base_python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "Tally needs Python 3.10 or newer; $base_python is $("$base_python" -V)" >&2
  exit 1
fi
if [ -z "${PYTHON:-}" ]; then
  PYTHON="$PWD/.venv/bin/python"
  # a .venv whose base interpreter is gone, or half made, is made again
  if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    echo "==> .venv: a virtual environment of $base_python ($("$base_python" -V))"
    rm -rf .venv
    "$base_python" -m venv .venv
  fi
fi

# What an install compiles or reads: setup.py, pyproject.toml and the C and
# Cython sources (a .c beside a .pyx of the same name is Cython's output).
sources_hash() {
  find . -name '.?*' -prune -o -name build -prune -o \
       \( -name '*.pyx' -o -name '*.pxd' -o -name '*.pxi' -o -name '*.h' -o -name '*.c' \) \
       -print | LC_ALL=C sort | while read -r file; do
    [[ "$file" == *.c && -e "${file%.c}.pyx" ]] || echo "$file"
  done | xargs sha256sum setup.py pyproject.toml | sha256sum | cut -c1-16
}

# The stamp lives in the environment, so a new environment installs afresh;
# it names this checkout, as one environment may serve several worktrees.
stamp="$("$PYTHON" -c 'import sys; print(sys.prefix)')/tally-setup.stamp"
installed="$(cat "$stamp" 2>/dev/null || true)"
wanted="$(sources_hash) $PWD"
if [ "$installed" = "$wanted test" ] || [ "$installed" = "$wanted $purpose" ]; then
  echo "==> Tally is installed in $PYTHON and its sources are unchanged: no pip install"
else
  echo "==> pip install -e $target into $PYTHON (compiles the Cython core and libtally: 2-3 min)"
  rm -f "$stamp"
  build_requires="$(sed -n 's/^requires = \[\(.*\)\]$/\1/p' pyproject.toml | sed 's/", *"/ /g' | tr -d '"')"
  "$PYTHON" -m pip install -q --upgrade pip $build_requires
  "$PYTHON" -m pip install -q --no-build-isolation -e "$target"
  echo "$wanted $purpose" >"$stamp"
fi

echo "==> Apache Pulsar (from Maven Central the first time, then cached under ~/.cache/tally)"
"$PYTHON" -c "from tally.service.pulsar.distribution import ensure_distribution
print('   ', ensure_distribution())"
