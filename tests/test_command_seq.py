"""Controller command sequence numbers: strictly increasing per device across restarts, crashes and a
second process, with one persisted step per block instead of an fsync per command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import fleet.command_seq as command_seq_mod
from fleet.command_seq import SeqCounter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_wave_of_a_thousand_commands_persists_once(tmp_path, monkeypatch):
    writes = []
    real = command_seq_mod.write_atomic
    monkeypatch.setattr(command_seq_mod, "write_atomic", lambda p, d, **kw: (writes.append(d), real(p, d, **kw)))
    c = SeqCounter(tmp_path / "command-seq.json")
    seqs = [c.next("dev-%04d" % i) for i in range(1000)]
    assert len(writes) == 1 and c.reservations == 1
    assert seqs == sorted(set(seqs))
    # The persisted ceiling is above every number handed out, before any was handed out.
    assert json.loads(writes[0])["ceiling"] > seqs[-1]


def test_seq_strictly_increases_per_device_across_a_restart_with_the_clock_set_back(tmp_path):
    path = tmp_path / "command-seq.json"
    first = SeqCounter(path, block=16)
    before = {d: [first.next(d) for _ in range(10)] for d in ("a", "b", "c")}
    assert first.reservations == 2  # 30 numbers from blocks of 16
    # A restarted controller whose clock jumped back to 1970: it continues above the persisted ceiling.
    again = SeqCounter(path, block=16, clock=lambda: 0.0)
    after = {d: again.next(d) for d in ("a", "b", "c")}
    for d, seqs in before.items():
        assert after[d] > max(seqs)
    assert all(b > a for seq in before.values() for a, b in zip(seq, seq[1:]))


def test_seq_continues_above_numbers_handed_out_before_a_kill_9(tmp_path):
    path = tmp_path / "command-seq.json"
    code = (
        "import sys, time\n"
        "from fleet.command_seq import SeqCounter\n"
        "c = SeqCounter(sys.argv[1], block=50)\n"
        "while True:\n"
        "    print(c.next('dev1'), flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    seen = []
    try:
        while len(seen) < 500:
            seen.append(int(proc.stdout.readline()))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    handed_out = seen + [int(x) for x in proc.stdout.read().split()]
    after = SeqCounter(path, block=50, clock=lambda: 0.0).next("dev1")
    assert after > max(handed_out)


def test_push_and_serve_processes_interleaving_on_one_file_never_go_backwards(tmp_path):
    path = tmp_path / "command-seq.json"
    serve = SeqCounter(path)
    push = SeqCounter(path)
    issued = {"dev1": [], "dev2": []}
    for i in range(20):
        # serve sends to both devices, then a one-shot push sends to one, then serve again ...
        for d, seqs in issued.items():
            seqs.append(serve.next(d))
        issued["dev%d" % (1 + i % 2)].append(push.next("dev%d" % (1 + i % 2)))
    for seqs in issued.values():
        assert all(b > a for a, b in zip(seqs, seqs[1:])), seqs


def test_old_per_device_file_is_continued_above_its_highest_number(tmp_path):
    path = tmp_path / "command-seq.json"
    far = int(time.time() * 1000) + 10**9  # numbers from a clock that ran ahead
    path.write_text(json.dumps({"dev1": far, "dev2": 5}))
    assert SeqCounter(path).next("dev2") > far


def test_unreadable_state_file_falls_back_to_the_clock(tmp_path):
    path = tmp_path / "command-seq.json"
    path.write_text("{not json")
    now_ms = int(time.time() * 1000)
    assert SeqCounter(path).next("dev1") >= now_ms
    assert json.loads(path.read_text())["ceiling"] > now_ms


def test_commands_sent_from_several_threads_leave_in_the_order_of_their_numbers(tmp_path, pg_url):
    """The rollout sender and RPC handlers command one device at once: the device refuses a number
    below one it already took, so the queue to the broker must hold them in number order (shared
    registry counter: each number is a database round trip, plenty of room to interleave)."""
    import threading

    from agent_helpers import write_key

    from edge_agent.protocol.messages import RollbackArgs
    from fleet.config import FleetConfig
    from fleet.controller import Controller

    key = write_key(tmp_path / "keys", "controller")
    cfg = FleetConfig(controller={"state_dir": tmp_path / "state", "key_file": tmp_path / "keys" / "controller.key"},
                      registry={"url": pg_url})
    c = Controller(cfg, key=key, serve_chunks=False, manage_fleet=False)
    try:
        gate = threading.Barrier(3)

        def send():
            gate.wait()
            for _ in range(40):
                c.send_command("dev-1", RollbackArgs(reason="x"))

        threads = [threading.Thread(target=send) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        seqs = []
        while not c.session._out.empty():
            seqs.append(json.loads(c.session._out.get_nowait().payload)["signed"]["seq"])
        assert len(seqs) == 120 and seqs == sorted(set(seqs))
    finally:
        c.stop()
