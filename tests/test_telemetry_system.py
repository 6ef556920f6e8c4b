"""System statistics: jtop shapes of Xavier NX and Orin, fallbacks, and sensors that fail."""

from __future__ import annotations

import os
import time

import pytest
from jtop_double import ORIN, XAVIER_NX, JtopDouble, hide_jtop

from edge_agent.telemetry.system_collector import SystemCollector, collect_system
from edge_agent.telemetry.system_parsers import SYSTEM_KEYS, parse_nvidia_smi, parse_tegrastats


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _collector(tmp_path, **kw) -> SystemCollector:
    (tmp_path / "thermal").mkdir(exist_ok=True)
    kw.setdefault("thermal_root", tmp_path / "thermal")
    kw.setdefault("use_psutil", False)
    kw.setdefault("nvidia_smi", None)
    kw.setdefault("cpu_sample_s", 0.0)
    return SystemCollector(**kw)


def _fake_proc(root, *, total_kb=8000000, avail_kb=6000000, stat="cpu  100 0 100 800 0 0 0 0 0 0\n"):
    root.mkdir(exist_ok=True)
    (root / "meminfo").write_text(
        "MemTotal: %d kB\nMemFree: 1000 kB\nMemAvailable: %d kB\nSwapFree: 0 kB\n" % (total_kb, avail_kb))
    (root / "stat").write_text(stat + "cpu0 50 0 50 400 0 0 0 0 0 0\nintr 1 2 3\n")
    return root


def test_xavier_nx_jtop_fields_are_read_in_their_units(tmp_path, monkeypatch):
    JtopDouble(XAVIER_NX).install(monkeypatch)
    proc = _fake_proc(tmp_path / "proc", total_kb=7765116, avail_kb=4000000)
    out = _collector(tmp_path, proc_root=proc).collect()
    assert set(out) == set(SYSTEM_KEYS)
    assert out["source"].startswith("jtop")
    assert out["cpu_percent"] == pytest.approx((12 + 8 + 10 + 6) / 4)  # the two 'OFF' cores are left out
    assert out["gpu_util"] == 37.0
    assert out["mem_used_mb"] == pytest.approx(3076212 / 1024.0)  # memory['RAM'] is KB
    assert out["mem_available_mb"] == pytest.approx(4000000 / 1024.0)  # MemAvailable from /proc
    assert out["power_mw"] == 4567  # power tot, mW
    assert out["temperatures_c"] == {"AO": 36.5, "AUX": 35.0, "CPU": 37.5, "GPU": 36.0, "thermal": 36.6}
    assert "Tdiode" not in out["temperatures_c"]  # offline sensor (-256)
    assert out["throttled"] is False


def test_orin_jtop_fields_are_read(tmp_path, monkeypatch):
    JtopDouble(ORIN).install(monkeypatch)
    out = _collector(tmp_path, proc_root=_fake_proc(tmp_path / "proc")).collect()
    assert out["cpu_percent"] == pytest.approx(sum(20 + i for i in range(1, 13)) / 12)
    assert out["gpu_util"] == 88.0
    assert out["mem_used_mb"] == pytest.approx(6587000 / 1024.0)
    assert out["power_mw"] == 15630
    assert out["temperatures_c"]["tj"] == 50.3 and len(out["temperatures_c"]) == 9
    assert out["throttled"] is False  # 'tot' has crit 0 (no limit) and is not counted as throttling


def test_jtop_hwmon_sensor_at_its_max_reports_throttling(tmp_path, monkeypatch):
    board = dict(XAVIER_NX, temperature=dict(XAVIER_NX["temperature"]))
    # a hwmon sensor (temp<N>_label): the only kind jtop reports with `max`/`crit`
    board["temperature"]["hwmon-sensor"] = {"online": True, "temp": 99.7, "max": 99.5, "crit": 103.5}
    JtopDouble(board).install(monkeypatch)
    out = _collector(tmp_path, proc_root=_fake_proc(tmp_path / "proc")).collect()
    assert out["throttled"] is True


