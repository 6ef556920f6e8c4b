"""Chunked, resumable, windowed pull of bundle files over MQTT 5."""
