"""A test double of jetson-stats' `jtop` module (4.x API), for machines without a Jetson.

It follows the documented shapes: `jtop(interval)` is a Thread with `start()`, `close()`, `ok()`,
`is_alive()` and the context-manager protocol; `stats` (CPU1..n as % or 'OFF', RAM/SWAP as fractions,
GPU %, 'Temp <name>' °C, 'Power <rail>'/'Power TOT' mW), `memory['RAM']` (KB), `gpu` (by device-tree
name), `temperature` ({online, temp}, -256 when offline; `max`/`crit` only for hwmon sensors, never for the
CPU/GPU/SOC/tj/CV thermal zones: jetson_stats 4.2.12 jtop/core/temperature.py reads those from
/sys/class/thermal without limits) and `power` ({'rail': {...}, 'tot': {...}}, mV/mA/mW).
`memory` and `gpu` behave like jtop's GenericInterface (jtop/core/common.py): indexing, iteration, len,
`in`, keys(), values(), items() and get(). `install(monkeypatch, board)` puts it in `sys.modules['jtop']`.
"""

from __future__ import annotations

import copy
import re
import types
from typing import Any, Dict, Optional, Set


class JtopException(Exception):
    """Raised by the real jtop when the service is unreachable or the connection is lost."""


XAVIER_NX: Dict[str, Any] = {
    "stats": {
        "uptime": 12345.0,
        "CPU1": 12, "CPU2": 8, "CPU3": "OFF", "CPU4": "OFF", "CPU5": 10, "CPU6": 6,
        "RAM": 0.396, "SWAP": 0.0, "EMC": 5, "GPU": 37.0,
        "APE": "OFF", "NVENC": "OFF", "NVDEC": "OFF", "NVJPG": "OFF", "fan": 34.5,
        "Temp AO": 36.5, "Temp AUX": 35.0, "Temp CPU": 37.5, "Temp GPU": 36.0, "Temp thermal": 36.6,
        "Temp Tdiode": -256,
        "Power VDD_CPU_GPU_CV": 1234, "Power VDD_SOC": 1100, "Power TOT": 4567,
        "jetson_clocks": "OFF", "nvp model": "MODE_20W_6CORE",
    },
    "memory": {
        "RAM": {"tot": 7765116, "used": 3076212, "free": 2500000, "buffers": 100000, "cached": 2000000,
                "shared": 120000, "lfb": 512},
        "SWAP": {"tot": 3882544, "used": 0, "cached": 0, "table": {}},
        "EMC": {"online": True, "val": 5, "cur": 1600000, "max": 1866000, "min": 204000},
    },
    "gpu": {
        "gv11b": {
            "type": "integrated",
            "status": {"railgate": False, "tpc_pg_mask": False, "3d_scaling": True, "load": 37.0},
            "freq": {"governor": "nvhost_podgov", "cur": 1109250, "max": 1109250, "min": 114750, "GPC": [1109250]},
        }
    },
    "temperature": {
        "AO": {"online": True, "temp": 36.5},
        "AUX": {"online": True, "temp": 35.0},
        "CPU": {"online": True, "temp": 37.5},
        "GPU": {"online": True, "temp": 36.0},
        "Tdiode": {"online": False, "temp": -256},  # jtop skips PMIC zones by name
        "thermal": {"online": True, "temp": 36.6},
    },
    "power": {
        "rail": {
            "VDD_CPU_GPU_CV": {"online": True, "type": "INA3221", "status": "ok", "volt": 5000, "curr": 246,
                               "power": 1234, "avg": 1200, "warn": 32760, "crit": 32760},
            "VDD_SOC": {"online": True, "type": "INA3221", "status": "ok", "volt": 5000, "curr": 220,
                        "power": 1100, "avg": 1090, "warn": 32760, "crit": 32760},
        },
        "tot": {"online": True, "type": "INA3221", "status": "ok", "name": "VDD_IN", "volt": 5000, "curr": 913,
                "power": 4567, "avg": 4500, "warn": 32760, "crit": 32760},
    },
}

