"""System statistics for telemetry: jetson-stats (jtop) on a Jetson, /proc, /sys, psutil and nvidia-smi elsewhere.

On a Jetson whose jtop service is not running, one `tegrastats` line fills GPU load, temperatures and
power (the service-free fallback).

`collect_system()` always returns the same keys (`SYSTEM_KEYS`); a value the machine cannot give is None
(`temperatures_c` is then an empty dict). Nothing here raises: a sensor that fails is logged once and
reported as unknown, a jtop service that is not running means the /proc path is used instead and
jtop is tried again later.

Units (jtop's, per jetson-stats 4.x): `stats['RAM']`/`stats['SWAP']` are fractions, `memory['RAM']`
values are KB, power values are mW, a temperature of -256 means the sensor is offline.
"""

from __future__ import annotations

import logging
import math
import re
import select
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from edge_agent.sysinfo.meminfo import available_bytes, read_meminfo_bytes

logger = logging.getLogger(__name__)

SYSTEM_KEYS = (
    "gpu_util", "cpu_percent", "mem_used_mb", "mem_available_mb", "temperatures_c", "power_mw", "throttled",
    "gpu_mem_used_mb", "gpu_mem_total_mb", "source",
)
#: jtop reports an offline temperature sensor as -256 °C.
JTOP_OFFLINE_TEMP = -256.0
NVIDIA_SMI_QUERY = "utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw"
_PLAUSIBLE_TEMP_C = (-60.0, 200.0)
#: The *_mb keys are MiB (as jtop's and /proc's kB are KiB).
MIB = 1024.0 * 1024.0


def empty_system() -> Dict[str, Any]:
    """The system dict with every value unknown."""
    out: Dict[str, Any] = {k: None for k in SYSTEM_KEYS}
    out["temperatures_c"] = {}
    return out


def _num(v: Any) -> Optional[float]:
    """A finite float, or None for anything else ('OFF', None, NaN, booleans, garbage strings)."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _temp(v: Any) -> Optional[float]:
    t = _num(v)
    if t is None or t <= JTOP_OFFLINE_TEMP or not (_PLAUSIBLE_TEMP_C[0] <= t <= _PLAUSIBLE_TEMP_C[1]):
        return None
    return t


# ------------------------------------------------------------------------------------------------ parsers


def parse_proc_stat_cpu(text: str) -> Optional[tuple]:
    """(busy, total) jiffies from the aggregate `cpu` line of /proc/stat, or None."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            vals = [int(x) for x in fields[1:9] if x.isdigit()]
            if len(vals) < 4:
                return None
            idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
            total = sum(vals)
            return total - idle, total
    return None


def parse_nvidia_smi(text: str) -> Dict[str, Any]:
    """Output of `nvidia-smi --query-gpu=<NVIDIA_SMI_QUERY> --format=csv,noheader,nounits`, one line per GPU.

    Returns gpu_util (mean %), gpu_mem_used_mb / gpu_mem_total_mb (sums, MiB), power_mw (sum; nvidia-smi
    reports W) and temperatures {"gpu0": °C, ...}; '[N/A]' / '[Not Supported]' fields become unknown.
    """
    utils: List[float] = []
    used: List[float] = []
    total: List[float] = []
    power: List[float] = []
    temps: Dict[str, float] = {}
    for i, line in enumerate(ln for ln in text.splitlines() if ln.strip()):
        cols = [c.strip() for c in line.split(",")]
        if len(cols) != 5:
            continue
        u, mu, mt, t, p = (_num(c) for c in cols)
        if u is not None:
            utils.append(u)
        if mu is not None:
            used.append(mu)
        if mt is not None:
            total.append(mt)
        if p is not None:
            power.append(p * 1000.0)
        tc = _temp(t)
        if tc is not None:
            temps["gpu%d" % i] = tc
    return {
        "gpu_util": sum(utils) / len(utils) if utils else None,
        "gpu_mem_used_mb": sum(used) if used else None,
        "gpu_mem_total_mb": sum(total) if total else None,
        "power_mw": sum(power) if power else None,
        "temperatures_c": temps,
    }


