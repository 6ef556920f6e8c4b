"""The dynamic batcher: max batch, max queue delay, a bounded queue that refuses at once, clean close."""

from __future__ import annotations

import time

import numpy as np
import pytest

from edge_agent.errors import InputError
from edge_agent.runtime.batcher import DynamicBatcher
from edge_agent.runtime.errors import OverloadedError, ServiceClosedError
from tests._runtime_helpers import GatedEngine, digits_models, load_split


@pytest.fixture(scope="module")
def models():
    m = digits_models(max_batch=16)
    yield m
    m.close()


@pytest.fixture(scope="module")
def items():
    x, _ = load_split("heldout")
    return [{"image": x[i]} for i in range(40)]


def _wait(pred, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.002)


def test_batches_never_exceed_max_batch_and_fill_up_to_it(models, items):
    eng = GatedEngine(models.small)
    b = DynamicBatcher(eng, name="small", max_batch=4, max_queue_delay_ms=50, max_queue=64)
    try:
        futs = [b.submit(items[i]) for i in range(11)]
        eng.gate.set()
        results = [f.result(5) for f in futs]
    finally:
        b.close()
    assert max(eng.batches) == 4
    assert all(n <= 4 for n in eng.batches)
    assert sum(eng.batches) == 11
    assert all(r.batch_size <= 4 for r in results)
    # Each item got its own row back: same answer as running it alone.
    alone = models.small.infer({"image": items[7]["image"][None]})["logits"][0]
    np.testing.assert_allclose(results[7].outputs["logits"], alone, rtol=1e-5, atol=1e-6)


def test_a_lone_request_on_an_idle_engine_runs_at_once_whatever_the_delay(models, items):
    """The clock never moves, so a batcher that waited for the queue delay would never run the item
    (the wait would last the whole 60 s delay): it must run because the engine is idle."""
    b = DynamicBatcher(models.small, name="small", max_batch=16, max_queue_delay_ms=60_000, max_queue=8,
                       clock=lambda: 1000.0)
    try:
        r = b.submit(items[0]).result(10)
    finally:
        b.close()
    assert r.batch_size == 1


def test_requests_arriving_while_a_batch_runs_form_the_next_batch(models, items):
    eng = GatedEngine(models.small)
    b = DynamicBatcher(eng, name="small", max_batch=8, max_queue_delay_ms=60_000, max_queue=16,
                       clock=lambda: 1000.0)
    try:
        first = b.submit(items[0])
        assert eng.entered.wait(5)  # the first runs alone at once and holds the engine
        rest = [b.submit(items[i]) for i in range(1, 6)]
        eng.gate.set()
        sizes = [first.result(10).batch_size] + [f.result(10).batch_size for f in rest]
    finally:
        b.close()
    assert eng.batches == [1, 5] and sizes == [1, 5, 5, 5, 5, 5]


def test_inline_a_lone_request_runs_in_the_callers_thread():
    """With inline_when_idle a request on an idle engine runs in the submitting thread (no hand-off)."""
    import threading

    from tests._runtime_helpers import digits_models

    m = digits_models(max_batch=8)
    seen = []

    class Recording:
        inputs, outputs, max_batch = m.small.inputs, m.small.outputs, m.small.max_batch

        def infer(self, feed):
            seen.append(threading.current_thread())
            return m.small.infer(feed)

    x, _ = load_split("heldout")
    b = DynamicBatcher(Recording(), name="small", max_batch=8, max_queue_delay_ms=60_000, max_queue=8,
                       clock=lambda: 1000.0, inline_when_idle=True)
    try:
        t = b.submit({"image": x[0]})
        assert t.done() and t.result(0).batch_size == 1
        assert seen == [threading.current_thread()]
    finally:
        b.close()
        m.close()


def test_while_an_inline_request_runs_the_next_ones_wait_and_run_as_one_batch(models, items):
    """The engine runs one batch at a time: requests arriving while a lone request runs inline are held
    by the worker (still counted in the queue bound) and run together once the engine is free."""
    import threading

    eng = GatedEngine(models.small)
    b = DynamicBatcher(eng, name="small", max_batch=8, max_queue_delay_ms=60_000, max_queue=16,
                       clock=lambda: 1000.0, inline_when_idle=True)
    first = []
    caller = threading.Thread(target=lambda: first.append(b.submit(items[0])))
    try:
        caller.start()
        assert eng.entered.wait(5)  # running inline in the caller's thread, holding the engine
        second, third = b.submit(items[1]), b.submit(items[2])
        assert not second.done()
        _wait(lambda: b._sleeping and not b._queue and b.queue_depth() == 2)  # held, counted
        eng.gate.set()
        caller.join(10)
        sizes = [first[0].result(10).batch_size, second.result(10).batch_size, third.result(10).batch_size]
    finally:
        eng.gate.set()
        b.close()
    assert sizes == [1, 2, 2] and eng.batches == [1, 2]


