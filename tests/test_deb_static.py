"""Debian packaging sources, checked without building: unit directives, scripts, conffile, wheel tags."""

from __future__ import annotations

import importlib.util
import re
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


SCRIPTS = ["postinst", "prerm", "postrm", "fleet/postinst", "fleet/prerm", "fleet/postrm"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_maintainer_script_is_valid_posix_sh(script):
    path = DEBIAN / script
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#!/bin/sh\n")
    assert "\nset -e\n" in text
    shell = shutil.which("dash") or "/bin/sh"
    proc = subprocess.run([shell, "-n", str(path)], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("package", ["", "fleet/"])
def test_purge_removes_state_but_never_the_user(package):
    postrm = (DEBIAN / (package + "postrm")).read_text(encoding="utf-8")
    purge = postrm.split("    purge)", 1)[1].split(";;", 1)[0]
    remove = postrm.split("    remove)", 1)[1].split(";;", 1)[0]
    assert "rm -rf /var/lib/" in purge and "rm -rf" not in remove
    # Debian policy: the system user stays on purge (files it owned may remain; a reinstall reuses it).
    for script in ("postinst", "prerm", "postrm"):
        text = (DEBIAN / (package + script)).read_text(encoding="utf-8")
        assert not re.search(r"\b(userdel|deluser|groupdel|delgroup|useradd|groupadd)\b", text), script


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_use_debian_helpers_not_the_user_database_or_bare_systemctl(script):
    text = (DEBIAN / script).read_text(encoding="utf-8")
    assert "/etc/passwd" not in text and "/etc/group" not in text
    assert "DPKG_ROOT" not in text
    for line in text.splitlines():
        # Enabling goes through deb-systemd-helper (keeps an administrator's disable/mask); starting
        # asks policy-rc.d first; stopping goes through deb-systemd-invoke, which asks it itself.
        assert not re.search(r"systemctl (--root\S* )?(enable|disable|stop)\b", line), line
        if re.search(r"systemctl --no-block", line):
            assert "policy_allows" in text.split(line, 1)[0].rsplit("\n", 3)[-2], line
    if script.endswith("postinst"):
        assert "adduser --system" in text and "deb-systemd-helper" in text
    if script.endswith("prerm"):
        assert "deb-systemd-invoke stop" in text


def test_postinst_asks_policy_rc_d_before_starting(tmp_path):
    """policy_allows() as written in postinst: 101 from policy-rc.d forbids, anything else allows."""
    text = (DEBIAN / "postinst").read_text(encoding="utf-8")
    func = text[text.index("policy_allows() {"):text.index("}\n", text.index("policy_allows() {")) + 2]
    for rc, allowed in ((101, False), (0, True), (104, True)):
        policy = tmp_path / "policy-rc.d"
        policy.write_text("#!/bin/sh\nexit %d\n" % rc)
        policy.chmod(0o755)
        script = func.replace("/usr/sbin/policy-rc.d", str(policy)) + 'UNIT=x\npolicy_allows start\n'
        proc = subprocess.run([shutil.which("dash") or "/bin/sh", "-c", script], check=False)
        assert (proc.returncode == 0) is allowed, rc


def test_packaged_conffile_holds_only_site_settings_and_parses(tmp_path):
    conffile = tmp_path / "agent.toml"
    text = (DEBIAN / "agent.toml").read_text(encoding="utf-8")
    active = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert active == ["[mqtt]", 'host = "127.0.0.1"', "port = 1883"]
    conffile.write_text(text, encoding="utf-8")
    cfg = load_agent_config(conffile)
    assert cfg.state_dir == Path("/var/lib/edge-agent")  # from the code's defaults
    assert cfg.trust.bundle_keys_dir == Path("/etc/edge-agent/keys")
    assert all(str(p).startswith("/etc/edge-agent/command-keys/") for p in cfg.trust.command_keys)


def test_conffiles_list_the_agent_config_only():
    assert (DEBIAN / "conffiles").read_text(encoding="utf-8").split() == ["/etc/edge-agent/agent.toml"]


def test_fleet_conffile_parses_with_the_controller_config_model():
    from fleet.config import load_fleet_config

    cfg = load_fleet_config(DEBIAN / "fleet" / "fleet.toml")
    assert str(cfg.controller.key_file) == "/etc/fleet/keys/controller.key"
    assert str(cfg.controller.state_dir) == "/var/lib/fleet"


def test_fleet_unit_runs_the_serve_command_as_its_user():
    from fleet.cli import COMMAND_MODULES as FLEET_MODULES

    d = unit_directives((DEBIAN / "fleet" / "fleet.service").read_text(encoding="utf-8"))
    argv = d["ExecStart"][0].split()
    assert argv[0] == "/usr/bin/fleet" and d["User"] == ["edge-fleet"] and d["StateDirectory"] == ["fleet"]
    args = build_parser("fleet", "", FLEET_MODULES, "0").parse_args(argv[1:])
    assert args.command == "serve" and args.config == "/etc/fleet/fleet.toml"


@pytest.mark.parametrize("target", sorted(build_deb.TARGETS))
def test_lock_pins_every_wheel_with_a_hash(target):
    lock = DEBIAN / "locks" / ("%s.txt" % target)
    lines = [ln for ln in lock.read_text(encoding="utf-8").splitlines() if ln and not ln.startswith("#")]
    assert lines
    for line in lines:
        assert re.match(r"^[a-z0-9-]+==[^\s=]+ --hash=sha256:[0-9a-f]{64}$", line), line
    pins = dict(ln.split(" ")[0].split("==") for ln in lines)
    for name in ("numpy", "onnxruntime", "pydantic", "paho-mqtt", "cryptography", "psutil"):
        assert name in pins, name
    assert pins["numpy"].startswith("1.")
    assert ("tomli" in pins) is (build_deb.TARGETS[target].python != "3.11")
    assert not set(pins) & build_deb.EXCLUDED


def test_jetpack_targets_differ_in_version_suffix_and_python():
    t5, t6 = build_deb.TARGETS["jetpack5"], build_deb.TARGETS["jetpack6"]
    assert t5.arch == t6.arch == "arm64"
    assert (t5.python, t5.glibc, t5.suite, t5.tag) == ("3.8", "2.31", "jetpack5", "jp5")
    assert (t6.python, t6.glibc, t6.suite, t6.tag) == ("3.10", "2.35", "jetpack6", "jp6")


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
        ("deb-jetpack5", "--target jetpack5"),
        ("deb-jetpack6", "--target jetpack6"),
        ("deb-bookworm", "--target bookworm"),
    ],
)
def test_make_targets_pass_the_target_to_the_builder(target, expected):
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
