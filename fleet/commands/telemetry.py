"""`fleet telemetry`: the fleet's metrics.

Without --follow: the latest summary per device from the controller's registry.
With --follow: subscribes to the devices' telemetry topics directly (no controller needed, only read
access to ``{p}/devices/+/telemetry``) and keeps a live table, or prints one JSON object per message
with --json (for scripts and pipes).
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
from typing import Any, Dict, List

from edge_agent.clikit import CliError
from edge_agent.errors import TransportError
from edge_agent.protocol import topics
from edge_agent.protocol.messages import MessageError, Telemetry
from fleet._table import age, bundle_text, percent, render_table
from fleet.commands._connect import add_connection_args, mqtt_config, rpc_call
from fleet.telemetry_view import telemetry_summary

HEADERS = (
    "DEVICE",
    "BUNDLE",
    "QPS",
    "P50 MS",
    "P99 MS",
    "ERRORS",
    "QUEUE",
    "BATCH",
    "LARGE",
    "TAU",
    "GPU%",
    "CPU%",
    "MEM FREE MB",
    "TEMP C",
    "POWER W",
    "THROTTLED",
    "AGE",
)


def summary_row(device_id: str, t: Dict[str, Any], now: float) -> List[Any]:
    """A table row from a telemetry summary (see `fleet.telemetry_view.telemetry_summary`)."""
    power = t.get("power_mw")
    return [
        device_id,
        bundle_text(t.get("bundle")),
        t.get("qps"),
        t.get("p50_ms"),
        t.get("p99_ms"),
        percent(t.get("error_rate")),
        t.get("queue_depth"),
        t.get("mean_batch"),
        percent(t.get("large_fraction")),
        t.get("tau"),
        t.get("gpu_util"),
        t.get("cpu_percent"),
        t.get("mem_available_mb"),
        t.get("temp_max_c"),
        None if power is None else power / 1000.0,
        t.get("throttled"),
        age(t.get("ts"), now),
    ]


def render(latest: Dict[str, Dict[str, Any]], now: float) -> str:
    """The live table, devices sorted by id."""
    rows = [summary_row(d, latest[d], now) for d in sorted(latest)]
    return render_table(HEADERS, rows, numeric=tuple(range(2, 15)))


def _snapshot(args: argparse.Namespace) -> int:
    params = {"device_id": args.device} if args.device else {}
    rows = rpc_call(args, "telemetry.latest", params)
    if args.json:
        for r in rows:
            print(json.dumps(r, sort_keys=True))
        return 0
    latest = {r["device_id"]: r["telemetry"] for r in rows if r.get("telemetry")}
    if not latest:
        print("no telemetry yet")
        return 0
    print(render(latest, time.time()))
    return 0


def _follow(args: argparse.Namespace) -> int:
    from edge_agent.mqtt.session import MqttSession, require_connected

    cfg = mqtt_config(args)
    if args.device:
        try:
            filt = topics.telemetry(cfg.prefix, args.device)
        except ValueError as e:
            raise CliError(str(e))
    else:
        filt = topics.all_devices(cfg.prefix, "telemetry")
    inbox: queue.Queue = queue.Queue(maxsize=10000)
    dropped = [0]

    def on_message(msg) -> None:
        try:
            inbox.put_nowait(msg.payload)
        except queue.Full:
            dropped[0] += 1

    session = MqttSession(cfg, client_id="fleet-telemetry-%d" % (time.time() * 1000 % 10**9), name="fleet-telemetry")
    session.subscribe(filt, on_message, qos=0)
    session.start()
    try:
        require_connected(session, min(10.0, args.timeout))
    except TransportError:
        session.stop(timeout_s=1.0)
        raise
    tty = sys.stdout.isatty() and not args.json
    latest: Dict[str, Dict[str, Any]] = {}
    malformed = 0
    seen = 0
    end = time.monotonic() + args.duration if args.duration else None
    next_draw = 0.0
    if not args.json:
        print("following %s (Ctrl-C to stop)" % filt)
        sys.stdout.flush()
    try:
        while True:
            now_m = time.monotonic()
            if end is not None and now_m >= end:
                break
            if args.count and seen >= args.count:
                break
            try:
                payload = inbox.get(timeout=0.2)
            except queue.Empty:
                payload = None
            if payload is not None:
                try:
                    t = Telemetry.from_json(payload)
                except MessageError:
                    malformed += 1
                    continue
                seen += 1
                if args.json:
                    print(json.dumps(t.to_dict(), sort_keys=True))
                    sys.stdout.flush()
                    continue
                latest[t.device_id] = telemetry_summary(t)
            if not args.json and latest and time.monotonic() >= next_draw:
                if tty:
                    sys.stdout.write("\x1b[2J\x1b[H")
                print(render(latest, time.time()))
                if malformed or dropped[0]:
                    print("(%d malformed, %d dropped by this viewer)" % (malformed, dropped[0]))
                if not tty:
                    print()
                sys.stdout.flush()
                next_draw = time.monotonic() + args.interval
    except KeyboardInterrupt:
        pass
    finally:
        session.stop(timeout_s=1.0)
    return 0


def _history(args: argparse.Namespace) -> int:
    if not args.device:
        raise CliError("--history needs --device ID")
    since = time.time() - args.history * 3600.0
    rows = rpc_call(args, "telemetry.history", {"device_id": args.device, "since": since})
    if args.json:
        for r in rows:
            print(json.dumps(r, sort_keys=True))
        return 0
    if not rows:
        print("no telemetry history for %s in the last %g h" % (args.device, args.history))
        return 0
    now = time.time()
    table = [[time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["ts"])), *summary_row(args.device, r, now)[1:]]
             for r in rows]
    print(render_table(("TIME", *HEADERS[1:]), table, numeric=tuple(range(2, 15))))
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.history is not None:
        return _history(args)
    return _follow(args) if args.follow else _snapshot(args)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `telemetry` command."""
    p = sub.add_parser(
        "telemetry",
        help="fleet metrics: latest, or live with --follow",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", metavar="ID", help="only this device")
    p.add_argument("--follow", "-f", action="store_true", help="live, straight from the devices' topics")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--history", type=float, metavar="HOURS",
                   help="the device's downsampled history over the last HOURS (with --device)")
    p.add_argument("--interval", type=float, default=2.0, metavar="S", help="--follow: redraw every S seconds")
    p.add_argument("--count", type=int, default=0, metavar="N", help="--follow: stop after N messages")
    p.add_argument("--duration", type=float, default=0.0, metavar="S", help="--follow: stop after S seconds")
    add_connection_args(p)
    p.set_defaults(func=_run)
