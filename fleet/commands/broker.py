"""`fleet broker dynsec --out FILE --device ID ... [--controller NAME] [--operator NAME]`: write the broker's
access rules as a mosquitto dynamic-security file (see docs/security.md and configs/mosquitto/)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import List

from edge_agent.clikit import CliError
from edge_agent.protocol import topics

#: Longest devices file read (one device id per line; 64-byte ids, a million devices is 65 MB).
MAX_DEVICES_FILE_BYTES = 64 * 1024 * 1024


def _read_devices_file(path: Path) -> List[str]:
    try:
        with open(str(path), "rb") as f:
            data = f.read(MAX_DEVICES_FILE_BYTES + 1)
    except OSError as e:
        raise CliError("cannot read %s: %s" % (path, e.strerror))
    if len(data) > MAX_DEVICES_FILE_BYTES:
        raise CliError("%s is over %d bytes" % (path, MAX_DEVICES_FILE_BYTES))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CliError("%s is not UTF-8 text (one device id per line)" % path)
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _run(args: argparse.Namespace) -> int:
    from fleet.dynsec import DynsecError, build_document, render

    devices = list(args.device or [])
    if args.devices_file:
        devices += _read_devices_file(Path(args.devices_file))
    try:
        doc = build_document(prefix=args.prefix, devices=devices, controllers=args.controller or ["fleet-controller"],
                             operators=args.operator or ["fleet-operator"], admins=args.admin or [])
    except DynsecError as e:
        raise CliError(str(e))
    out = Path(args.out)
    tmp = out.with_name("." + out.name + ".tmp")
    try:
        # The plugin rewrites this file itself after `mosquitto_ctrl` changes: keep it private to its owner.
        fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(render(doc))
        os.replace(str(tmp), str(out))
    except OSError as e:
        raise CliError("cannot write %s: %s" % (out, e.strerror))
    print("wrote %s: %d device(s), %d controller(s), %d operator(s)"
          % (out, len(devices), len(args.controller or [1]), len(args.operator or [1])))
    return 0


def _run_ctrl(args: argparse.Namespace) -> int:
    import shlex

    from fleet.dynsec import DynsecError, device_ctrl_commands

    try:
        cmds = device_ctrl_commands(args.prefix, args.device_id)
    except DynsecError as e:
        raise CliError(str(e))
    for c in cmds:
        print(" ".join(shlex.quote(x) for x in ["mosquitto_ctrl", *args.ctrl_option, *c]))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `broker` command group."""
    p = sub.add_parser("broker", help="broker configuration helpers", description=__doc__)
    bsub = p.add_subparsers(dest="broker_command", required=True)
    d = bsub.add_parser("dynsec", help="write the dynamic-security rules (one role per identity)",
                        description=__doc__)
    d.add_argument("--out", required=True, help="file to write (install as /etc/mosquitto/edge-agent/"
                                                "dynamic-security.json, owned by the mosquitto user)")
    d.add_argument("--device", action="append", help="a device id (repeat)")
    d.add_argument("--devices-file", help="a file with one device id per line")
    d.add_argument("--controller", action="append", help="controller identity (default: fleet-controller)")
    d.add_argument("--operator", action="append", help="operator identity (default: fleet-operator)")
    d.add_argument("--admin", action="append",
                   help="identity that may change the rules at run time with mosquitto_ctrl (default: none)")
    d.add_argument("--prefix", default=topics.DEFAULT_PREFIX, help="mqtt.prefix (default: %(default)s)")
    d.set_defaults(func=_run)
    c = bsub.add_parser("add-device", help="print the mosquitto_ctrl commands that add a device at run time",
                        description="Print the `mosquitto_ctrl dynsec` commands that give a new device its role on a "
                                    "running broker (mosquitto does not re-read the file on reload). Run them as an "
                                    "identity with the admin role (`fleet broker dynsec --admin NAME`).")
    c.add_argument("device_id")
    c.add_argument("--ctrl-option", action="append", default=[],
                   help="connection option for mosquitto_ctrl, repeat per word (e.g. --ctrl-option=--cafile ...)")
    c.add_argument("--prefix", default=topics.DEFAULT_PREFIX, help="mqtt.prefix (default: %(default)s)")
    c.set_defaults(func=_run_ctrl)
