"""Debian packaging sources, checked without building: unit directives, scripts, conffile, wheel tags."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from edge_agent.cli import COMMAND_MODULES
from edge_agent.clikit import build_parser
from edge_agent.config import load_agent_config

REPO = Path(__file__).resolve().parent.parent
DEBIAN = REPO / "packaging" / "debian"


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_deb", str(DEBIAN / "build_deb.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_deb = _load_builder()


def unit_directives(text: str) -> Dict[str, List[str]]:
    """`Key` -> every value it is given in the unit (systemd allows repeats)."""
    out: Dict[str, List[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.fixture(scope="module")
def unit() -> Dict[str, List[str]]:
    return unit_directives((DEBIAN / "edge-agent.service").read_text(encoding="utf-8"))


def test_unit_is_notify_with_watchdog_restart_and_user(unit):
    assert unit["Type"] == ["notify"]
    assert int(unit["WatchdogSec"][0]) >= 10
    assert unit["Restart"] == ["on-failure"]
    assert unit["User"] == ["edge-agent"]
    assert unit["StateDirectory"] == ["edge-agent"]
    assert "video" in unit["SupplementaryGroups"][0].split()


def test_unit_is_hardened_but_keeps_gpu_devices_visible(unit):
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["ProtectHome"] == ["yes"]
    # Each of these would hide or close the GPU device nodes (/dev/nvhost-*, /dev/nvmap, /dev/nvidia*).
    assert unit.get("PrivateDevices", ["no"]) == ["no"]
    assert "DeviceAllow" not in unit
    assert unit.get("DevicePolicy", ["auto"]) == ["auto"]
    assert "ProtectClock" not in unit  # implies DeviceAllow=char-rtc, which closes every other device
    assert "MemoryDenyWriteExecute" not in unit  # CUDA/TensorRT/ONNX Runtime generate code


def test_unit_execstart_is_a_valid_edge_agent_command_line(unit):
    (exec_start,) = unit["ExecStart"]
    argv = exec_start.split()
    assert argv[0] == "/usr/bin/edge-agent"
    parser = build_parser("edge-agent", "", COMMAND_MODULES, "0")
    args = parser.parse_args(argv[1:])
    assert args.command == "run"
    assert args.config == "/etc/edge-agent/agent.toml"


@pytest.mark.parametrize("script", ["postinst", "prerm", "postrm"])
def test_maintainer_script_is_valid_posix_sh(script):
    path = DEBIAN / script
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#!/bin/sh\n")
    assert "\nset -e\n" in text
    shell = shutil.which("dash") or "/bin/sh"
    proc = subprocess.run([shell, "-n", str(path)], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_only_purge_removes_state_and_user():
    postrm = (DEBIAN / "postrm").read_text(encoding="utf-8")
    purge = postrm.split("    purge)", 1)[1].split(";;", 1)[0]
    remove = postrm.split("    remove)", 1)[1].split(";;", 1)[0]
    assert "userdel" in purge and "rm -rf \"$ROOT/var/lib/edge-agent\"" in purge
    assert "userdel" not in remove and "rm -rf" not in remove
    assert "userdel" not in (DEBIAN / "prerm").read_text(encoding="utf-8")


def test_packaged_conffile_parses_with_the_agent_config_model(tmp_path):
    conffile = tmp_path / "agent.toml"
    text = (DEBIAN / "agent.toml.head").read_text(encoding="utf-8")
    assert all(line.startswith("#") for line in text.splitlines())  # the header adds no settings
    conffile.write_text(text + (REPO / "configs" / "agent.toml").read_text(encoding="utf-8"), encoding="utf-8")
    cfg = load_agent_config(conffile)
    assert cfg.state_dir == Path("/var/lib/edge-agent")
    assert cfg.trust.bundle_keys_dir == Path("/etc/edge-agent/keys")
    assert all(str(p).startswith("/etc/edge-agent/command-keys/") for p in cfg.trust.command_keys)


def test_conffiles_list_the_agent_config_only():
    assert (DEBIAN / "conffiles").read_text(encoding="utf-8").split() == ["/etc/edge-agent/agent.toml"]


def test_platform_tags_for_jetpack5_cover_glibc_2_31_down_to_manylinux2014():
    tags = build_deb.platform_tags("arm64", "2.31")
    assert tags[0] == "manylinux_2_31_aarch64"
    assert "manylinux_2_17_aarch64" in tags and "manylinux2014_aarch64" in tags
    assert "manylinux_2_32_aarch64" not in tags
    assert all(t.endswith("_aarch64") for t in tags)


def test_pip_target_args_select_the_target_interpreter():
    args = build_deb.pip_target_args("arm64", "3.8", "2.31")
    assert args[:7] == ["--only-binary=:all:", "--python-version", "3.8", "--implementation", "cp", "--abi", "cp38"]


def test_glibc_older_than_manylinux2014_is_refused():
    with pytest.raises(build_deb.BuildError, match=r"2\.17"):
        build_deb.platform_tags("amd64", "2.12")


def test_builder_refuses_unknown_arch_with_one_line_error(capsys):
    assert build_deb.main(["--arch", "riscv64", "--python", "3.8"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "build-deb: error: unsupported --arch 'riscv64' (choose amd64, arm64)"


def test_builder_refuses_a_python_that_is_not_a_minor_version(capsys):
    assert build_deb.main(["--arch", "arm64", "--python", "python3"]) == 1
    assert "--python must be a minor version" in capsys.readouterr().err


def test_shipped_numpy_stays_on_1x_for_jetpack_modules():
    reqs = build_deb.read_requirements(DEBIAN / "requirements.txt")
    assert "numpy>=1.21,<2" in reqs
    assert sys.version_info >= (3, 8)


def test_lintian_overrides_each_have_a_reason():
    lines = (DEBIAN / "lintian-overrides").read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if line.startswith("edge-agent:"):
            assert i > 0 and lines[i - 1].startswith(("#", "edge-agent:")), "override without a reason: %s" % line
            j = i
            while lines[j].startswith("edge-agent:"):
                j -= 1
            assert lines[j].startswith("#"), "override without a reason: %s" % line


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("deb-jetpack5", "--arch arm64 --python 3.8 --glibc 2.31"),
        ("deb-jetpack6", "--arch arm64 --python 3.10 --glibc 2.35"),
    ],
)
def test_make_targets_pass_the_jetpack_platform_to_the_builder(target, expected):
    proc = subprocess.run(["make", "-n", "-s", "-C", str(REPO), target], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "packaging/debian/build_deb.py" in proc.stdout
    assert expected in " ".join(proc.stdout.split())


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_deb_takes_arch_and_python_variables():
    proc = subprocess.run(["make", "-n", "-s", "-C", str(REPO), "deb", "ARCH=arm64", "PYTHON=3.8"], check=False,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--arch arm64 --python 3.8" in " ".join(proc.stdout.split())


REQUIRES = {
    "edge-agent": ["pydantic<3,>=2.5", 'tomli>=1.1; python_version < "3.11"', 'onnxruntime>=1.15; extra == "cpu"'],
    "pydantic": ["typing-extensions>=4.6", 'foo-arm; platform_machine == "aarch64"'],
    "typing-extensions": [],
    "tomli": [],
    "hostonly": [],
}


def test_closure_adds_what_the_target_python_needs_and_pip_skipped_for_the_build_python():
    env = build_deb.target_marker_env("amd64", "3.8")
    requires = {k: v for k, v in REQUIRES.items() if k != "tomli"}  # pip ran on 3.11: no tomli
    needed, missing = build_deb.dependency_closure(["edge-agent"], requires, env)
    assert missing == ["tomli>=1.1"]
    assert needed == ["edge-agent", "pydantic", "typing-extensions"]


def test_closure_drops_what_only_the_build_python_needed():
    env = build_deb.target_marker_env("amd64", "3.11")
    needed, missing = build_deb.dependency_closure(["edge-agent"], REQUIRES, env)
    assert missing == []
    assert "tomli" not in needed and "hostonly" not in needed
    assert "onnxruntime" not in needed  # an extra nobody asked for


def test_closure_evaluates_platform_markers_for_the_target_machine():
    env = build_deb.target_marker_env("arm64", "3.10")
    _, missing = build_deb.dependency_closure(["edge-agent"], REQUIRES, env)
    assert missing == ["foo-arm"]
