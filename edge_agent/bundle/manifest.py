"""The bundle manifest: ``{"signed": ManifestBody, "signatures": [...]}``.

Numbers that must survive canonical JSON are integers or decimal strings (floats are refused by
`edge_agent.signing.canonical_json`): thresholds and tolerances are decimal strings such as ``"0.05"``.
Times are integer Unix seconds (UTC).
"""

from __future__ import annotations

from typing import Dict, List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edge_agent.protocol.messages import NAME_PATTERN, SHA256_PATTERN, SignatureEntry

MANIFEST_SCHEMA = "edge-agent/manifest/1"
MANIFEST_NAME = "manifest.json"
DTYPES = ("float32", "float16", "int8", "uint8", "int32", "int64", "bool")
PRECISIONS = ("fp32", "fp16", "int8")
PLATFORM_KEY_PATTERN = r"^trt[0-9]+(\.[0-9]+)*-sm[0-9]{2,3}(-[a-z0-9]+)*$"


def _decimal(v: str) -> str:
    try:
        float(v)
    except (TypeError, ValueError):
        raise ValueError("%r is not a decimal number string" % (v,))
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Strict):
    """One file of the bundle, pinned by size and sha256."""

    sha256: str = Field(pattern=SHA256_PATTERN)
    size: int = Field(ge=0)


