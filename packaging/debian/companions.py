"""The companion packages built with edge-agent from the same tree.

- edge-agent-fleet: the controller (`fleet serve`) as the systemd service fleet.service, run by the
  system user edge-fleet from edge-agent's venv (the `fleet` package is in the same wheel), its
  conffile /etc/fleet/fleet.toml and key folder /etc/fleet/keys.
- edge-agent-broker (Architecture: all): the mosquitto drop-ins of configs/mosquitto/, shipped as they
  are in the source tree under /usr/share/edge-agent-broker/mosquitto/ for a broker host to enable
  (they are alternatives: TLS with client certificates, or TLS with passwords).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from stagefiles import HERE, PREFIX, installed_size_kib, maintainer, write_changelog, write_debian

FLEET = HERE / "fleet"
BROKER = HERE / "broker"


def _control(template: Path, **fields) -> str:
    return template.read_text(encoding="utf-8").format(maintainer=maintainer(), **fields)


def _doc(stage: Path, package: str, version: str, note: str) -> Path:
    doc = stage / "usr" / "share" / "doc" / package
    doc.mkdir(parents=True)
    shutil.copy2(HERE / "copyright", doc / "copyright")
    write_changelog(doc, package, version, note)
    return doc


def stage_fleet(stage: Path, *, version: str, arch: str, source: Path) -> str:
    """edge-agent-fleet: unit, conffile, key folder, /usr/bin/fleet; returns its architecture."""
    package = "edge-agent-fleet"
    etc = stage / "etc" / "fleet"
    (etc / "keys").mkdir(parents=True)
    shutil.copy2(FLEET / "fleet.toml", etc / "fleet.toml")
    unit_dir = stage / "lib" / "systemd" / "system"
    unit_dir.mkdir(parents=True)
    shutil.copy2(FLEET / "fleet.service", unit_dir / "fleet.service")
    usr_bin = stage / "usr" / "bin"
    usr_bin.mkdir(parents=True)
    os.symlink(PREFIX + "/bin/fleet", str(usr_bin / "fleet"))
    doc = _doc(stage, package, version, "Release %s." % version)
    shutil.copy2(FLEET / "README.Debian", doc / "README.Debian")
    shutil.copy2(source / "configs" / "fleet.toml", doc / "fleet.toml.example")
    control = _control(FLEET / "control.in", version=version, arch=arch, installed_size=installed_size_kib(stage))
    scripts = {name: (FLEET / name).read_text(encoding="utf-8") for name in ("postinst", "prerm", "postrm")}
    write_debian(stage, control, conffiles=["/etc/fleet/fleet.toml"], scripts=scripts)
    return arch


def stage_broker(stage: Path, *, version: str, arch: str, source: Path) -> str:
    """edge-agent-broker: configs/mosquitto/ as it is; returns "all"."""
    package = "edge-agent-broker"
    share = stage / "usr" / "share" / package / "mosquitto"
    shutil.copytree(source / "configs" / "mosquitto", share)
    doc = _doc(stage, package, version, "Release %s." % version)
    shutil.copy2(BROKER / "README.Debian", doc / "README.Debian")
    control = _control(BROKER / "control.in", version=version, installed_size=installed_size_kib(stage))
    write_debian(stage, control, conffiles=[], scripts={})
    return "all"


STAGERS = {"edge-agent-fleet": stage_fleet, "edge-agent-broker": stage_broker}
