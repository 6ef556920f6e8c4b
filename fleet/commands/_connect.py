"""Broker options shared by the `fleet` commands that talk to the controller or watch devices."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Dict, Optional

from edge_agent.clikit import CliError
from edge_agent.config import MqttConfig

#: Environment variable naming the `fleet.toml` to read the broker settings from.
CONFIG_ENV = "FLEET_CONFIG"


def add_connection_args(p: argparse.ArgumentParser, *, timeout: bool = True) -> None:
    """--config / --broker / --prefix (and --timeout for RPC commands)."""
    g = p.add_argument_group("broker")
    g.add_argument("--config", help="fleet.toml whose [mqtt] section names the broker (default: $%s)" % CONFIG_ENV)
    g.add_argument("--broker", metavar="HOST[:PORT]", help="broker address (overrides the config)")
    g.add_argument("--prefix", help="topic prefix (default: the config's, or edge/v1)")
    if timeout:
        g.add_argument(
            "--timeout", type=float, default=10.0, metavar="S", help="seconds to wait for the controller (default 10)"
        )


def mqtt_config(args: argparse.Namespace) -> MqttConfig:
    """The broker settings from --config / $FLEET_CONFIG, then --broker and --prefix on top."""
    path = getattr(args, "config", None) or os.environ.get(CONFIG_ENV)
    if path:
        from fleet.config import load_fleet_config

        cfg = load_fleet_config(Path(path)).mqtt
    else:
        cfg = MqttConfig()
    update: Dict[str, Any] = {}
    broker = getattr(args, "broker", None)
    if broker:
        host, _, port = broker.rpartition(":") if ":" in broker else (broker, "", "")
        if not host:
            raise CliError("--broker %r: expected HOST or HOST:PORT" % broker)
        update["host"] = host
        if port:
            try:
                update["port"] = int(port)
            except ValueError:
                raise CliError("--broker %r: port %r is not a number" % (broker, port))
            if not 0 < update["port"] < 65536:
                raise CliError("--broker %r: port out of range" % broker)
    prefix = getattr(args, "prefix", None)
    if prefix:
        update["prefix"] = prefix
    if update:
        try:
            cfg = MqttConfig.model_validate({**cfg.model_dump(), **update})
        except ValueError as e:
            raise CliError("bad broker option: %s" % str(e).splitlines()[0])
    return cfg


def rpc_call(args: argparse.Namespace, method: str, params: Optional[Dict[str, Any]] = None) -> Any:
    """Connect, make one RPC call to the controller, disconnect."""
    from fleet.rpc import RpcClient

    cfg = mqtt_config(args)
    with RpcClient.connect(cfg, connect_timeout_s=min(10.0, args.timeout)) as client:
        return client.call(method, params or {}, timeout_s=args.timeout)


def split_ids(values: Optional[list]) -> list:
    """Device ids from repeated and/or comma-separated options, in order, without duplicates."""
    out: list = []
    for v in values or []:
        for part in v.replace(" ", ",").split(","):
            part = part.strip()
            if part and part not in out:
                out.append(part)
    return out
