"""What the inference service answers for one request (or one item of a batch request)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict


@dataclass(frozen=True)
class InferResult:
    """The answer to one request."""

    route: str
    output: Dict[str, Any]
    latency_ms: float
    extra: Dict[str, Any] = field(default_factory=dict)
