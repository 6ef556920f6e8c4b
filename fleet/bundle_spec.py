"""The bundle SPEC (TOML) as validated models: what `fleet bundle build` reads before it touches a model.

Decimal settings may be written as TOML floats (``tau = 0.9``); `decimals_as_strings` turns them into
decimal strings because signed documents carry no floats. Unknown SPEC fields are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent._toml import TOMLDecodeError, load_toml
from edge_agent.bundle.manifest import PLATFORM_KEY_PATTERN
from edge_agent.config import format_validation_error
from edge_agent.errors import EdgeAgentError


class SpecError(EdgeAgentError):
    """The bundle SPEC, or a model or file it names, is not acceptable."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorSpecDecl(_Spec):
    """A declared model input or output (batch axis -1)."""

    name: str
    dtype: str
    shape: List[int]


class ModelSpecDecl(_Spec):
    """One model in the SPEC."""

    onnx: str
    inputs: Optional[List[TensorSpecDecl]] = None
    outputs: Optional[List[TensorSpecDecl]] = None
    precisions: List[str] = Field(default_factory=lambda: ["fp32", "fp16"])
    features_output: Optional[str] = None
    calibration_cache: Optional[str] = None


class GoldenDecl(_Spec):
    """The golden input set (npz, one array per model input) and tolerances per precision."""

    inputs: str
    tolerances: Optional[Dict[str, Dict[str, Any]]] = None


class BundleSpec(_Spec):
    """The whole SPEC file."""

    name: str
    version: int = Field(ge=1)
    description: str = ""
    min_agent_version: str = "0.1.0"
    expires_in_days: Optional[float] = Field(None, gt=0)
    expires: Optional[int] = Field(None, ge=1)
    models: Dict[str, ModelSpecDecl]
    preprocessing: Dict[str, Any] = Field(default_factory=dict)
    postprocessing: Dict[str, Any] = Field(default_factory=dict)
    router: Dict[str, Any] = Field(default_factory=dict)
    health: Dict[str, Any] = Field(default_factory=dict)
    golden: GoldenDecl


def decimals_as_strings(value: Any) -> Any:
    """TOML floats -> decimal strings (shortest round-trip form), recursively."""
    if isinstance(value, bool):
        return value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return {k: decimals_as_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decimals_as_strings(v) for v in value]
    return value


def load_spec(spec_path: Path) -> BundleSpec:
    """Parse and validate a SPEC file."""
    spec_path = Path(spec_path)
    try:
        raw = load_toml(spec_path)
    except OSError as e:
        raise SpecError("cannot read SPEC %s: %s" % (spec_path, e.strerror or e))
    except TOMLDecodeError as e:
        raise SpecError("SPEC %s is not valid TOML: %s" % (spec_path, e))
    try:
        spec = BundleSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError("SPEC %s: %s" % (spec_path, format_validation_error(e)))
    if set(spec.models) != {"small", "large"}:
        raise SpecError("SPEC %s: [models] must define exactly 'small' and 'large'" % spec_path)
    if (spec.expires is None) == (spec.expires_in_days is None):
        raise SpecError("SPEC %s: give exactly one of expires_in_days or expires" % spec_path)
    return spec


def parse_engine_option(text: str) -> Tuple[str, str, Path]:
    """``PLATFORM_KEY=MODEL:PLAN`` -> (platform key, model name, plan path)."""
    import re

    key, sep, rest = text.partition("=")
    model, sep2, plan = rest.partition(":")
    if not sep or not sep2 or not plan:
        raise SpecError("--engine %r is not of the form PLATFORM_KEY=MODEL:PLAN" % text)
    if not re.match(PLATFORM_KEY_PATTERN, key):
        raise SpecError("--engine platform key %r is not of the form trt<version>-sm<major><minor>" % key)
    if model not in ("small", "large"):
        raise SpecError("--engine model %r must be 'small' or 'large'" % model)
    return key, model, Path(plan)
