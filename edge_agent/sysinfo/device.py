"""What this device is (machine, Python, Jetson model, L4T, TensorRT, CUDA, memory), for the retained status."""

from __future__ import annotations

import logging
import platform as _platform
from typing import Any, Dict

from edge_agent.protocol.messages import PlatformInfo
from edge_agent.sysinfo.meminfo import read_meminfo_bytes

log = logging.getLogger(__name__)


def platform_info(backend: str) -> PlatformInfo:
    """What this device is, for the retained status (never raises)."""
    info: Dict[str, Any] = {"machine": _platform.machine(), "python": _platform.python_version(), "backend": backend}
    try:
        from edge_agent.engines.platform import detect_platform

        p = detect_platform(probe_gpu=backend != "onnxruntime")
        d = p.describe()
        info.update(
            jetson_model=d.get("jetson_model"), l4t=d.get("l4t"), tensorrt=d.get("trt"), cuda=d.get("cuda"),
            compute_capability=("%d.%d" % p.compute_capability) if p.compute_capability else None,
            platform_key=d.get("platform_key"),
        )
    except Exception as e:  # platform probing must never stop the agent
        log.warning("platform detection failed: %s", e)
    try:
        total = read_meminfo_bytes().get("MemTotal")
        if total is not None:
            info["memory_total_mb"] = total // (1024 * 1024)
    except OSError:
        pass
    return PlatformInfo(**info)
