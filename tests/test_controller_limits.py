"""The controller's bounds against one hostile sender, piece by piece and in-process: fetch entitlement,
per-device fetch rates and fair queueing, back-pressure on chunks, report size/rate/backlog bounds, and
the operator RPC's retained, stale and flooded requests. The whole-process versions, with the shipped
broker and `fleet serve`, are in tests/test_controller_floods.py."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from agent_helpers import build_sample_bundle, write_key
from test_ingest import status, telemetry

from edge_agent.config import MqttConfig
from edge_agent.mqtt.packets import Inbound
from edge_agent.mqtt.session import MqttSession
from edge_agent.protocol import topics
from edge_agent.protocol.messages import ChunkRequest, DeployArgs, RollbackArgs, RpcRequest, RpcResponse
from fleet.bundle_store import ControllerStore
from fleet.chunk_server import ChunkServer
from fleet.config import ChunkServerSection, RpcSection
from fleet.entitlements import Entitlements
from fleet.fairqueue import FairQueue
from fleet.ingest import Ingest
from fleet.registry import Registry
from fleet.rpc import RpcServer

P = "edge/v1"


def _drain(session: MqttSession):
    out = []
    while not session._out.empty():
        out.append(session._out.get_nowait())
    return out


class Chunks:
    """A chunk server over a real store with one bundle, a real (unstarted) session and real entitlements."""

    def __init__(self, tmp: Path, **cfg) -> None:
        key = write_key(tmp / "keys", "release")
        self.store = ControllerStore(tmp / "store")
        bundle = build_sample_bundle(tmp / "b", key, version=1, extra={"blob.bin": os.urandom(3 << 20)})
        self.body, self.msha, _ = self.store.add_bundle(bundle, max_manifest_bytes=1 << 20, max_bundle_bytes=1 << 30)
        self.session = MqttSession(MqttConfig(), client_id="controller", outgoing_queue=1 << 16)
        self.entitlements = Entitlements(tmp / "entitlements.sqlite")
        self.server = ChunkServer(self.session, self.store, prefix=P, cfg=ChunkServerSection(**cfg),
                                  entitled=self.entitlements.allows)
        self.sha, self.entry = max(((e.sha256, e) for e in self.body.files.values()), key=lambda t: t[1].size)

    def request(self, device: str, length: int = 4096, offset: int = 0, *, sender: str = "") -> Inbound:
        """`device`'s request for a range, published on `sender`'s fetch topic (default: its own)."""
        req = ChunkRequest(device_id=device, bundle={"name": "digits", "version": 1}, sha256=self.sha,
                           offset=offset, length=min(length, self.entry.size - offset))
        return Inbound(topics.fetch(P, sender or device), req.to_json(), 1, False, {}, topics.chunks(P, device),
                       b"c")


def test_fetch_of_a_bundle_never_deployed_to_the_device_is_refused(tmp_path):
    c = Chunks(tmp_path)
    c.entitlements.grant("dev-b", "digits", 1)
    c.server.serve(c.request("dev-a"))
    c.server.serve(c.request("dev-b"))
    refused, served = _drain(c.session)
    assert refused.topic == topics.chunks(P, "dev-a") and refused.payload == b""
    assert refused.user_properties["error"] == "bundle digits v1 is not available to dev-a"
    assert served.topic == topics.chunks(P, "dev-b") and len(served.payload) == 4096  # positive control
    assert c.server.stats["not_entitled"] == 1


def test_entitlement_granted_by_another_controller_process_is_honoured(tmp_path):
    """`fleet push` (one process) grants, `fleet serve` (another) answers: they share the SQLite file."""
    push = Entitlements(tmp_path / "e.sqlite")
    serve = Entitlements(tmp_path / "e.sqlite")
    assert not serve.allows("dev-a", "digits", 3)
    push.grant("dev-a", "digits", 3)
    assert serve.allows("dev-a", "digits", 3)
    assert not serve.allows("dev-a", "digits", 4) and not serve.allows("dev-b", "digits", 3)


def test_deploy_command_grants_the_fetch_entitlement_and_rollback_does_not(tmp_path):
    from edge_agent.signing import PrivateKey
    from fleet.config import FleetConfig
    from fleet.controller import Controller

    cfg = FleetConfig.model_validate({"controller": {"state_dir": str(tmp_path / "ctl")}})
    ctl = Controller(cfg, key=PrivateKey.generate(), serve_chunks=False)
    ctl.send_command("dev-r", RollbackArgs(reason="x"))
    assert not ctl.entitlements.allows("dev-r", "digits", 5)
    ctl.send_command("dev-d", DeployArgs(bundle={"name": "digits", "version": 5}, manifest_sha256="a" * 64,
                                         manifest_size=100))
    assert ctl.entitlements.allows("dev-d", "digits", 5)
    ctl.entitlements.close()


def test_oversize_fetch_request_is_dropped_before_parsing(tmp_path):
    c = Chunks(tmp_path)
    c.server.on_request(Inbound(topics.fetch(P, "dev-a"), b"[" * 5000, 1, False, {}, topics.chunks(P, "dev-a"), b"c"))
    assert c.server.stats["oversize"] == 1 and len(c.server._q) == 0


def test_fetch_flood_from_one_device_is_rate_limited_and_others_are_served_in_turn(tmp_path):
    c = Chunks(tmp_path, device_requests_per_s=1.0, device_request_burst=10, device_queue=5)
    for _ in range(50):
        c.server.on_request(c.request("dev-a"))
    for _ in range(3):
        c.server.on_request(c.request("dev-b"))
    # dev-a: 10 requests pass its rate, 5 fit its queue share; dev-b keeps its own share.
    assert c.server.stats["rate_limited"] == 40 and c.server.stats["dropped"] == 5
    order = [c.server._q.get(0.1).response_topic for _ in range(8)]
    a, b = topics.chunks(P, "dev-a"), topics.chunks(P, "dev-b")
    assert order == [a, b, a, b, a, b, a, a]


def test_device_naming_another_device_in_a_fetch_cannot_spend_its_share(tmp_path, caplog):
    """The attack: dev-a publishes fetch requests naming dev-b (dev-b's bundle, dev-b's chunks topic) to use
    up dev-b's request rate and queue share. The broker lets dev-a publish only on its own fetch topic, so
    the requests count against dev-a's share; served, each is refused (counted, logged once) and nothing is
    sent; dev-b's own requests still pass its full burst and are answered."""
    c = Chunks(tmp_path, device_requests_per_s=1.0, device_request_burst=10, device_queue=5)
    c.entitlements.grant("dev-b", "digits", 1)
    for _ in range(50):
        c.server.on_request(c.request("dev-b", sender="dev-a"))
    # dev-a's own share took them: 10 passed its rate, 5 fit its queue share.
    assert c.server.stats["rate_limited"] == 40 and c.server.stats["dropped"] == 5
    for _ in range(10):  # dev-b's whole burst is still its own
        c.server.on_request(c.request("dev-b"))
    assert c.server.stats["rate_limited"] == 40 and c.server.stats["dropped"] == 5 + 5
    with caplog.at_level("WARNING", logger="fleet.chunk_server"):
        while True:
            msg = c.server._q.get(0.01)
            if msg is None:
                break
            c.server.serve(msg)
    assert c.server.stats["impersonation"] == 5
    assert [r.getMessage() for r in caplog.records if "naming device" in r.getMessage()] == [
        "device dev-a sent fetch requests naming device dev-b; refused (1 such requests so far)"]
    sent = _drain(c.session)
    assert len(sent) == 5 and all(d.topic == topics.chunks(P, "dev-b") and len(d.payload) == 4096 for d in sent)