class TensorDecl(_Strict):
    """A model input or output: name, dtype, shape with -1 for the (dynamic) batch axis."""

    name: str = Field(min_length=1, max_length=256)
    dtype: str
    shape: List[int] = Field(min_length=1, max_length=8)

    @field_validator("dtype")
    @classmethod
    def _dtype_known(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError("dtype must be one of %s" % ", ".join(DTYPES))
        return v

    @field_validator("shape")
    @classmethod
    def _batch_axis_dynamic(cls, v: List[int]) -> List[int]:
        if v[0] != -1:
            raise ValueError("the first (batch) axis must be dynamic (-1)")
        if any(d < 1 for d in v[1:]):
            raise ValueError("only the batch axis may be dynamic; other dims must be >= 1")
        return v


class ModelSpec(_Strict):
    """One model of the bundle (`small` or `large`)."""

    path: str
    inputs: List[TensorDecl] = Field(min_length=1)
    outputs: List[TensorDecl] = Field(min_length=1)
    precisions: List[str] = Field(default_factory=lambda: ["fp32", "fp16"])
    engines: Dict[str, str] = Field(default_factory=dict, description="platform key -> prebuilt plan path")
    calibration_cache: Optional[str] = None
    features_output: Optional[str] = Field(None, description="output holding pooled features for a linear gate")

    @field_validator("precisions")
    @classmethod
    def _precisions_known(cls, v: List[str]) -> List[str]:
        bad = [p for p in v if p not in PRECISIONS]
        if bad or not v:
            raise ValueError("precisions must be a non-empty subset of %s" % ", ".join(PRECISIONS))
        return v

    @field_validator("engines")
    @classmethod
    def _platform_keys(cls, v: Dict[str, str]) -> Dict[str, str]:
        import re

        for k in v:
            if not re.match(PLATFORM_KEY_PATTERN, k):
                raise ValueError("platform key %r is not of the form trt<version>-sm<major><minor>" % k)
        return v

    def referenced_paths(self) -> List[str]:
        """Every bundle file this model refers to."""
        out = [self.path, *self.engines.values()]
        if self.calibration_cache:
            out.append(self.calibration_cache)
        return out


class Preprocessing(_Strict):
    """How raw images become the model's input tensor."""

    color: Literal["gray", "rgb", "bgr"] = "rgb"
    resize: Optional[List[int]] = Field(None, min_length=2, max_length=2, description="[height, width]")
    scale: str = Field("1", description="multiply pixel values (after dtype conversion)")
    mean: List[str] = Field(default_factory=list)
    std: List[str] = Field(default_factory=list)
    layout: Literal["nchw", "nhwc"] = "nchw"
    dtype: str = "float32"

    _v_scale = field_validator("scale")(_decimal)

    @field_validator("mean", "std")
    @classmethod
    def _decimals(cls, v: List[str]) -> List[str]:
        return [_decimal(x) for x in v]


class Postprocessing(_Strict):
    """How the model's outputs become results."""

    kind: Literal["classification", "detection", "raw"] = "classification"
    output: Optional[str] = Field(None, description="output tensor to post-process (default: the first)")
    apply_softmax: bool = True
    top_k: int = Field(5, ge=1, le=1000)
    labels: Optional[List[str]] = None
    score_threshold: str = "0.25"
    iou_threshold: str = "0.45"
    max_detections: int = Field(100, ge=1)

    _v_thresholds = field_validator("score_threshold", "iou_threshold")(_decimal)


class RouterPolicy(_Strict):
    """The DynamicRouter's gate and the bounds of its adaptive threshold τ."""

    gate: Literal["confidence", "linear", "small-only", "large-only"] = Field(
        "confidence", description="small-only / large-only: fixed routes (baselines, emergency switch); "
        "large-only never runs the small model")
    tau: str = "0.9"
    tau_min: str = "0.5"
    tau_max: str = "0.999"
    adaptive: bool = False
    target_large_fraction: Optional[str] = None
    window: int = Field(500, ge=10)
    linear_head: Optional[str] = Field(None, description="npz with weights `w`, bias `b` and `source`")
    large_queue_limit: int = Field(64, ge=1)
    large_p99_slo_ms: Optional[str] = None

    _v_dec = field_validator("tau", "tau_min", "tau_max")(_decimal)

    @model_validator(mode="after")
    def _tau_in_bounds(self) -> RouterPolicy:
        if not float(self.tau_min) <= float(self.tau) <= float(self.tau_max):
            raise ValueError("router needs tau_min <= tau <= tau_max")
        if self.gate == "linear" and not self.linear_head:
            raise ValueError("a linear gate needs linear_head")
        return self


class Tolerance(_Strict):
    """Allowed difference to the reference outputs for one precision."""

    atol: str = "1e-4"
    rtol: str = "1e-3"
    min_top1_agreement: str = "1.0"

    _v_dec = field_validator("atol", "rtol", "min_top1_agreement")(_decimal)


def _default_tolerances() -> Dict[str, Tolerance]:
    return {
        "fp32": Tolerance(atol="1e-4", rtol="1e-3", min_top1_agreement="1.0"),
        "fp16": Tolerance(atol="1e-2", rtol="5e-2", min_top1_agreement="0.98"),
        "int8": Tolerance(atol="1e-1", rtol="2e-1", min_top1_agreement="0.95"),
    }


class GoldenSet(_Strict):
    """Golden inputs (npz, one array per input name) and reference outputs per model (npz)."""

    inputs: str
    small_outputs: str
    large_outputs: str
    tolerances: Dict[str, Tolerance] = Field(default_factory=_default_tolerances)


class HealthGates(_Strict):
    """Gates watched during probation and by rollouts."""

    probation_s: int = Field(60, ge=0)
    max_error_rate: str = "0.01"
    p99_latency_slo_ms: Optional[str] = None
    min_requests: int = Field(0, ge=0)
    shadow_min_agreement: str = "0.98"
    shadow_min_inputs: int = Field(200, ge=1)
    shadow_window_s: int = Field(300, ge=0)
    shadow_max_latency_ratio: str = "1.5"

    _v_dec = field_validator("max_error_rate", "shadow_min_agreement", "shadow_max_latency_ratio")(_decimal)


class ManifestBody(_Strict):
    """The signed part of a manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_: Literal["edge-agent/manifest/1"] = Field(MANIFEST_SCHEMA, alias="schema")
    name: str = Field(pattern=NAME_PATTERN)
    version: int = Field(ge=1)
    created: int = Field(ge=0)
    expires: int = Field(ge=0)
    min_agent_version: str = "0.1.0"
    description: str = Field("", max_length=2000)
    files: Dict[str, FileEntry] = Field(min_length=1)
    models: Dict[Literal["small", "large"], ModelSpec]
    preprocessing: Preprocessing = Preprocessing()
    postprocessing: Postprocessing = Postprocessing()
    router: RouterPolicy = RouterPolicy()
    golden: GoldenSet
    health: HealthGates = HealthGates()

    @model_validator(mode="after")
    def _consistent(self) -> ManifestBody:
        from edge_agent.bundle.paths import check_member_path
        from edge_agent.errors import ArchiveError

        for p in self.files:
            try:
                check_member_path(p)
            except ArchiveError as e:
                raise ValueError(str(e))
            if p == MANIFEST_NAME:
                raise ValueError("a bundle file may not be named %s" % MANIFEST_NAME)
        if set(self.models) != {"small", "large"}:
            raise ValueError("models must name exactly 'small' and 'large'")
        if self.expires <= self.created:
            raise ValueError("expires must be after created")
        refs = [self.golden.inputs, self.golden.small_outputs, self.golden.large_outputs]
        for m in self.models.values():
            refs.extend(m.referenced_paths())
        if self.router.linear_head:
            refs.append(self.router.linear_head)
        missing = sorted(set(r for r in refs if r not in self.files))
        if missing:
            raise ValueError("manifest refers to files it does not list: %s" % ", ".join(missing))
        return self

    def total_size(self) -> int:
        """Sum of all file sizes."""
        return sum(f.size for f in self.files.values())

    def to_signed_dict(self) -> dict:
        """The JSON value that signatures cover."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class SignedManifest(_Strict):
    """A manifest with its signatures, as written to `manifest.json`."""

    signed: ManifestBody
    signatures: List[SignatureEntry] = Field(max_length=32)