def test_a_full_batch_does_not_wait_for_the_queue_delay(models, items):
    eng = GatedEngine(models.small)
    b = DynamicBatcher(eng, name="small", max_batch=4, max_queue_delay_ms=10_000, max_queue=8)
    try:
        futs = [b.submit(items[i]) for i in range(4)]
        eng.gate.set()
        t0 = time.monotonic()
        results = [f.result(5) for f in futs]
        assert time.monotonic() - t0 < 2.0  # far below the 10 s delay
    finally:
        b.close()
    assert [r.batch_size for r in results] == [4, 4, 4, 4]


def test_zero_delay_runs_what_is_there(models, items):
    b = DynamicBatcher(models.small, name="small", max_batch=16, max_queue_delay_ms=0, max_queue=8)
    try:
        r = b.submit(items[0]).result(5)
    finally:
        b.close()
    assert r.batch_size == 1
    assert r.latency_ms < 50


def test_full_queue_refuses_at_once_and_counts_it(models, items):
    eng = GatedEngine(models.small)
    b = DynamicBatcher(eng, name="small", max_batch=1, max_queue_delay_ms=0, max_queue=3)
    try:
        running = b.submit(items[0])
        assert eng.entered.wait(5)  # the worker holds one batch in the engine
        queued = [b.submit(items[i]) for i in range(1, 4)]
        assert b.queue_depth() == 3
        t0 = time.monotonic()
        with pytest.raises(OverloadedError, match="queue is full"):
            b.submit(items[4])
        assert time.monotonic() - t0 < 1.0  # refused at once, not after a wait (the gate holds the engine)
        assert b.queue_depth() == 3  # nothing was added
        assert b.total_refused == 1
        eng.gate.set()
        for f in [running, *queued]:
            assert f.result(5).batch_size == 1
        snap = b.snapshot()
        assert snap["refused"] == 1 and snap["items"] == 4
        assert b.submit(items[5]).result(5) is not None  # serving again
    finally:
        eng.gate.set()
        b.close()


def test_close_answers_queued_requests_first_and_refuses_new_ones(models, items):
    """A model swap closes the old batcher: what was already queued is answered, nothing is lost."""
    import threading

    eng = GatedEngine(models.small)
    b = DynamicBatcher(eng, name="small", max_batch=1, max_queue_delay_ms=0, max_queue=8)
    running = b.submit(items[0])
    assert eng.entered.wait(5)
    waiting = [b.submit(items[i]) for i in (1, 2, 3)]
    closer = threading.Thread(target=b.close, kwargs={"timeout_s": 10})
    closer.start()
    _wait(lambda: not b._accepting)
    with pytest.raises(ServiceClosedError):  # closing: no new work is taken
        b.submit(items[4])
    eng.gate.set()
    closer.join(10)
    assert not closer.is_alive()
    assert running.result(5) is not None
    for t in waiting:
        assert t.result(5).outputs["logits"].shape == (10,)
    assert b.snapshot()["items"] == 4


def test_close_without_drain_fails_waiting_requests_with_service_closed(models, items):
    eng = GatedEngine(models.small)
    b = DynamicBatcher(eng, name="small", max_batch=1, max_queue_delay_ms=0, max_queue=8)
    running = b.submit(items[0])
    assert eng.entered.wait(5)
    waiting = b.submit(items[1])
    eng.gate.set()
    b.close(drain=False)
    assert running.result(5) is not None
    # The waiting one either ran before the worker saw the close, or failed cleanly: never hangs.
    try:
        waiting.result(5)
    except ServiceClosedError:
        pass
    with pytest.raises(ServiceClosedError):
        b.submit(items[2])


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on(models, items):
    b = DynamicBatcher(models.small, name="small", max_batch=4, max_queue_delay_ms=0, max_queue=8)
    try:
        bad = b.submit({"image": np.zeros((1, 8, 8), np.float64)})  # wrong dtype: the engine refuses it
        with pytest.raises(InputError, match="dtype float64"):
            bad.result(5)
        assert b.submit(items[0]).result(5).batch_size == 1
        assert b.snapshot()["errors"] == 1
    finally:
        b.close()


