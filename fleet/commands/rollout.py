"""`fleet rollout`: staged rollouts with health gates, run by the controller.

    fleet rollout start BUNDLE [--waves 10,30,100 | --wave ID,ID --wave ID,...] [--devices ID,...]
    fleet rollout status [ID] [--watch] [--devices]
    fleet rollout list
    fleet rollout pause|resume ID
    fleet rollout abort ID [--keep]
    fleet rollout promote ID [--drop]

BUNDLE is NAME@VERSION of a bundle the controller stores, or the bundle file itself: with the
controller's fleet.toml (--config, on the controller's host) the file is checked and stored first;
without, the controller must already hold the same manifest.
A wave advances only when its devices passed self-test and probation; failures past the error
threshold halt the rollout and roll back every device that took the bundle.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from edge_agent.clikit import CliError
from fleet._table import age, bar, bundle_text, render_table
from fleet.commands._connect import CONFIG_ENV, add_connection_args, rpc_call, split_ids

_REF = re.compile(r"^([a-z0-9][a-z0-9_.-]{0,63})[@:]([0-9]+)$")
FINAL = ("succeeded", "halted", "aborted")


def bundle_params(text: str, config: Optional[str] = None) -> Dict[str, Any]:
    """{bundle: {name, version}[, manifest_sha256]} from NAME@VERSION or a bundle file.

    With a bundle file and the controller's `fleet.toml` (on the controller's host), the bundle is first
    checked and stored in the controller's store, as `fleet push` does; otherwise the controller must
    already hold the same manifest."""
    m = _REF.match(text)
    if m:
        return {"bundle": {"name": m.group(1), "version": int(m.group(2))}}
    path = Path(text)
    if not path.is_file():
        raise CliError("%s is neither NAME@VERSION nor a bundle file" % text)
    if config:
        from fleet.config import load_fleet_config
        from fleet.controller import Controller

        cfg = load_fleet_config(Path(config))
        body, sha, _size = Controller(cfg, serve_chunks=False).add_bundle(path)
        print("stored %s v%d in %s" % (body.name, body.version, cfg.controller.state_dir / "store"))
        return {"bundle": {"name": body.name, "version": body.version}, "manifest_sha256": sha}
    from edge_agent.bundle.archive import read_bundle
    from edge_agent.bundle.verify import manifest_digest, read_unverified

    raw, reader = read_bundle(path, max_manifest_bytes=1 << 20, max_bundle_bytes=1 << 62)
    with reader:
        body = read_unverified(raw, max_manifest_bytes=1 << 20)
    return {"bundle": {"name": body.name, "version": body.version}, "manifest_sha256": manifest_digest(raw)}


def _percents(text: str) -> List[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CliError("--waves %r: expected percentages such as 10,30,100" % text)
    if not vals:
        raise CliError("--waves is empty")
    return vals


def render_rollout(r: Dict[str, Any], *, devices: bool = False, history: int = 8, now: Optional[float] = None) -> str:
    """The human view of a rollout: header, per-wave progress, optional per-device table, recent history."""
    now = time.time() if now is None else now
    head = "rollout %s  %s  mode %s  %s" % (r["rollout_id"], bundle_text(r["bundle"]), r["mode"], r["state"].upper())
    if r["state"] not in FINAL:
        head += "  (wave %d of %d)" % (max(1, r["current_wave"]), r["waves"])
    lines = [head]
    if r.get("reason"):
        lines.append("reason: %s" % r["reason"])
    rows = []
    for w in r["wave_progress"]:
        c = w["counts"]
        inflight = c.get("sent", 0) + c.get("in-progress", 0)
        rolled = c.get("rolled-back", 0) + c.get("rollback-sent", 0) + c.get("rollback-failed", 0)
        status = "waiting"
        if w["started"]:
            status = "running" if inflight else ("passed" if w["succeeded"] >= w["needed"] else "failed")
        if c.get("skipped"):
            status = "skipped"
        rows.append(
            [
                w["wave"],
                w["devices"],
                bar(w["succeeded"], w["devices"]),
                "%d/%d" % (w["succeeded"], w["needed"]),
                inflight,
                c.get("failed", 0),
                c.get("timed-out", 0),
                rolled,
                status,
            ]
        )
    lines.append(
        render_table(
            ("WAVE", "DEVICES", "PROGRESS", "OK/NEEDED", "IN FLIGHT", "FAILED", "TIMED OUT", "ROLLED BACK", "STATUS"),
            rows,
            numeric=(0, 1, 4, 5, 6, 7),
        )
    )
    if devices and r.get("devices"):
        lines.append("")
        lines.append(
            render_table(
                ("DEVICE", "WAVE", "STATE", "UPDATED", "DETAIL"),
                [
                    [
                        e["device_id"],
                        e["wave"] + 1,
                        e["state"],
                        age(e.get("updated"), now),
                        (e.get("detail") or "")[:70],
                    ]
                    for e in r["devices"]
                ],
                numeric=(1,),
            )
        )
    cand = candidate_table(r)
    if cand:
        lines.append("")
        lines.append(cand)
    hist = r.get("history") or []
    if hist and history:
        lines.append("")
        for h in hist[-history:]:
            who = " %s" % h["device_id"] if h.get("device_id") else ""
            lines.append(
                "  %s  %s%s: %s" % (time.strftime("%H:%M:%S", time.localtime(h["ts"])), h["kind"], who, h["message"])
            )
    return "\n".join(lines)


def _num(v: Any, fmt: str = "%.2f") -> str:
    return "-" if v is None else fmt % v


def candidate_table(r: Dict[str, Any]) -> str:
    """Shadow / A-B rollouts: per device, the candidate's agreement and latency against the active model
    (the shadow window so far, or the figures the device decided on); empty for normal rollouts."""
    if r.get("mode") not in ("shadow", "ab"):
        return ""
    rows = []
    for e in r.get("devices") or []:
        sh = e.get("shadow")
        if not sh:
            continue
        w = sh.get("window") or {}
        if r["mode"] == "shadow":
            agreement = w.get("agreement", sh.get("agreement"))
            cand_p99 = w.get("candidate_p99_ms", sh.get("candidate_p99_ms"))
            act_p99 = w.get("active_p99_ms", sh.get("active_p99_ms"))
            compared = w.get("compared", sh.get("compared"))
            rows.append([e["device_id"], _num(agreement, "%.4f"), compared if compared is not None else "-",
                         _num(cand_p99), _num(act_p99), sh.get("candidate_errors") or 0,
                         sh.get("dropped") if sh.get("dropped") is not None else "-", sh.get("outcome") or "shadowing"])
        else:
            arms = sh.get("arms") or {}
            a, c = arms.get("active") or {}, arms.get("candidate") or {}
            rows.append([e["device_id"], _num(sh.get("split"), "%g%%"),
                         _num(sh.get("candidate_share"), "%.3f"), c.get("requests", "-"), _num(c.get("p99_ms")),
                         a.get("requests", "-"), _num(a.get("p99_ms")), sh.get("candidate_errors") or 0])
    if not rows:
        return ""
    if r["mode"] == "shadow":
        head = ("DEVICE", "AGREEMENT", "COMPARED", "CAND P99 MS", "ACTIVE P99 MS", "CAND ERRORS", "SHED", "SHADOW")
        return render_table(head, rows, numeric=(1, 2, 3, 4, 5, 6))
    head = ("DEVICE", "SPLIT", "CAND SHARE", "CAND REQ", "CAND P99 MS", "ACTIVE REQ", "ACTIVE P99 MS", "CAND ERRORS")
    return render_table(head, rows, numeric=(2, 3, 4, 5, 6, 7))


def _show(args: argparse.Namespace, r: Dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(r, sort_keys=True))
    else:
        print(render_rollout(r, devices=getattr(args, "show_devices", False)))
    sys.stdout.flush()


def _watch(args: argparse.Namespace, rollout_id: str) -> int:
    """Poll the rollout until it ends; redraw on a terminal, print changes otherwise."""
    tty = sys.stdout.isatty() and not args.json
    last = None
    deadline = time.monotonic() + args.watch_timeout if args.watch_timeout else None
    while True:
        r = rpc_call(args, "rollout.status", {"rollout_id": rollout_id, "history": 8, "devices": _want_devices(args)})
        key = json.dumps([r["state"], r["wave_progress"], r.get("reason")], sort_keys=True)
        if key != last:
            if tty:
                sys.stdout.write("\x1b[2J\x1b[H")
            elif last is not None and not args.json:
                print()
            _show(args, r)
            last = key
        if r["state"] in FINAL:
            return 0 if r["state"] == "succeeded" else 3
        if deadline is not None and time.monotonic() > deadline:
            raise CliError(
                "rollout %s still %s after --watch-timeout %g s" % (rollout_id, r["state"], args.watch_timeout)
            )
        time.sleep(args.interval)


def _start(args: argparse.Namespace) -> int:
    params = bundle_params(args.bundle, args.config or os.environ.get(CONFIG_ENV))
    if args.wave:
        if args.waves:
            raise CliError("give either --waves (percentages) or --wave (device lists), not both")
        params["wave_devices"] = [split_ids([w]) for w in args.wave]
    elif args.waves:
        params["waves"] = _percents(args.waves)
    devs = split_ids(args.devices)
    if devs:
        if args.wave:
            raise CliError("--devices restricts percentage waves; with --wave the lists name the devices already")
        params["devices"] = devs
    params["mode"] = args.mode
    if args.mode == "ab" and args.ab_split is None:
        raise CliError("--mode ab needs --split PCT (percent of requests the candidate serves)")
    if args.ab_split is not None and (args.mode != "ab" or not 0 < args.ab_split < 100):
        raise CliError("--split is for --mode ab and must be between 0 and 100 (exclusive)")
    for key in ("ab_split", "success_threshold", "error_threshold", "device_timeout_s"):
        v = getattr(args, key)
        if v is not None:
            params[key] = v
    r = rpc_call(args, "rollout.start", params)
    if not args.json:
        print("started rollout %s" % r["rollout_id"])
    if args.watch:
        return _watch(args, r["rollout_id"])
    _show(args, r)
    return 0


def _status(args: argparse.Namespace) -> int:
    if args.watch:
        rid = args.id or rpc_call(args, "rollout.status", {"history": 0, "devices": False})["rollout_id"]
        return _watch(args, rid)
    params: Dict[str, Any] = {"devices": _want_devices(args)}
    if args.id:
        params["rollout_id"] = args.id
    r = rpc_call(args, "rollout.status", params)
    _show(args, r)
    return 0


def _want_devices(args: argparse.Namespace) -> Any:
    """The whole per-device list when it is shown (--devices) or printed (--json); otherwise "auto": the
    controller includes it for rollouts small enough to answer in one message (the shadow/A-B candidate
    table is built from it)."""
    return True if getattr(args, "show_devices", False) or getattr(args, "json", False) else "auto"


def _list(args: argparse.Namespace) -> int:
    rows = rpc_call(args, "rollout.list", {"limit": args.limit})
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    if not rows:
        print("no rollouts yet")
        return 0
    print(
        render_table(
            ("ROLLOUT", "BUNDLE", "MODE", "STATE", "STARTED", "REASON"),
            [
                [
                    r["rollout_id"],
                    bundle_text(r["bundle"]),
                    r["mode"],
                    r["state"],
                    age(r["created"]) + " ago",
                    (r.get("reason") or "")[:60],
                ]
                for r in rows
            ],
        )
    )
    return 0


def _simple(method: str, extra=None):
    def run(args: argparse.Namespace) -> int:
        params = {"rollout_id": args.id}
        if extra:
            params.update(extra(args))
        r = rpc_call(args, method, params)
        _show(args, r)
        return 0

    return run


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `rollout` command group."""
    p = sub.add_parser(
        "rollout",
        help="staged rollouts: start, status, pause, resume, abort",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rs = p.add_subparsers(dest="rollout_command", metavar="ACTION")
    p.set_defaults(func=lambda a: p.print_help() or 2)

    s = rs.add_parser("start", help="start a rollout of a stored bundle")
    s.add_argument("bundle", metavar="BUNDLE", help="NAME@VERSION or a bundle file")
    s.add_argument("--waves", metavar="P,P,...", help="cumulative wave percentages (default: the controller's)")
    s.add_argument("--wave", action="append", metavar="ID,ID,...", help="an explicit wave (repeat for each wave)")
    s.add_argument("--devices", action="append", metavar="ID,ID,...", help="only these devices (default: all)")
    s.add_argument(
        "--mode",
        choices=("normal", "shadow", "ab"),
        default="normal",
        help="normal (activate), shadow (mirror traffic to the candidate) or ab (split traffic)",
    )
    s.add_argument("--split", "--ab-split", type=float, dest="ab_split", metavar="PCT",
                   help="ab mode: percent of requests the candidate serves")
    s.add_argument("--success-threshold", type=float, metavar="F", help="fraction of a wave that must pass (0.9)")
    s.add_argument(
        "--error-threshold",
        type=float,
        metavar="F",
        help="halt when failures exceed this fraction of the devices started (0.1)",
    )
    s.add_argument(
        "--device-timeout",
        type=float,
        dest="device_timeout_s",
        metavar="S",
        help="seconds a device has to pass self-test and probation (1800)",
    )
    s.add_argument("--watch", action="store_true", help="follow the rollout until it ends")
    s.set_defaults(func=_start)

    st = rs.add_parser("status", help="per-wave progress of a rollout (default: the newest)")
    st.add_argument("id", nargs="?", metavar="ID")
    st.add_argument(
        "--watch", action="store_true", help="follow until the rollout ends (exit 3 if it does not succeed)"
    )
    st.add_argument("--devices", dest="show_devices", action="store_true", help="also list every device")
    st.set_defaults(func=_status)

    ls = rs.add_parser("list", help="recent rollouts")
    ls.add_argument("--limit", type=int, default=20)
    ls.set_defaults(func=_list)

    for name, help_text in (("pause", "stop starting new waves"), ("resume", "continue a paused or stalled rollout")):
        x = rs.add_parser(name, help=help_text)
        x.add_argument("id", metavar="ID")
        x.set_defaults(func=_simple("rollout.%s" % name))
    ab = rs.add_parser("abort", help="stop for good and roll back the devices that took the bundle")
    ab.add_argument("id", metavar="ID")
    ab.add_argument("--keep", action="store_true", help="do not roll back; devices keep the bundle")
    ab.set_defaults(func=_simple("rollout.abort", lambda a: {"rollback": not a.keep}))
    pr = rs.add_parser("promote", help="shadow/ab rollouts: make the candidate active on its devices")
    pr.add_argument("id", metavar="ID")
    pr.add_argument("--drop", action="store_true", help="drop the candidate instead")
    pr.set_defaults(func=_simple("rollout.promote", lambda a: {"accept": not a.drop}))

    for x in (s, st, ls, *[rs.choices[n] for n in ("pause", "resume", "abort", "promote")]):
        x.add_argument("--json", action="store_true", help="machine-readable output")
        add_connection_args(x)
        if x in (s, st):
            x.add_argument("--interval", type=float, default=2.0, metavar="S", help="--watch poll interval")
            x.add_argument(
                "--watch-timeout",
                type=float,
                default=0.0,
                metavar="S",
                help="give up watching after S seconds (0: never)",
            )