def test_jtop_double_refuses_limits_on_a_thermal_zone():
    board = dict(XAVIER_NX, temperature=dict(XAVIER_NX["temperature"]))
    board["temperature"]["CPU"] = {"online": True, "temp": 99.7, "max": 99.5}
    with pytest.raises(ValueError, match="thermal zone 'CPU'"):
        JtopDouble(board)


def _orin_zones(root, temps_mc, *, cpu_trip_mc=99000):
    """/sys/class/thermal of an Orin (L4T zone types `CPU-therm`...; the CPU zone's trips as tegra234's
    device tree has them: `cpu-sw-throttle` passive, `cpu-sw-shutdown` critical; tj: fan `active` trips)."""
    trips = {"CPU-therm": [("critical", 104500), ("passive", cpu_trip_mc)],
             "tj-therm": [("active", 85000), ("active", 105000)]}
    for i, (typ, mc) in enumerate(temps_mc.items()):
        z = root / ("thermal_zone%d" % i)
        z.mkdir(parents=True, exist_ok=True)
        (z / "type").write_text(typ + "\n")
        (z / "temp").write_text("%d\n" % mc)
        for n, (kind, trip) in enumerate(trips.get(typ, [])):
            (z / ("trip_point_%d_type" % n)).write_text(kind + "\n")
            (z / ("trip_point_%d_temp" % n)).write_text("%d\n" % trip)


def test_orin_with_jtop_reports_throttling_from_the_zone_trip_points(tmp_path, monkeypatch):
    # jtop (strict double: no limits on thermal zones) alone cannot tell; the kernel's trip points can.
    JtopDouble(ORIN).install(monkeypatch)
    root = tmp_path / "thermal"
    _orin_zones(root, {"CPU-therm": 48200, "GPU-therm": 50300, "tj-therm": 90000})
    c = _collector(tmp_path, proc_root=_fake_proc(tmp_path / "proc"), thermal_root=root)
    out = c.collect()
    assert out["source"] == "jtop+proc+sysfs"
    assert out["throttled"] is False  # tj past a fan (active) trip is not throttling
    # one name per sensor: the zones jtop already reported are not added again under their type
    assert sorted(out["temperatures_c"]) == sorted(ORIN["temperature"])
    _orin_zones(root, {"CPU-therm": 99000, "GPU-therm": 50300, "tj-therm": 99000})
    out = c.collect()
    assert out["throttled"] is True  # CPU at its passive (sw-throttle) trip
    assert out["temperatures_c"]["CPU"] == 48.2  # temperatures stay jtop's


def test_hot_trip_counts_as_throttling_and_critical_does_not(tmp_path, monkeypatch):
    hide_jtop(monkeypatch)
    root = tmp_path / "thermal"
    z = root / "thermal_zone0"
    z.mkdir(parents=True)
    (z / "type").write_text("CPU-therm\n")
    (z / "temp").write_text("96000\n")
    (z / "trip_point_0_type").write_text("critical\n")
    (z / "trip_point_0_temp").write_text("95000\n")
    c = _collector(tmp_path, proc_root=_fake_proc(tmp_path / "proc"), thermal_root=root)
    assert c.collect()["throttled"] is None  # a shutdown trip is no throttling limit
    (z / "trip_point_1_type").write_text("hot\n")
    (z / "trip_point_1_temp").write_text("95500\n")
    assert c.collect()["throttled"] is True


def test_jtop_without_memory_uses_proc_for_both_memory_fields(tmp_path, monkeypatch):
    d = JtopDouble(XAVIER_NX).install(monkeypatch)
    d.failing.add("memory")
    out = _collector(tmp_path, proc_root=_fake_proc(tmp_path / "proc", total_kb=8192000, avail_kb=2048000)).collect()
    assert out["mem_used_mb"] == pytest.approx((8192000 - 2048000) / 1024.0)
    assert out["mem_available_mb"] == pytest.approx(2000.0)
    assert out["gpu_util"] == 37.0  # the other jtop parts still come through


