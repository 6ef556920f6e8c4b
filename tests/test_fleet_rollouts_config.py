"""The [rollouts] section of fleet.toml: documented in the shipped file, defaults, bad values refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edge_agent.errors import ConfigError
from fleet.config import FleetConfig, load_fleet_config

FLEET_TOML = Path(__file__).resolve().parent.parent / "configs" / "fleet.toml"


def test_rollouts_section_is_documented_and_parses_to_the_defaults():
    text = FLEET_TOML.read_text(encoding="utf-8")
    keys = set(re.findall(r"(?m)^#?\s*([a-z_]+)\s*=", text))
    for name in type(FleetConfig().rollouts).model_fields:
        assert name in keys, "rollouts.%s is not documented in configs/fleet.toml" % name
    assert load_fleet_config(FLEET_TOML).rollouts == FleetConfig().rollouts


@pytest.mark.parametrize(
    "line, field",
    [
        ("success_threshold = 0", "rollouts.success_threshold"),
        ("error_threshold = 1.0", "rollouts.error_threshold"),
        ("waves = []", "rollouts.waves"),
        ("device_timeout_s = -5", "rollouts.device_timeout_s"),
        ("registry = 'x'", "rollouts.registry"),
    ],
)
def test_bad_rollout_settings_refused_naming_the_field(tmp_path, line, field):
    p = tmp_path / "fleet.toml"
    p.write_text("[rollouts]\n%s\n" % line)
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_fleet_config(p)


def test_relative_registry_file_resolves_against_the_config(tmp_path):
    p = tmp_path / "fleet.toml"
    p.write_text('[rollouts]\nregistry_file = "db/fleet.sqlite"\n')
    assert load_fleet_config(p).rollouts.registry_file == tmp_path / "db" / "fleet.sqlite"
