"""Hostile input to the controller's MQTT handlers, with hypothesis: the chunk server (fetch requests),
the operator RPC server, and the ingest of device status, telemetry and events. Random bytes, wrong
JSON types, huge values, unknown fields, wrong schema versions and hostile response topics never crash
a handler, never change the registry or the bundle store, never send bundle bytes anywhere but the
requesting device's own chunks topic, and malformed messages are counted.

The handlers are called in-process through their real entry points (`ChunkServer.serve`,
`RpcServer._on_request` + `dispatch`, `Ingest.handle`) with a real, unstarted `MqttSession` whose
outgoing queue holds what they would have published.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from agent_helpers import build_sample_bundle, write_key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fuzz_agent import _enc, json_values, mutated

from edge_agent.config import MqttConfig
from edge_agent.mqtt.packets import Inbound
from edge_agent.mqtt.session import MqttSession
from edge_agent.protocol import topics
from edge_agent.protocol.messages import (
    ChunkRequest,
    Event,
    MessageError,
    RpcRequest,
    RpcResponse,
    Status,
    Telemetry,
)
from fleet.config import RpcSection

FUZZ = settings(max_examples=int(os.environ.get("EDGE_AGENT_FUZZ_EXAMPLES", "200")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
P = "edge/v1"

payloads = st.one_of(st.binary(max_size=3000), json_values.map(_enc), st.text(max_size=100).map(str.encode))


def _published(session: MqttSession) -> List[Any]:
    out = []
    while not session._out.empty():
        out.append(session._out.get_nowait())
    return out


def _tree(root: Path) -> List[Tuple[str, int, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


# ------------------------------------------------------------------------------------------ chunk server


class ChunkRig:
    def __init__(self, tmp: Path) -> None:
        from fleet.bundle_store import ControllerStore
        from fleet.chunk_server import ChunkServer
        from fleet.config import ChunkServerSection

        key = write_key(tmp / "keys", "release")
        bundle = build_sample_bundle(tmp / "b", key, version=1)
        self.root = tmp / "store"
        self.store = ControllerStore(self.root)
        self.body, self.msha, self.msize = self.store.add_bundle(bundle, max_manifest_bytes=1 << 20,
                                                                 max_bundle_bytes=1 << 30)
        self.session = MqttSession(MqttConfig(), client_id="controller", outgoing_queue=1 << 20)
        self.cfg = ChunkServerSection(max_chunk_bytes=64 * 1024)
        from fleet.entitlements import Entitlements

        self.entitlements = Entitlements(tmp / "entitlements.sqlite")
        self.entitlements.grant("dev1", "digits", 1)
        self.server = ChunkServer(self.session, self.store, prefix=P, cfg=self.cfg, entitled=self.entitlements.allows)
        self.allowed = self.store.allowed("digits", 1)
        _name, entry = sorted(self.body.files.items())[0]
        self.valid = ChunkRequest(device_id="dev1", bundle={"name": "digits", "version": 1}, sha256=entry.sha256,
                                  offset=0, length=min(4096, entry.size)).to_dict()


@pytest.fixture(scope="module")
def chunks(tmp_path_factory):
    r = ChunkRig(tmp_path_factory.mktemp("fuzz-chunk-server"))
    yield r
    r.server.stop()


response_topics = st.one_of(st.none(), st.sampled_from([topics.chunks(P, "dev1"), topics.chunks(P, "dev2"),
                                                         topics.commands(P, "dev1"), P + "/devices/+/chunks",
                                                         P + "/fleet/rpc", ""]), st.text(max_size=30))
#: The topic a request arrives on: the broker lets only device `{id}` publish on `{p}/devices/{id}/fetch`.
fetch_topics = st.sampled_from([topics.fetch(P, "dev1"), topics.fetch(P, "dev2"), P + "/bundles/fetch",
                                topics.events(P, "dev1")])


@st.composite
def chunk_requests(draw, rig: ChunkRig):
    kind = draw(st.sampled_from(["random", "mutated", "range"]))
    if kind == "random":
        payload = draw(payloads)
    elif kind == "mutated":
        payload = _enc(draw(mutated(rig.valid))[1])
    else:  # well-formed, hostile numbers: past the end, over the chunk cap, other files, other bundles
        doc = dict(rig.valid)
        doc["offset"] = draw(st.sampled_from([0, 1, 4095, 2 ** 31, 2 ** 62, 10 ** 30]))
        doc["length"] = draw(st.sampled_from([1, 4096, 65536, 65537, 1 << 20, (1 << 20) + 1]))
        doc["sha256"] = draw(st.sampled_from([*sorted(rig.allowed), "0" * 64, "f" * 64]))
        doc["bundle"] = draw(st.sampled_from([{"name": "digits", "version": 1}, {"name": "digits", "version": 2},
                                              {"name": "other", "version": 1}]))
        payload = _enc(doc)
    return Inbound(draw(fetch_topics), payload, 1, False, {}, draw(response_topics),
                   draw(st.one_of(st.none(), st.binary(max_size=16))))


@FUZZ
@given(data=st.data())
def test_chunk_server_hostile_requests_never_crash_never_leak_bytes(chunks, data):
    rig = chunks
    msg = data.draw(chunk_requests(rig))
    before = _tree(rig.root)
    stats = dict(rig.server.stats)
    try:
        req = ChunkRequest.from_json(msg.payload, max_bytes=4096)
    except MessageError:
        req = None
    rig.server.serve(msg)  # must not raise
    sent = _published(rig.session)
    assert _tree(rig.root) == before, "a fetch request changed the controller's store"
    sender = topics.parse_device_topic(P, msg.topic)
    if req is None or sender is None or sender[1] != "fetch":
        assert rig.server.stats["malformed"] == stats["malformed"] + 1 and not sent
        return
    if req.device_id != sender[0]:  # names another device than the one that published it
        assert not sent and rig.server.stats["impersonation"] == stats["impersonation"] + 1
        return
    own = topics.chunks(P, req.device_id)
    if msg.response_topic != own:
        assert not sent and rig.server.stats["refused"] == stats["refused"] + 1
        return
    assert len(sent) == 1
    out = sent[0]
    assert out.topic == own and out.correlation_data == msg.correlation_data
    if out.payload:
        total = rig.allowed.get(req.sha256)
        assert total is not None and req.bundle.name == "digits" and req.bundle.version == 1
        assert req.length <= rig.cfg.max_chunk_bytes and req.offset + req.length <= total
        with open(rig.store.object_path(req.sha256), "rb") as f:
            f.seek(req.offset)
            assert out.payload == f.read(req.length)
    else:
        assert out.user_properties.get("error")


# ------------------------------------------------------------------------------------------ registry


def _dump(db: Path) -> Dict[str, List[tuple]]:
    con = sqlite3.connect(str(db))
    try:
        names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        return {n: sorted(map(repr, con.execute("SELECT * FROM %s" % n).fetchall())) for n in names}
    finally:
        con.close()


def _status(device: str) -> Dict[str, Any]:
    return Status(device_id=device, online=True, ts=time.time(), agent_version="0.1.0", ready=True,
                  active={"name": "digits", "version": 3}, deploy={"state": "active"}).to_dict()


def _telemetry(device: str) -> Dict[str, Any]:
    return Telemetry(device_id=device, ts=time.time(), seq=5, period_s=10.0, uptime_s=100.0, requests=10,
                     errors=1, latency_ms={"p50": 1.0, "p95": 2.0, "p99": 3.0}, temperatures_c={"cpu": 40.0},
                     bundle={"name": "digits", "version": 3}).to_dict()


def _event(device: str) -> Dict[str, Any]:
    return Event(device_id=device, ts=time.time(), seq=7, kind="activated", level="info", message="ok",
                 bundle={"name": "digits", "version": 3}, rollout_id="r1", data={"x": 1}).to_dict()


class ControlRig:
    def __init__(self, tmp: Path) -> None:
        from fleet.control_plane import ControlPlane
        from fleet.registry import Registry

        self.db = tmp / "registry.sqlite"
        self.registry = Registry(self.db)
        self.sent: List[tuple] = []
        self.session = MqttSession(MqttConfig(), client_id="controller", outgoing_queue=1 << 20)

        def resolve(name, version):
            from fleet.bundle_store import BundleRecordError

            raise BundleRecordError("the controller does not store bundle %s v%s" % (name, version))

        # Thousands of requests from one operator name: the rate limit has its own test (test_rpc.py).
        self.cp = ControlPlane(self.session, prefix=P, registry=self.registry,
                               send_command=lambda d, a: self.sent.append((d, a)), resolve_bundle=resolve,
                               rpc_limits=RpcSection(requests_per_s=1e9, request_burst=10 ** 9))
        # Known devices, so handlers that read the registry have rows to read.
        for dev in ("devA", "devB"):
            self.cp.ingest.handle(topics.status(P, dev), _enc(_status(dev)))
            self.cp.ingest.handle(topics.events(P, dev), _enc(_event(dev)))
        _published(self.session)


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    r = ControlRig(tmp_path_factory.mktemp("fuzz-control"))
    yield r
    r.cp.runner.stop_sender()
    r.registry.close()


# ------------------------------------------------------------------------------------------ RPC

READ_ONLY = {"controller.status", "devices.list", "devices.show", "rollout.status", "rollout.list",
             "telemetry.latest", "telemetry.history", "devices.events", "fleet.summary"}
reply_topics = st.one_of(st.none(), st.sampled_from([P + "/fleet/rpc-reply/op/cli-1", P + "/devices/devA/commands",
                                                     "other/fleet/rpc-reply/x", ""]), st.text(max_size=30))


hostile_values = st.sampled_from([10 ** 40, -(10 ** 40), 2 ** 63, -1, 0, "", "x" * 5000, [], {}, None, True, 1e308,
                                  ["devA"], [["devA"]], [{"a": 1}], {"name": "digits", "version": 10 ** 40}])


@st.composite
def rpc_requests(draw, methods: List[str]):
    kind = draw(st.sampled_from(["random", "mutated", "params"]))
    if kind == "random":
        payload = draw(payloads)
    else:
        method = draw(st.one_of(st.sampled_from(methods), st.text(max_size=20)))
        base = {"schema": "edge-agent/rpc-request/1", "method": method, "issued_at": int(time.time()),
                "params": draw(st.dictionaries(st.sampled_from(
                    ["rollout_id", "device_id", "devices", "bundle", "history", "limit", "online", "to", "reason",
                     "waves", "rollback", "accept", "mode", "x"]), st.one_of(hostile_values, json_values),
                    max_size=4))}
        payload = _enc(draw(mutated(base))[1] if kind == "mutated" else base)
    return Inbound(P + "/fleet/rpc", payload, 1, False, {}, draw(reply_topics),
                   draw(st.one_of(st.none(), st.binary(max_size=16))))


@FUZZ
@given(data=st.data())
def test_rpc_handler_hostile_requests_answered_with_errors_no_state_change(control, data):
    rpc = control.cp.rpc
    msg = data.draw(rpc_requests(rpc.methods))
    before = _dump(control.db)
    stats = dict(rpc.stats)
    try:
        req = RpcRequest.from_json(msg.payload, max_bytes=256 * 1024)
    except MessageError:
        req = None
    rpc._on_request(msg)  # the network-thread entry: parse, refuse or queue
    while not rpc._queue.empty():  # what the worker thread does
        r, m = rpc._queue.get_nowait()
        rpc._answer(m, rpc.dispatch(r.method, r.params))
    sent = _published(control.session)
    assert _dump(control.db) == before, "an RPC request changed the registry"
    assert control.sent == [], "an RPC request sent a device command"
    assert rpc.stats["errors"] == stats["errors"], "a handler raised an unexpected exception"
    if not msg.response_topic or not msg.response_topic.startswith(P + "/fleet/rpc-reply/"):
        assert not sent and rpc.stats["malformed"] == stats["malformed"] + 1
        return
    assert len(sent) == 1 and sent[0].topic == msg.response_topic
    assert sent[0].correlation_data == msg.correlation_data
    resp = RpcResponse.from_json(sent[0].payload, max_bytes=2 << 20)
    if req is None:
        assert rpc.stats["malformed"] == stats["malformed"] + 1 and not resp.ok
    elif resp.ok:
        assert req.method in READ_ONLY, (req.method, req.params)
    else:
        assert resp.error and "\n" not in resp.error


# ------------------------------------------------------------------------------------------ ingest

MODELS = {"status": (Status, _status), "telemetry": (Telemetry, _telemetry), "events": (Event, _event)}
ingest_topics = st.one_of(
    st.builds(lambda d, c: "%s/devices/%s/%s" % (P, d, c), st.sampled_from(["devA", "devB", "devC", "x" * 80, "+", ""]),
              st.sampled_from(["status", "telemetry", "events", "commands", "chunks", "results", ""])),
    st.text(max_size=40))


@st.composite
def device_messages(draw):
    topic = draw(ingest_topics)
    channel = topic.rsplit("/", 1)[-1]
    kind = draw(st.sampled_from(["random", "mutated", "other-device"]))
    if kind == "random" or channel not in MODELS:
        payload = draw(payloads)
    else:
        _, make = MODELS[channel]
        if kind == "other-device":  # a well-formed message naming another device than its topic
            payload = _enc(make("devZ"))
        else:
            payload = _enc(draw(mutated(dict(make("devA"), device_id=topic.split("/")[-2])))[1])
    return topic, payload


@FUZZ
@given(msg=device_messages())
def test_ingest_hostile_device_messages_never_crash_counted_no_state_change(control, msg):
    topic, payload = msg
    ing = control.cp.ingest
    before = _dump(control.db)
    pending_before = dict(ing._pending)
    malformed = dict(ing.malformed)
    errors = ing.listener_errors
    parsed = topics.parse_device_topic(P, topic)
    valid = False
    if parsed is not None and parsed[1] in MODELS:
        model = MODELS[parsed[1]][0]
        try:
            m = model.from_json(payload, max_bytes=ing.max_payload_bytes)
            valid = m.device_id == parsed[0]
        except MessageError:
            valid = parsed[1] == "status" and not payload  # a retained status being cleared
    ing.handle(topic, payload)  # must not raise
    assert ing.listener_errors == errors, ing.last_error
    if valid:
        return  # a well-formed message for its own device: recording it is the job
    assert _dump(control.db) == before, "a malformed message changed the registry"
    assert ing._pending == pending_before
    key = parsed[1] if parsed is not None and parsed[1] in MODELS else "topic"
    assert ing.malformed[key] == malformed[key] + 1
    assert sum(ing.malformed.values()) == sum(malformed.values()) + 1


def test_ingest_telemetry_flush_after_fuzzing_still_works(control):
    ing = control.cp.ingest
    ing.handle(topics.telemetry(P, "devA"), json.dumps(_telemetry("devA")).encode())
    assert ing.flush() >= 1
    rows = {r["device_id"]: r for r in control.registry.list_devices()}
    assert rows["devA"]["telemetry"]["requests"] == 10
