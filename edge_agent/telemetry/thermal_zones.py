"""Reading /sys/class/thermal: each zone's temperature and whether it is at a throttling trip point.

This is also where a Jetson's throttling shows: jtop reports the CPU/GPU/SOC/tj zones without any
limit (jetson-stats jtop/core/temperature.py reads only their `temp`), while the kernel exposes each
zone's trip points.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Collection, Dict, Optional, Tuple

from edge_agent.telemetry.system_parsers import (
    THROTTLE_TRIP_TYPES,
    as_temperature,
    jtop_sensor_name,
    thermal_zone_index,
)

#: warn(key, message, *args): log a failing zone once.
WarnFn = Callable[..., None]


def read_zones(root: Path, *, reported: Collection[str], warn: WarnFn) -> Tuple[Dict[str, float], Optional[bool]]:
    """({zone type: °C}, throttled) of every readable zone under `root`. Zones whose jtop name (lower
    case) is in `reported` add no temperature (already reported) but still count for throttling;
    throttled is None when no zone has a throttling trip point. Never raises."""
    try:
        zones = sorted(root.glob("thermal_zone*"), key=lambda p: thermal_zone_index(p.name))
    except OSError:
        return {}, None
    temps: Dict[str, float] = {}
    throttled: Optional[bool] = None
    for zone in zones:
        try:
            name = (zone / "type").read_text().strip() or zone.name
            t = as_temperature(int((zone / "temp").read_text().strip()) / 1000.0)
        except (OSError, ValueError) as e:
            warn("thermal:" + zone.name, "cannot read %s: %s", zone, e)
            continue
        if t is None:
            continue
        if jtop_sensor_name(name).lower() not in reported:
            key = name if name not in temps else "%s_%d" % (name, thermal_zone_index(zone.name))
            temps[key] = t
        zone_throttled = zone_at_trip(zone, t)
        if zone_throttled is not None:
            throttled = bool(throttled) or zone_throttled
    return temps, throttled


def zone_at_trip(zone: Path, temp_c: float) -> Optional[bool]:
    """Whether a thermal zone is at or past one of its throttling trip points; None without any.

    Throttling trips are `passive` (the kernel caps clocks: tegra234 `cpu-sw-throttle`) and `hot`
    (hardware throttling, e.g. Tegra SOCTHERM's throttle trips); `active` trips start a fan and
    `critical` ones shut the board down, neither is throttling.
    """
    result: Optional[bool] = None
    for trip_type in zone.glob("trip_point_*_type"):
        try:
            if trip_type.read_text().strip() not in THROTTLE_TRIP_TYPES:
                continue
            trip = int((zone / trip_type.name.replace("_type", "_temp")).read_text().strip()) / 1000.0
        except (OSError, ValueError):
            continue
        if trip > 0:
            result = bool(result) or temp_c >= trip
    return result
