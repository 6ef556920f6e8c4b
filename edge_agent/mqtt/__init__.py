"""The device's and the controller's MQTT 5 client side.

`session` is the one-thread paho session (everything else hands it work through a bounded queue),
`props` parses MQTT 5 user properties, `routing` finds the handlers of an incoming topic.
"""
