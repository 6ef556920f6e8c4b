"""Collecting system statistics: jetson-stats (jtop) on a Jetson, /proc, /sys, psutil and nvidia-smi elsewhere.

On a Jetson whose jtop service is not running, one `tegrastats` line fills GPU load, temperatures and
power (the service-free fallback).

`collect_system()` always returns the same keys (`SYSTEM_KEYS`); a value the machine cannot give is None
(`temperatures_c` is then an empty dict). Nothing here raises: a sensor that fails is logged once and
reported as unknown, a jtop service that is not running means the /proc path is used instead and
jtop is tried again later.

This module does the I/O (starting jtop, running tegrastats and nvidia-smi with timeouts, reading /proc
and /sys); what the output means is decided by the pure parsers in `system_parsers`.
"""

from __future__ import annotations

import logging
import select
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from edge_agent.sysinfo.meminfo import available_bytes, read_meminfo_bytes
from edge_agent.telemetry.system_parsers import (
    MIB,
    NVIDIA_SMI_QUERY,
    as_number,
    as_temperature,
    empty_system,
    fill_missing,
    parse_jtop,
    parse_nvidia_smi,
    parse_proc_stat_cpu,
    parse_tegrastats,
)
from edge_agent.telemetry.thermal_zones import read_zones

logger = logging.getLogger(__name__)

