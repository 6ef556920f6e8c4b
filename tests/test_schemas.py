"""docs/schemas/*.json are generated from the pydantic models; this fails when they drift.

Regenerate with `fleet schema --out docs/schemas`.
"""

from __future__ import annotations

import json
from pathlib import Path

from fleet.commands.schema import render_schemas

SCHEMAS = Path(__file__).resolve().parent.parent / "docs" / "schemas"


def test_committed_schemas_are_the_generated_ones():
    rendered = render_schemas()
    committed = {p.name: p.read_text(encoding="utf-8") for p in SCHEMAS.glob("*.json")}
    assert sorted(committed) == sorted(rendered), "schema files differ; run: fleet schema --out docs/schemas"
    stale = sorted(name for name in rendered if rendered[name] != committed[name])
    assert stale == [], "stale schemas %s; run: fleet schema --out docs/schemas" % ", ".join(stale)


def test_every_schema_is_json_with_an_id_and_a_version_field():
    for name, text in render_schemas().items():
        schema = json.loads(text)
        assert schema["$id"] == "edge-agent/%s" % name
        if name not in ("command.json", "manifest.json"):  # signed documents carry it inside `signed`
            assert "schema" in schema["properties"], name


def test_drift_is_detected(monkeypatch):
    from edge_agent.protocol import messages

    class Probe(messages.Message):
        """Only here to prove the drift check notices a new message."""

        value: int

    monkeypatch.setitem(messages.ALL_MESSAGES, "probe", Probe)
    assert "probe.json" in render_schemas()
    assert not (SCHEMAS / "probe.json").exists()
