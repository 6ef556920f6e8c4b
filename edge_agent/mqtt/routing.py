"""Routing received MQTT messages to the handlers whose topic filters match, without a per-message scan.

A session's subscriptions are few (a device has two, a controller about six) but a controller receives
thousands of messages a second on thousands of distinct topics (`{p}/devices/{id}/telemetry`). Matching
each message against every filter with paho's `topic_matches_sub` costs microseconds per filter; here
exact filters are a dict lookup, wildcard filters are compiled once to a regular expression, and the
handler list of each topic is cached (bounded), so a repeated topic costs one dict lookup.

Matching follows MQTT 5 §4.7: `+` is one level (possibly empty), a trailing `#` is the parent level and
everything below it, a filter starting with a wildcard never matches a topic starting with `$`, and a
shared subscription `$share/{group}/{filter}` matches like `{filter}`.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Callable, Dict, List, Optional, Pattern, Tuple

#: Distinct topics whose handler lists are remembered; past it the cache starts over.
DEFAULT_CACHE_TOPICS = 65536

Route = Tuple[str, Callable[[Any], None]]


def plain_filter(topic_filter: str) -> str:
    """A shared subscription `$share/group/filter` matches topics like `filter`."""
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        return parts[2] if len(parts) == 3 else topic_filter
    return topic_filter


def compile_filter(topic_filter: str) -> Optional[Pattern[str]]:
    """A regular expression for a wildcard filter, or None when the filter has no wildcard (exact)."""
    if "+" not in topic_filter and "#" not in topic_filter:
        return None
    levels = topic_filter.split("/")
    out = []
    for i, level in enumerate(levels):
        sep = "/" if i else ""
        if level == "#":
            if i != len(levels) - 1:
                raise ValueError("'#' must be the last level of topic filter %r" % topic_filter)
            out.append("(?:/.*)?" if i else ".*")
        elif level == "+":
            out.append(sep + "[^/]*")
        elif "+" in level or "#" in level:
            raise ValueError("a wildcard must fill a whole level in topic filter %r" % topic_filter)
        else:
            out.append(sep + re.escape(level))
    pattern = "".join(out)
    if levels[0] in ("+", "#"):
        pattern = "(?!\\$)" + pattern  # wildcards at the first level do not match $SYS-style topics
    return re.compile(pattern + "\\Z", re.DOTALL)


class TopicRouter:
    """Subscription filters → handlers, with exact filters hashed and results cached per topic.

    `add` may be called from any thread; `routes` is meant for the one network thread and reads an
    immutable snapshot, so it takes no lock on the hot path.
    """

    def __init__(self, cache_topics: int = DEFAULT_CACHE_TOPICS) -> None:
        self._lock = threading.Lock()
        self._entries: List[Tuple[str, Callable[[Any], None]]] = []
        self._exact: Dict[str, List[Tuple[int, Route]]] = {}
        self._wild: List[Tuple[int, Pattern[str], Route]] = []
        self._cache: Dict[str, Tuple[Route, ...]] = {}
        self._cache_topics = max(1, cache_topics)

    def add(self, topic_filter: str, handler: Callable[[Any], None]) -> None:
        """Route topics matching `topic_filter` (shared subscriptions allowed) to `handler`."""
        plain = plain_filter(topic_filter)
        rx = compile_filter(plain)
        with self._lock:
            idx = len(self._entries)
            self._entries.append((topic_filter, handler))
            exact = {k: list(v) for k, v in self._exact.items()}
            wild = list(self._wild)
            route = (topic_filter, handler)
            if rx is None:
                exact.setdefault(plain, []).append((idx, route))
            else:
                wild.append((idx, rx, route))
            # Swap whole objects: a concurrent `routes` sees the old set or the new one, never half.
            self._exact, self._wild, self._cache = exact, wild, {}

    def routes(self, topic: str) -> Tuple[Route, ...]:
        """(filter, handler) pairs matching `topic`, in subscription order."""
        cache = self._cache
        hit = cache.get(topic)
        if hit is not None:
            return hit
        found = list(self._exact.get(topic, ()))
        for idx, rx, route in self._wild:
            if rx.match(topic):
                found.append((idx, route))
        if len(found) > 1:
            found.sort(key=lambda item: item[0])
        result = tuple(route for _, route in found)
        if len(cache) >= self._cache_topics:
            cache.clear()
        cache[topic] = result
        return result

    def filters(self) -> List[str]:
        """The filters added so far, in order."""
        with self._lock:
            return [f for f, _ in self._entries]
