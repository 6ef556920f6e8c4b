"""MQTT message routing benchmark: the cost of finding a received message's handlers.

Every received message goes through `MqttSession._on_message`, which must find the handlers whose
subscription filters match its topic. Measured here for the subscription sets the product really uses:

* the controller (`fleet serve`): bundle fetch requests, device status, telemetry and events (shared
  subscriptions with `+`), and the operator RPC — with telemetry from N distinct devices;
* a device: its `commands` and `chunks` topics (exact filters).

Baseline, measured in the same run: the previous routing, which called paho's `topic_matches_sub`
for every subscription on every message. Compared: `edge_agent.mqtt.routing.TopicRouter.routes`
(exact filters hashed, wildcards compiled once, results cached per topic), and the whole
`MqttSession._on_message` (metadata decoding + routing + a no-op handler) for context.

    python bench/mqtt_routing.py [--quick] [--json PATH]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import environment, figure, parser, print_table, write_json  # noqa: E402

PREFIX = "edge/v1"


def controller_filters() -> List[str]:
    """The filters `fleet serve` subscribes to (fleet/controller.py, fleet/control_plane.py, fleet/ingest.py,
    fleet/rpc.py)."""
    from edge_agent.protocol import topics

    out = ["$share/fleet/%s" % topics.all_devices(PREFIX, "fetch"), topics.all_devices(PREFIX, "status")]
    out += ["$share/fleet/%s" % topics.all_devices(PREFIX, c) for c in ("telemetry", "events")]
    out.append("$share/fleet-rpc/%s" % topics.fleet_rpc(PREFIX))
    return out


def device_filters(device_id: str) -> List[str]:
    """The filters an agent subscribes to."""
    from edge_agent.protocol import topics

    return [topics.commands(PREFIX, device_id), topics.chunks(PREFIX, device_id)]


def _old_plain(f: str) -> str:
    if f.startswith("$share/"):
        parts = f.split("/", 2)
        return parts[2] if len(parts) == 3 else f
    return f


def scan_router(filters: List[str]) -> Callable[[str], list]:
    """The previous routing: paho's matcher against every subscription, for every message."""
    from paho.mqtt.client import topic_matches_sub

    subs = [(f, 1, f) for f in filters]

    def route(topic: str) -> list:
        return [h for f, _, h in subs if topic_matches_sub(_old_plain(f), topic)]

    return route


def cached_router(filters: List[str]) -> Callable[[str], list]:
    """The current routing."""
    from edge_agent.mqtt.routing import TopicRouter

    r = TopicRouter()
    for f in filters:
        r.add(f, f)
    return r.routes


def _per_message_us(route: Callable[[str], object], topics_: List[str], rounds: int) -> float:
    n = 0
    t0 = time.perf_counter()
    for _ in range(rounds):
        for t in topics_:
            route(t)
        n += len(topics_)
    return (time.perf_counter() - t0) / n * 1e6


def _median(values: List[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2]


def compare(filters: List[str], topics_: List[str], rounds: int, repeats: int) -> Tuple[float, float]:
    """(scan µs/message, cached µs/message), medians of interleaved repeats (same answers checked)."""
    old, new = scan_router(filters), cached_router(filters)
    for t in topics_[:200]:
        assert sorted(old(t)) == sorted(h for _, h in new(t)), t
    a, b = [], []
    for _ in range(repeats):
        a.append(_per_message_us(old, topics_, rounds))
        b.append(_per_message_us(new, topics_, rounds))
    return _median(a), _median(b)


def session_on_message_us(filters: List[str], topics_: List[str], rounds: int) -> float:
    """The whole receive callback of a real `MqttSession` (no broker needed to call it)."""
    from edge_agent.config import MqttConfig
    from edge_agent.mqtt.session import MqttSession

    s = MqttSession(MqttConfig(), client_id="bench")
    for f in filters:
        s.subscribe(f, lambda m: None)

    class Msg:
        __slots__ = ("payload", "properties", "qos", "retain", "topic")

        def __init__(self, topic: str) -> None:
            self.topic, self.payload, self.qos, self.retain, self.properties = topic, b"{}", 0, False, None

    msgs = [Msg(t) for t in topics_]
    n = 0
    t0 = time.perf_counter()
    for _ in range(rounds):
        for m in msgs:
            s._on_message(None, None, m)
        n += len(msgs)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> int:
    """Run the benchmark."""
    args = parser(__doc__.splitlines()[0]).parse_args()
    from edge_agent.protocol import topics

    devices = 1000 if args.quick else 10000
    rounds = 3
    repeats = 3
    ctl = controller_filters()
    # Every device sends telemetry; one in four also a status and an event in the same stretch.
    ctl_topics = []
    for i in range(devices):
        d = "dev-%05d" % i
        ctl_topics.append(topics.telemetry(PREFIX, d))
        if i % 4 == 0:
            ctl_topics += [topics.status(PREFIX, d), topics.events(PREFIX, d)]
    dev = device_filters("dev-00001")
    dev_topics = [topics.chunks(PREFIX, "dev-00001")] * 9 + [topics.commands(PREFIX, "dev-00001")]
    dev_topics = dev_topics * 100

    figures = []
    old, new = compare(ctl, ctl_topics, rounds, repeats)
    figures += [
        figure("controller routing, %d device topics" % devices, new, "us/message", baseline=old,
               higher_is_better=False),
        figure("controller routing speed-up", old / new, "x", baseline=1.0, target=5.0),
    ]
    old_d, new_d = compare(dev, dev_topics, rounds * 20, repeats)
    figures += [
        figure("device routing (commands + chunks)", new_d, "us/message", baseline=old_d, higher_is_better=False),
        figure("device routing speed-up", old_d / new_d, "x", baseline=1.0, target=2.0),
    ]
    figures.append(figure("controller MqttSession._on_message (whole callback)",
                          session_on_message_us(ctl, ctl_topics, rounds), "us/message", higher_is_better=False))
    print_table(figures, "MQTT routing (%s; baseline = paho topic_matches_sub over every subscription)"
                % ("quick" if args.quick else "full"))
    write_json(args.json, figures, environment(subscriptions_controller=len(ctl), device_topics=devices))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
