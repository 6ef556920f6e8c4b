"""One page of the device registry (`devices.list` with `page`, the console's devices table) on SQLite and
on PostgreSQL: the same rows, order, totals, filters and refusals on both."""

from __future__ import annotations

import time

import pytest

from fleet.device_query import fleet_summary, page_devices
from fleet.registry import Registry
from fleet.rollouts.states import RolloutError


def _fill(reg: Registry, n: int) -> None:
    now = time.time()
    for i in range(n):
        reg.record_status({"device_id": "Dev_%02d" % i if i % 10 == 0 else "dev-%02d" % i, "ts": now + i,
                           "online": i % 4 != 0, "agent_version": "0.1.0",
                           "active": {"name": "digits", "version": 1 + i % 2} if i % 5 else None,
                           "previous": None, "deploy": {"state": "active" if i % 5 else "idle"}, "ready": True},
                          now=now + i)
    reg.record_telemetry([("dev-%02d" % i, now, {"p99_ms": 5.0}, "ok" if i % 3 else "unhealthy")
                          for i in range(n) if i % 10], now=now + n)


@pytest.fixture(params=["sqlite", "postgresql"])
def reg(request, tmp_path):
    if request.param == "sqlite":
        r = Registry(tmp_path / "r.sqlite")
    else:
        r = Registry(request.getfixturevalue("pg_url"))
    _fill(r, 30)
    yield r
    r.close()


def ids(page):
    return [d["device_id"] for d in page["devices"]]


def test_pages_cover_every_device_once_in_order(reg):
    seen = []
    for off in range(0, 30, 7):
        p = page_devices(reg, {"sort": "device_id", "order": "asc", "offset": off, "limit": 7})
        assert p["total"] == 30
        seen += ids(p)
    assert len(seen) == 30 and seen == sorted(seen)


def test_sort_keys_and_nulls_last(reg):
    p = page_devices(reg, {"sort": "last_seen", "order": "desc", "limit": 3})
    assert ids(p) == ["dev-29", "dev-28", "dev-27"]
    for order in ("asc", "desc"):
        p = page_devices(reg, {"sort": "bundle", "order": order, "limit": 30})
        bundles = [d["active"] for d in p["devices"]]
        assert bundles[-6:] == [None] * 6  # devices without a bundle come last either way


def test_filters(reg):
    assert page_devices(reg, {"q": "dev_", "limit": 50})["total"] == 3  # _ is literal, case-insensitive
    assert page_devices(reg, {"q": "DEV-2", "limit": 50})["total"] == 9
    assert page_devices(reg, {"online": False, "limit": 50})["total"] == 8
    assert page_devices(reg, {"health": "unhealthy", "limit": 50})["total"] == 9
    assert page_devices(reg, {"health": "unknown", "limit": 50})["total"] == 3
    assert page_devices(reg, {"bundle": "digits", "version": 2, "limit": 50})["total"] == 12
    assert page_devices(reg, {"state": "idle", "limit": 50})["total"] == 6
    s = fleet_summary(reg)
    assert s["devices"] == 30 and s["online"] == {"0": 8, "1": 22}
    assert sum(b["devices"] for b in s["bundles"]) == 30


@pytest.mark.parametrize("bad", [{"sort": "telemetry"}, {"order": "sideways"}, {"limit": 0}, {"limit": 501},
                                 {"offset": -1}, {"limit": True}, {"q": 5}, {"version": "2"}, {"q": "x" * 65}])
def test_refusals(reg, bad):
    with pytest.raises(RolloutError):
        page_devices(reg, dict({"limit": 10}, **bad))
