"""Batch sizing and tuning (pure choosers + the measuring loop) and the engine cache's refusals."""

from __future__ import annotations

import json

import pytest

from edge_agent.engines.cache import EngineCache, EngineKey
from edge_agent.engines.tuner import (
    BatchMeasurement,
    MemoryModel,
    TuneChoice,
    candidate_batches,
    choose_batch,
    format_table,
    max_batch_for_budget,
    measure_batches,
)

MB = 1024 * 1024


def m(batch, p99, ips):
    return BatchMeasurement(batch=batch, p50_ms=p99 / 2, p99_ms=p99, items_per_s=ips)


def test_max_batch_is_largest_where_both_models_fit():
    small, large = MemoryModel(10 * MB, 1 * MB), MemoryModel(100 * MB, 9 * MB)
    # 110 MB fixed + 10 MB per item: 200 MB -> 9 items
    assert max_batch_for_budget([small, large], 200 * MB, limit=64) == 9
    assert max_batch_for_budget([small, large], 119 * MB, limit=64) == 0
    assert max_batch_for_budget([small, large], 10_000 * MB, limit=64) == 64
    # the large model alone would fit 11 at 200 MB: both together must fit
    assert max_batch_for_budget([large], 200 * MB, limit=64) == 11


def test_candidates_are_powers_of_two_and_the_max():
    assert candidate_batches(1) == [1]
    assert candidate_batches(12) == [1, 2, 4, 8, 12]
    assert candidate_batches(16) == [1, 2, 4, 8, 16]


def test_choice_is_highest_throughput_meeting_the_slo():
    table = [m(1, 2.0, 500), m(4, 5.0, 800), m(8, 9.0, 900), m(16, 20.0, 950)]
    c = choose_batch(table, slo_ms=10.0)
    assert (c.batch, c.slo_met) == (8, True)
    assert choose_batch(table, slo_ms=25.0).batch == 16


def test_no_batch_meets_slo_picks_lowest_p99_and_says_so():
    table = [m(1, 12.0, 80), m(2, 15.0, 130)]
    c = choose_batch(table, slo_ms=10.0)
    assert (c.batch, c.slo_met) == (1, False)
    assert "no batch meets" in c.reason


def test_throughput_tie_prefers_smaller_batch():
    assert choose_batch([m(4, 3.0, 1000), m(8, 5.0, 1000)], slo_ms=10).batch == 4


def test_choice_round_trips_through_json_and_prints_a_table():
    c = choose_batch([m(1, 2.0, 500), m(2, 3.0, 700)], slo_ms=10)
    again = TuneChoice.from_dict(json.loads(json.dumps(c.as_dict())))
    assert again == c
    text = format_table(c, "large")
    assert "<- chosen" in text and "choice: batch 2" in text


def test_measuring_loop_times_a_real_engine():
    pytest.importorskip("onnxruntime")
    from edge_agent.engines.ort import OrtEngine
    from edge_agent.selftest import tiny_model_path

    with OrtEngine(tiny_model_path(), max_batch=8) as eng:
        table = measure_batches(eng, [1, 8], iterations=5, memory_at=lambda b: b * 100)
    assert [t.batch for t in table] == [1, 8]
    assert all(t.p50_ms > 0 and t.p99_ms >= t.p50_ms and t.items_per_s > 0 for t in table)
    assert table[1].memory_bytes == 800


# ---------------------------------------------------------------------------------------------- cache


KEY = EngineKey(onnx_sha256="a" * 64, platform_key="trt8.5.2-sm72", precision="fp16", min_batch=1, opt_batch=4,
                max_batch=8)
META = {"trt_version": "8.5.2.2", "compute_capability": "7.2", "l4t": "35.4.1", "device": "Xavier",
        "precision": "fp16", "profile": [1, 4, 8], "onnx_sha256": "a" * 64}


def _stored(tmp_path):
    cache = EngineCache(tmp_path)
    plan = tmp_path / "new.plan"
    plan.write_bytes(b"PLAN" * 100)
    cache.store(KEY, plan, META)
    return cache


def test_cache_hit_needs_every_field_to_match(tmp_path):
    cache = _stored(tmp_path)
    assert cache.lookup(KEY, META) == cache.plan_path(KEY)
    for field_name, other in [("trt_version", "8.6.1.6"), ("compute_capability", "8.7"), ("l4t", "36.3.0"),
                              ("device", "Orin"), ("precision", "fp32"), ("profile", [1, 8, 16])]:
        assert cache.lookup(KEY, dict(META, **{field_name: other})) is None, field_name


def test_key_digest_changes_with_every_part():
    digests = {KEY.digest()}
    for change in [dict(onnx_sha256="b" * 64), dict(platform_key="trt8.6.2-sm87"), dict(precision="int8"),
                   dict(max_batch=16), dict(opt_batch=2), dict(flags=["x"])]:
        digests.add(EngineKey(**dict(KEY.__dict__, **change)).digest())
    assert len(digests) == 7


def test_corrupt_metadata_or_plan_is_a_miss_not_a_crash(tmp_path):
    cache = _stored(tmp_path)
    cache.meta_path(KEY).write_text("{not json")
    assert cache.lookup(KEY, META) is None
    cache = _stored(tmp_path)
    cache.plan_path(KEY).write_bytes(b"PLAN" * 99)  # truncated
    assert cache.lookup(KEY, META) is None
    cache = _stored(tmp_path)
    cache.plan_path(KEY).unlink()
    assert cache.lookup(KEY, META) is None


def test_invalidate_removes_both_files(tmp_path):
    cache = _stored(tmp_path)
    cache.invalidate(KEY)
    assert not cache.plan_path(KEY).exists() and not cache.meta_path(KEY).exists()
    cache.invalidate(KEY)  # twice is fine


def test_unusable_cache_dir_is_a_resource_error(tmp_path):
    from edge_agent.errors import ResourceError

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ResourceError, match="not writable"):
        EngineCache(blocker / "cache")


class _Recorder:
    """An Engine that records the batch of every call (no model behind it)."""

    def __new__(cls):
        import numpy as np

        from edge_agent.engines.base import Engine, TensorSpec

        class Rec(Engine):
            backend = "record"

            def __init__(self):
                super().__init__(inputs=[TensorSpec("x", "float32", (-1, 3))],
                                 outputs=[TensorSpec("y", "float32", (-1, 3))], max_batch=8)
                self.calls = []

            def _infer_impl(self, feed):
                self.calls.append(len(feed["x"]))
                return {"y": np.zeros_like(feed["x"])}

        return Rec()


def test_candidates_are_measured_round_robin_so_a_load_burst_is_shared():
    eng = _Recorder()
    table = measure_batches(eng, [1, 4], iterations=10, warmup=1, rounds=5)
    measured = eng.calls[2:]  # after one warm-up call per batch
    assert len(measured) == 20
    assert measured[:4] == [1, 1, 4, 4] and measured[4:8] == [1, 1, 4, 4]
    assert [t.batch for t in table] == [1, 4]


def test_leftovers_of_a_build_killed_mid_write_are_removed(tmp_path):
    import os
    import time

    EngineCache(tmp_path)
    old = tmp_path / "engines" / ".abc.building.x1.tmp"
    young = tmp_path / "engines" / ".def.building.x2.tmp"
    old.write_bytes(b"half a plan")
    young.write_bytes(b"a build in progress")
    past = time.time() - 2 * 3600
    os.utime(str(old), (past, past))
    EngineCache(tmp_path)
    assert not old.exists() and young.exists()
