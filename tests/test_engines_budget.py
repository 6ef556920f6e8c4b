"""Memory budget and platform detection on recorded-style inputs (8 GB Xavier NX, 16 GB Orin NX)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.engines.budget import (
    MIB,
    apply_budget,
    budget_from_cuda,
    budget_from_meminfo,
    read_budget,
)
from edge_agent.engines.platform import (
    detect_platform,
    parse_device_tree_model,
    parse_nv_tegra_release,
    platform_key,
)
from edge_agent.errors import ResourceError
from edge_agent.sysinfo.meminfo import parse_meminfo_bytes

DATA = Path(__file__).parent / "data"
KB = 1024


def _meminfo(board: str) -> dict:
    return parse_meminfo_bytes((DATA / ("meminfo_%s.txt" % board)).read_text())


@pytest.mark.parametrize(
    "board, available_kb",
    [("xavier_nx_8gb", 4615876), ("orin_nx_16gb", 12731452)],
)
def test_budget_from_meminfo_is_available_times_fraction_minus_reserve(board, available_kb):
    b = budget_from_meminfo(_meminfo(board), fraction=0.6, reserve_bytes=512 * MIB)
    assert b.source == "meminfo"
    assert b.available_bytes == available_kb * KB
    assert b.budget_bytes == int(available_kb * KB * 0.6) - 512 * MIB


def test_xavier_budget_is_smaller_than_orin_budget():
    x = budget_from_meminfo(_meminfo("xavier_nx_8gb"), fraction=0.6, reserve_bytes=512 * MIB)
    o = budget_from_meminfo(_meminfo("orin_nx_16gb"), fraction=0.6, reserve_bytes=512 * MIB)
    assert 2000 * MIB < x.budget_bytes < 2300 * MIB  # ~2.1 GiB on an 8 GB Xavier NX with a desktop up
    assert 6900 * MIB < o.budget_bytes < 7100 * MIB
    assert o.changed_by(x) > 2.0


def test_swap_counts_only_when_allowed():
    info = _meminfo("xavier_nx_8gb")
    without = budget_from_meminfo(info, fraction=1.0, reserve_bytes=0)
    with_swap = budget_from_meminfo(info, fraction=1.0, reserve_bytes=0, allow_swap=True)
    assert with_swap.available_bytes - without.available_bytes == 3667136 * KB


def test_reserve_larger_than_available_gives_zero_not_negative():
    b = budget_from_meminfo(_meminfo("xavier_nx_8gb"), fraction=0.1, reserve_bytes=8 * 1024 * MIB)
    assert b.budget_bytes == 0


def test_meminfo_without_memavailable_falls_back_to_free_plus_cache():
    text = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 10 kB\nCached: 200 kB\n"
    assert budget_from_meminfo(parse_meminfo_bytes(text), fraction=1.0, reserve_bytes=0).available_bytes == 310 * KB


def test_garbage_meminfo_is_a_resource_error():
    with pytest.raises(ResourceError, match="MemTotal"):
        budget_from_meminfo(parse_meminfo_bytes("hello\nworld: lots\n"), fraction=0.5, reserve_bytes=0)


def test_budget_has_no_jtop_source():
    """jtop's RAM `cached` (Cached + SReclaimable, Cached including Shmem) over-counts what is available;
    MemAvailable from the same /proc/meminfo is the kernel's own estimate, so jtop is not consulted."""
    import inspect

    from edge_agent.engines import budget

    assert not hasattr(budget, "budget_from_jtop")
    assert "use_jtop" not in inspect.signature(budget.read_budget).parameters


def test_discrete_gpu_budget_from_mem_get_info():
    b = budget_from_cuda(6 * 1024 * MIB, 8 * 1024 * MIB, fraction=0.5, reserve_bytes=256 * MIB)
    assert (b.source, b.budget_bytes) == ("cuda", 3 * 1024 * MIB - 256 * MIB)


