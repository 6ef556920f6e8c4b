"""The device's and the controller's MQTT 5 client side.

`session` is the one-thread paho session (everything else hands it work through a bounded queue);
`client` builds its paho client and converts MQTT 5 properties; `packets` holds the values it takes and
gives (Will, Inbound, Outgoing, Delivery); `backoff` paces reconnects; `props` parses MQTT 5 user
properties fast; `routing` finds the handlers of an incoming topic.
"""