def test_latency_is_measured_from_arrival_to_answer(models, items):
    eng = GatedEngine(models.small)
    b = DynamicBatcher(eng, name="small", max_batch=4, max_queue_delay_ms=0, max_queue=8)
    try:
        f = b.submit(items[0])
        time.sleep(0.1)  # held in the engine for 100 ms
        eng.gate.set()
        r = f.result(5)
    finally:
        b.close()
    assert r.latency_ms >= 100
    assert b.snapshot()["latency_samples_ms"].size == 1


def test_chunks_are_split_to_the_max_batch_and_never_overfill_a_batch(models, items):
    eng = GatedEngine(models.small)
    b = DynamicBatcher(eng, name="small", max_batch=4, max_queue_delay_ms=50, max_queue=64)
    x = np.stack([it["image"] for it in items[:10]])
    try:
        single = b.submit(items[0])
        chunk = b.submit_chunk({"image": x})  # 10 items -> pieces of 4, 4, 2
        tail = b.submit(items[1])
        eng.gate.set()
        outs = [f.result(5) for f in chunk]
        assert single.result(5).outputs["logits"].shape == (10,)
        assert tail.result(5) is not None
    finally:
        b.close()
    assert [o.outputs["logits"].shape[0] for o in outs] == [4, 4, 2]
    assert all(n <= 4 for n in eng.batches) and sum(eng.batches) == 12
    got = np.concatenate([o.outputs["logits"] for o in outs])
    np.testing.assert_allclose(got, models.small.infer({"image": x})["logits"], rtol=1e-5, atol=1e-6)


def test_queue_bound_counts_items_and_a_chunk_is_admitted_whole_or_not_at_all(models, items):
    eng = GatedEngine(models.small)
    b = DynamicBatcher(eng, name="small", max_batch=1, max_queue_delay_ms=0, max_queue=6)
    x = np.stack([it["image"] for it in items[:5]])
    try:
        running = b.submit(items[0])
        assert eng.entered.wait(5)
        first = b.submit_chunk({"image": x[:4]})
        assert b.queue_depth() == 4
        with pytest.raises(OverloadedError, match="queue is full"):
            b.submit_chunk({"image": x[:3]})  # 4 + 3 > 6: refused, nothing queued
        assert b.queue_depth() == 4
        last = b.submit_chunk({"image": x[:2]})  # exactly fills the queue
        assert b.queue_depth() == 6
        eng.gate.set()
        for f in [running, *first, *last]:
            assert f.result(5) is not None
        assert b.queue_depth() == 0 and b.total_refused == 1
    finally:
        eng.gate.set()
        b.close()


def test_a_ticket_cancelled_while_queued_never_runs_and_says_so(models, items):
    import concurrent.futures

    eng = GatedEngine(models.small)
    b = DynamicBatcher(eng, name="small", max_batch=1, max_queue_delay_ms=0, max_queue=8)
    try:
        running = b.submit(items[0])
        assert eng.entered.wait(5)  # the worker holds one batch in the engine
        waiting = b.submit(items[1])
        assert waiting.cancel() and waiting.cancelled() and waiting.done()
        with pytest.raises(concurrent.futures.CancelledError):
            waiting.result(5)
        eng.gate.set()
        assert running.result(5).batch_size == 1
        after = b.submit(items[2]).result(5)
        alone = models.small.infer({"image": items[2]["image"][None]})["logits"][0]
        np.testing.assert_allclose(after.outputs["logits"], alone, rtol=1e-5, atol=1e-6)
    finally:
        eng.gate.set()
        b.close()
    assert eng.batches == [1, 1]  # the cancelled entry never reached the engine
    assert b.queue_depth() == 0


def test_result_times_out_without_losing_the_answer_and_a_running_ticket_cannot_be_cancelled(models, items):
    import concurrent.futures

    eng = GatedEngine(models.small)
    b = DynamicBatcher(eng, name="small", max_batch=1, max_queue_delay_ms=0, max_queue=8)
    try:
        running = b.submit(items[0])
        assert eng.entered.wait(5)
        t0 = time.monotonic()
        with pytest.raises(concurrent.futures.TimeoutError):
            running.result(0.05)
        assert 0.04 <= time.monotonic() - t0 < 2.0
        assert not running.cancel() and not running.cancelled() and not running.done()
        eng.gate.set()
        first = running.result(5)
        assert running.done() and running.result(0) is first  # answered once, readable again
    finally:
        eng.gate.set()
        b.close()
