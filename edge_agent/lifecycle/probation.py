"""Device-side probation: after activating a bundle, watch its health gates and decide pass or fail.

`Probation` is pure logic over the runtime's period stats (the dicts of
`InferenceService.stats_snapshot(reset=True)`, the same ones telemetry is built from) and a clock:

- window: max(config `window_s`, manifest `probation_s`), capped by `max_window_s` when set (test rigs);
  min requests: the larger of both.
- error rate = errors / requests over the window must stay at or under the manifest's `max_error_rate`.
  A breach fails early, before the window ends, once `early_fail_min_requests` requests were seen.
- p99 latency vs the manifest's `p99_latency_slo_ms`: only whole-period p99s are known, so the gate
  takes their median weighted by the answered requests of each period (periods with fewer than
  `p99_min_requests` answers do not count): it fails when most of the traffic was served in periods
  whose p99 broke the SLO. One slow period (a warm-up, a GC pause) does not roll a good model back.
- at the window's end, when every other gate holds, the golden set is re-run (if a re-check is given
  and `golden_recheck` is on); a mismatch fails.

`verdict()` is None while undecided; once decided the verdict never changes.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from edge_agent.bundle.manifest import HealthGates, ManifestBody
from edge_agent.config import ProbationConfig

logger = logging.getLogger(__name__)


class ProbationVerdict(NamedTuple):
    """The outcome: passed or not, a one-line reason, and the figures it was decided on."""

    passed: bool
    reason: str
    measured: Dict[str, Any]


def _count(v: Any) -> int:
    try:
        return max(0, int(v or 0))
    except (TypeError, ValueError):
        return 0


def weighted_median(pairs: List[Tuple[float, int]]) -> Optional[float]:
    """The value below which half of the total weight lies ((value, weight) pairs; None when empty)."""
    pairs = sorted((v, w) for v, w in pairs if w > 0)
    total = sum(w for _, w in pairs)
    if total == 0:
        return None
    acc = 0
    for v, w in pairs:
        acc += w
        if acc * 2 >= total:
            return v
    return pairs[-1][0]


def _golden_outcome(result: Any) -> Tuple[bool, str]:
    """Accept a GoldenReport-like object (.passed, .message), a bool, or a (bool, message) tuple."""
    if isinstance(result, tuple) and len(result) == 2:
        return bool(result[0]), str(result[1])
    if hasattr(result, "passed"):
        return bool(result.passed), str(getattr(result, "message", ""))
    return bool(result), ""


class Probation:
    """Health gates of one activated bundle over its probation window."""

    def __init__(
        self,
        gates: HealthGates,
        cfg: ProbationConfig,
        clock: Callable[[], float] = time.monotonic,
        *,
        golden_recheck: Optional[Callable[[], Any]] = None,
    ) -> None:
        self.window_s = max(float(cfg.window_s), float(gates.probation_s))
        if cfg.max_window_s is not None:
            self.window_s = min(self.window_s, float(cfg.max_window_s))
        self.min_requests = max(cfg.min_requests, gates.min_requests)
        self.max_error_rate = float(gates.max_error_rate)
        self.p99_slo_ms = float(gates.p99_latency_slo_ms) if gates.p99_latency_slo_ms is not None else None
        self._cfg = cfg
        self._clock = clock
        self._golden = golden_recheck if cfg.golden_recheck else None
        self._lock = threading.Lock()
        self.started = clock()
        self.requests = 0
        self.errors = 0
        self.refused = 0
        self._p99s: List[Tuple[float, int]] = []
        self._verdict: Optional[ProbationVerdict] = None

    # ------------------------------------------------------------------------------------------ public

    def observe(self, stats: Optional[Dict[str, Any]]) -> None:
        """Add one period of runtime stats (counts of that period); ignored once decided."""
        if not stats:
            return
        with self._lock:
            if self._verdict is not None:
                return
            req, err, ref = (_count(stats.get(k)) for k in ("requests", "errors", "refused"))
            self.requests += req
            self.errors += err
            self.refused += ref
            p99 = (stats.get("latency_ms") or {}).get("p99")
            answered = max(0, req - err - ref)
            if p99 is not None and answered >= self._cfg.p99_min_requests:
                try:
                    self._p99s.append((float(p99), answered))
                except (TypeError, ValueError):
                    logger.debug("probation: ignoring p99 %r", p99)
            breach = self._error_breach()
            if breach and self.requests >= self._cfg.early_fail_min_requests:
                self._decide(False, breach)

    def verdict(self) -> Optional[ProbationVerdict]:
        """The decision, or None while the window is still open and no gate has failed.

        At the window's end this runs the golden re-check (outside the lock, so `observe()` from the
        telemetry thread is not held up by inference).
        """
        with self._lock:
            if self._verdict is not None:
                return self._verdict
            if self.elapsed_s() < self.window_s:
                return None
            reason = self._error_breach() or self._p99_breach() or self._traffic_shortfall()
            if reason:
                return self._decide(False, reason)
            golden = self._golden
        golden_note = ""
        if golden is not None:
            try:
                ok, msg = _golden_outcome(golden())
            except Exception as e:  # the candidate model crashing on its golden set is a failure
                ok, msg = False, "%s: %s" % (type(e).__name__, e)
            if not ok:
                with self._lock:
                    if self._verdict is None:
                        self._decide(False, "golden re-check failed: %s" % (msg or "outputs differ"))
                    return self._verdict
            golden_note = ", golden re-check passed"
        with self._lock:
            if self._verdict is not None:  # decided by another caller meanwhile
                return self._verdict
            reason = self._error_breach() or self._p99_breach() or self._traffic_shortfall()
            if reason:
                return self._decide(False, reason)
            m = self.measured()
            p99 = m["p99_ms"]
            return self._decide(True, "healthy for %.0f s: %d requests, error rate %s, p99 %s%s" % (
                self.window_s, self.requests, "n/a" if m["error_rate"] is None else "%.4f" % m["error_rate"],
                "n/a" if p99 is None else "%.1f ms" % p99, golden_note))

    def elapsed_s(self) -> float:
        """Seconds since probation started."""
        return max(0.0, self._clock() - self.started)

    def remaining_s(self) -> float:
        """Seconds until the window ends (0 once it has)."""
        return max(0.0, self.window_s - self.elapsed_s())

    def measured(self) -> Dict[str, Any]:
        """The figures so far (JSON-ready)."""
        p99 = weighted_median(self._p99s)
        return {
            "window_s": self.window_s,
            "elapsed_s": round(self.elapsed_s(), 3),
            "requests": self.requests,
            "errors": self.errors,
            "refused": self.refused,
            "error_rate": round(self.errors / self.requests, 6) if self.requests else None,
            "max_error_rate": self.max_error_rate,
            "p99_ms": p99,
            "p99_max_ms": max(v for v, _ in self._p99s) if self._p99s else None,
            "p99_periods": len(self._p99s),
            "p99_slo_ms": self.p99_slo_ms,
            "min_requests": self.min_requests,
        }

    # ------------------------------------------------------------------------------------------ gates

    def _error_breach(self) -> Optional[str]:
        if not self.requests:
            return None
        rate = self.errors / self.requests
        if rate > self.max_error_rate:
            return "error rate %.4f over the gate %s (%d of %d requests failed)" % (
                rate, self.max_error_rate, self.errors, self.requests)
        return None

    def _p99_breach(self) -> Optional[str]:
        if self.p99_slo_ms is None:
            return None
        p99 = weighted_median(self._p99s)
        if p99 is not None and p99 > self.p99_slo_ms:
            return "p99 latency %.1f ms over the SLO %s ms (median of %d periods, worst %.1f ms)" % (
                p99, self.p99_slo_ms, len(self._p99s), max(v for v, _ in self._p99s))
        return None

    def _traffic_shortfall(self) -> Optional[str]:
        if self.requests < self.min_requests:
            return "only %d requests in the %.0f s window; the gate needs %d" % (
                self.requests, self.window_s, self.min_requests)
        return None

    def _decide(self, passed: bool, reason: str) -> ProbationVerdict:
        self._verdict = ProbationVerdict(passed, reason, self.measured())
        (logger.info if passed else logger.warning)("probation %s: %s", "passed" if passed else "failed", reason)
        return self._verdict


def wait_for_verdict(
    probation: Probation,
    *,
    stop: threading.Event,
    poll_s: float = 0.5,
    get_stats: Optional[Callable[[], Optional[Dict[str, Any]]]] = None,
) -> Optional[ProbationVerdict]:
    """Block until `probation` decides (returns the verdict) or `stop` is set (returns None).

    `get_stats`, when given, is polled each time and fed to `observe()`; leave it out when the period
    stats already reach the probation another way (the telemetry publisher's stats listeners), so the
    runtime's counters are not read-and-reset by two consumers.
    """
    while True:
        if get_stats is not None:
            try:
                probation.observe(get_stats())
            except Exception as e:
                logger.warning("probation: reading runtime stats failed: %s", e)
        v = probation.verdict()
        if v is not None:
            return v
        if stop.wait(min(poll_s, max(0.01, probation.remaining_s()))):
            return None


INTERRUPTED = "probation interrupted before its window ended (agent stopping)"


def make_probation_hook(
    cfg: ProbationConfig,
    *,
    stop: threading.Event,
    add_listener: Optional[Callable[[Callable[[Dict[str, Any]], None]], None]] = None,
    remove_listener: Optional[Callable[[Callable[[Dict[str, Any]], None]], None]] = None,
    get_stats: Optional[Callable[[], Optional[Dict[str, Any]]]] = None,
    golden_recheck: Optional[Callable[[Any, ManifestBody], Any]] = None,
    on_verdict: Optional[Callable[[ProbationVerdict], None]] = None,
    poll_s: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
) -> Callable[[Any, ManifestBody], Optional[str]]:
    """The deployer's `Hooks.probation`: `(record, manifest) -> None` when probation passes, else the reason.

    Period stats reach the probation either through `add_listener`/`remove_listener` (the telemetry
    publisher's stats listeners: one reader of the runtime's reset-on-read counters) or by polling
    `get_stats`. `golden_recheck(record, manifest)` re-runs the golden set at the window's end. A stop
    (agent shutting down) before the verdict counts as a failure: an unproven bundle is not committed.
    """

    def hook(record: Any, manifest: ManifestBody) -> Optional[str]:
        recheck = None
        if golden_recheck is not None:
            def recheck():
                return golden_recheck(record, manifest)
        p = Probation(manifest.health, cfg, clock, golden_recheck=recheck)
        logger.info("probation of %s v%s for %.0f s", manifest.name, manifest.version, p.window_s)
        if add_listener is not None:
            add_listener(p.observe)
        try:
            v = wait_for_verdict(p, stop=stop, poll_s=poll_s, get_stats=get_stats)
        finally:
            if remove_listener is not None:
                remove_listener(p.observe)
        if v is None:
            v = ProbationVerdict(False, INTERRUPTED, p.measured())
        if on_verdict is not None:
            try:
                on_verdict(v)
            except Exception as e:
                logger.warning("probation verdict callback failed: %s", e)
        return None if v.passed else v.reason

    return hook