_TS_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_TS_GPU = re.compile(r"\bGR3D_FREQ (\d+(?:\.\d+)?)%")
_TS_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_TS_TEMP = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b")
_TS_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?![0-9A-Za-z])")
_TS_TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")


def parse_tegrastats(line: str) -> Dict[str, Any]:
    """One `tegrastats` line (JetPack 4, 5 and 6 spellings) as system keys; missing parts stay None.

    Power is the board input rail (VDD_IN / POM_5V_IN) when there is one, else the sum of the rails
    (as jtop does on AGX Orin); rails are `cur/avg` in mW, with or without the `mW` unit.
    """
    out: Dict[str, Any] = {"temperatures_c": {}}
    m = _TS_CPU.search(line)
    if m:
        loads = [_num(c.split("%")[0]) for c in m.group(1).split(",") if "%" in c]
        loads_ok = [x for x in loads if x is not None]
        out["cpu_percent"] = sum(loads_ok) / len(loads_ok) if loads_ok else None
    m = _TS_GPU.search(line)
    if m:
        out["gpu_util"] = float(m.group(1))
    m = _TS_RAM.search(line)
    if m:
        out["mem_used_mb"] = float(m.group(1))
        out["mem_total_mb"] = float(m.group(2))
    for name, val in _TS_TEMP.findall(line):
        t = _temp(val)
        if t is not None:
            out["temperatures_c"][name] = t
    rails = {name: float(cur) for name, cur, _ in _TS_RAIL.findall(line) if name not in ("RAM", "SWAP", "IRAM")}
    total = next((rails[n] for n in _TS_TOTAL_RAILS if n in rails), None)
    if total is None and rails:
        total = sum(rails.values())
    out["power_mw"] = total
    return out


def _key(obj: Any, key: str) -> Any:
    """`obj[key]` for dicts and jtop's dict-like interfaces (Memory, GPU); None when absent."""
    if obj is None:
        return None
    try:
        return obj[key]
    except (KeyError, IndexError, TypeError):
        return None


def _pairs(obj: Any) -> List[tuple]:
    """(key, value) pairs of a dict or a jtop dict-like interface."""
    if obj is None:
        return []
    if hasattr(obj, "items"):
        return list(obj.items())
    return [(k, obj[k]) for k in list(obj)]


def read_jtop(j: Any) -> Dict[str, Any]:
    """Map a started jtop object's data (jetson-stats 4.x API) to system keys; missing parts stay None.

    Each part is read on its own so one missing property does not lose the others. jtop's `memory`
    and `gpu` are dict-like objects rather than dicts, so only `[key]` and `items()` are used on them.
    """
    out: Dict[str, Any] = {}
    stats: Dict[str, Any] = {}
    try:
        stats = dict(_pairs(j.stats))
    except Exception as e:  # any failure inside jtop: degrade, never raise
        logger.debug("jtop stats unavailable: %s", e)
    cpus = [_num(v) for k, v in stats.items() if isinstance(k, str) and k.startswith("CPU") and k[3:].isdigit()]
    cpus_on = [c for c in cpus if c is not None]  # 'OFF' cores are not part of the mean
    out["cpu_percent"] = sum(cpus_on) / len(cpus_on) if cpus_on else None
    out["gpu_util"] = _num(stats.get("GPU"))
    if out["gpu_util"] is None:
        try:
            loads = [_num(_key(_key(g, "status"), "load")) for _, g in _pairs(j.gpu)]
            loads_ok = [x for x in loads if x is not None]
            out["gpu_util"] = sum(loads_ok) / len(loads_ok) if loads_ok else None
        except Exception as e:
            logger.debug("jtop gpu unavailable: %s", e)
    try:
        ram = _key(j.memory, "RAM")
        used_kb, tot_kb = _num(_key(ram, "used")), _num(_key(ram, "tot"))
        out["mem_used_mb"] = used_kb / 1024.0 if used_kb is not None else None
        if used_kb is not None and tot_kb is not None:
            out["mem_total_mb"] = tot_kb / 1024.0
    except Exception as e:
        logger.debug("jtop memory unavailable: %s", e)
    temps: Dict[str, float] = {}
    throttled: Optional[bool] = None
    try:
        for name, t in sorted(_pairs(j.temperature), key=lambda kv: str(kv[0])):
            if _key(t, "online") is False:
                continue
            val = _temp(_key(t, "temp"))
            if val is None:
                continue
            temps[str(name)] = val
            limit = _num(_key(t, "max"))
            if limit is not None and limit > 0:
                throttled = bool(throttled) or val >= limit
    except Exception as e:
        logger.debug("jtop temperature unavailable: %s", e)
    if not temps:
        for k, v in stats.items():
            if isinstance(k, str) and k.startswith("Temp "):
                val = _temp(v)
                if val is not None:
                    temps[k[5:]] = val
    out["temperatures_c"] = temps
    power: Optional[float] = None
    try:
        pw = j.power
        power = _num(_key(_key(pw, "tot"), "power"))
        for _, rail in _pairs(_key(pw, "rail")):
            # Over-current throttling: a rail drawing at or past its critical current limit (mA).
            curr, crit = _num(_key(rail, "curr")), _num(_key(rail, "crit"))
            if _key(rail, "online") is not False and curr is not None and crit is not None and crit > 0:
                throttled = bool(throttled) or curr >= crit
    except Exception as e:
        logger.debug("jtop power unavailable: %s", e)
    if power is None:
        power = _num(stats.get("Power TOT"))
    out["power_mw"] = power
    out["throttled"] = throttled
    return out


