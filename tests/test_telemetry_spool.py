"""The offline spool: bounded, ordered, honest about drops, tolerant of torn records, survives restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edge_agent.errors import ResourceError
from edge_agent.telemetry.spool import HEAD_FILE, Spool

TOPIC = "edge/v1/devices/d1/telemetry"


def _payload(i: int) -> bytes:
    return json.dumps({"seq": i, "pad": "x" * (i % 7)}).encode()


def _segments(d: Path):
    return sorted(p for p in d.iterdir() if p.name.startswith("seg-"))


def test_messages_come_back_in_order_and_ack_removes_them(tmp_path):
    s = Spool(tmp_path, 100)
    for i in range(10):
        assert s.append(TOPIC, _payload(i), i % 2) == i
    got = s.peek(4)
    assert [m.seq for m in got] == [0, 1, 2, 3]
    assert [m.payload for m in got] == [_payload(i) for i in range(4)]
    assert [m.qos for m in got] == [0, 1, 0, 1] and all(m.topic == TOPIC for m in got)
    assert s.ack(got[-1].seq) == 4
    assert [m.seq for m in s] == list(range(4, 10))
    assert len(s) == 6 and s.dropped == 0


def test_spool_survives_reopen_with_pending_messages_and_acks(tmp_path):
    s = Spool(tmp_path, 100)
    for i in range(6):
        s.append(TOPIC, _payload(i), 0)
    s.ack(1)
    s.close()
    s2 = Spool(tmp_path, 100)
    assert [m.seq for m in s2] == [2, 3, 4, 5]
    assert s2.append(TOPIC, _payload(6), 0) == 6  # sequence numbers keep increasing
    s2.close()
    assert [m.payload for m in Spool(tmp_path, 100)] == [_payload(i) for i in range(2, 7)]


def test_full_spool_drops_oldest_first_and_counts_them_across_restarts(tmp_path):
    s = Spool(tmp_path, 5)
    for i in range(12):
        s.append(TOPIC, _payload(i), 0)
    assert len(s) == 5
    assert [m.seq for m in s] == [7, 8, 9, 10, 11]
    assert s.dropped == 7
    s.close()
    s2 = Spool(tmp_path, 5)
    assert s2.dropped == 7
    assert [m.payload for m in s2] == [_payload(i) for i in range(7, 12)]


def test_byte_bound_drops_oldest(tmp_path):
    s = Spool(tmp_path, 1000, max_bytes=1000)
    for _ in range(20):
        s.append(TOPIC, b"y" * 100, 0)
    assert s.bytes <= 1000
    kept = [m.seq for m in s]
    assert kept == list(range(20 - len(kept), 20)) and len(kept) >= 5
    assert s.dropped == 20 - len(kept)
    assert s.append(TOPIC, b"z" * 5000, 0) == -1  # alone over the bound: dropped and counted, others kept
    assert s.dropped == 21 - len(kept) and [m.seq for m in s] == kept


def test_torn_last_record_is_skipped_and_trimmed(tmp_path):
    s = Spool(tmp_path, 100)
    for i in range(3):
        s.append(TOPIC, _payload(i), 1)
    s.close()
    seg = _segments(tmp_path)[-1]
    whole = seg.read_bytes()
    with open(seg, "ab") as f:  # a crash in the middle of a write: header and half a body
        f.write(whole[: len(whole) // 3 + 30])
    s2 = Spool(tmp_path, 100)
    assert [m.seq for m in s2] == [0, 1, 2]
    assert s2.corrupt == 1
    assert seg.stat().st_size == len(whole)  # the torn bytes are cut off
    s2.append(TOPIC, _payload(3), 1)
    s2.close()
    assert [m.payload for m in Spool(tmp_path, 100)] == [_payload(i) for i in range(4)]


def test_corrupt_record_in_an_older_segment_skips_only_that_segment_rest(tmp_path):
    s = Spool(tmp_path, 1000, segment_bytes=400)
    for i in range(30):
        s.append(TOPIC, _payload(i), 0)
    s.close()
    segs = _segments(tmp_path)
    assert len(segs) >= 3
    first = bytearray(segs[0].read_bytes())
    first[-3] ^= 0xFF  # flip a byte in the last record of the oldest segment
    segs[0].write_bytes(bytes(first))
    s2 = Spool(tmp_path, 1000)
    seqs = [m.seq for m in s2]
    assert s2.corrupt == 1
    assert seqs == sorted(seqs) and seqs[-1] == 29
    assert len(seqs) == 29  # exactly the damaged record is missing
    assert all(m.payload == _payload(m.seq) for m in s2)


def test_acked_segments_are_deleted(tmp_path):
    s = Spool(tmp_path, 1000, segment_bytes=300)
    for i in range(40):
        s.append(TOPIC, _payload(i), 0)
    assert len(_segments(tmp_path)) > 3
    s.ack(39)
    assert len(s) == 0
    assert len(_segments(tmp_path)) <= 1  # only the segment still open for appends
    s.close()
    s2 = Spool(tmp_path, 1000)
    assert len(s2) == 0 and s2.append(TOPIC, b"a", 0) == 40


def test_unreadable_head_file_resends_rather_than_loses(tmp_path):
    s = Spool(tmp_path, 100)
    for i in range(4):
        s.append(TOPIC, _payload(i), 0)
    s.ack(1)
    s.close()
    (tmp_path / HEAD_FILE).write_text("{not json")
    assert [m.seq for m in Spool(tmp_path, 100)] == [0, 1, 2, 3]


def test_spool_dir_that_cannot_be_created_is_a_resource_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ResourceError, match="cannot open the telemetry spool"):
        Spool(blocker / "spool", 10)
    assert blocker.read_text() == "x"


def test_kill_9_while_appending_leaves_a_readable_ordered_prefix(tmp_path):
    src = Path(__file__).resolve().parents[1]
    code = textwrap.dedent("""
        import json, sys
        sys.path.insert(0, %r)
        from edge_agent.telemetry.spool import Spool
        s = Spool(sys.argv[1], 100000)
        i = 0
        while True:
            s.append("t", json.dumps({"i": i, "pad": "p" * (i %% 50)}).encode(), 1)
            i += 1
    """ % str(src))
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            segs = _segments(tmp_path) if tmp_path.exists() else []
            if sum(p.stat().st_size for p in segs) > 40000:
                break
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    s = Spool(tmp_path, 100000)
    msgs = list(s)
    assert len(msgs) > 100
    assert [m.seq for m in msgs] == list(range(len(msgs)))
    assert [json.loads(m.payload)["i"] for m in msgs] == list(range(len(msgs)))
    s.append("t", b"after", 1)  # still appendable after the crash
    assert list(s)[-1].payload == b"after"


def test_spool_matches_a_simple_model_under_random_operations(tmp_path_factory):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    ops = st.lists(st.one_of(
        st.tuples(st.just("append"), st.integers(0, 300)),
        st.tuples(st.just("ack"), st.integers(0, 8)),
        st.tuples(st.just("reopen"), st.just(0)),
        st.tuples(st.just("tear"), st.integers(1, 40)),
    ), max_size=60)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(ops)
    def run(seq_ops):
        d = tmp_path_factory.mktemp("model")
        max_messages, max_bytes = 7, 2000
        s = Spool(d, max_messages, max_bytes=max_bytes, segment_bytes=300, fsync=False)
        model = []  # (seq, payload)
        dropped = 0
        next_seq = 0
        for op, arg in seq_ops:
            if op == "append":
                payload = bytes([next_seq % 251]) * arg
                rec = 24 + 3 + len(TOPIC) + len(payload)
                got = s.append(TOPIC, payload, 1)
                if rec > max_bytes:
                    assert got == -1
                    dropped += 1
                    continue
                assert got == next_seq
                model.append((next_seq, payload, rec))
                next_seq += 1
                while len(model) > max_messages or sum(r for _, _, r in model) > max_bytes:
                    model.pop(0)
                    dropped += 1
            elif op == "ack":
                if model:
                    upto = model[min(arg, len(model) - 1)][0]
                    s.ack(upto)
                    model = [m for m in model if m[0] > upto]
            elif op == "reopen":
                s.close()
                s = Spool(d, max_messages, max_bytes=max_bytes, segment_bytes=300, fsync=False)
            elif op == "tear":
                # a crash mid-append: garbage after the last complete record
                s.close()
                segs = _segments(d)
                if segs:
                    with open(segs[-1], "ab") as f:
                        f.write(b"ESP1" + bytes(arg))
                s = Spool(d, max_messages, max_bytes=max_bytes, segment_bytes=300, fsync=False)
            assert [(m.seq, m.payload) for m in s] == [(q, p) for q, p, _ in model]
            assert s.dropped == dropped
        s.close()

    run()


def _failing_fsync_dir(real, fail):
    """fsync_dir that raises EIO while fail[0] is set (a dying disk cannot be made on demand here)."""

    def fsync_dir(path):
        if fail[0]:
            raise OSError(5, "Input/output error")
        real(path)

    return fsync_dir


def test_new_segment_whose_directory_entry_cannot_be_synced_fails_the_append_then_recovers(tmp_path, monkeypatch):
    import edge_agent.telemetry.spool as spool_mod

    fail = [False]
    monkeypatch.setattr(spool_mod, "fsync_dir", _failing_fsync_dir(spool_mod.fsync_dir, fail))
    s = Spool(tmp_path / "spool", 100, segment_bytes=200)
    assert s.append(TOPIC, _payload(0), 1) == 0
    fail[0] = True
    with pytest.raises(ResourceError, match="cannot write to the telemetry spool"):
        for i in range(1, 20):  # the first append that opens a second segment
            s.append(TOPIC, _payload(i), 1)
    kept = len(s)
    assert kept >= 2
    fail[0] = False
    seq = s.append(TOPIC, b"after", 1)  # reuses the segment, syncing its entry this time
    assert [m.seq for m in s.peek(100)] == [*range(kept), seq]
    s.close()
    again = Spool(tmp_path / "spool", 100, segment_bytes=200)
    assert [m.payload for m in again.peek(100)][-1] == b"after" and len(again) == kept + 1


def test_head_that_cannot_be_synced_is_counted_and_logged_not_fatal(tmp_path, monkeypatch, caplog):
    import edge_agent.telemetry.spool as spool_mod

    fail = [False]
    monkeypatch.setattr(spool_mod, "fsync_dir", _failing_fsync_dir(spool_mod.fsync_dir, fail))
    s = Spool(tmp_path / "spool", 2)
    for i in range(2):
        s.append(TOPIC, _payload(i), 1)
    fail[0] = True
    with caplog.at_level("DEBUG", logger="edge_agent.telemetry.spool"):
        assert s.append(TOPIC, _payload(2), 1) == 2  # drops the oldest: head.json rewritten and synced
        assert s.append(TOPIC, _payload(3), 1) == 3
    assert [m.seq for m in s.peek(10)] == [2, 3] and s.dropped == 2
    assert s.summary()["head_write_failures"] == 2
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "cannot update" in r.getMessage()]
    assert len(warnings) == 1  # once per streak, not once per message
    fail[0] = False
    assert s.ack(2) == 1  # writes head.json again
    s.close()
    assert json.loads((tmp_path / "spool" / HEAD_FILE).read_text()) == {"head": 3, "dropped": 2}