def test_jtop_service_not_running_falls_back_and_retries_later(tmp_path, monkeypatch, caplog):
    d = JtopDouble(XAVIER_NX, service_active=False).install(monkeypatch)
    clock = FakeClock()
    c = _collector(tmp_path, proc_root=_fake_proc(tmp_path / "proc"), jtop_retry_s=60.0, clock=clock)
    out = c.collect()
    assert out["source"] == "proc"
    assert out["gpu_util"] is None and out["power_mw"] is None
    assert out["mem_available_mb"] == pytest.approx(6000000 / 1024.0)
    assert "jtop is not available" in caplog.text and "jtop.service is not active" in caplog.text
    tries = len(d.instances)
    c.collect()
    assert len(d.instances) == tries  # not retried before jtop_retry_s
    d.service_active = True
    clock.t += 61
    out = c.collect()
    assert out["source"].startswith("jtop") and out["gpu_util"] == 37.0


def test_jtop_not_installed_falls_back_to_proc(tmp_path, monkeypatch):
    hide_jtop(monkeypatch)
    out = _collector(tmp_path, proc_root=_fake_proc(tmp_path / "proc")).collect()
    assert out["source"] == "proc"
    assert out["mem_used_mb"] == pytest.approx(2000000 / 1024.0)


def test_jtop_connection_lost_falls_back_then_reconnects(tmp_path, monkeypatch):
    d = JtopDouble(ORIN).install(monkeypatch)
    clock = FakeClock()
    c = _collector(tmp_path, proc_root=_fake_proc(tmp_path / "proc"), jtop_retry_s=5.0, clock=clock)
    assert c.collect()["gpu_util"] == 88.0
    d.alive = False
    out = c.collect()
    assert out["source"] == "proc" and out["gpu_util"] is None
    assert d.closed == 1  # the dead client was closed, not leaked
    d.alive = True
    clock.t += 6
    assert c.collect()["gpu_util"] == 88.0
    c.close()
    assert d.closed == 2


def test_every_sensor_failing_gives_nulls_not_errors(tmp_path, monkeypatch):
    d = JtopDouble(XAVIER_NX).install(monkeypatch)
    d.failing.update({"stats", "memory", "gpu", "temperature", "power"})
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "meminfo").write_bytes(b"\xff\xfe garbage")
    (proc / "stat").mkdir()  # reading it raises IsADirectoryError
    zone = tmp_path / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").mkdir()
    out = _collector(tmp_path, proc_root=proc).collect()
    assert {k: out[k] for k in SYSTEM_KEYS if k not in ("temperatures_c", "source")} == dict.fromkeys(
        [k for k in SYSTEM_KEYS if k not in ("temperatures_c", "source")])
    assert out["temperatures_c"] == {}
    assert out["source"] == "jtop"  # connected, but it gave nothing usable


def test_missing_proc_gives_nulls(tmp_path, monkeypatch):
    hide_jtop(monkeypatch)
    out = _collector(tmp_path, proc_root=tmp_path / "nope").collect()
    assert out["cpu_percent"] is None and out["mem_used_mb"] is None and out["mem_available_mb"] is None
    assert out["source"] is None


def test_proc_stat_cpu_percent_is_the_busy_share_between_two_readings(tmp_path, monkeypatch):
    hide_jtop(monkeypatch)
    proc = _fake_proc(tmp_path / "proc", stat="cpu  100 0 100 800 0 0 0 0 0 0\n")
    c = _collector(tmp_path, proc_root=proc)
    assert c.collect()["cpu_percent"] is None  # one reading is not a rate
    # +300 busy (user 200, system 100), +100 idle, +100 iowait (counted idle)
    _fake_proc(proc, stat="cpu  300 0 200 900 100 0 0 0 0 0\n")
    assert c.collect()["cpu_percent"] == pytest.approx(300 / 500 * 100)


