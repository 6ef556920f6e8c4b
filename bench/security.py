"""Controller under a hostile device: peak memory and a bystander's bundle pull under four floods.

Setup (tests/flood_rig.py): mosquitto with the shipped TLS drop-in and dynamic-security rules, `fleet serve`
as a real process with the controller's certificate, and clients with real device/operator certificates.
For each kind of flood the controller is restarted (so its peak-RSS counter, VmHWM in /proc/<pid>/status,
starts fresh), the bystander device pulls a bundle deployed to it once without a flood (the baseline), then
the flood starts from one certificate and the bystander pulls the same bundle again while it runs:

- fetch:     fetch requests naming the bystander's bundle (not deployed to the attacker), 1 MiB each
- events:    1 MB events on the attacker's own events topic
- telemetry: small valid telemetry messages on the attacker's own topic, as fast as the broker takes them
- rpc:       valid `devices.list` CLI requests from a second operator certificate

Figures per flood: the controller's peak RSS under the flood (baseline: its RSS before the flood; target:
the bound tests/test_controller_floods.py asserts), the bystander's pull time under the flood vs without
(same run), their ratio, and the attacker's sending rate. `--quick` pulls a 2 MiB bundle instead of 16 MiB.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench._common import environment, figure, parser, print_table, write_json  # noqa: E402

MIB = 1 << 20
KINDS = ("fetch", "events", "telemetry", "rpc")


def _flood(rig, kind: str, bystander_body):
    if kind == "fetch":
        return rig.fetch_flood(bystander_body)
    if kind == "events":
        return rig.report_flood("events", payload_bytes=1_000_000)
    if kind == "telemetry":
        return rig.report_flood("telemetry")
    return rig.rpc_flood()


def _one(rig, kind: str, bundle) -> Dict[str, Any]:
    from flood_rig import BYSTANDER

    body, msha, size = bundle
    rig.stop_serve()
    rig.start_serve()
    idle_mb = rig.rss_mb()
    base_s = rig.pull(BYSTANDER, body, msha, size)
    flood = _flood(rig, kind, body).start()
    t0 = time.monotonic()
    try:
        deadline = time.monotonic() + 30
        while flood.sent < 200 and time.monotonic() < deadline:  # flooding at full rate first
            time.sleep(0.05)
        flood_s = rig.pull(BYSTANDER, body, msha, size, timeout_s=10.0)
    finally:
        sent, took = flood.sent, time.monotonic() - t0
        flood.stop()
    alive = rig.serve.poll() is None
    return {"kind": kind, "idle_mb": idle_mb, "peak_mb": rig.peak_rss_mb() if alive else None, "base_s": base_s,
            "flood_s": flood_s, "rate": sent / max(took, 1e-6), "alive": alive}


def main() -> int:
    """Run the benchmark."""
    args = parser(__doc__.splitlines()[0]).parse_args()
    from flood_rig import BYSTANDER, FloodRig
    from test_controller_floods import RSS_BOUND_MB

    payload = (2 if args.quick else 16) * MIB
    figures: List[Dict[str, Any]] = []
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-security-") as td:
        rig = FloodRig(Path(td))
        try:
            bundle = rig.deploy_bundle(BYSTANDER, version=2, payload_bytes=payload)
            for kind in KINDS:
                print("%s flood ..." % kind, file=sys.stderr, flush=True)
                r = _one(rig, kind, bundle)
                results.append(r)
                figures.append(figure("%s flood: controller peak RSS" % kind, round(r["peak_mb"] or -1, 1), "MB",
                                      baseline=round(r["idle_mb"], 1), target=RSS_BOUND_MB, higher_is_better=False))
                figures.append(figure("%s flood: bystander pull time" % kind, round(r["flood_s"], 2), "s",
                                      baseline=round(r["base_s"], 2), higher_is_better=False))
                figures.append(figure("%s flood: bystander slowdown" % kind, round(r["flood_s"] / r["base_s"], 2),
                                      "x", baseline=1.0, higher_is_better=False))
                figures.append(figure("%s flood: attacker rate" % kind, round(r["rate"], 1), "msg/s"))
        finally:
            rig.close()
    print_table(figures, "controller under a flood from one certificate (bystander pulls %d MiB)" % (payload // MIB))
    for r in results:
        if not r["alive"]:
            print("%s flood: fleet serve EXITED" % r["kind"])
    write_json(args.json, figures, environment(bystander_bundle_mib=payload // MIB, quick=bool(args.quick)))
    return 0 if all(r["alive"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
