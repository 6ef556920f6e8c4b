#!/usr/bin/env bash
# Run the whole test suite (ruff + pytest) on the current python3 and on Python 3.8 (JetPack 5's
# Python) when it is installed. Installs what it needs on a fresh Debian/Ubuntu machine.
#   scripts/test.sh              full suite
#   scripts/test.sh -m "not slow"   extra arguments go to pytest
# EDGE_AGENT_REQUIRE_PY38=1 makes a missing Python 3.8 an error (CI sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh

make_venv .venv python3
echo "== ruff"
.venv/bin/ruff check .

pythons=(.venv)
py38=$(find_python38)
if [ -n "$py38" ]; then
  make_venv .venv38 "$py38"
  pythons+=(.venv38)
elif [ "${EDGE_AGENT_REQUIRE_PY38:-0}" = 1 ]; then
  echo "Python 3.8 is required (JetPack 5) but was not found: install it (pyenv install 3.8)" >&2
  exit 1
else
  echo "== Python 3.8 not found: running on $(python3 --version) only"
fi

for v in "${pythons[@]}"; do
  echo "== pytest on $("$v/bin/python" --version)"
  # pytest exits 5 when no test ran: with set -e that fails the run, as it should.
  "$v/bin/python" -m pytest -q -p no:cacheprovider --durations=15 "$@"
done
echo "== all tests passed"
