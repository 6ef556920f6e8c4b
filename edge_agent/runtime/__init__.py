"""Serving: dynamic batching, the small/large DynamicRouter, pre/post-processing, HTTP API, sources."""
