#!/usr/bin/env bash
# The whole loop on loopback: broker, controller, agents on the CPU backend, a signed bundle rolled out
# in waves, inference through the router, telemetry, and a bad bundle halted and rolled back.
# Installs what it needs on a fresh Debian/Ubuntu machine (mosquitto, a venv with the project).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh
make_venv .venv python3
exec .venv/bin/python scripts/demo.py "$@"
