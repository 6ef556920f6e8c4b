"""Telemetry: system collectors, the offline spool, the message builder, Prometheus text and the publisher."""
