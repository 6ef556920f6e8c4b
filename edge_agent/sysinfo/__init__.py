"""Facts about the host read from the kernel (/proc), shared by engine sizing, telemetry and the agent.

`meminfo`: /proc/meminfo in bytes. It lives here rather than in `telemetry/` or `engines/` because
both of those, and the agent's platform announcement, read it: neither should import the other for it.
"""
