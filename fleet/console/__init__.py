"""The operator console of `fleet serve`: a REST API over the controller's RPC methods, a web UI
without a build step, and the fleet-wide Prometheus ``/metrics`` (docs/console.md)."""