ORIN: Dict[str, Any] = {
    "stats": dict(
        {"uptime": 999.0, "RAM": 0.21, "SWAP": 0.0, "EMC": 3, "GPU": 88.0, "fan": 40.0,
         "Temp CPU": 48.2, "Temp CV0": 46.1, "Temp CV1": 46.0, "Temp CV2": 45.8, "Temp GPU": 50.3,
         "Temp SOC0": 47.0, "Temp SOC1": 46.5, "Temp SOC2": 46.9, "Temp tj": 50.3,
         "Power VDD_GPU_SOC": 9120, "Power VDD_CPU_CV": 2410, "Power VIN_SYS_5V0": 4100,
         "Power TOT": 15630, "jetson_clocks": "ON", "nvp model": "MAXN"},
        **{"CPU%d" % i: 20 + i for i in range(1, 13)},
    ),
    "memory": {
        "RAM": {"tot": 31366340, "used": 6587000, "free": 20000000, "buffers": 200000, "cached": 4500000,
                "shared": 900000, "lfb": 2048},
        "SWAP": {"tot": 15683168, "used": 0, "cached": 0, "table": {}},
    },
    "gpu": {
        "ga10b": {
            "type": "integrated",
            "status": {"railgate": False, "tpc_pg_mask": False, "3d_scaling": True, "load": 88.0},
            "freq": {"governor": "nvhost_podgov", "cur": 1300500, "max": 1300500, "min": 306000, "GPC": [1300500]},
        }
    },
    "temperature": {
        "CPU": {"online": True, "temp": 48.2},
        "CV0": {"online": True, "temp": 46.1},
        "CV1": {"online": True, "temp": 46.0},
        "CV2": {"online": True, "temp": 45.8},
        "GPU": {"online": True, "temp": 50.3},
        "SOC0": {"online": True, "temp": 47.0},
        "SOC1": {"online": True, "temp": 46.5},
        "SOC2": {"online": True, "temp": 46.9},
        "tj": {"online": True, "temp": 50.3},
    },
    "power": {
        "rail": {
            "VDD_GPU_SOC": {"online": True, "type": "INA3221", "status": "ok", "volt": 19984, "curr": 456,
                            "power": 9120, "avg": 8900, "warn": 32760, "crit": 32760},
            "VDD_CPU_CV": {"online": True, "type": "INA3221", "status": "ok", "volt": 19984, "curr": 120,
                           "power": 2410, "avg": 2300, "warn": 32760, "crit": 32760},
            "VIN_SYS_5V0": {"online": True, "type": "INA3221", "status": "ok", "volt": 5000, "curr": 820,
                            "power": 4100, "avg": 4000, "warn": 32760, "crit": 32760},
        },
        "tot": {"online": True, "type": "sum", "status": "ok", "name": "ALL", "volt": 0, "curr": 0,
                "power": 15630, "avg": 15200, "warn": 0, "crit": 0},
    },
}


class _Interface:
    """Like jtop's GenericInterface (`memory`, `gpu`; jetson_stats jtop/core/common.py): indexing, iteration,
    len, `in`, items(), keys(), values() and get() — and nothing else, so code that works on the double does
    not depend on more than jtop gives."""

    def __init__(self, data: Dict[str, Any]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def items(self):
        return self._data.items()

    def keys(self):
        return self._data.keys()

    def values(self):
        return self._data.values()

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._data


#: Names jtop gives the Jetson thermal zones (zone type up to its first '-' or '_'); jetson_stats 4.2.12
#: jtop/core/temperature.py get_virtual_thermal_temperature reads only their `temp`, never a limit.
_THERMAL_ZONE_NAME = re.compile(r"^(AO|AUX|CPU|GPU|CV\d*|SOC\d*|tj|thermal|Tdiode|Tboard|PLL|MCPU|BCPU|Tj)$")


def _check_temperature_shape(temps: Dict[str, Any]) -> None:
    """Refuse a board jtop could not report: `max`/`crit` on a thermal zone (only hwmon sensors have them)."""
    for name, sensor in temps.items():
        extra = set(sensor) - {"online", "temp"}
        if extra and _THERMAL_ZONE_NAME.match(name):
            raise ValueError("jtop reports no %s for thermal zone %r (only hwmon sensors have limits)"
                             % (sorted(extra), name))


class JtopDouble:
    """Controls what the fake `jtop` class does; one per test."""

    def __init__(self, board: Optional[Dict[str, Any]], *, service_active: bool = True) -> None:
        self.board = copy.deepcopy(board) if board is not None else None
        _check_temperature_shape((self.board or {}).get("temperature") or {})
        self.service_active = service_active
        self.failing: Set[str] = set()  # property names that raise on access
        self.started = 0
        self.closed = 0
        self.alive = True
        self.instances: list = []

    def module(self) -> types.ModuleType:
        """A module object exposing `jtop` and `JtopException` like the real package."""
        double = self

        class jtop:  # the real class is lower case
            """The jtop client; reads from `double.board`."""

            def __init__(self, interval: float = 1.0) -> None:
                self.interval = float(interval)
                self._started = False
                double.instances.append(self)

            def start(self) -> None:
                if not double.service_active:
                    raise JtopException(
                        "The jtop.service is not active. Please run:\nsudo systemctl restart jtop.service")
                self._started = True
                double.started += 1

            def close(self) -> None:
                self._started = False
                double.closed += 1

            def is_alive(self) -> bool:
                return self._started and double.alive

            def ok(self, spin: bool = False) -> bool:
                return self.is_alive()

            def __enter__(self):
                self.start()
                return self

            def __exit__(self, *exc) -> None:
                self.close()

            def _get(self, name: str) -> Any:
                if name in double.failing:
                    raise JtopException("Lost connection with jtop server")
                return double.board[name]

            stats = property(lambda self: self._get("stats"))
            memory = property(lambda self: _Interface(self._get("memory")))
            gpu = property(lambda self: _Interface(self._get("gpu")))
            temperature = property(lambda self: self._get("temperature"))
            power = property(lambda self: self._get("power"))

        mod = types.ModuleType("jtop")
        mod.jtop = jtop
        mod.JtopException = JtopException
        return mod

    def install(self, monkeypatch) -> JtopDouble:
        """Make `from jtop import jtop, JtopException` find this double."""
        import sys

        monkeypatch.setitem(sys.modules, "jtop", self.module())
        return self


def hide_jtop(monkeypatch) -> None:
    """Make `import jtop` fail as on a machine without jetson-stats."""
    import sys

    monkeypatch.setitem(sys.modules, "jtop", None)
