"""The broker's access rules as a mosquitto dynamic-security document (``dynamic-security.json``).

mosquitto 2.0's plain ``acl_file`` accepts every SUBSCRIBE, ``$share/<group>/...`` included, and checks
``read`` only when a message is delivered. A device that joins the controller's shared subscription
(``$share/fleet/{p}/devices/+/fetch``, ``.../events``, ``.../telemetry``, ``$share/fleet-rpc/{p}/fleet/rpc``)
therefore takes a round-robin turn, and the broker then drops that message at the ACL instead of giving it
to a controller. The dynamic-security plugin (``mosquitto_dynamic_security.so``, shipped with Debian's and
Ubuntu's mosquitto 2.0) checks SUBSCRIBE against ``subscribeLiteral`` / ``subscribePattern`` rules, with
the full filter (``$share/...`` included), and refuses it in the SUBACK: a device cannot join those groups.

The plugin in 2.0.11 does not expand ``%u`` or ``%c`` in its rules (``plugins/dynamic-security/acl.c``
matches topics as written), so every device gets its own role naming its own topics. Every identity gets
only its own role, so the controller and operator names are never treated as devices (the old ``pattern``
lines applied to every user).

`build_document` is pure: names in, the JSON document out. ``fleet broker dynsec`` writes it.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterable, List, Sequence

from edge_agent.protocol import topics

#: Rules for anything no role names: publish, receive and subscribe are refused; unsubscribing is harmless.
DEFAULT_ACL_ACCESS = {"publishClientSend": False, "publishClientReceive": False, "subscribe": False,
                      "unsubscribe": True}
#: What a device publishes on its own topics (``fetch``: its chunk requests; only it may publish there, so the
#: controller knows who asked).
DEVICE_REPORTS = ("status", "telemetry", "events", "results", "fetch")
DEVICE_INBOX = ("commands", "chunks")


class DynsecError(ValueError):
    """A name that cannot be an identity (the caller's mistake)."""


def _acl(acltype: str, topic: str, allow: bool = True) -> Dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": allow, "priority": 0}


def _receive_and_subscribe(filters: Iterable[str], *, shared: bool = False) -> List[Dict[str, Any]]:
    """Receive messages matching each filter and subscribe to it (also through any `$share` group when
    `shared`)."""
    out = []
    for f in filters:
        out.append(_acl("publishClientReceive", f))
        out.append(_acl("subscribePattern", f))
        if shared:
            out.append(_acl("subscribePattern", "$share/+/" + f))
    return out


def device_role(prefix: str, device_id: str) -> Dict[str, Any]:
    """A device publishes its own reports and fetch requests (all on its own topics), and reads its own commands
    and chunks."""
    acls = [_acl("publishClientSend", topics.device_topic(prefix, device_id, c)) for c in DEVICE_REPORTS]
    for c in DEVICE_INBOX:
        t = topics.device_topic(prefix, device_id, c)
        acls += [_acl("publishClientReceive", t), _acl("subscribeLiteral", t)]
    return {"rolename": "device-" + device_id, "textname": "edge-agent device %s" % device_id, "acls": acls}


def controller_role(prefix: str) -> Dict[str, Any]:
    """The controller reads every device's reports, fetch requests and CLI requests (directly or through any
    shared-subscription group), sends commands, chunks and CLI replies, and may clear a retained CLI
    request (an empty retained publish on ``{p}/fleet/rpc``)."""
    reads = [topics.all_devices(prefix, c) for c in DEVICE_REPORTS]
    reads.append(topics.fleet_rpc(prefix))
    acls = _receive_and_subscribe(reads, shared=True)
    sends = [topics.all_devices(prefix, c) for c in DEVICE_INBOX]
    sends += [prefix + "/fleet/rpc-reply/#", topics.fleet_rpc(prefix)]
    acls += [_acl("publishClientSend", t) for t in sends]
    return {"rolename": "fleet-controller", "textname": "fleet controller (fleet serve)", "acls": acls}


def operator_role(prefix: str, name: str) -> Dict[str, Any]:
    """An operator sends CLI requests, reads the replies under its own name, and follows the devices'
    telemetry and retained status (never through a shared subscription)."""
    reads = [prefix + "/fleet/rpc-reply/%s/#" % name, topics.all_devices(prefix, "telemetry"),
             topics.all_devices(prefix, "status")]
    acls = _receive_and_subscribe(reads)
    acls.append(_acl("publishClientSend", topics.fleet_rpc(prefix)))
    return {"rolename": "operator-" + name, "textname": "fleet operator %s" % name, "acls": acls}


def admin_role() -> Dict[str, Any]:
    """Who may change the rules at run time with `mosquitto_ctrl dynsec ...` (the plugin's control topic)."""
    t = "$CONTROL/dynamic-security/#"
    acls = [_acl("publishClientSend", t), _acl("publishClientReceive", t), _acl("subscribePattern", t)]
    return {"rolename": "dynsec-admin", "textname": "changes these rules (mosquitto_ctrl)", "acls": acls}


def _check_names(devices: Sequence[str], controllers: Sequence[str], operators: Sequence[str],
                 admins: Sequence[str] = ()) -> None:
    seen: Dict[str, str] = {}
    for kind, names in (("device", devices), ("controller", controllers), ("operator", operators),
                        ("admin", admins)):
        for n in names:
            try:
                topics.device_topic(topics.DEFAULT_PREFIX, n, "status")  # the same rule as device ids
            except ValueError as e:
                raise DynsecError("%s name: %s" % (kind, e))
            if n in seen:
                raise DynsecError("%r is named both as %s and as %s; one identity has one role" % (n, seen[n], kind))
            seen[n] = kind


def build_document(*, prefix: str = topics.DEFAULT_PREFIX, devices: Sequence[str] = (),
                   controllers: Sequence[str] = ("fleet-controller",),
                   operators: Sequence[str] = ("fleet-operator",), admins: Sequence[str] = ()) -> Dict[str, Any]:
    """The dynamic-security document: one client per identity (no password: with certificates the broker
    takes the CN as the username and skips password checks; with the password drop-in the password file
    authenticates) and one role per client. `admins` may change the rules at run time."""
    _check_names(devices, controllers, operators, admins)
    roles = [controller_role(prefix)] if controllers else []
    clients = [{"username": c, "roles": [{"rolename": "fleet-controller"}]} for c in controllers]
    for name in operators:
        role = operator_role(prefix, name)
        roles.append(role)
        clients.append({"username": name, "roles": [{"rolename": role["rolename"]}]})
    for d in devices:
        role = device_role(prefix, d)
        roles.append(role)
        clients.append({"username": d, "roles": [{"rolename": role["rolename"]}]})
    if admins:
        roles.append(admin_role())
        clients += [{"username": a, "roles": [{"rolename": "dynsec-admin"}]} for a in admins]
    return {"defaultACLAccess": dict(DEFAULT_ACL_ACCESS), "clients": clients, "groups": [], "roles": roles}


def device_ctrl_commands(prefix: str, device_id: str) -> List[List[str]]:
    """The `mosquitto_ctrl dynsec ...` arguments that add one device to a running broker (the same role the
    file would hold), for an identity with the admin role."""
    _check_names([device_id], [], [])
    role = device_role(prefix, device_id)
    out = [["dynsec", "createRole", role["rolename"]]]
    for a in role["acls"]:
        out.append(["dynsec", "addRoleACL", role["rolename"], a["acltype"], a["topic"], "allow"])
    out.append(["dynsec", "createClient", device_id])
    out.append(["dynsec", "addClientRole", device_id, role["rolename"]])
    return out


def render(doc: Dict[str, Any]) -> str:
    """The document as the file the plugin reads (``plugin_opt_config_file``)."""
    return json.dumps(doc, indent=2, sort_keys=False) + "\n"