def test_read_budget_reads_the_file_it_is_given(tmp_path):
    p = tmp_path / "meminfo"
    p.write_text((DATA / "meminfo_orin_nx_16gb.txt").read_text())
    b = read_budget(fraction=0.5, reserve_bytes=0, meminfo_path=p)
    assert b.available_bytes == 12731452 * KB
    with pytest.raises(ResourceError, match="cannot read"):
        read_budget(fraction=0.5, reserve_bytes=0, meminfo_path=tmp_path / "absent")


def test_read_budget_uses_device_memory_on_a_discrete_gpu():
    b = read_budget(fraction=1.0, reserve_bytes=0, unified_memory=False, cuda_mem_get_info=lambda: (100, 200))
    assert (b.source, b.available_bytes, b.total_bytes) == ("cuda", 100, 200)


def test_apply_budget_rejects_a_bad_fraction():
    with pytest.raises(ValueError):
        apply_budget(100, fraction=0.0, reserve_bytes=0)


# ------------------------------------------------------------------------------------------ platform


@pytest.mark.parametrize(
    "line, want",
    [
        ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, DATE: Tue Aug  1 2023", "35.4.1"),
        ("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, DATE: Fri Sep 13 2024", "36.4.0"),
        ("garbage", None),
        ("", None),
    ],
)
def test_l4t_release_parsed_from_first_line(line, want):
    assert parse_nv_tegra_release(line + "\n# KERNEL_VARIANT: oot\n") == want


def test_device_tree_model_strips_nul():
    model = "NVIDIA Jetson Xavier NX Developer Kit"
    assert parse_device_tree_model(model.encode() + b"\x00") == model
    assert parse_device_tree_model(b"\x00") is None


@pytest.mark.parametrize(
    "version, cc, board, key",
    [
        ("8.5.2.2", (7, 2), None, "trt8.5.2.2-sm72"),
        ("8.6.2.3", (8, 7), "NVIDIA Jetson Orin Nano Developer Kit", "trt8.6.2.3-sm87-orin-nano"),
        ("8.6.2.3", (8, 7), "NVIDIA Jetson AGX Orin Developer Kit", "trt8.6.2.3-sm87-agx-orin"),
        ("10.3.0.30", (8, 7), "NVIDIA Jetson Orin NX Engineering Reference Developer Kit", "trt10.3.0.30-sm87-orin-nx"),
    ],
)
def test_platform_key_has_full_version_and_board_and_matches_the_manifest_pattern(version, cc, board, key):
    import re

    from edge_agent.bundle.manifest import PLATFORM_KEY_PATTERN

    assert platform_key(version, cc, board) == key
    assert re.match(PLATFORM_KEY_PATTERN, key)


def test_plans_from_another_fourth_version_digit_or_another_orin_get_another_key():
    assert platform_key("8.6.1.6", (8, 7)) != platform_key("8.6.1.2", (8, 7))  # NVIDIA/TensorRT#3069
    nano = platform_key("8.6.2.3", (8, 7), "NVIDIA Jetson Orin Nano Developer Kit")
    agx = platform_key("8.6.2.3", (8, 7), "NVIDIA Jetson AGX Orin Developer Kit")
    assert nano != agx  # both sm_87


def test_detect_platform_on_a_fake_jetson_root(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text("# R35 (release), REVISION: 4.1, GCID: 1, BOARD: t186ref\n")
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Orin NX Developer Kit\x00")
    info = detect_platform(root=tmp_path, probe_gpu=False)
    assert info.l4t_release == "35.4.1"
    assert info.jetson_model == "NVIDIA Orin NX Developer Kit"
    assert info.is_jetson and info.unified_memory
    assert info.key is None  # no GPU probed


def test_detect_platform_on_this_machine_never_raises():
    info = detect_platform()
    d = info.describe()
    assert d["python"] and d["machine"]
    if info.trt_version is None:
        assert info.trt_error and "tensorrt" in info.trt_error
