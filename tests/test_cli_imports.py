"""Every `fleet` and `edge-agent` command module is imported to build the parser, so none of them may
import a heavy library at module level: `fleet devices` or `edge-agent config` on a small device must not
pay for numpy, onnxruntime, OpenCV, psycopg or jtop (they are imported where they are used)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from agent_helpers import REPO

HEAVY = ("numpy", "onnxruntime", "cv2", "psycopg", "psycopg_pool", "jtop", "tensorrt", "pycuda", "selenium")

_PROBE = """
import json, sys
from edge_agent.clikit import build_parser, installed_modules
import edge_agent.cli, fleet.cli
build_parser("fleet", "", installed_modules(fleet.cli.COMMAND_MODULES), "0")
build_parser("edge-agent", "", installed_modules(edge_agent.cli.COMMAND_MODULES), "0")
print(json.dumps(sorted(m for m in %r if m in sys.modules)))
"""


def test_building_both_command_lines_imports_no_heavy_library():
    out = subprocess.run([sys.executable, "-c", _PROBE % (HEAVY,)], capture_output=True, text=True, check=True,
                         cwd=str(REPO), timeout=60)
    assert json.loads(out.stdout) == []


@pytest.mark.parametrize("command", [["config"], ["telemetry", "--json"]])
def test_edge_agent_diagnostic_commands_run_without_heavy_libraries(tmp_path, command):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('device_id = "dev1"\nstate_dir = %r\n' % str(tmp_path / "state"), encoding="utf-8")
    probe = ("import sys\nfrom edge_agent.cli import main\nrc = main(%r + ['--config', %r])\n"
             "sys.stdout.write('\\nHEAVY=%%s\\n' %% [m for m in %r if m in sys.modules])\nsys.exit(rc)\n"
             % (command, str(cfg), HEAVY))
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False,
                         cwd=str(REPO), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().splitlines()[-1] == "HEAVY=[]", out.stdout[-500:]
