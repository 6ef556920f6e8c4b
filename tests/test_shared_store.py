"""What several controllers share through the PostgreSQL registry, without a broker: the bundle store
(a controller that never saw the push serves the bundle's bytes), command sequence numbers and
rollout leases. Sequence numbers and leases run on both engines."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest
from bundle_helpers import FILES, body_dict, good_members, signed_bytes, write_tar

from edge_agent.signing import PrivateKey
from fleet.bundle_store import BundleRecordError
from fleet.bundle_store_db import CHUNK_BYTES, SharedBundleStore
from fleet.leases import LeaseLost, RolloutLeases
from fleet.registry import Registry


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "fleet.db")
    return request.getfixturevalue("pg_url")


def _bundle(tmp_path, version=3, blob=b""):
    files = dict(FILES)
    if blob:
        files["extra/blob.bin"] = blob
    key = PrivateKey.generate("release")
    raw = signed_bytes(body_dict(files, version=version), [key])
    return write_tar(tmp_path / ("b%d.tar" % version), good_members(raw, files)), files


def test_a_controller_that_never_saw_the_push_serves_the_bundle(tmp_path, pg_url):
    blob = os.urandom(2 * CHUNK_BYTES + 12345)  # three database chunks
    path, files = _bundle(tmp_path, blob=blob)
    pusher_reg, server_reg = Registry(pg_url), Registry(pg_url)
    pusher = SharedBundleStore(tmp_path / "a", pusher_reg)
    _body, msha, size = pusher.add_bundle(path, max_manifest_bytes=1 << 20, max_bundle_bytes=1 << 30)
    server = SharedBundleStore(tmp_path / "b", server_reg)  # another machine: nothing local
    assert server.record("digits", 3)["manifest_sha256"] == msha
    allowed = server.allowed("digits", 3)
    assert allowed[msha] == size and len(allowed) == len(files) + 1
    for data in files.values():
        sha = hashlib.sha256(data).hexdigest()
        assert server.object_path(sha).read_bytes() == data
    assert server.materialized == len(files) + 1
    # A different build under the same version is refused, whichever controller is asked.
    other, _ = _bundle(tmp_path, blob=b"other")  # same name and version, different bytes
    with pytest.raises(BundleRecordError, match="different manifest"):
        SharedBundleStore(tmp_path / "c", server_reg).add_bundle(other, max_manifest_bytes=1 << 20,
                                                                 max_bundle_bytes=1 << 30)
    with pytest.raises(BundleRecordError):
        server.record("digits", 99)
    pusher_reg.close()
    server_reg.close()


def test_a_corrupted_shared_object_is_never_served(tmp_path, pg_url):
    path, _files = _bundle(tmp_path, blob=os.urandom(1000))
    reg = Registry(pg_url)
    SharedBundleStore(tmp_path / "a", reg).add_bundle(path, max_manifest_bytes=1 << 20, max_bundle_bytes=1 << 30)
    sha = reg.read("SELECT sha256 FROM bundle_objects WHERE size = 1000")[0]["sha256"]
    reg.write(lambda tx: tx.execute("UPDATE bundle_chunks SET data = ? WHERE sha256 = ?", (b"x" * 1000, sha)))
    server = SharedBundleStore(tmp_path / "b", reg)
    with pytest.raises(Exception, match="does not match its hash"):
        server.object_path(sha)
    assert not (tmp_path / "b" / "objects" / "sha256" / sha).exists()
    reg.close()


def test_sequence_numbers_strictly_increase_per_device_across_controllers(target):
    regs = [Registry(target) for _ in range(3)]
    got = {r: [] for r in range(3)}

    def allocate(k):
        for _ in range(50):
            got[k].append(regs[k].next_command_seq("dev-1", floor=1000))

    threads = [threading.Thread(target=allocate, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = sorted(s for v in got.values() for s in v)
    assert len(set(every)) == 150 and every == list(range(1000, 1150))
    assert all(v == sorted(v) for v in got.values())
    # A clock floor above the last number moves it up; a lower one never moves it back.
    assert regs[0].next_command_seq("dev-1", floor=5000) == 5000
    assert regs[1].next_command_seq("dev-1", floor=10) == 5001
    for r in regs:
        r.close()


def _rollout_body(rid="r1"):
    return {"rollout_id": rid, "bundle": {"name": "digits", "version": 2}, "mode": "normal", "state": "running",
            "created": 1.0, "updated": 1.0, "reason": "", "waves": [["a"]], "devices": []}


def _age_leases(reg, seconds):
    """Time passes for every lease (on the database's clock, which is what leases compare)."""
    reg.write(lambda tx: tx.execute("UPDATE rollout_leases SET expires_at = expires_at - ?", (seconds,)))


def test_leases_renew_expire_and_fence_the_old_owner(target):
    reg = Registry(target)
    # Controller clocks are not used for leases: b's clock an hour ahead does not let it steal a's lease.
    a = RolloutLeases(reg, "ctl-a", lease_s=10)
    b = RolloutLeases(reg, "ctl-b", lease_s=10, clock=lambda: time.time() + 3600)
    reg.save_rollout(_rollout_body())
    assert b.orphans(["running"]) == ["r1"]
    assert a.acquire("r1") and not b.acquire("r1")
    assert b.orphans(["running"]) == [] and b.holder("r1") == "ctl-a"
    _age_leases(reg, 5)
    assert a.renew(["r1"]) == {"r1"}  # back to 10 s left
    _age_leases(reg, 9)
    assert not b.acquire("r1") and b.holder("r1") == "ctl-a"  # renewed: 1 s left
    _age_leases(reg, 2)
    assert b.holder("r1") is None
    assert b.orphans(["running"]) == ["r1"] and b.acquire("r1")
    # The old owner comes back: it cannot renew, and its saves are refused (no command follows them).
    assert a.renew(["r1"]) == set()
    with pytest.raises(LeaseLost):
        reg.save_rollout(_rollout_body(), [(116.0, "x", None, "stale owner")], owner="ctl-a")
    reg.save_rollout(_rollout_body(), [(116.0, "y", None, "new owner")], owner="ctl-b")
    assert [h["kind"] for h in reg.rollout_history("r1")] == ["y"]
    b.settle("r1")
    _age_leases(reg, 1e9)
    assert a.orphans(["running"]) == [] and a.holder("r1") is None
    # An ended rollout's lease is taken for one operator step only when asked for (settled_too).
    assert not a.acquire("r1") and a.acquire("r1", settled_too=True) and a.holder("r1") == "ctl-a"
    reg.close()


def test_lease_times_are_the_database_clock(target):
    reg = Registry(target)
    a = RolloutLeases(reg, "ctl-a", lease_s=10, clock=lambda: 0.0)  # a controller clock far in the past
    assert a.acquire("r1")
    expires = reg.read("SELECT expires_at FROM rollout_leases")[0]["expires_at"]
    assert abs(expires - (time.time() + 10)) < 5  # the database's now() + lease_s, not the controller's
    reg.close()


def test_inbox_carries_an_operator_request_and_its_answer(target):
    reg = Registry(target)
    owner = RolloutLeases(reg, "ctl-a")
    other = RolloutLeases(reg, "ctl-b")
    item = other.post("r1", "op", {"op": "pause", "args": {}})
    answers = []
    t = threading.Thread(target=lambda: answers.append(other.wait_result(item, 10)))
    t.start()
    [got] = owner.take(["r1"])
    assert got["body"] == {"op": "pause", "args": {}} and owner.take(["r2"]) == []
    owner.done(got["id"], {"result": {"state": "paused"}})
    t.join()
    assert answers == [{"result": {"state": "paused"}}]
    assert owner.take(["r1"]) == [] and reg.read("SELECT COUNT(*) AS n FROM rollout_inbox")[0]["n"] == 0
    reg.close()


# ------------------------------------------------------------------------------ bounded local cache

BLOB = 400_000


def _pushed(tmp_path, pg_url):
    """Three bundles (v3, v4, v5) pushed through one controller; their big objects by version."""
    reg = Registry(pg_url)
    pusher = SharedBundleStore(tmp_path / "pusher", reg)
    blobs = {}
    for v in (3, 4, 5):
        blobs[v] = os.urandom(BLOB)
        path, _ = _bundle(tmp_path, version=v, blob=blobs[v])
        pusher.add_bundle(path, max_manifest_bytes=1 << 20, max_bundle_bytes=1 << 30)
    return reg, {v: (hashlib.sha256(b).hexdigest(), b) for v, b in blobs.items()}


def _cached(store, sha):
    return (store.objects / sha).is_file()


def test_the_local_cache_evicts_the_least_recently_used_object_and_serves_it_again_later(tmp_path, pg_url):
    reg, objs = _pushed(tmp_path, pg_url)
    (x, xb), (y, yb), (z, zb) = objs[3], objs[4], objs[5]
    server = SharedBundleStore(tmp_path / "server", reg, cache_bytes=1_000_000)  # two of them fit
    assert server.read_object(x) == xb and server.read_object(y) == yb
    assert server.read_object(x) == xb  # x used again: y is now the least recently used
    assert server.read_object(z) == zb
    assert not _cached(server, y) and _cached(server, x) and _cached(server, z)
    assert server.evicted == 1 and server.cached_bytes() <= 1_000_000
    # Asked for again: copied again from the database (x, now the oldest, makes room).
    assert server.read_object(y) == yb and server.materialized == 4
    assert not _cached(server, x) and server.evicted == 2
    # A restarted controller finds its copies and keeps the bound (oldest modification goes first).
    again = SharedBundleStore(tmp_path / "server", reg, cache_bytes=BLOB + 1000)
    assert again.cached_bytes() <= BLOB + 1000 and _cached(again, y) and not _cached(again, z)
    reg.close()


def test_an_object_being_served_is_never_evicted(tmp_path, pg_url):
    reg, objs = _pushed(tmp_path, pg_url)
    (x, xb), (y, _), (z, _) = objs[3], objs[4], objs[5]
    server = SharedBundleStore(tmp_path / "server", reg, cache_bytes=1_000_000)
    fd = server.open_object(x)  # x being served (the least recently used from now on)
    server.read_object(y)
    server.read_object(z)  # over the bound: y goes, not x
    assert _cached(server, x) and not _cached(server, y) and _cached(server, z)
    assert os.pread(fd, 100, BLOB - 100) == xb[-100:]
    server.release_object(x, fd)
    server.read_object(y)  # now x, the least recently used and no longer served, goes
    assert not _cached(server, x) and _cached(server, y) and _cached(server, z)
    reg.close()


def test_a_damaged_cached_copy_is_never_served(tmp_path, pg_url):
    reg, objs = _pushed(tmp_path, pg_url)
    x, xb = objs[3]
    server = SharedBundleStore(tmp_path / "server", reg)
    assert server.read_object(x) == xb
    cached = server.objects / x
    st = cached.stat()
    cached.write_bytes(b"\0" * BLOB)  # damaged after it was checked (same size, new mtime)
    os.utime(str(cached), ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert server.read_object(x) == xb and server.corrupt == 1
    # Damage that keeps the metadata is caught by the next process to serve the copy.
    st = cached.stat()
    with open(str(cached), "r+b") as f:
        f.write(b"\xff" * 10)
    os.utime(str(cached), ns=(st.st_atime_ns, st.st_mtime_ns))
    restarted = SharedBundleStore(tmp_path / "server", reg)
    fd = restarted.open_object(x)
    try:
        assert os.pread(fd, 10, 0) == xb[:10] and restarted.corrupt == 1
    finally:
        restarted.release_object(x, fd)
    reg.close()


def test_the_chunk_server_serves_an_object_again_after_its_eviction(tmp_path, pg_url):
    from edge_agent.config import MqttConfig
    from edge_agent.mqtt.packets import Inbound
    from edge_agent.mqtt.session import MqttSession
    from edge_agent.protocol import topics
    from edge_agent.protocol.messages import ChunkRequest
    from fleet.chunk_server import ChunkServer
    from fleet.config import ChunkServerSection

    reg, objs = _pushed(tmp_path, pg_url)
    (x, xb), (y, _), (z, _) = objs[3], objs[4], objs[5]
    store = SharedBundleStore(tmp_path / "server", reg, cache_bytes=1_000_000)
    session = MqttSession(MqttConfig(), client_id="controller", outgoing_queue=1 << 16)
    server = ChunkServer(session, store, prefix="edge/v1", cfg=ChunkServerSection(), entitled=lambda *a: True)

    def fetch(offset):
        req = ChunkRequest(device_id="dev-a", bundle={"name": "digits", "version": 3}, sha256=x, offset=offset,
                           length=4096)
        server.serve(Inbound(topics.fetch("edge/v1", "dev-a"), req.to_json(), 1, False, {},
                             topics.chunks("edge/v1", "dev-a"), b"c"))
        out = session._out.get_nowait()
        assert "error" not in out.user_properties, out.user_properties
        return out.payload

    assert fetch(0) == xb[:4096]
    store.read_object(y)
    store.read_object(z)
    assert _cached(store, x)  # its descriptor is still out: not evicted
    server._close_fds()  # what the worker does when no request is waiting
    store.read_object(y)
    assert not _cached(store, x)
    assert fetch(8192) == xb[8192:12288] and _cached(store, x)  # copied again, served
    server._close_fds()
    reg.close()


def test_live_controllers_are_judged_by_the_database_clock(target):
    reg = Registry(target)
    reg.controller_heartbeat("ctl-a@host:1:ab", "ctl-a", 1.0, {"takeovers": 0})
    reg.controller_heartbeat("ctl-b@host:2:cd", "ctl-b", 1.0, {"takeovers": 1})
    assert [c["client_id"] for c in reg.list_controllers(within_s=30)] == ["ctl-a", "ctl-b"]
    reg.write(lambda tx: tx.execute("UPDATE controllers SET heartbeat = heartbeat - 60 WHERE client_id = 'ctl-a'"))
    assert [c["client_id"] for c in reg.list_controllers(within_s=30)] == ["ctl-b"]
    reg.close()


def test_events_forwarded_to_a_rollout_that_ended_are_dropped_when_it_settles(target):
    reg = Registry(target)
    owner, other = RolloutLeases(reg, "ctl-a"), RolloutLeases(reg, "ctl-b")
    assert owner.acquire("r1")
    other.post("r1", "event", {"kind": "probation-passed"})
    other.post("r2", "event", {"kind": "probation-passed"})
    owner.settle("r1")
    assert [r["rollout_id"] for r in reg.read("SELECT rollout_id FROM rollout_inbox")] == ["r2"]
    reg.close()
