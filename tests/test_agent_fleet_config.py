"""configs/fleet.toml parses into FleetConfig, documents every field, and bad values are refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from edge_agent.errors import ConfigError
from fleet.config import FleetConfig, load_fleet_config

REPO = Path(__file__).resolve().parent.parent
FLEET_TOML = REPO / "configs" / "fleet.toml"


def test_shipped_fleet_toml_parses_to_the_defaults():
    """Every value in the shipped file is the model's default (the file documents them)."""
    cfg = load_fleet_config(FLEET_TOML)
    assert cfg.controller == FleetConfig().controller
    assert cfg.chunks == FleetConfig().chunks
    assert cfg.mqtt.max_payload_bytes == FleetConfig().mqtt.max_payload_bytes


def test_every_field_is_mentioned_in_the_shipped_file():
    """A field added to the model but not documented in configs/fleet.toml fails this test."""
    text = FLEET_TOML.read_text(encoding="utf-8")
    keys = set(re.findall(r"(?m)^#?\s*([a-z_]+)\s*=", text))
    sections = [name for name in FleetConfig.model_fields if isinstance(getattr(FleetConfig(), name), BaseModel)]
    assert {"mqtt", "controller", "chunks", "trust"} <= set(sections)
    for section in sections:
        assert re.search(r"(?m)^\[%s\]" % section, text), "[%s] missing from configs/fleet.toml" % section
        model = type(getattr(FleetConfig(), section))
        for name, _field in model.model_fields.items():
            if name == "tls":
                continue
            assert name in keys, "%s.%s is not documented in configs/fleet.toml" % (section, name)


def test_unknown_key_and_oversize_chunk_refused_with_one_line(tmp_path):
    """A typo or a chunk above 1 MiB is a ConfigError naming the field."""
    p = tmp_path / "fleet.toml"
    p.write_text("[chunks]\nmax_chunk_bytes = 2097152\n")
    with pytest.raises(ConfigError, match=r"chunks\.max_chunk_bytes"):
        load_fleet_config(p)
    p.write_text("[controller]\nkey_fiel = 'x'\n")
    with pytest.raises(ConfigError, match=r"controller\.key_fiel"):
        load_fleet_config(p)


def test_relative_paths_resolve_against_the_file(tmp_path):
    """key_file and state_dir are relative to fleet.toml, not to the working directory."""
    p = tmp_path / "fleet.toml"
    p.write_text('[controller]\nkey_file = "keys/c.key"\nstate_dir = "state"\n')
    cfg = load_fleet_config(p)
    assert cfg.controller.key_file == tmp_path / "keys" / "c.key"
    assert cfg.controller.state_dir == tmp_path / "state"
