"""configs/agent.toml, the documented example: it parses, it documents every AgentConfig field, its
active values are the code's defaults, and unknown keys are refused."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import pytest
from pydantic import BaseModel

from edge_agent._toml import loads_toml
from edge_agent.config import AgentConfig, load_agent_config
from edge_agent.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "agent.toml"
_COMMENTED = re.compile(r"^#\s*(\[\[?[a-z_.]+\]\]?\s*$|[a-z_]+ = .*$)")


def _uncommented(text: str) -> str:
    """The example with every commented-out setting and table header switched on."""
    return "\n".join(_COMMENTED.sub(r"\1", line) for line in text.splitlines()) + "\n"


def _model_of(annotation: Any):
    """The pydantic model inside Optional[...] / List[...], or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        m = _model_of(arg)
        if m is not None:
            return m
    return None


def _fields(model: type, prefix: Tuple[str, ...] = ()) -> Iterator[Tuple[str, ...]]:
    for name, info in model.model_fields.items():
        sub = _model_of(info.annotation)
        if sub is not None:
            yield from _fields(sub, (*prefix, name))
        else:
            yield (*prefix, name)


def _lookup(doc: Dict[str, Any], path: Tuple[str, ...]) -> Any:
    cur: Any = doc
    for p in path:
        if isinstance(cur, list):
            cur = cur[0]
        cur = cur[p]
    return cur


def test_example_parses_into_agent_config():
    cfg = load_agent_config(EXAMPLE)
    assert isinstance(cfg, AgentConfig)
    assert cfg.trust.command_keys == [Path("/etc/edge-agent/command-keys/controller.pub")]


def test_example_with_every_optional_setting_switched_on_parses(tmp_path):
    full = tmp_path / "agent.toml"
    full.write_text(_uncommented(EXAMPLE.read_text()))
    cfg = load_agent_config(full)
    assert cfg.device_id == "jetson-01"
    assert cfg.mqtt.tls is not None and cfg.mqtt.tls.ca_file == Path("/etc/edge-agent/tls/ca.crt")
    assert cfg.limits.store_quota_bytes == 10737418240
    assert [s.name for s in cfg.sources] == ["gate-camera"]


def test_example_documents_every_field():
    doc = loads_toml(_uncommented(EXAMPLE.read_text()))
    missing = []
    for path in _fields(AgentConfig):
        try:
            _lookup(doc, path)
        except (KeyError, IndexError, TypeError):
            missing.append(".".join(path))
    assert missing == [], "configs/agent.toml does not document: %s" % ", ".join(missing)


def test_active_values_in_example_are_the_defaults():
    doc = loads_toml(EXAMPLE.read_text())
    defaults = AgentConfig(device_id="x").model_dump(mode="json")
    differ = []
    for path in _fields(AgentConfig):
        try:
            value = _lookup(doc, path)
        except (KeyError, IndexError, TypeError):
            continue  # commented out: optional
        if value != _lookup(defaults, path):
            differ.append("%s = %r (default %r)" % (".".join(path), value, _lookup(defaults, path)))
    assert differ == []


@pytest.mark.parametrize(
    "extra",
    ["colour = 1\n", "[mqtt]\nhots = \"x\"\n", "[telemetry]\nperiod = 5\n", "[nonsense]\n"],
)
def test_unknown_keys_are_refused(tmp_path, extra):
    bad = tmp_path / "agent.toml"
    bad.write_text(extra)
    with pytest.raises(ConfigError, match="Extra inputs are not permitted"):
        load_agent_config(bad)


def test_unknown_key_added_to_the_example_is_refused(tmp_path):
    text = EXAMPLE.read_text().replace("[limits]\n", "[limits]\nmax_manifset_bytes = 5\n")
    bad = tmp_path / "agent.toml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=r"limits\.max_manifset_bytes"):
        load_agent_config(bad)
