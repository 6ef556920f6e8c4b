"""The paho-mqtt boundary of an `MqttSession`: the client built from `[mqtt]` (MQTT 5, credentials, TLS,
Last Will, CONNECT properties: maximum packet size, no session expiry), and the conversions of a publish's
and a received message's MQTT 5 properties. paho is imported here, lazily."""

from __future__ import annotations

import ssl
from typing import Any, Dict, Optional, Tuple

from edge_agent.config import MqttConfig
from edge_agent.errors import ConfigError
from edge_agent.mqtt.packets import Inbound, Outgoing, Will

#: Bytes an MQTT 5 PUBLISH header may add around the payload (topic, properties, user properties).
PACKET_OVERHEAD_BYTES = 16 * 1024


def make_client(cfg: MqttConfig, *, client_id: str, will: Optional[Will]) -> Tuple[Any, Any]:
    """A new paho client (callbacks not set, not connected) and the CONNECT properties to connect with.

    Raises ConfigError when the password file or the TLS certificates cannot be read."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from edge_agent.mqtt.props import install as install_region_only_property_parsing

    install_region_only_property_parsing()  # large chunks with user properties cost far less CPU
    client = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        reconnect_on_failure=False,
    )
    client.max_queued_messages_set(cfg.max_queued_messages)
    client.max_inflight_messages_set(64)
    if cfg.username:
        password = None
        if cfg.password_file is not None:
            try:
                password = cfg.password_file.read_text(encoding="utf-8").strip()
            except OSError as e:
                raise ConfigError("mqtt.password_file %s cannot be read: %s" % (cfg.password_file, e.strerror))
        client.username_pw_set(cfg.username, password)
    if cfg.tls is not None:
        try:
            client.tls_set(
                ca_certs=str(cfg.tls.ca_file),
                certfile=str(cfg.tls.cert_file) if cfg.tls.cert_file else None,
                keyfile=str(cfg.tls.key_file) if cfg.tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except (OSError, ssl.SSLError, ValueError) as e:
            raise ConfigError("mqtt.tls: cannot load certificates: %s" % e)
        if cfg.tls.insecure_skip_hostname_check:
            client.tls_insecure_set(True)
    if will is not None:
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
    connect_props = Properties(PacketTypes.CONNECT)
    # Ask the broker never to send us a packet we would refuse anyway: it drops it instead of
    # making us allocate it.
    connect_props.MaximumPacketSize = cfg.max_payload_bytes + PACKET_OVERHEAD_BYTES
    connect_props.SessionExpiryInterval = 0
    return client, connect_props


def publish_properties(item: Outgoing) -> Any:
    """The PUBLISH properties of a queued publish (user properties, response topic, correlation data,
    message expiry), or None when it has none."""
    if not (item.user_properties or item.response_topic or item.correlation_data is not None or item.expiry_s):
        return None
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.PUBLISH)
    if item.expiry_s:
        props.MessageExpiryInterval = int(item.expiry_s)
    if item.user_properties:
        props.UserProperty = [(k, str(v)) for k, v in item.user_properties.items()]
    if item.response_topic:
        props.ResponseTopic = item.response_topic
    if item.correlation_data is not None:
        props.CorrelationData = item.correlation_data
    return props


def inbound_from(msg: Any) -> Inbound:
    """A received paho message as an `Inbound` with plain-value metadata."""
    props = getattr(msg, "properties", None)
    user: Dict[str, str] = {}
    response_topic = None
    correlation = None
    if props is not None:
        for k, v in getattr(props, "UserProperty", None) or []:
            user[k] = v
        response_topic = getattr(props, "ResponseTopic", None)
        correlation = getattr(props, "CorrelationData", None)
    return Inbound(msg.topic, msg.payload, msg.qos, bool(msg.retain), user, response_topic, correlation)