def test_thermal_zones_names_and_passive_trip_throttling(tmp_path, monkeypatch):
    hide_jtop(monkeypatch)
    root = tmp_path / "thermal"
    for i, (typ, temp, trip) in enumerate([("acpitz", 41000, 95000), ("acpitz", 43500, None),
                                          ("x86_pkg_temp", 97000, 96000), ("bogus", -256000, None)]):
        z = root / ("thermal_zone%d" % i)
        z.mkdir(parents=True)
        (z / "type").write_text(typ + "\n")
        (z / "temp").write_text("%d\n" % temp)
        if trip is not None:
            (z / "trip_point_0_type").write_text("passive\n")
            (z / "trip_point_0_temp").write_text("%d\n" % trip)
            (z / "trip_point_1_type").write_text("critical\n")
            (z / "trip_point_1_temp").write_text("1000\n")  # a critical trip is not throttling
    c = _collector(tmp_path, proc_root=_fake_proc(tmp_path / "proc"), thermal_root=root)
    out = c.collect()
    assert out["temperatures_c"] == {"acpitz": 41.0, "acpitz_1": 43.5, "x86_pkg_temp": 97.0}
    assert out["throttled"] is True
    (root / "thermal_zone2" / "temp").write_text("50000\n")
    assert c.collect()["throttled"] is False


def test_parse_nvidia_smi_two_gpus_with_unsupported_fields():
    text = "45, 1024, 8192, 61, 35.50\n[N/A], 2048, 16384, [N/A], [Not Supported]\n"
    out = parse_nvidia_smi(text)
    assert out["gpu_util"] == 45.0
    assert out["gpu_mem_used_mb"] == 3072 and out["gpu_mem_total_mb"] == 24576
    assert out["power_mw"] == pytest.approx(35500.0)  # watts -> mW
    assert out["temperatures_c"] == {"gpu0": 61.0}


def test_hung_nvidia_smi_is_bounded_by_its_timeout(tmp_path, monkeypatch):
    hide_jtop(monkeypatch)
    exe = tmp_path / "nvidia-smi"
    calls = tmp_path / "calls"
    exe.write_text("#!/bin/sh\necho x >> %s\nexec sleep 30\n" % calls)
    os.chmod(exe, 0o755)
    clock = FakeClock()
    c = _collector(tmp_path, proc_root=_fake_proc(tmp_path / "proc"), nvidia_smi=str(exe),
                   nvidia_smi_timeout_s=0.5, clock=clock)
    t0 = time.monotonic()
    out = c.collect()
    assert time.monotonic() - t0 < 5
    assert out["gpu_util"] is None and out["mem_available_mb"] is not None
    assert calls.read_text().count("x") == 1
    c.collect()  # not asked again until the retry time
    assert calls.read_text().count("x") == 1


def test_collect_system_on_this_machine_has_every_key():
    out = collect_system(use_jtop=True)
    assert set(out) == set(SYSTEM_KEYS)
    if os.path.exists("/proc/meminfo"):
        assert out["mem_available_mb"] is not None and out["mem_available_mb"] > 0


TEGRASTATS_JP4_NX = ("RAM 2257/7765MB (lfb 5392x4MB) SWAP 0/3882MB (cached 0MB) CPU [12%@1190,8%@1190,off,off,"
                     "10%@1190,6%@1190] EMC_FREQ 0% GR3D_FREQ 37% AO@36.5C GPU@36C PMIC@100C AUX@35C CPU@37.5C "
                     "thermal@36.6C VDD_IN 4567/4500 VDD_CPU_GPU_CV 1234/1200 VDD_SOC 1100/1090")
TEGRASTATS_JP5_NX = ("11-22-2026 00:00:00 RAM 3004/7765MB (lfb 512x4MB) SWAP 0/3882MB (cached 0MB) CPU [12%@1190,"
                     "8%@1190,off,off,10%@1190,6%@1190] EMC_FREQ 5%@1600 GR3D_FREQ 37%@1109 VIC_FREQ 115 APE 150 "
                     "AUX@35C CPU@37.5C thermal@36.6C AO@36.5C GPU@36C PMIC@-256C VDD_IN 4567mW/4500mW "
                     "VDD_CPU_GPU_CV 1234mW/1200mW VDD_SOC 1100mW/1090mW")
