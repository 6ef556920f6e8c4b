"""Message routing by topic filter: the cached router agrees with paho's reference matcher, keeps
subscription order, forgets its cache when a subscription is added, and follows MQTT's `$` rule."""

from __future__ import annotations

import random

import pytest

from edge_agent.mqtt.routing import TopicRouter, compile_filter, plain_filter

LEVELS = ["a", "b", "dev-1", "telemetry", "", "$SYS", "x.y", "(", "*"]


def _random_filter(rng: random.Random) -> str:
    n = rng.randint(1, 4)
    levels = [rng.choice([*LEVELS, "+", "+"]) for _ in range(n)]
    if rng.random() < 0.3:
        levels.append("#")
    return "/".join(levels)


def _random_topic(rng: random.Random) -> str:
    return "/".join(rng.choice(LEVELS) for _ in range(rng.randint(1, 5)))


def test_router_agrees_with_paho_topic_matches_sub_on_random_filters_and_topics():
    from paho.mqtt.client import topic_matches_sub

    rng = random.Random(7)
    checked = matched = 0
    for _ in range(200):
        filters = [_random_filter(rng) for _ in range(rng.randint(1, 6))]
        router = TopicRouter()
        for i, f in enumerate(filters):
            router.add(f if rng.random() < 0.7 else "$share/g/" + f, i)
        for _ in range(40):
            topic = _random_topic(rng)
            expected = [i for i, f in enumerate(filters) if topic_matches_sub(f, topic)]
            for _ in range(2):  # the second answer comes from the cache
                assert [h for _, h in router.routes(topic)] == expected, (filters, topic)
            checked += 1
            matched += bool(expected)
    assert checked == 8000 and 500 < matched < 7500  # both outcomes well exercised


def test_handlers_run_in_subscription_order_across_exact_and_wildcard_filters():
    router = TopicRouter()
    router.add("p/devices/+/telemetry", "wild-1")
    router.add("p/devices/d1/telemetry", "exact")
    router.add("$share/ctl/p/#", "shared")
    assert [h for _, h in router.routes("p/devices/d1/telemetry")] == ["wild-1", "exact", "shared"]
    assert [f for f, _ in router.routes("p/devices/d2/telemetry")] == ["p/devices/+/telemetry", "$share/ctl/p/#"]
    assert router.routes("q/devices/d1/telemetry") == ()


def test_a_subscription_added_later_reaches_topics_already_cached():
    router = TopicRouter()
    router.add("p/a", "first")
    assert [h for _, h in router.routes("p/b")] == []
    router.add("p/+", "later")
    assert [h for _, h in router.routes("p/b")] == ["later"]
    assert [h for _, h in router.routes("p/a")] == ["first", "later"]


def test_cache_is_bounded():
    router = TopicRouter(cache_topics=10)
    router.add("p/+", "h")
    for i in range(100):
        assert router.routes("p/%d" % i)[0][1] == "h"
    assert len(router._cache) <= 10


def test_leading_wildcards_do_not_match_dollar_topics_and_hash_matches_the_parent():
    assert not compile_filter("#").match("$SYS/broker")
    assert not compile_filter("+/broker").match("$SYS/broker")
    assert compile_filter("$SYS/#").match("$SYS/broker")
    assert compile_filter("sport/#").match("sport")
    assert not compile_filter("sport/#").match("sports")
    assert compile_filter("a/+/c") is not None and compile_filter("a/b/c") is None
    assert plain_filter("$share/g/a/+") == "a/+" and plain_filter("a/b") == "a/b"


@pytest.mark.parametrize("bad", ["a/#/b", "a/b#", "a+/b"])
def test_malformed_filters_are_refused(bad):
    with pytest.raises(ValueError):
        TopicRouter().add(bad, "h")
