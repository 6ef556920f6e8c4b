"""`fleet schema --out DIR`: write the JSON Schema of every wire message."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict

from edge_agent.clikit import CliError


def _normalise(value: Any) -> Any:
    """Make the output independent of the pydantic version: integral floats become ints, and the
    JSON Schema default ``additionalProperties: true`` (spelled out by some versions only) is dropped."""
    if isinstance(value, dict):
        return {
            k: _normalise(v) for k, v in value.items() if not (k == "additionalProperties" and v is True)
        }
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def render_schemas() -> Dict[str, str]:
    """File name -> JSON Schema text for every wire message and the bundle manifest."""
    from edge_agent.bundle.manifest import SignedManifest
    from edge_agent.protocol.messages import ALL_MESSAGES

    models = dict(ALL_MESSAGES)
    models["manifest"] = SignedManifest
    out = {}
    for name, model in sorted(models.items()):
        schema = _normalise(model.model_json_schema(by_alias=True))
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = "edge-agent/%s.json" % name
        out["%s.json" % name] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for fname, text in render_schemas().items():
            (out / fname).write_text(text, encoding="utf-8")
    except OSError as e:
        raise CliError("cannot write schemas to %s: %s" % (out, e.strerror))
    print("wrote %d schemas to %s" % (len(render_schemas()), out))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `schema` command."""
    p = sub.add_parser("schema", help="write the JSON Schemas of all wire messages", description=__doc__)
    p.add_argument("--out", default="docs/schemas", help="output folder (default: docs/schemas)")
    p.set_defaults(func=_run)
