"""What preparing a bundle yields: both engines with how they were prepared (`PreparedModels`), and the
choices both backends share (the model names, the precision a model is built or loaded at)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

from edge_agent.bundle.manifest import ManifestBody, ModelSpec
from edge_agent.engines.base import Engine
from edge_agent.engines.budget import MIB, MemoryBudget
from edge_agent.engines.platform import PlatformInfo
from edge_agent.engines.tuner import (
    MemoryModel,
    TuneChoice,
)

log = logging.getLogger(__name__)

Emit = Callable[[str, str, dict], None]
MODELS = ("small", "large")
_PRECISION_ORDER = ("int8", "fp16", "fp32")


@dataclass
class PreparedModels:
    """Both engines, ready to serve, and how they were prepared."""

    small: Engine
    large: Engine
    backend: str
    precision: str
    batch: Dict[str, int]
    budget_bytes: int
    max_batch: int = 1
    backend_reason: str = ""
    precisions: Dict[str, str] = field(default_factory=dict)
    sources: Dict[str, str] = field(default_factory=dict)
    memory_bytes: Dict[str, int] = field(default_factory=dict)
    tuning: Dict[str, TuneChoice] = field(default_factory=dict)
    tuning_keys: Dict[str, str] = field(default_factory=dict)
    memory_models: Dict[str, MemoryModel] = field(default_factory=dict)
    platform: Optional[PlatformInfo] = None
    budget: Optional[MemoryBudget] = None

    def engine(self, name: str) -> Engine:
        """`small` or `large`."""
        return self.small if name == "small" else self.large

    def describe(self) -> Dict[str, Any]:
        """JSON-ready summary for status and telemetry (str/int/float/None values only)."""
        out: Dict[str, Any] = {
            "backend": self.backend,
            "backend_reason": self.backend_reason,
            "precision": self.precision,
            "max_batch": self.max_batch,
            "budget_mb": round(self.budget_bytes / MIB, 1),
            "platform_key": self.platform.key if self.platform else None,
            "trt": self.platform.trt_version if self.platform else None,
        }
        for name in MODELS:
            out["batch_%s" % name] = self.batch.get(name)
            out["source_%s" % name] = self.sources.get(name)
            out["precision_%s" % name] = self.precisions.get(name)
            mem = self.memory_bytes.get(name)
            out["memory_mb_%s" % name] = round(mem / MIB, 2) if mem is not None else None
            choice = self.tuning.get(name)
            out["slo_met_%s" % name] = int(choice.slo_met) if choice else None
        return out

    def close(self) -> None:
        """Close both engines."""
        for eng in (self.small, self.large):
            try:
                eng.close()
            except Exception:  # closing must not hide the other engine's close
                log.exception("closing an engine failed")


def choose_precision(requested: str, spec: ModelSpec) -> str:
    """The requested precision if the manifest allows it for this model (INT8 also needs the bundle's
    calibration cache), else the next wider one the manifest allows."""
    start = _PRECISION_ORDER.index(requested)
    for p in _PRECISION_ORDER[start:]:
        if p not in spec.precisions:
            continue
        if p == "int8" and not spec.calibration_cache:
            continue
        return p
    # the manifest lists only narrower precisions than asked for: take its widest
    return next(p for p in reversed(_PRECISION_ORDER) if p in spec.precisions)


def file_sha256(manifest: ManifestBody, path: str) -> str:
    """The sha256 the signed manifest gives for bundle file `path`."""
    return manifest.files[path].sha256
