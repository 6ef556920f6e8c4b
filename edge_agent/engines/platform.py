"""What this device is: Jetson model, L4T release, TensorRT version, GPU and the platform key.

Engines are bound to the full 4-part TensorRT version (a plan from 8.6.1.6 is refused by 8.6.1.2,
NVIDIA/TensorRT#3069) and the SM; AGX Orin, Orin NX and Orin Nano all report sm_87, so a Jetson's board
model is part of the key too: `trt<a.b.c.d>-sm<major><minor>[-<board>]`, e.g. `trt8.5.2.2-sm72-xavier-nx`.
The parsers are pure; `detect_platform` reads.
"""

from __future__ import annotations

import logging
import platform as _stdlib_platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

log = logging.getLogger(__name__)

_L4T_RE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([0-9.]+)")


def parse_nv_tegra_release(text: str) -> Optional[str]:
    """`# R35 (release), REVISION: 4.1, GCID: ...` -> "35.4.1" (None when the line does not parse)."""
    first = text.splitlines()[0] if text else ""
    m = _L4T_RE.search(first)
    if not m:
        return None
    return "%s.%s" % (m.group(1), m.group(2).rstrip("."))


def parse_device_tree_model(raw: bytes) -> Optional[str]:
    """`/proc/device-tree/model` (NUL-terminated) -> "NVIDIA Jetson Xavier NX Developer Kit"."""
    text = raw.replace(b"\x00", b"").decode("utf-8", "replace").strip()
    return text or None


def trt_version_full(version: str) -> str:
    """"8.5.2.2" -> "8.5.2.2": the numeric parts of the version, all of them (plans are bound to all four)."""
    parts = [p for p in version.split(".") if p.isdigit()]
    if not parts:
        raise ValueError("not a TensorRT version: %r" % version)
    return ".".join(parts[:4])


_BOARD_NOISE = {"nvidia", "jetson", "developer", "kit", "module", "engineering", "reference", "board", "p3768",
                "p3767", "p3701", "p3737", "p3509", "p3668", "p3450", "p2888"}


def board_slug(model: Optional[str]) -> Optional[str]:
    """"NVIDIA Jetson Orin Nano Developer Kit" -> "orin-nano" (None when there is no board model)."""
    if not model:
        return None
    words = [w for w in re.split(r"[^a-z0-9]+", model.lower()) if w and w not in _BOARD_NOISE]
    slug = "-".join(words)[:40].strip("-")
    return slug or None


def platform_key(trt_version: str, compute_capability: Tuple[int, int], board: Optional[str] = None) -> str:
    """`trt<full version>-sm<major><minor>[-<board slug>]`, e.g. "trt8.5.2.2-sm72-xavier-nx"."""
    major, minor = compute_capability
    key = "trt%s-sm%d%d" % (trt_version_full(trt_version), int(major), int(minor))
    slug = board_slug(board)
    return key + "-" + slug if slug else key


@dataclass(frozen=True)
class PlatformInfo:
    """The facts engines depend on; None where unknown."""

    python: str
    machine: str
    jetson_model: Optional[str]
    l4t_release: Optional[str]
    trt_version: Optional[str]
    trt_error: Optional[str]
    cuda_version: Optional[str]  #: the driver's CUDA version (cuDriverGetVersion)
    gpu_name: Optional[str]
    compute_capability: Optional[Tuple[int, int]]
    gpu_error: Optional[str] = None  #: why no GPU answered ("pycuda is not installed", "no CUDA GPU ...")
    cuda_compiled_version: Optional[str] = None  #: the CUDA version pycuda was built against
    pycuda_version: Optional[str] = None
    total_memory_bytes: Optional[int] = None

    @property
    def is_jetson(self) -> bool:
        """A Jetson (integrated GPU sharing DRAM with the CPU)."""
        return self.l4t_release is not None or bool(self.jetson_model and "jetson" in self.jetson_model.lower())

    @property
    def has_gpu(self) -> bool:
        """A CUDA device answered."""
        return self.compute_capability is not None

    @property
    def unified_memory(self) -> bool:
        """Size engines from system memory (Jetson, or no GPU at all) rather than device memory."""
        return self.is_jetson or not self.has_gpu

    @property
    def key(self) -> Optional[str]:
        """Platform key, or None when TensorRT or the GPU is missing."""
        if self.trt_version is None or self.compute_capability is None:
            return None
        return platform_key(self.trt_version, self.compute_capability, self.jetson_model if self.is_jetson else None)

    def describe(self) -> Dict[str, Any]:
        """JSON-ready view (str/None values)."""
        cc = self.compute_capability
        return {
            "python": self.python,
            "machine": self.machine,
            "jetson_model": self.jetson_model,
            "l4t": self.l4t_release,
            "trt": self.trt_version,
            "cuda": self.cuda_version,
            "cuda_compiled": self.cuda_compiled_version,
            "pycuda": self.pycuda_version,
            "gpu": self.gpu_name,
            "gpu_error": self.gpu_error,
            "gpu_memory_mb": self.total_memory_bytes // (1024 * 1024) if self.total_memory_bytes else None,
            "sm": "%d%d" % cc if cc else None,
            "platform_key": self.key,
        }


def tensorrt_version() -> Tuple[Optional[str], Optional[str]]:
    """(version, None) when `tensorrt` imports, else (None, reason)."""
    try:
        import tensorrt as trt
    except ImportError as e:
        return None, "tensorrt does not import (%s)" % e
    except Exception as e:  # a broken install (missing libnvinfer.so) raises OSError and friends
        return None, "tensorrt fails to import: %s" % e
    return str(trt.__version__), None


def detect_platform(*, root: Path = Path("/"), probe_gpu: bool = True) -> PlatformInfo:
    """Read the device facts. Never raises: unknowns are None."""
    from edge_agent.engines import _cuda

    l4t = model = None
    try:
        l4t = parse_nv_tegra_release((root / "etc/nv_tegra_release").read_text(errors="replace"))
    except OSError:
        pass
    try:
        model = parse_device_tree_model((root / "proc/device-tree/model").read_bytes())
    except OSError:
        pass
    trt_version, trt_error = tensorrt_version()
    gpu = _cuda.probe_gpu() if probe_gpu else {"ok": False, "reason": "GPU not probed"}
    ok = bool(gpu.get("ok"))
    return PlatformInfo(
        python=_stdlib_platform.python_version(),
        machine=_stdlib_platform.machine(),
        jetson_model=model,
        l4t_release=l4t,
        trt_version=trt_version,
        trt_error=trt_error,
        cuda_version=gpu.get("cuda_driver_version"),
        gpu_name=gpu.get("name") if ok else None,
        compute_capability=gpu.get("compute_capability") if ok else None,
        gpu_error=None if ok else str(gpu.get("reason")),
        cuda_compiled_version=gpu.get("cuda_compiled_version"),
        pycuda_version=gpu.get("pycuda_version"),
        total_memory_bytes=gpu.get("total_memory_bytes") if ok else None,
    )
