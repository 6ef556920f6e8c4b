"""Resource faults: the store out of space (a configured quota, a small filesystem full before the pull
and one that fills up in the middle of it), broken engine cache entries, and a broken jtop install.

Out of space, the new bundle is refused cleanly: the agent keeps running, `state.json` is valid with
the old bundle active and nothing pending, no partial file is left behind, and the old bundle keeps
answering inferences through the HTTP API. The small-filesystem tests mount a real tmpfs (root only).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import MIB, REPO, FleetRig, build_sample_bundle
from mqtt_broker import free_port

HELDOUT = Path(__file__).resolve().parents[1] / "samples" / "digits" / "heldout.npz"


# ------------------------------------------------------------------------------------------ helpers


def _npy_item() -> bytes:
    with np.load(str(HELDOUT)) as z:
        x = z["x"][0].astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


class SpaceRig:
    """`fleet serve` + one agent process with the HTTP API on, over a real broker."""

    def __init__(self, broker, tmp: Path, *, extra: str = "", rate: int = 0) -> None:
        self.tmp = tmp
        self.rig = FleetRig(broker, tmp, max_bytes_per_s=rate or None)
        self.key = self.rig.release_key
        self.port = free_port()
        self.dev = "dev1"
        self.state_dir = tmp / ("state-" + self.dev)
        cfg = self.rig.agent_config(self.dev, extra=extra)
        text = cfg.read_text().replace("[api]\nenabled = false",
                                       '[api]\nenabled = true\nhost = "127.0.0.1"\nport = %d' % self.port)
        cfg.write_text(text)
        self.pusher = self.rig.pusher()

    def start(self) -> None:
        self.proc = self.rig.start_agent(self.dev)

    def bundle(self, version: int, blob_bytes: int) -> None:
        extra = {"extra/blob.bin": os.urandom(blob_bytes)} if blob_bytes else None
        path = build_sample_bundle(self.tmp / "bundles", self.key, version=version, extra=extra)
        self.pusher.add_bundle(path)

    def deploy(self, version: int) -> None:
        args = self.pusher.deploy_args("digits", version)
        assert self.pusher.send_command(self.dev, args).wait(10)

    def wait_state(self, version: int, states, timeout_s: float = 60) -> dict:
        w = self.rig.watcher

        def done() -> bool:
            d = (w.status.get(self.dev) or {}).get("deploy") or {}
            return d.get("state") in states and (d.get("bundle") or {}).get("version") == version

        w.wait_for(done, timeout_s, "v%d in %s" % (version, states))
        return w.status[self.dev]

    def infer(self) -> dict:
        body = _npy_item()
        req = urllib.request.Request("http://127.0.0.1:%d/v1/infer" % self.port, data=body, method="POST",
                                     headers={"Content-Type": "application/x-npy"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200
            return json.loads(r.read())

    def state(self) -> dict:
        from edge_agent.bundle.store_state import StoreState

        raw = (self.state_dir / "state.json").read_bytes()
        StoreState.model_validate(json.loads(raw))
        return json.loads(raw)

    def check_refused_cleanly(self, reason_re: str) -> None:
        """The refusal the tests expect, and everything that must still hold after it."""
        s = self.wait_state(2, ("failed",))
        assert s["ready"] is True and s["active"]["version"] == 1
        st = self.state()
        assert st["active"]["version"] == 1 and st["pending"] is None and st["deploy"]["state"] == "failed"
        assert re.search(reason_re, st["deploy"]["detail"] or ""), st["deploy"]
        assert not list((self.state_dir / "partial").iterdir()), "partial data left after the refusal"
        for f in (self.state_dir / "objects" / "sha256").iterdir():
            assert hashlib.sha256(f.read_bytes()).hexdigest() == f.name
        assert self.proc.poll() is None, "the agent exited:\n" + self.rig.logs(self.dev)
        out = self.infer()  # the old bundle keeps serving
        assert out["bundle"]["version"] == 1 and out["route"] in ("small", "large")

    def close(self) -> None:
        self.rig.close()


@pytest.fixture
def make_rig(broker, tmp_path):
    made = []

    def make(**kw) -> SpaceRig:
        r = SpaceRig(broker, tmp_path, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def _can_mount() -> str:
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root (run the suite as root, e.g. in CI containers, to cover it)"
    probe = Path("/tmp/.edge-agent-mount-probe-%d" % os.getpid())
    probe.mkdir(exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True,
                           text=True, check=False)
        if r.returncode != 0:
            return "cannot mount a tmpfs here: %s" % r.stderr.strip()
        subprocess.run(["umount", str(probe)], check=False)
        return ""
    finally:
        probe.rmdir()


@pytest.fixture
def small_fs(tmp_path):
    """Mount a 6 MiB tmpfs as the agent's state dir (root only; skipped with the reason otherwise).
    Request it before `make_rig`, so the agent is stopped before the unmount."""
    why = _can_mount()
    if why:
        pytest.skip(why)
    mnt = tmp_path / "state-dev1"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0755", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(mnt)], check=False)  # detach it at least


def _fill(path: Path) -> int:
    """Write zeros until the filesystem is full; returns the bytes written."""
    n = 0
    block = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                n += f.write(block)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                break
    return n


# ------------------------------------------------------------------------------------------ quota


@pytest.mark.mqtt
def test_store_quota_refuses_the_new_bundle_and_the_active_one_keeps_serving(make_rig):
    r = make_rig(extra="[limits]\nstore_quota_bytes = %d" % (3 * MIB))
    r.start()
    r.bundle(1, 0)
    r.deploy(1)
    r.wait_state(1, ("active",))
    assert r.infer()["bundle"]["version"] == 1
    r.bundle(2, 4 * MIB)
    r.deploy(2)
    r.check_refused_cleanly(r"store quota")
    refused = r.rig.watcher.find("dev1", "deploy-failed")
    assert any("store quota" in e["message"] and e["data"]["reason"] == "store quota" for e in refused), refused


# ------------------------------------------------------------------------------------------ small filesystem


@pytest.mark.mqtt
def test_small_filesystem_without_room_refuses_before_fetching(small_fs, make_rig):
    r = make_rig()
    r.start()
    r.bundle(1, 0)
    r.deploy(1)
    r.wait_state(1, ("active",))
    free = os.statvfs(str(small_fs)).f_bavail * os.statvfs(str(small_fs)).f_frsize
    r.bundle(2, free + MIB)
    r.deploy(2)
    r.check_refused_cleanly(r"disk full")
    assert not r.rig.watcher.find("dev1", "fetch-progress")  # refused before a byte was asked for


@pytest.mark.mqtt
def test_filesystem_filling_up_during_the_pull_refuses_cleanly_then_recovers(small_fs, make_rig):
    """Room for the bundle when the pull starts; another process takes it mid-way (ENOSPC on a chunk
    write). The pull fails cleanly, the agent stays up and serving; with room again, it completes."""
    r = make_rig(rate=1 * MIB, extra="[transfer]\nprogress_interval_s = 0.2\nchunk_bytes = 65536")
    r.start()
    r.bundle(1, 0)
    r.deploy(1)
    r.wait_state(1, ("active",))
    r.bundle(2, 2 * MIB)
    r.deploy(2)
    w = r.rig.watcher
    w.wait_for(lambda: any((e.get("bundle") or {}).get("version") == 2 for e in w.find("dev1", "fetch-progress")),
               30, "v2 fetch progress")
    filler = small_fs / "filler.bin"
    _fill(filler)
    try:
        r.check_refused_cleanly(r"No space left|disk full|ENOSPC")
    finally:
        filler.unlink()
    r.deploy(2)  # the operator retries once there is room
    s = r.wait_state(2, ("active",), timeout_s=90)
    assert s["active"]["version"] == 2
    assert r.infer()["bundle"]["version"] == 2


@pytest.mark.mqtt
def test_disk_full_during_a_pull_is_a_deploy_outcome_that_fleet_push_wait_reports(small_fs, make_rig):
    """Before, a pull that hit ENOSPC ended in an event of kind `error`, which `fleet push --wait` does not
    count as an outcome: it waited out its whole timeout. Now the device reports `deploy-failed` with
    reason "disk full", and push prints the failure and exits 1 as soon as it arrives."""
    r = make_rig(rate=1 * MIB, extra="[transfer]\nprogress_interval_s = 0.2\nchunk_bytes = 65536")
    r.start()
    r.bundle(1, 0)
    r.deploy(1)
    r.wait_state(1, ("active",))
    v2 = build_sample_bundle(r.tmp / "bundles", r.key, version=2, extra={"extra/blob.bin": os.urandom(2 * MIB)})
    push = subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", "push", str(v2), "--devices", r.dev, "--config", str(r.rig.fleet_toml),
         "--wait", "120"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(REPO))
    w = r.rig.watcher
    filler = small_fs / "filler.bin"
    try:
        w.wait_for(lambda: any((e.get("bundle") or {}).get("version") == 2 for e in w.find("dev1", "fetch-progress")),
                   30, "v2 fetch progress")
        _fill(filler)
        started = time.monotonic()
        out, _ = push.communicate(timeout=90)
        waited = time.monotonic() - started
    finally:
        if push.poll() is None:
            push.kill()
            push.wait()
        if filler.exists():
            filler.unlink()
    assert push.returncode == 1, out
    assert re.search(r"dev1 +failed: .*(No space left|disk full)", out), out
    assert waited < 90  # an outcome, not the end of --wait
    failed = [e for e in w.find("dev1", "deploy-failed") if (e.get("bundle") or {}).get("version") == 2]
    assert failed and failed[-1]["data"]["reason"] == "disk full", failed
    assert not [e for e in w.find("dev1", "error") if (e.get("bundle") or {}).get("version") == 2]
    r.check_refused_cleanly(r"No space left|disk full|ENOSPC")


# ------------------------------------------------------------------------------------------ engine cache


@pytest.mark.parametrize("damage", ["meta-garbage", "meta-truncated", "meta-directory", "plan-truncated",
                                    "plan-empty", "plan-directory", "tuning-garbage", "tuning-directory"])
def test_damaged_engine_cache_entry_is_rebuilt(trt_double, tmp_path, damage):
    """A cache entry that is garbage, cut short, or a directory where the file should be, is a miss:
    the engine is built again, it serves, and the cache is whole again afterwards."""
    from test_engines_prepare import TRT_CFG, Events, _budget, _build_bundle, _platform

    from edge_agent.engines.prepare import prepare_engines

    bundle_dir, manifest = _build_bundle(tmp_path)
    kw = dict(bundle_dir=bundle_dir, manifest=manifest, cfg=TRT_CFG, cache_dir=tmp_path / "cache",
              budget=_budget(1024), platform=_platform(trt_double.__version__, (7, 2)))
    prepare_engines(emit=Events(), **kw).close()
    kind, how = damage.split("-")
    folder = tmp_path / "cache" / ("tuning" if kind == "tuning" else "engines")
    victims = sorted(folder.glob("*.json" if kind in ("meta", "tuning") else "*.plan"))
    assert victims, "nothing cached to damage in %s" % folder
    for v in victims:
        data = v.read_bytes()
        if how == "directory":
            v.unlink()
            v.mkdir()
            (v / "junk").write_bytes(b"x")
        elif how == "garbage":
            v.write_bytes(os.urandom(len(data)))
        elif how == "truncated":
            v.write_bytes(data[: len(data) // 2])
        else:
            v.write_bytes(b"")
    events = Events()
    models = prepare_engines(emit=events, **kw)
    try:
        if kind != "tuning":
            assert models.sources == {"small": "built", "large": "built"}, events
        out = models.large.infer({"image": np.zeros((2, 1, 8, 8), np.float32)})
        assert out["logits"].shape == (2, 10)
    finally:
        models.close()
    again = prepare_engines(emit=Events(), **kw)
    again.close()
    assert again.sources == {"small": "cache", "large": "cache"}


# ------------------------------------------------------------------------------------------ telemetry


def test_jtop_install_that_raises_on_import_degrades_to_proc(tmp_path, monkeypatch):
    """A broken jetson-stats (its import raises something other than ImportError) must not turn the
    whole reading into nulls: /proc still gives memory and CPU. (Sensor-by-sensor failures are in
    tests/test_telemetry_system.py.)"""
    import sys
    import types

    from test_telemetry_system import _collector, _fake_proc

    class Broken(types.ModuleType):
        def __getattr__(self, name):
            raise RuntimeError("jtop: service version mismatch")

    monkeypatch.setitem(sys.modules, "jtop", Broken("jtop"))
    c = _collector(tmp_path, proc_root=_fake_proc(tmp_path / "proc"))
    out = c.collect()
    assert out["mem_available_mb"] == pytest.approx(6000000 / 1024.0)
    assert out["gpu_util"] is None and out["source"] == "proc"
    c.close()



@pytest.mark.mqtt
def test_disk_completely_full_when_a_command_arrives_refuses_it_and_keeps_serving(small_fs, make_rig):
    """Not even state.json can be rewritten: the command is refused (its sequence number could not be
    made durable, so a replay could not be refused later), the agent stays up, the old state file is
    intact and the active model answers."""
    r = make_rig()
    r.start()
    r.bundle(1, 0)
    r.deploy(1)
    r.wait_state(1, ("active",))
    before = (small_fs / "state.json").read_bytes()
    r.bundle(2, 0)
    filler = small_fs / "filler.bin"
    _fill(filler)
    try:
        r.deploy(2)
        w = r.rig.watcher
        w.wait_for(lambda: any("cannot record command" in e["message"] for e in w.find("dev1", "command-refused")),
                   30, "command refused for lack of space")
        assert (small_fs / "state.json").read_bytes() == before
        assert r.proc.poll() is None, r.rig.logs("dev1")
        assert r.infer()["bundle"]["version"] == 1
    finally:
        filler.unlink()
    r.deploy(2)
    r.wait_state(2, ("active",))
    assert r.infer()["bundle"]["version"] == 2


def test_pull_that_cannot_save_its_progress_closes_every_partial_file(tmp_path, monkeypatch):
    """Disk full while the pull saves its progress: the error reaches the deployer, and no partial
    file of the pull stays open (one failing close must not leak the other files' descriptors)."""
    from edge_agent.bundle.store import BundleStore
    from edge_agent.config import MqttConfig, TransferConfig
    from edge_agent.errors import EdgeAgentError
    from edge_agent.mqtt.session import MqttSession
    from edge_agent.protocol.messages import BundleRef
    from edge_agent.transfer.fetcher import Fetcher, FetchStats

    store = BundleStore(tmp_path / "state").open()
    session = MqttSession(MqttConfig(), client_id="dev1", outgoing_queue=1 << 16)  # never started
    session.connected.set()  # as if connected: requests only queue
    f = Fetcher(session, store, TransferConfig(chunk_bytes=4096), prefix="edge/v1", device_id="dev1")
    targets = [f._target(("%x" % i) * 64, 3 * 4096, "file%d" % i) for i in range(1, 4)]
    calls = []

    def full(*a, **kw):
        calls.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    def stalled(timeout):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a chunk write would

    monkeypatch.setattr(store, "save_chunk_map", full)
    monkeypatch.setattr(f, "_get", stalled)
    for t in targets:
        t.unsaved = 1
    with pytest.raises((OSError, EdgeAgentError)):
        f._run(BundleRef(name="digits", version=2), targets, FetchStats(), progress=False)
    assert calls, "the progress save was not attempted"
    assert [t.fd for t in targets] == [-1, -1, -1], "partial files left open"
    session.stop()


def test_pull_after_a_failed_progress_save_is_not_failed_by_the_old_error(tmp_path, monkeypatch):
    """A background progress save failed (disk full) in an earlier pull; once there is room again the
    next pull runs (before, the stale error failed every later pull until the agent restarted)."""
    from edge_agent.bundle.store import BundleStore
    from edge_agent.config import MqttConfig, TransferConfig
    from edge_agent.mqtt.session import MqttSession
    from edge_agent.protocol.messages import BundleRef
    from edge_agent.transfer.fetcher import Fetcher, FetchStats, TransferCancelled

    store = BundleStore(tmp_path / "state").open()
    session = MqttSession(MqttConfig(), client_id="dev1", outgoing_queue=1 << 16)  # never started
    session.connected.set()  # as if connected: requests only queue
    f = Fetcher(session, store, TransferConfig(chunk_bytes=4096), prefix="edge/v1", device_id="dev1")
    real_save = store.save_chunk_map

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "save_chunk_map", full)
    t = f._target("ab" * 32, 3 * 4096, "file")
    f._open(t)
    try:
        assert f._checkpoints.submit(t.fd, t.sha256, t.cmap.to_json())
        f._checkpoints.wait()
    finally:
        f._close(t, save_map=False)
    assert f._checkpoints.error  # the first pull saw the failure
    monkeypatch.setattr(store, "save_chunk_map", real_save)  # room again

    def nothing_then_cancel(timeout):
        f._cancel.set()  # the operator's shutdown: stop after one pass of the loop

    monkeypatch.setattr(f, "_get", nothing_then_cancel)
    target = f._target("cd" * 32, 3 * 4096, "file2")
    with pytest.raises(TransferCancelled):  # not ResourceError("cannot save download progress")
        f._run(BundleRef(name="digits", version=3), [target], FetchStats(), progress=False)
    assert f._checkpoints.error is None
    session.stop()