def test_fetch_request_on_a_topic_that_is_not_a_devices_fetch_topic_is_dropped(tmp_path):
    c = Chunks(tmp_path)
    c.entitlements.grant("dev-a", "digits", 1)
    good = c.request("dev-a")
    for topic in (P + "/bundles/fetch", topics.events(P, "dev-a"), P + "/devices/a/b/fetch"):
        c.server.on_request(Inbound(topic, good.payload, 1, False, {}, good.response_topic, b"c"))
    assert c.server.stats["malformed"] == 3 and len(c.server._q) == 0
    c.server.on_request(good)  # positive control
    assert len(c.server._q) == 1


def test_fair_queue_bounds_per_key_and_in_total():
    q = FairQueue(per_key=2, total=3)
    assert q.put("a", 1) and q.put("a", 2) and not q.put("a", 3)
    assert q.put("b", 1) and not q.put("c", 1)
    assert len(q) == 3 and q.get(0.1) == 1 and q.get(0.1) == 1 and q.get(0.1) == 2 and q.get(0.01) is None


def test_chunks_waiting_for_the_broker_are_bounded(tmp_path):
    """Nothing acknowledges (the session is not connected): after `max_inflight_bytes` of chunks the
    server waits `send_timeout_s`, then drops the request instead of reading more bytes into memory."""
    c = Chunks(tmp_path, max_inflight_bytes=1 << 20, send_timeout_s=0.05)
    c.entitlements.grant("dev-a", "digits", 1)
    n = 0
    for off in range(0, c.entry.size - 65536, 65536):
        c.server.serve(c.request("dev-a", 65536, off))
        n += 1
    assert n * 65536 > (1 << 20), "the sample bundle is too small for this test"
    assert c.server._inflight_bytes <= 1 << 20
    assert c.server.stats["busy_dropped"] == n - (1 << 20) // 65536
    assert len(_drain(c.session)) == (1 << 20) // 65536


# ------------------------------------------------------------------------------------------ reports


