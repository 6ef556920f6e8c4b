#!/usr/bin/env bash
# Run the whole test suite (ruff + pytest) on the current python3 and on Python 3.8 (JetPack 5's
# Python) when it is installed. Installs what it needs on a fresh Debian/Ubuntu machine.
#   scripts/test.sh              full suite
#   scripts/test.sh -m "not slow"   extra arguments go to pytest
# Python 3.8 (JetPack 5's Python) is required: pyenv's 3.8 or a python3.8 on PATH; when neither is there
# and pyenv is, it is installed with pyenv.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh
export EDGE_AGENT_TEST_SCRIPT=1  # tests needing a tool this script installs fail, not skip, without it
# What the tests use beyond the demo: the Debian package build and checks (dpkg-dev, lintian,
# systemd-analyze, make), the system python3 the package targets, the apt repository test (apt-utils's
# apt-ftparchive, gnupg to sign, debootstrap for a clean Debian root), prometheus (promtool),
# postgresql (the registry tests' server) and chromium with its driver (the console's browser tests).
ensure_apt lintian python3 systemd dpkg-dev make apt-utils gnupg debootstrap prometheus postgresql chromium chromium-driver

make_venv .venv python3
echo "== ruff"
.venv/bin/ruff check .

pythons=(.venv)
py38=$(find_python38)
if [ -z "$py38" ] && command -v pyenv >/dev/null 2>&1; then
  echo "== installing Python 3.8 with pyenv"
  pyenv install -s 3.8
  py38=$(find_python38)
fi
if [ -z "$py38" ]; then
  echo "Python 3.8 is required (JetPack 5's Python) but was not found: install it (pyenv install 3.8)" >&2
  exit 1
fi
make_venv .venv38 "$py38"
pythons+=(.venv38)

for v in "${pythons[@]}"; do
  echo "== pytest on $("$v/bin/python" --version)"
  # pytest exits 5 when no test ran: with set -e that fails the run, as it should.
  "$v/bin/python" -m pytest -q -p no:cacheprovider --durations=15 "$@"
done
echo "== all tests passed"