class SystemCollector:
    """Stateful collector: keeps the jtop connection and the previous /proc/stat sample between calls."""

    def __init__(
        self,
        *,
        use_jtop: bool = True,
        jtop_interval_s: float = 1.0,
        jtop_retry_s: float = 60.0,
        nvidia_smi: Optional[str] = "nvidia-smi",
        nvidia_smi_timeout_s: float = 2.0,
        nvidia_smi_retry_s: float = 300.0,
        tegrastats: Optional[str] = "tegrastats",
        tegrastats_timeout_s: float = 3.0,
        proc_root: Path = Path("/proc"),
        thermal_root: Path = Path("/sys/class/thermal"),
        use_psutil: bool = True,
        cpu_sample_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.use_jtop = use_jtop
        self._jtop_interval_s = jtop_interval_s
        self._jtop_retry_s = jtop_retry_s
        self._jtop: Any = None
        self._jtop_missing = False
        self._jtop_retry_at = 0.0
        self._nvidia_smi = nvidia_smi
        self._smi_timeout_s = nvidia_smi_timeout_s
        self._smi_retry_s = nvidia_smi_retry_s
        self._smi_retry_at = 0.0
        self._tegrastats = tegrastats
        self._ts_timeout_s = tegrastats_timeout_s
        self._ts_retry_at = 0.0
        self._proc = Path(proc_root)
        self._thermal = Path(thermal_root)
        self._use_psutil = use_psutil
        self._psutil_primed = False
        self._cpu_sample_s = cpu_sample_s
        self._prev_cpu: Optional[tuple] = None
        self._clock = clock
        self._warned: set = set()
        self._lock = threading.Lock()

    # -- public

    def collect(self) -> Dict[str, Any]:
        """One reading of every system key; never raises."""
        with self._lock:
            out = empty_system()
            sources: List[str] = []
            try:
                self._collect(out, sources)
            except Exception as e:  # belt and braces: a bug in a reader must not stop telemetry
                self._warn_once("collect", "system statistics failed: %s", e)
            out["source"] = "+".join(sources) or None
            return out

    def close(self) -> None:
        """Stop the jtop client thread if one was started."""
        with self._lock:
            self._close_jtop()

    # -- sources

    def _collect(self, out: Dict[str, Any], sources: List[str]) -> None:
        mem_total_jtop: Optional[float] = None
        if self.use_jtop:
            data = self._read_jtop()
            if data is not None:
                sources.append("jtop")
                mem_total_jtop = data.pop("mem_total_mb", None)
                fill_missing(out, data)
        if self.use_jtop and "jtop" not in sources and self._tegrastats:
            # A Jetson whose jtop service is missing: tegrastats still has GPU load and power.
            data = self._read_tegrastats()
            if data is not None:
                sources.append("tegrastats")
                mem_total_jtop = data.pop("mem_total_mb", None)
                fill_missing(out, data)
        if self._read_proc(out):
            sources.append("proc")
        if out["mem_available_mb"] is None and mem_total_jtop is not None and out["mem_used_mb"] is not None:
            out["mem_available_mb"] = max(0.0, mem_total_jtop - out["mem_used_mb"])
        if self._read_thermal(out):
            sources.append("sysfs")
        if self._use_psutil and self._read_psutil(out):
            sources.append("psutil")
        if self._nvidia_smi and "jtop" not in sources and self._read_nvidia_smi(out):
            sources.append("nvidia-smi")

    def _read_jtop(self) -> Optional[Dict[str, Any]]:
        j = self._jtop_handle()
        if j is None:
            return None
        try:
            alive = j.is_alive()
        except Exception:
            alive = False
        if not alive:
            self._warn_once("jtop-lost", "jtop connection lost; using /proc until it is back")
            self._close_jtop()
            self._jtop_retry_at = self._clock() + self._jtop_retry_s
            return None
        return parse_jtop(j)

    def _jtop_handle(self) -> Any:
        if self._jtop is not None:
            return self._jtop
        if self._jtop_missing or self._clock() < self._jtop_retry_at:
            return None
        try:
            from jtop import JtopException, jtop
        except ImportError:
            self._jtop_missing = True
            logger.info("jetson-stats (jtop) is not installed; system statistics come from /proc")
            return None
        except Exception as e:  # a broken install (raises at import): /proc still has the rest
            self._jtop_missing = True
            logger.warning("jetson-stats (jtop) is broken (%s: %s); system statistics come from /proc",
                           type(e).__name__, e)
            return None
        j = None
        try:
            j = jtop(interval=self._jtop_interval_s)
            j.start()
        except JtopException as e:
            self._warn_once("jtop-start", "jtop is not available (%s); using /proc, retrying every %.0f s",
                            str(e).splitlines()[0] if str(e) else type(e).__name__, self._jtop_retry_s)
            self._jtop_retry_at = self._clock() + self._jtop_retry_s
            _close_quietly(j)
            return None
        except Exception as e:  # a broken jetson-stats install must not stop the agent either
            self._warn_once("jtop-start", "jtop failed to start (%s: %s); using /proc", type(e).__name__, e)
            self._jtop_retry_at = self._clock() + self._jtop_retry_s
            _close_quietly(j)
            return None
        self._jtop = j
        self._warned.discard("jtop-start")
        self._warned.discard("jtop-lost")
        return j

    def _close_jtop(self) -> None:
        j, self._jtop = self._jtop, None
        _close_quietly(j)

    def _read_proc(self, out: Dict[str, Any]) -> bool:
        got = False
        try:
            mem = read_meminfo_bytes(self._proc / "meminfo")
            total, avail = mem.get("MemTotal"), available_bytes(mem)
            if avail is not None:
                out["mem_available_mb"] = avail / MIB
                got = True
            if out["mem_used_mb"] is None and total is not None and avail is not None:
                out["mem_used_mb"] = max(0, total - avail) / MIB
        except OSError as e:
            self._warn_once("meminfo", "cannot read %s: %s", self._proc / "meminfo", e)
        if out["cpu_percent"] is None:
            pct = self._proc_cpu_percent()
            if pct is not None:
                out["cpu_percent"] = pct
                got = True
        return got

    def _proc_cpu_percent(self) -> Optional[float]:
        try:
            cur = parse_proc_stat_cpu((self._proc / "stat").read_text())
            if cur is None:
                return None
            prev = self._prev_cpu
            if prev is None and self._cpu_sample_s > 0:
                # First reading: a short sample so the first message is not empty.
                time.sleep(self._cpu_sample_s)
                prev, cur = cur, parse_proc_stat_cpu((self._proc / "stat").read_text())
                if cur is None:
                    return None
            self._prev_cpu = cur
            if prev is None or cur[1] <= prev[1]:
                return None
            busy = (cur[0] - prev[0]) / float(cur[1] - prev[1]) * 100.0
            return min(100.0, max(0.0, busy))
        except (OSError, ValueError) as e:
            self._warn_once("stat", "cannot read %s: %s", self._proc / "stat", e)
            return None

    def _read_thermal(self, out: Dict[str, Any]) -> bool:
        """Temperatures of the zones jtop did not report, and throttling from their trip points."""
        reported = {k.lower() for k in out["temperatures_c"]}
        temps, throttled = read_zones(self._thermal, reported=reported, warn=self._warn_once)
        if not temps and throttled is None:
            return False
        for k, v in temps.items():
            out["temperatures_c"].setdefault(k, v)
        if out["throttled"] is None:
            out["throttled"] = throttled
        elif throttled:
            out["throttled"] = True
        return True

    def _read_psutil(self, out: Dict[str, Any]) -> bool:
        need_cpu = out["cpu_percent"] is None
        need_mem = out["mem_available_mb"] is None or out["mem_used_mb"] is None
        need_temp = not out["temperatures_c"]
        if not (need_cpu or need_mem or need_temp):
            return False
        try:
            import psutil
        except ImportError:
            return False
        got = False
        try:
            if need_cpu:
                if not self._psutil_primed:
                    psutil.cpu_percent(interval=None)
                    self._psutil_primed = True
                    time.sleep(self._cpu_sample_s)
                out["cpu_percent"] = as_number(psutil.cpu_percent(interval=None))
                got = got or out["cpu_percent"] is not None
            if need_mem:
                vm = psutil.virtual_memory()
                if out["mem_available_mb"] is None:
                    out["mem_available_mb"] = vm.available / MIB
                if out["mem_used_mb"] is None:
                    out["mem_used_mb"] = (vm.total - vm.available) / MIB
                got = True
            if need_temp and hasattr(psutil, "sensors_temperatures"):
                for chip, entries in (psutil.sensors_temperatures() or {}).items():
                    for i, e in enumerate(entries):
                        t = as_temperature(e.current)
                        if t is not None:
                            out["temperatures_c"]["%s_%s" % (chip, e.label or i)] = t
                            got = True
        except Exception as e:
            self._warn_once("psutil", "psutil failed: %s", e)
        return got

    def _read_tegrastats(self) -> Optional[Dict[str, Any]]:
        if self._clock() < self._ts_retry_at:
            return None
        exe = shutil.which(self._tegrastats or "")
        if exe is None:
            self._ts_retry_at = float("inf")  # not a Jetson (or not installed): never look again
            return None
        try:
            proc = subprocess.Popen([exe, "--interval", "100"], stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        except OSError as e:
            self._warn_once("tegrastats", "cannot run tegrastats: %s", e)
            self._ts_retry_at = self._clock() + self._smi_retry_s
            return None
        line = b""
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], self._ts_timeout_s)
            if ready:
                line = proc.stdout.readline(64 * 1024)
        except (OSError, ValueError) as e:
            self._warn_once("tegrastats", "reading tegrastats failed: %s", e)
        finally:
            proc.kill()
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                logger.debug("tegrastats did not exit after SIGKILL")
            if proc.stdout is not None:
                proc.stdout.close()
        data = parse_tegrastats(line.decode("utf-8", "replace"))
        if not any(v for k, v in data.items() if k != "mem_total_mb"):
            self._warn_once("tegrastats", "tegrastats gave no usable line in %.1f s; not asking again for %.0f s",
                            self._ts_timeout_s, self._smi_retry_s)
            self._ts_retry_at = self._clock() + self._smi_retry_s
            return None
        return data

    def _read_nvidia_smi(self, out: Dict[str, Any]) -> bool:
        if self._clock() < self._smi_retry_at:
            return False
        exe = shutil.which(self._nvidia_smi or "")
        if exe is None:
            self._smi_retry_at = self._clock() + self._smi_retry_s
            return False
        cmd = [exe, "--query-gpu=" + NVIDIA_SMI_QUERY, "--format=csv,noheader,nounits"]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  timeout=self._smi_timeout_s, check=False)
        except subprocess.TimeoutExpired:
            self._warn_once("smi", "nvidia-smi did not answer in %.1f s; not asking again for %.0f s",
                            self._smi_timeout_s, self._smi_retry_s)
            self._smi_retry_at = self._clock() + self._smi_retry_s
            return False
        except OSError as e:
            self._warn_once("smi", "cannot run nvidia-smi: %s", e)
            self._smi_retry_at = self._clock() + self._smi_retry_s
            return False
        if proc.returncode != 0:
            self._warn_once("smi", "nvidia-smi exited with %d", proc.returncode)
            self._smi_retry_at = self._clock() + self._smi_retry_s
            return False
        data = parse_nvidia_smi(proc.stdout.decode("utf-8", "replace"))
        temps = data.pop("temperatures_c")
        for k, v in temps.items():
            out["temperatures_c"].setdefault(k, v)
        fill_missing(out, data)
        return any(v is not None for v in data.values()) or bool(temps)

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key in self._warned:
            logger.debug(msg, *args)
        else:
            self._warned.add(key)
            logger.warning(msg, *args)


def _close_quietly(j: Any) -> None:
    if j is None:
        return
    try:
        j.close()
    except Exception as e:
        logger.debug("closing jtop failed: %s", e)


_collectors: Dict[bool, SystemCollector] = {}
_collectors_lock = threading.Lock()


def collect_system(use_jtop: bool = True) -> Dict[str, Any]:
    """One reading of the system keys from a process-wide collector; never raises."""
    with _collectors_lock:
        c = _collectors.get(use_jtop)
        if c is None:
            c = _collectors[use_jtop] = SystemCollector(use_jtop=use_jtop)
    return c.collect()
