"""`fleet push BUNDLE --devices ID[,ID...] --config fleet.toml`: store a bundle and tell devices to deploy it.

The bundle's files are checked against its manifest and copied into the controller's store (so
`fleet serve` can answer the devices' chunk requests); then each device gets a deploy command signed
with the controller key, with the next sequence number for that device. `--wait S` follows the
devices' events until each has activated the bundle or failed.

`--mode shadow` runs the bundle as a candidate beside each device's active bundle (mirrored traffic,
promoted or refused on the bundle's shadow gates; `--wait` follows until then); `--mode ab --split P`
serves P % of requests with it until `fleet rollout promote` (or a drop / rollback).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional

from edge_agent.clikit import CliError
from fleet.commands._follow import EventFollower, send_and_follow

DEVICE_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
FINAL = {"activated": "activated", "bundle-refused": "refused", "fetch-failed": "fetch failed",
         "selftest-failed": "self-test failed", "engine-build-failed": "engine failed", "command-refused": "refused",
         "candidate-refused": "candidate refused", "deploy-failed": "failed"}
#: The event that means success, per deploy mode.
SUCCESS = {"normal": "activated", "shadow": "promoted", "ab": "shadow-started"}


def _devices(text: str):
    ids = [d.strip() for d in text.split(",") if d.strip()]
    if not ids:
        raise CliError("--devices needs at least one device id")
    for d in ids:
        if set(d) - DEVICE_ID_CHARS or len(d) > 64:
            raise CliError("invalid device id %r" % d)
    return ids


def _run(args: argparse.Namespace) -> int:
    from edge_agent.protocol import topics
    from fleet.config import load_fleet_config
    from fleet.controller import Controller

    devices = _devices(args.devices)
    if args.mode == "ab" and args.split is None:
        raise CliError("--mode ab needs --split PCT (percent of requests the candidate serves)")
    if args.split is not None and (args.mode != "ab" or not 0 < args.split < 100):
        raise CliError("--split is for --mode ab and must be between 0 and 100 (exclusive)")
    final = dict(FINAL)
    if args.mode != "normal":
        del final["activated"]
        final[SUCCESS[args.mode]] = {"shadow": "promoted", "ab": "serving the split"}[args.mode]
    bundle = Path(args.bundle)
    if not bundle.is_file():
        raise CliError("bundle file %s does not exist" % bundle)
    cfg = load_fleet_config(Path(args.config))
    ctl = Controller(cfg, key=Controller.load_key(cfg), client_id="fleet-push-%d" % (time.time() * 1000 % 1e9),
                     serve_chunks=False)
    body, msha, _ = ctl.add_bundle(bundle)
    print("stored %s v%d (%d files, %d bytes, manifest %s…)" % (
        body.name, body.version, len(body.files), body.total_size(), msha[:12]))

    def _final(ev) -> Optional[str]:
        b = ev.get("bundle") or {}
        if ev.get("kind") in final and (ev.get("kind") == "command-refused"
                                        or (b.get("name"), b.get("version")) == (body.name, body.version)):
            return "%s: %s" % (final[ev["kind"]], ev.get("message", ""))
        return None

    def _progress(dev: str, ev) -> None:
        if ev.get("kind") == "fetch-progress":
            d = ev.get("data") or {}
            print("  %-20s fetching %5.1f%%  %.1f MB/s" % (dev, d.get("percent", 0), d.get("bytes_per_s", 0) / 1e6),
                  flush=True)

    def _deploy_args(dev: str):
        return ctl.deploy_args(body.name, body.version).model_copy(
            update={"mode": args.mode, "ab_split": None if args.split is None else (
                "%.4f" % args.split).rstrip("0").rstrip(".")})

    follower = EventFollower(devices, max_bytes=cfg.mqtt.max_payload_bytes, final=_final, progress=_progress)
    outcome = send_and_follow(ctl, follower, _deploy_args, what="deploy command", timeout_s=args.timeout,
                              wait_s=args.wait, events_topic=topics.all_devices(cfg.mqtt.prefix, "events"))
    ok = final[SUCCESS[args.mode]]
    if any(not v.startswith(ok) for v in outcome.values()):
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `push` command."""
    p = sub.add_parser("push", help="store a bundle and send signed deploy commands to devices",
                       description=__doc__)
    p.add_argument("bundle", help="bundle file (from `fleet bundle build`)")
    p.add_argument("--devices", required=True, metavar="ID[,ID...]", help="device ids")
    p.add_argument("--config", required=True, help="fleet.toml")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the broker (default 10)")
    p.add_argument("--mode", choices=("normal", "shadow", "ab"), default="normal",
                   help="normal (activate), shadow (candidate beside the active bundle, promoted on its gates) "
                        "or ab (serve --split %% of requests with it)")
    p.add_argument("--split", type=float, metavar="PCT", help="ab mode: percent of requests the candidate serves")
    p.add_argument("--wait", type=float, default=0.0, metavar="S",
                   help="follow device events up to S seconds until each activated or failed")
    p.set_defaults(func=_run)