def test_oversize_report_is_dropped_before_parsing(tmp_path):
    ing = Ingest(Registry(tmp_path / "r.sqlite"), prefix=P, max_payload_bytes=4096)
    ing.submit(P + "/devices/a/events", b"[" * 5000)
    assert ing.oversize == 1 and ing.stats()["queued"] == 0 and sum(ing.malformed.values()) == 0


def test_report_flood_from_one_device_is_rate_limited_and_others_pass(tmp_path):
    ing = Ingest(Registry(tmp_path / "r.sqlite"), prefix=P, device_rate_per_s=1.0, device_burst=20)
    for i in range(100):
        ing.submit(P + "/devices/flood/telemetry", telemetry("flood", seq=i + 1))
    ing.submit(P + "/devices/quiet/status", status("quiet"))
    assert ing.rate_limited == 80 and ing.stats()["queued"] == 21


def test_report_backlog_is_bounded_in_bytes(tmp_path):
    ing = Ingest(Registry(tmp_path / "r.sqlite"), prefix=P, max_backlog_bytes=10000, device_burst=10 ** 6)
    doc = status("d")
    for _ in range(100):
        ing.submit(P + "/devices/d/status", doc)
    assert ing.stats()["queued_bytes"] <= 10000
    assert ing.stats()["queued"] == 10000 // len(doc) and ing.dropped["status"] == 100 - 10000 // len(doc)


# ------------------------------------------------------------------------------------------ RPC


class Rpc:
    def __init__(self, **limits) -> None:
        self.session = MqttSession(MqttConfig(), client_id="controller", outgoing_queue=1 << 16)
        self.server = RpcServer(self.session, prefix=P, limits=RpcSection(**limits))
        self.calls = []
        self.server.register("rollback", lambda p: self.calls.append(p) or {"sent": p.get("devices")})

    def request(self, *, user: str = "op", retain: bool = False, issued_at=None, method="rollback") -> Inbound:
        req = RpcRequest(method=method, params={"devices": ["d1"]},
                         issued_at=int(time.time()) if issued_at is None else issued_at)
        return Inbound(P + "/fleet/rpc", req.to_json(), 1, retain, {}, "%s/fleet/rpc-reply/%s/cli" % (P, user), b"c")

    def run(self, msg: Inbound):
        self.server._on_request(msg)
        while not self.server._queue.empty():
            r, m = self.server._queue.get_nowait()
            self.server._answer(m, self.server.dispatch(r.method, r.params))
        return _drain(self.session)


def test_retained_rpc_request_is_ignored_and_cleared():
    r = Rpc()
    out = r.run(r.request(retain=True))
    assert r.calls == []
    assert len(out) == 1 and out[0].topic == P + "/fleet/rpc" and out[0].payload == b"" and out[0].retain
    assert r.server.stats["retained_cleared"] == 1
    out = r.run(r.request())  # positive control: the same request, not retained, runs
    assert r.calls == [{"devices": ["d1"]}] and RpcResponse.from_json(out[0].payload, max_bytes=1 << 20).ok


def test_stale_or_future_rpc_request_is_refused():
    r = Rpc(max_age_s=60)
    for issued in (int(time.time()) - 3600, int(time.time()) + 3600):
        out = r.run(r.request(issued_at=issued))
        resp = RpcResponse.from_json(out[0].payload, max_bytes=1 << 20)
        assert not resp.ok and "refused" in resp.error
    assert r.calls == [] and r.server.stats["expired"] == 2


def test_rpc_request_without_issued_at_is_refused():
    r = Rpc()
    msg = r.request()
    doc = RpcRequest.from_json(msg.payload, max_bytes=1 << 20).to_dict()
    del doc["issued_at"]
    out = r.run(Inbound(msg.topic, json.dumps(doc).encode(), 1, False, {}, msg.response_topic, b"c"))
    assert not RpcResponse.from_json(out[0].payload, max_bytes=1 << 20).ok and r.calls == []


def test_rpc_flood_from_one_operator_is_rate_limited_and_others_answered():
    r = Rpc(requests_per_s=1.0, request_burst=5, backlog=1000)
    for _ in range(50):
        r.run(r.request(user="flooder", method="rollback"))
    assert len(r.calls) == 5 and r.server.stats["rate_limited"] == 45
    out = r.run(r.request(user="other"))
    assert len(out) == 1 and RpcResponse.from_json(out[0].payload, max_bytes=1 << 20).ok


def test_rpc_client_request_carries_issued_at_and_expires_at_the_broker():
    from fleet.rpc import RpcClient, RpcTimeout

    session = MqttSession(MqttConfig(), client_id="cli", outgoing_queue=16)  # never connected
    client = RpcClient(session, prefix=P, client_id="cli", username="op")
    with pytest.raises(RpcTimeout):
        client.call("controller.status", timeout_s=0.2)
    (item,) = _drain(session)
    assert item.expiry_s == 1
    assert abs(RpcRequest.from_json(item.payload, max_bytes=1 << 20).issued_at - time.time()) < 5
