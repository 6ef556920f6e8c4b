"""The one /proc/meminfo reader: bytes everywhere, counts left out, hostile files bounded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge_agent.sysinfo.meminfo import (
    MAX_MEMINFO_BYTES,
    available_bytes,
    parse_meminfo_bytes,
    read_meminfo_bytes,
)

DATA = Path(__file__).parent / "data"
KB = 1024


def test_recorded_xavier_meminfo_is_read_in_bytes():
    info = parse_meminfo_bytes((DATA / "meminfo_xavier_nx_8gb.txt").read_text())
    assert info["MemTotal"] == 7334312 * KB
    assert info["MemAvailable"] == 4615876 * KB
    assert available_bytes(info) == 4615876 * KB


def test_lines_without_a_kb_unit_are_counts_and_left_out():
    info = parse_meminfo_bytes("MemTotal: 1000 kB\nHugePages_Total:       0\nHugepagesize: 2048 kB\n")
    assert info == {"MemTotal": 1000 * KB, "Hugepagesize": 2048 * KB}


@pytest.mark.parametrize("line", ["MemTotal 1000 kB", "MemTotal: lots kB", "MemTotal: -5 kB", "MemTotal:", ": 5 kB x"])
def test_malformed_lines_are_skipped(line):
    assert parse_meminfo_bytes(line + "\nMemFree: 7 kB\n") == {"MemFree": 7 * KB}


def test_available_falls_back_to_free_plus_cache_on_kernels_without_memavailable():
    info = parse_meminfo_bytes("MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 10 kB\nCached: 200 kB\n")
    assert available_bytes(info) == 310 * KB
    assert available_bytes({"MemTotal": 1000 * KB}) is None


def test_read_is_bounded_and_survives_undecodable_bytes(tmp_path):
    p = tmp_path / "meminfo"
    p.write_bytes(b"\xff\xfe garbage\nMemTotal: 8 kB\n" + b"Junk: 1 kB\n" * (MAX_MEMINFO_BYTES // 8))
    info = read_meminfo_bytes(p)
    assert info["MemTotal"] == 8 * KB
    with pytest.raises(OSError):
        read_meminfo_bytes(tmp_path / "absent")


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="needs Linux /proc")
def test_this_machines_meminfo_has_total_and_available():
    info = read_meminfo_bytes()
    assert info["MemTotal"] > 0
    assert 0 < available_bytes(info) <= info["MemTotal"]


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="needs Linux /proc")
def test_device_platform_info_announces_memtotal_in_mib():
    from edge_agent.sysinfo.device import platform_info

    assert platform_info("onnxruntime").memory_total_mb == read_meminfo_bytes()["MemTotal"] // (1024 * 1024)
