"""Chunked pull over a real mosquitto: resume, broker outage, forged chunks, limits, bounded retries.

The controller's chunk server and the device's fetcher run in this process, each with its own MQTT
session to the broker, exactly as in `fleet serve` and `edge-agent run`.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
from bundle_helpers import FILES, body_dict, signed_bytes

from edge_agent.bundle.archive import pack_bundle
from edge_agent.bundle.manifest import ManifestBody
from edge_agent.bundle.store import BundleStore
from edge_agent.config import MqttConfig, TransferConfig
from edge_agent.errors import IntegrityError, ManifestError, TransportError
from edge_agent.mqtt.session import MqttSession
from edge_agent.protocol import topics
from edge_agent.protocol.messages import BundleRef, ChunkRequest
from edge_agent.signing import PrivateKey
from edge_agent.transfer.fetcher import Fetcher, TransferCancelled
from fleet.config import FleetConfig
from fleet.controller import Controller

pytestmark = pytest.mark.mqtt

P = "edge/v1"
BLOB = "extra/blob.bin"


def _bundle(tmp_path: Path, blob: bytes, version: int = 3) -> Path:
    files = dict(FILES, **{BLOB: blob})
    raw = signed_bytes(body_dict(files, version=version), [PrivateKey.generate()])
    paths = {}
    for name, data in files.items():
        p = tmp_path / ("m-%d-" % version + name.replace("/", "_"))
        p.write_bytes(data)
        paths[name] = p
    out = tmp_path / ("b%d.bundle" % version)
    pack_bundle(raw, paths, out)
    return out


class Rig:
    """A controller and one device session on the test broker."""

    def __init__(self, broker, tmp_path: Path, *, rate=None, transfer=None, device="dev1"):
        self.mq = MqttConfig(host=broker.host, port=broker.port, reconnect_min_s=0.1, reconnect_max_s=0.5)
        chunks = {"max_bytes_per_s": rate} if rate else {}
        fc = FleetConfig.model_validate({"mqtt": self.mq.model_dump(), "chunks": chunks,
                                         "controller": {"state_dir": str(tmp_path / "ctl")}})
        self.ctl = Controller(fc, key=PrivateKey.generate())
        self.device = device
        self.store = BundleStore(tmp_path / ("dev-" + device)).open()
        self.session = MqttSession(self.mq, client_id=device)
        self.events = []
        transfer = transfer or TransferConfig(progress_interval_s=0.1)
        self.fetcher = Fetcher(self.session, self.store, transfer, prefix=P, device_id=device,
                               emit=lambda k, m, d: self.events.append((k, d)))
        self.session.subscribe(topics.chunks(P, device), self.fetcher.on_chunk)

    def start(self):
        self.ctl.start()
        self.session.start()
        assert self.session.wait_connected(10) and self.ctl.wait_connected(10)
        time.sleep(0.2)  # subscriptions settle

    def add(self, bundle: Path):
        body, msha, size = self.ctl.add_bundle(bundle)
        # What a deploy command does: the device may now fetch this bundle (fleet/entitlements.py).
        self.ctl.entitlements.grant(self.device, body.name, body.version)
        return body, msha, size

    def close(self):
        self.session.stop()
        self.ctl.stop()


@pytest.fixture
def rig_factory(broker, tmp_path):
    rigs = []

    def make(**kw):
        r = Rig(broker, tmp_path, **kw)
        rigs.append(r)
        return r

    yield make
    for r in rigs:
        r.close()


def _ref(body: ManifestBody) -> BundleRef:
    return BundleRef(name=body.name, version=body.version)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_manifest_then_files_pulled_and_verified(rig_factory, tmp_path):
    blob = os.urandom(3 << 20)
    rig = rig_factory()
    body, msha, size = rig.add(_bundle(tmp_path, blob))
    rig.start()
    raw = rig.fetcher.fetch_manifest(_ref(body), msha, size, max_bytes=1 << 20)
    assert _sha(raw) == msha
    stats = rig.fetcher.fetch_files(_ref(body), rig.store.missing_files(body))
    assert not rig.store.missing_files(body)
    assert rig.store.object_path(_sha(blob)).read_bytes() == blob
    assert stats.bytes_received == body.total_size() and stats.bad_chunks == 0
    assert not list(rig.store.partial_dir.iterdir())
    assert any(k == "fetch-started" for k, _ in rig.events)


def test_only_missing_files_are_fetched(rig_factory, tmp_path):
    """A store that already holds every file but one asks for that one only."""
    blob = os.urandom(1 << 20)
    rig = rig_factory()
    body, _msha, _size = rig.add(_bundle(tmp_path, blob))
    for _name, data in FILES.items():
        rig.store.add_object_bytes(data)
    rig.start()
    missing = rig.store.missing_files(body)
    assert list(missing) == [_sha(blob)]
    stats = rig.fetcher.fetch_files(_ref(body), missing)
    assert stats.bytes_received == len(blob)
    assert rig.ctl.chunks.stats["served_bytes"] == len(blob)


def test_manifest_over_size_limit_refused_before_any_request(rig_factory, tmp_path):
    rig = rig_factory()
    body, msha, size = rig.add(_bundle(tmp_path, b"x" * 100))
    rig.start()
    with pytest.raises(ManifestError, match="max_manifest_bytes"):
        rig.fetcher.fetch_manifest(_ref(body), msha, size, max_bytes=size - 1)
    assert rig.ctl.chunks.stats["requests"] == 0
    assert not list(rig.store.partial_dir.iterdir())
    # A barrier: the same manifest within its limit. Requests travel in order, so a request of the refused
    # fetch would have reached the controller before this one's.
    rig.fetcher.fetch_manifest(_ref(body), msha, size, max_bytes=size)
    assert rig.ctl.chunks.stats["requests"] == 1


def test_interrupted_transfer_resumes_without_refetching_completed_chunks(rig_factory, tmp_path):
    blob = os.urandom(4 << 20)
    rig = rig_factory(rate=2 << 20)  # ~2 s for the blob
    body, _msha, _size = rig.add(_bundle(tmp_path, blob))
    rig.start()
    missing = rig.store.missing_files(body)

    def cancel_half_way():
        deadline = time.time() + 20
        while time.time() < deadline:
            p = [d for k, d in rig.events if k == "fetch-progress"]
            if p and p[-1]["percent"] >= 40:
                break
            time.sleep(0.05)
        rig.fetcher.cancel()

    threading.Thread(target=cancel_half_way, daemon=True).start()
    with pytest.raises(TransferCancelled):
        rig.fetcher.fetch_files(_ref(body), missing)
    first = rig.ctl.chunks.stats["served_bytes"]
    assert rig.store.chunk_map_path(_sha(blob)).exists()
    # A new fetcher (as after a restart) reads the chunk map and asks only for what is missing.
    fresh = Fetcher(rig.session, rig.store, TransferConfig(), prefix=P, device_id="dev1")
    rig.session.subscribe(topics.chunks(P, "dev1"), fresh.on_chunk)
    stats = fresh.fetch_files(_ref(body), rig.store.missing_files(body))
    assert stats.bytes_resumed > 0
    assert stats.bytes_received < len(blob)
    assert rig.store.object_path(_sha(blob)).read_bytes() == blob
    # The server may still answer the window of requests that were in flight at the cancel.
    in_flight = TransferConfig().window * TransferConfig().chunk_bytes
    assert rig.ctl.chunks.stats["served_bytes"] - first <= stats.bytes_received + in_flight


def test_broker_restart_mid_transfer_resumes_and_completes(broker, rig_factory, tmp_path):
    blob = os.urandom(4 << 20)
    rig = rig_factory(rate=3 << 20)
    body, _msha, _size = rig.add(_bundle(tmp_path, blob))
    rig.start()
    result = {}

    def run():
        try:
            result["stats"] = rig.fetcher.fetch_files(_ref(body), rig.store.missing_files(body))
        except Exception as e:  # reported below
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    deadline = time.time() + 20
    while time.time() < deadline and not any(k == "fetch-progress" and d["percent"] >= 30 for k, d in rig.events):
        time.sleep(0.05)
    broker.stop()
    time.sleep(1.0)
    broker.start()
    t.join(60)
    assert "error" not in result, result.get("error")
    assert rig.store.object_path(_sha(blob)).read_bytes() == blob
    assert rig.session.stats["disconnects"] >= 1


def test_rogue_chunk_on_device_topic_detected_and_file_refetched(broker, rig_factory, tmp_path):
    """A publisher that sees the fetch requests answers one first with forged bytes (right metadata,
    right correlation data). The file fails its sha256, is fetched again, and ends up correct."""
    blob = os.urandom(2 << 20)
    rig = rig_factory(rate=2 << 20)  # the real controller answers slowly; the rogue is instant
    body, _msha, _size = rig.add(_bundle(tmp_path, blob))
    rogue = MqttSession(rig.mq, client_id="rogue")
    forged = []

    def on_request(msg):
        req = ChunkRequest.from_json(msg.payload)
        # Forge the last chunk: the rate-limited controller answers it about a second later.
        if req.sha256 != _sha(blob) or forged or req.offset + req.length != len(blob):
            return
        forged.append(req.offset)
        rogue.publish(msg.response_topic, b"\0" * req.length, qos=1, correlation_data=msg.correlation_data,
                      user_properties={"sha256": req.sha256, "offset": str(req.offset), "length": str(req.length),
                                       "total": str(len(blob))})
        # Plus junk the device never asked for, and a wrong-length answer.
        rogue.publish(msg.response_topic, b"junk", qos=1, correlation_data=b"not-a-request",
                      user_properties={"sha256": req.sha256, "offset": "0", "length": "4", "total": "4"})

    rogue.subscribe(topics.all_devices(P, "fetch"), on_request)
    rogue.start()
    try:
        assert rogue.wait_connected(10)
        rig.start()
        stats = rig.fetcher.fetch_files(_ref(body), rig.store.missing_files(body))
    finally:
        rogue.stop()
    assert forged, "the rogue never saw a request"
    assert stats.files_refetched == 1, (stats, forged)
    assert stats.stray_chunks >= 1
    assert rig.store.object_path(_sha(blob)).read_bytes() == blob
    assert any(k == "error" and "sha256" in str(d) for k, d in rig.events)


def test_controller_answers_only_on_the_requesting_devices_topic(rig_factory, tmp_path):
    rig = rig_factory()
    body, msha, _size = rig.add(_bundle(tmp_path, b"secret" * 100))
    rig.start()
    req = ChunkRequest(device_id="dev1", bundle=_ref(body), sha256=msha, offset=0, length=100).to_json()
    got = []
    spy = MqttSession(rig.mq, client_id="spy")
    spy.subscribe(topics.chunks(P, "spy"), got.append)
    spy.start()
    try:
        assert spy.wait_connected(10)
        time.sleep(0.2)
        # On dev1's fetch topic (this test broker has no rules), answer to the spy: refused.
        spy.publish(topics.fetch(P, "dev1"), req, qos=1, response_topic=topics.chunks(P, "spy"),
                    correlation_data=b"x").wait(5)
        # On its own fetch topic, naming dev1 and dev1's chunks topic: refused as well.
        spy.publish(topics.fetch(P, "spy"), req, qos=1, response_topic=topics.chunks(P, "dev1"),
                    correlation_data=b"y").wait(5)
        stats = rig.ctl.chunks.stats
        deadline = time.monotonic() + 10
        while (stats["refused"] < 1 or stats["impersonation"] < 1) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        spy.stop()
    assert got == []
    assert stats["refused"] == 1 and stats["impersonation"] == 1 and stats["served_bytes"] == 0


def test_file_not_in_bundle_is_refused_by_the_controller(rig_factory, tmp_path):
    rig = rig_factory()
    body, _msha, _size = rig.add(_bundle(tmp_path, b"y" * 1000))
    rig.start()
    with pytest.raises(TransportError, match="has no file"):
        rig.fetcher.fetch_files(_ref(body), {"ab" * 32: ("other.bin", 10)})
    assert rig.ctl.chunks.stats["served_bytes"] == 0


def test_no_controller_gives_bounded_timeout(broker, tmp_path):
    mq = MqttConfig(host=broker.host, port=broker.port)
    store = BundleStore(tmp_path / "dev").open()
    s = MqttSession(mq, client_id="lonely")
    f = Fetcher(s, store, TransferConfig(chunk_timeout_s=0.3, max_retries=2), prefix=P, device_id="lonely")
    s.subscribe(topics.chunks(P, "lonely"), f.on_chunk)
    s.start()
    try:
        assert s.wait_connected(10)
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="after 3 attempts"):
            f.fetch_manifest(BundleRef(name="x", version=1), "c" * 64, 100, max_bytes=1 << 20)
        assert time.monotonic() - t0 < 5
    finally:
        s.stop()


def test_corrupt_file_every_time_gives_up_after_bounded_refetches(rig_factory, tmp_path):
    """When the controller's own copy is bad, the device gives up after max_retries re-fetches."""
    blob = os.urandom(100_000)
    rig = rig_factory(transfer=TransferConfig(max_retries=1))
    body, _msha, _size = rig.add(_bundle(tmp_path, blob))
    obj = rig.ctl.store.object_path(_sha(blob))
    obj.write_bytes(b"\1" * len(blob))
    rig.start()
    with pytest.raises(IntegrityError, match="giving up"):
        rig.fetcher.fetch_files(_ref(body), rig.store.missing_files(body))
    assert not rig.store.has_object(_sha(blob))


def test_controller_refuses_a_different_bundle_under_a_stored_name_and_version(rig_factory, tmp_path):
    from fleet.bundle_store import BundleRecordError

    rig = rig_factory()
    first = _bundle(tmp_path, b"one" * 10)
    rig.add(first)
    rig.add(first)  # the same bundle again is fine
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(BundleRecordError, match="higher version"):
        rig.add(_bundle(other, b"two" * 10))