# ---------------------------------------------------------------------------------------------- collector


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
                _fill(out, data)
        if self.use_jtop and "jtop" not in sources and self._tegrastats:
            # A Jetson whose jtop service is missing: tegrastats still has GPU load and power.
            data = self._read_tegrastats()
            if data is not None:
                sources.append("tegrastats")
                mem_total_jtop = data.pop("mem_total_mb", None)
                _fill(out, data)
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
        return read_jtop(j)

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
        try:
            zones = sorted(self._thermal.glob("thermal_zone*"), key=lambda p: _zone_index(p.name))
        except OSError:
            return False
        temps: Dict[str, float] = {}
        throttled: Optional[bool] = None
        for zone in zones:
            try:
                name = (zone / "type").read_text().strip() or zone.name
                t = _temp(int((zone / "temp").read_text().strip()) / 1000.0)
            except (OSError, ValueError) as e:
                self._warn_once("thermal:" + zone.name, "cannot read %s: %s", zone, e)
                continue
            if t is None:
                continue
            key = name if name not in temps else "%s_%d" % (name, _zone_index(zone.name))
            temps[key] = t
            for trip_type in zone.glob("trip_point_*_type"):
                try:
                    if trip_type.read_text().strip() != "passive":
                        continue
                    trip = int((zone / trip_type.name.replace("_type", "_temp")).read_text().strip()) / 1000.0
                except (OSError, ValueError):
                    continue
                if trip > 0:
                    throttled = bool(throttled) or t >= trip
        if not temps:
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
                out["cpu_percent"] = _num(psutil.cpu_percent(interval=None))
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
                        t = _temp(e.current)
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
        _fill(out, data)
        return any(v is not None for v in data.values()) or bool(temps)

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key in self._warned:
            logger.debug(msg, *args)
        else:
            self._warned.add(key)
            logger.warning(msg, *args)


def _fill(out: Dict[str, Any], data: Dict[str, Any]) -> None:
    """Copy known values from `data` into `out` where `out` does not have one yet."""
    for k, v in data.items():
        if k == "temperatures_c":
            for name, t in (v or {}).items():
                out["temperatures_c"].setdefault(name, t)
        elif k in out and out[k] is None and v is not None:
            out[k] = v


def _zone_index(name: str) -> int:
    digits = name[len("thermal_zone"):]
    return int(digits) if digits.isdigit() else 1 << 30


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
