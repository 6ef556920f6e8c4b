"""Pure parsers for system statistics: tool output, /proc text and jtop data in, system keys out.

No I/O happens here: `system_collector` runs the tools (tegrastats, nvidia-smi), reads /proc and /sys,
and talks to jtop, then hands what it got to these functions. Every parser returns the keys of
`SYSTEM_KEYS` it could fill (missing parts stay None) and never raises on malformed input.

Units (jtop's, per jetson-stats 4.x): `stats['RAM']`/`stats['SWAP']` are fractions, `memory['RAM']`
values are KB, power values are mW, a temperature of -256 means the sensor is offline. The *_mb keys
are MiB.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Dict, List, Optional

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


def as_number(v: Any) -> Optional[float]:
    """A finite float, or None for anything else ('OFF', None, NaN, booleans, garbage strings)."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def as_temperature(v: Any) -> Optional[float]:
    """A plausible temperature in °C, or None (offline jtop sensors read -256; garbage is refused)."""
    t = as_number(v)
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
        u, mu, mt, t, p = (as_number(c) for c in cols)
        if u is not None:
            utils.append(u)
        if mu is not None:
            used.append(mu)
        if mt is not None:
            total.append(mt)
        if p is not None:
            power.append(p * 1000.0)
        tc = as_temperature(t)
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
        loads = [as_number(c.split("%")[0]) for c in m.group(1).split(",") if "%" in c]
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
        t = as_temperature(val)
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


def parse_jtop(j: Any) -> Dict[str, Any]:
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
    cpus = [as_number(v) for k, v in stats.items() if isinstance(k, str) and k.startswith("CPU") and k[3:].isdigit()]
    cpus_on = [c for c in cpus if c is not None]  # 'OFF' cores are not part of the mean
    out["cpu_percent"] = sum(cpus_on) / len(cpus_on) if cpus_on else None
    out["gpu_util"] = as_number(stats.get("GPU"))
    if out["gpu_util"] is None:
        try:
            loads = [as_number(_key(_key(g, "status"), "load")) for _, g in _pairs(j.gpu)]
            loads_ok = [x for x in loads if x is not None]
            out["gpu_util"] = sum(loads_ok) / len(loads_ok) if loads_ok else None
        except Exception as e:
            logger.debug("jtop gpu unavailable: %s", e)
    try:
        ram = _key(j.memory, "RAM")
        used_kb, tot_kb = as_number(_key(ram, "used")), as_number(_key(ram, "tot"))
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
            val = as_temperature(_key(t, "temp"))
            if val is None:
                continue
            temps[str(name)] = val
            limit = as_number(_key(t, "max"))
            if limit is not None and limit > 0:
                throttled = bool(throttled) or val >= limit
    except Exception as e:
        logger.debug("jtop temperature unavailable: %s", e)
    if not temps:
        for k, v in stats.items():
            if isinstance(k, str) and k.startswith("Temp "):
                val = as_temperature(v)
                if val is not None:
                    temps[k[5:]] = val
    out["temperatures_c"] = temps
    power: Optional[float] = None
    try:
        pw = j.power
        power = as_number(_key(_key(pw, "tot"), "power"))
        for _, rail in _pairs(_key(pw, "rail")):
            # Over-current throttling: a rail drawing at or past its critical current limit (mA).
            curr, crit = as_number(_key(rail, "curr")), as_number(_key(rail, "crit"))
            if _key(rail, "online") is not False and curr is not None and crit is not None and crit > 0:
                throttled = bool(throttled) or curr >= crit
    except Exception as e:
        logger.debug("jtop power unavailable: %s", e)
    if power is None:
        power = as_number(stats.get("Power TOT"))
    out["power_mw"] = power
    out["throttled"] = throttled
    return out


def fill_missing(out: Dict[str, Any], data: Dict[str, Any]) -> None:
    """Copy known values from `data` into `out` where `out` does not have one yet."""
    for k, v in data.items():
        if k == "temperatures_c":
            for name, t in (v or {}).items():
                out["temperatures_c"].setdefault(name, t)
        elif k in out and out[k] is None and v is not None:
            out[k] = v


#: Trip point types at which the kernel or the hardware throttles (not `active`: a fan; not `critical`:
#: shutdown). Linux Documentation/devicetree/bindings/thermal/thermal-zones.yaml.
THROTTLE_TRIP_TYPES = ("passive", "hot")


def jtop_sensor_name(zone_type: str) -> str:
    """The name jtop gives a thermal zone: its type up to the first `-` (else `_`), as in jetson-stats
    jtop/core/temperature.py `get_virtual_thermal_temperature` (`CPU-therm` -> `CPU`)."""
    return zone_type.split("-", maxsplit=1)[0] if "-" in zone_type else zone_type.split("_", maxsplit=1)[0]


def thermal_zone_index(name: str) -> int:
    """N of a `thermal_zoneN` directory name (names that do not end in a number sort last)."""
    digits = name[len("thermal_zone"):]
    return int(digits) if digits.isdigit() else 1 << 30