TEGRASTATS_JP6_AGX_ORIN = ("11-22-2026 00:00:00 RAM 6432/30623MB (lfb 2x4MB) SWAP 0/15311MB (cached 0MB) CPU "
                           "[21%@2201,22%@2201,23%@2201,24%@2201,25%@2201,26%@2201,27%@2201,28%@2201] EMC_FREQ "
                           "3%@3199 GR3D_FREQ 88%@[1300,1300] NVENC off NVDEC off cpu@48.2C soc2@46.9C soc0@47C "
                           "gpu@50.3C tj@50.3C soc1@46.5C VDD_GPU_SOC 9120mW/8900mW VDD_CPU_CV 2410mW/2300mW "
                           "VIN_SYS_5V0 4100mW/4000mW")


@pytest.mark.parametrize("line,expect,temps", [
    (TEGRASTATS_JP4_NX, (9.0, 37.0, 2257.0, 4567.0), {"AO": 36.5, "GPU": 36.0, "PMIC": 100.0, "AUX": 35.0,
                                                     "CPU": 37.5, "thermal": 36.6}),
    (TEGRASTATS_JP5_NX, (9.0, 37.0, 3004.0, 4567.0), {"AUX": 35.0, "CPU": 37.5, "thermal": 36.6, "AO": 36.5,
                                                     "GPU": 36.0}),
    (TEGRASTATS_JP6_AGX_ORIN, (24.5, 88.0, 6432.0, 9120.0 + 2410.0 + 4100.0),
     {"cpu": 48.2, "soc2": 46.9, "soc0": 47.0, "gpu": 50.3, "tj": 50.3, "soc1": 46.5}),
])
def test_parse_tegrastats_lines_of_jetpack_4_5_and_6(line, expect, temps):

    cpu, gpu, used, power = expect
    out = parse_tegrastats(line)
    assert out["cpu_percent"] == pytest.approx(cpu)
    assert out["gpu_util"] == gpu
    assert out["mem_used_mb"] == used  # RAM is MB in tegrastats, not a rail
    assert out["power_mw"] == pytest.approx(power)
    assert out["temperatures_c"] == temps


def test_parse_tegrastats_garbage_gives_nothing():

    out = parse_tegrastats("tegrastats: permission denied")
    assert out.get("gpu_util") is None and out["power_mw"] is None and out["temperatures_c"] == {}


def test_jetson_without_jtop_service_reads_one_tegrastats_line(tmp_path, monkeypatch):
    # A stand-in for the Jetson-only tegrastats binary: prints lines at its interval until killed.
    JtopDouble(XAVIER_NX, service_active=False).install(monkeypatch)
    exe = tmp_path / "tegrastats"
    exe.write_text("#!/bin/sh\nwhile true; do echo '%s'; sleep 0.1; done\n" % TEGRASTATS_JP5_NX)
    os.chmod(exe, 0o755)
    c = _collector(tmp_path, proc_root=_fake_proc(tmp_path / "proc"), tegrastats=str(exe))
    out = c.collect()
    assert out["source"] == "tegrastats+proc"
    assert out["gpu_util"] == 37.0 and out["power_mw"] == 4567.0 and out["mem_used_mb"] == 3004.0
    assert out["mem_available_mb"] == pytest.approx(6000000 / 1024.0)


def test_tegrastats_that_prints_nothing_is_bounded_and_not_retried_at_once(tmp_path, monkeypatch):
    hide_jtop(monkeypatch)
    exe = tmp_path / "tegrastats"
    calls = tmp_path / "calls"
    exe.write_text("#!/bin/sh\necho x >> %s\nexec sleep 30\n" % calls)
    os.chmod(exe, 0o755)
    c = _collector(tmp_path, proc_root=_fake_proc(tmp_path / "proc"), tegrastats=str(exe),
                   tegrastats_timeout_s=0.3, clock=FakeClock())
    t0 = time.monotonic()
    out = c.collect()
    assert time.monotonic() - t0 < 3 and out["source"] == "proc"
    assert calls.read_text().count("x") == 1
    c.collect()  # not started again until the retry time
    assert calls.read_text().count("x") == 1
