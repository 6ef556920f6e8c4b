"""Hostile input to the agent's MQTT handlers, with hypothesis: the command handler and the chunk
handler get random bytes, wrong JSON types, huge values, unknown fields, wrong schema versions and
commands re-signed by the trusted key after such a mutation. Nothing crashes, nothing on disk changes
(`state.json`, the store), and malformed payloads are counted. One end-to-end check over mosquitto: a
payload over the session's maximum packet size is dropped by the broker, never sent to the agent.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
from agent_helpers import write_key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.agent import Agent
from edge_agent.config import AgentConfig, MqttConfig, TransferConfig
from edge_agent.errors import CommandError, TransportError
from edge_agent.mqtt.packets import Inbound
from edge_agent.mqtt.session import MqttSession
from edge_agent.protocol import topics
from edge_agent.protocol.commands import sign_command, verify_command
from edge_agent.protocol.messages import BundleRef, CommandEnvelope, DeployArgs, MessageError, PingArgs
from edge_agent.signing import PrivateKey, sign_document

FUZZ = settings(max_examples=int(os.environ.get("EDGE_AGENT_FUZZ_EXAMPLES", "200")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# ------------------------------------------------------------------------------------------ strategies

huge_ints = st.sampled_from([2 ** 63, 2 ** 64 + 1, -(2 ** 63) - 1, 10 ** 40, -1, 0])
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), huge_ints,
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
                         st.text(min_size=2000, max_size=3000))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=12)


def _paths(doc: Any, prefix=()) -> List[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.extend(_paths(v, (*prefix, i)))
    return out


def _set(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    doc = json.loads(json.dumps(doc))
    cur = doc
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    return doc


@st.composite
def mutated(draw, base: Dict[str, Any]) -> Any:
    """`base` with one hostile change: a value of another type, an unknown field, a wrong schema."""
    how = draw(st.sampled_from(["replace", "unknown", "schema", "drop"]))
    paths = _paths(base)
    path = draw(st.sampled_from(paths))
    if how == "replace":
        return how, _set(base, path, draw(json_values))
    if how == "unknown":
        dicts = [p for p in paths if isinstance(_get(base, p), dict)]
        p = draw(st.sampled_from(dicts))
        name = draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in _get(base, p)))
        return how, _set(base, (*p, name), draw(json_values))
    if how == "schema":
        dicts = [p for p in paths if isinstance(_get(base, p), dict) and "schema" in _get(base, p)]
        if not dicts:
            return how, _set(base, ("schema",), "edge-agent/x/1")
        p = draw(st.sampled_from(dicts))
        old = _get(base, p)["schema"]
        new = draw(st.sampled_from([old[:-1] + "2", old[:-1] + "0", old.upper(), ""]))
        return how, _set(base, (*p, "schema"), new)
    keyed = [p for p in paths if p and isinstance(p[-1], str)]
    p = draw(st.sampled_from(keyed))
    doc = json.loads(json.dumps(base))
    parent = _get(doc, p[:-1])
    del parent[p[-1]]
    return how, doc


def _get(doc: Any, path: tuple) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def _enc(doc: Any) -> bytes:
    return json.dumps(doc).encode()


# ------------------------------------------------------------------------------------------ the agent


class AgentUnderTest:
    """A real Agent (store, deployer, trust) without the network; events are recorded."""

    def __init__(self, tmp: Path) -> None:
        self.controller = write_key(tmp / "command-keys", "controller")
        self.stranger = PrivateKey.generate("stranger")
        (tmp / "bundle-keys").mkdir()
        cfg = AgentConfig.model_validate({
            "device_id": "dev1", "state_dir": str(tmp / "state"),
            "trust": {"bundle_keys_dir": str(tmp / "bundle-keys"),
                      "command_keys": [str(tmp / "command-keys" / "controller.pub")]},
            "engine": {"backend": "onnxruntime"}, "api": {"enabled": False},
        })
        self.agent = Agent(cfg).build(with_mqtt=False)
        self.events: List[tuple] = []
        self.agent.emit = lambda kind, message, **kw: self.events.append((kind, message))
        self.state_path = tmp / "state" / "state.json"
        # One accepted command so state.json exists and the replay counter is above zero.
        self.seq = int(time.time())
        self.agent.handle_command(self.signed(PingArgs(nonce="hello")))
        assert self.agent.store.state.last_command_seq == self.seq

    def signed(self, args, *, seq=None, key=None, device="dev1") -> bytes:
        return sign_command(args, device_id=device, seq=seq or self.seq, keys=[key or self.controller],
                            now=int(time.time()))

    def snapshot(self) -> tuple:
        objects = sorted(p.name for p in (self.agent.store.objects_dir).iterdir())
        return self.state_path.read_bytes(), objects

    def would_accept(self, raw: bytes) -> bool:
        st = self.agent.store.state
        if hashlib.sha256(raw).hexdigest() == st.last_command_sha256:
            return True  # the quiet duplicate path
        try:
            verify_command(raw, device_id="dev1", trusted=self.agent._command_keys(), last_seq=st.last_command_seq,
                           now=self.agent.deployer.now(), max_age_s=self.agent.cfg.trust.max_command_age_s)
        except CommandError:
            return False
        return True

    def close(self) -> None:
        self.agent.shutdown()


@pytest.fixture(scope="module")
def dut(tmp_path_factory):
    a = AgentUnderTest(tmp_path_factory.mktemp("fuzz-agent"))
    yield a
    a.close()


def _check_command(dut: AgentUnderTest, raw: bytes) -> None:
    """`raw` is refused (the product's own verifier is the oracle): nothing changes, malformed counted."""
    before = dut.snapshot()
    assert not dut.would_accept(raw)
    try:
        CommandEnvelope.from_json(raw, max_bytes=64 * 1024)
        parses = True
    except MessageError:
        parses = False
    malformed = dut.agent.malformed
    n_events = len(dut.events)
    dut.agent.handle_command(raw)  # must not raise
    assert dut.snapshot() == before, "a refused command changed state.json or the store"
    new = dut.events[n_events:]
    assert [k for k, _ in new] == ["command-refused"], new
    assert dut.agent.malformed == malformed + (0 if parses else 1)


def _valid_deploy_doc(dut: AgentUnderTest) -> Dict[str, Any]:
    args = DeployArgs(bundle=BundleRef(name="digits", version=7), manifest_sha256="ab" * 32, manifest_size=1234,
                      rollout_id="r1")
    return json.loads(dut.signed(args, seq=dut.seq + 1000))


@FUZZ
@given(raw=st.one_of(st.binary(max_size=3000), json_values.map(_enc), st.text(max_size=200).map(str.encode)))
def test_command_handler_random_bytes_and_json_refused_counted_no_state_change(dut, raw):
    _check_command(dut, raw)


@FUZZ
@given(data=st.data())
def test_command_handler_mutated_envelope_refused_no_state_change(dut, data):
    """A valid signed deploy with one hostile change, signatures left as they were."""
    how, doc = data.draw(mutated(_valid_deploy_doc(dut)))
    raw = _enc(doc)
    if how in ("replace", "drop") and dut.would_accept(raw):
        return  # a value replaced by itself, or a field at its default dropped: still the valid command
    _check_command(dut, raw)


@FUZZ
@given(data=st.data())
def test_command_handler_mutated_then_resigned_by_trusted_key_refused(dut, data):
    """The trusted controller key signs a body with a wrong type, an unknown field or a wrong schema
    version: the schema check refuses it (the key holder cannot smuggle in an invalid command)."""
    body = _valid_deploy_doc(dut)["signed"]
    how, signed = data.draw(mutated(body))
    if not isinstance(signed, dict):
        signed = {"value": signed}
    try:
        doc = sign_document(signed, [dut.controller])
    except Exception:
        return  # not signable (floats are refused by the canonical form): nothing to send
    raw = _enc(doc)
    if how in ("replace", "drop") and dut.would_accept(raw):
        # The key holder changed a value to another valid one (another rollout id, a default-valued
        # field dropped): a valid command, not hostile input.
        return
    _check_command(dut, raw)  # unknown fields and wrong schema versions are never accepted


def test_command_signed_by_untrusted_key_or_for_another_device_refused_not_malformed(dut):
    for raw in (dut.signed(PingArgs(), seq=dut.seq + 5, key=dut.stranger),
                dut.signed(PingArgs(), seq=dut.seq + 5, device="dev2"),
                dut.signed(PingArgs(), seq=dut.seq - 1)):  # a replay
        _check_command(dut, raw)


# ------------------------------------------------------------------------------------------ chunks

CHUNK = 4096
FILE = os.urandom(3 * CHUNK - 100)
FILE_SHA = hashlib.sha256(FILE).hexdigest()


@pytest.fixture(scope="module")
def fetcher(tmp_path_factory):
    from edge_agent.bundle.store import BundleStore
    from edge_agent.transfer.fetcher import Fetcher

    tmp = tmp_path_factory.mktemp("fuzz-chunks")
    store = BundleStore(tmp / "state").open()
    # A real session that is never started: publishes (the re-requests) only queue.
    session = MqttSession(MqttConfig(), client_id="dev1", outgoing_queue=1 << 20)
    f = Fetcher(session, store, TransferConfig(chunk_bytes=CHUNK, max_retries=3), prefix="edge/v1", device_id="dev1")
    yield f
    session.stop()


def _fresh_run(fetcher):
    from edge_agent.transfer.fetcher import FetchStats, _Run
    from edge_agent.transfer.partial import PendingRequest

    t = fetcher._target(FILE_SHA, len(FILE), "payload.bin")
    fetcher._open(t)
    run = _Run(BundleRef(name="digits", version=3), FetchStats(bytes_total=len(FILE)))
    run.remaining[FILE_SHA] = t
    req = PendingRequest(t, 1, time.monotonic(), attempts=1, corr=b"corr-1")
    run.outstanding[req.corr] = req
    return t, run


def _good_props(index: int) -> Dict[str, str]:
    off = index * CHUNK
    length = min(CHUNK, len(FILE) - off)
    return {"sha256": FILE_SHA, "offset": str(off), "length": str(length), "total": str(len(FILE))}


prop_values = st.one_of(st.text(max_size=20), st.sampled_from([FILE_SHA, "0", "4096", str(len(FILE)), "-1",
                                                               "99999999999999999999", "4096 ", "0x1000"]))


@st.composite
def chunk_messages(draw):
    corr = draw(st.one_of(st.none(), st.just(b"corr-1"), st.binary(max_size=24)))
    props = draw(st.one_of(
        st.dictionaries(st.sampled_from(["sha256", "offset", "length", "total", "error", "x"]), prop_values,
                        max_size=6),
        st.builds(lambda k, v: dict(_good_props(1), **{k: v}),
                  st.sampled_from(["sha256", "offset", "length", "total"]), prop_values),
    ))
    good_len = int(_good_props(1)["length"])
    payload = draw(st.one_of(st.binary(max_size=64), st.binary(min_size=good_len, max_size=good_len),
                             st.binary(min_size=good_len + 1, max_size=good_len + 64)))
    return Inbound(topics.chunks("edge/v1", "dev1"), payload, 1, False, props, None, corr)


@FUZZ
@given(msg=chunk_messages())
def test_chunk_handler_hostile_answers_never_crash_never_enter_the_store(fetcher, msg):
    t, run = _fresh_run(fetcher)
    store = fetcher.store
    objects_before = sorted(p.name for p in store.objects_dir.iterdir())
    bad_before = fetcher.malformed
    props = msg.user_properties
    good = _good_props(1)
    acceptable = (msg.correlation_data == b"corr-1" and not props.get("error")
                  and all(props.get(k) == v for k, v in good.items()) and len(msg.payload) == int(good["length"]))
    try:
        fetcher._handle(msg, run)
    except TransportError as e:
        # Only a refusal the controller signalled ends the transfer, with a clear error.
        assert props.get("error") and msg.correlation_data == b"corr-1", e
    finally:
        fetcher._close(t, save_map=False)
        store.drop_partial(FILE_SHA)
    assert sorted(p.name for p in store.objects_dir.iterdir()) == objects_before
    assert t.cmap.has(1) == acceptable
    if msg.correlation_data != b"corr-1":
        assert run.stats.stray_chunks == 1
    elif not acceptable and not props.get("error"):
        assert run.stats.bad_chunks == 1 and fetcher.malformed == bad_before + 1
        assert b"corr-1" in run.outstanding  # asked again


def test_chunk_handler_forged_bytes_with_right_metadata_caught_by_file_hash(fetcher):
    """Right metadata, wrong bytes for every chunk: the file never enters the store."""
    from edge_agent.errors import IntegrityError
    from edge_agent.transfer.partial import PendingRequest

    t, run = _fresh_run(fetcher)
    run.outstanding.clear()
    try:
        with pytest.raises(IntegrityError):
            for _ in range(fetcher.cfg.max_retries + 1):
                for i in range(t.cmap.count):
                    req = PendingRequest(t, i, time.monotonic(), corr=b"c%d" % i)
                    run.outstanding[req.corr] = req
                    p = _good_props(i)
                    fetcher._handle(Inbound("x", os.urandom(int(p["length"])), 1, False, p, None, req.corr), run)
    finally:
        fetcher._close(t, save_map=False)
        fetcher.store.drop_partial(FILE_SHA)
    assert not fetcher.store.has_object(FILE_SHA)


def test_chunk_inbox_is_bounded_under_a_flood(fetcher):
    dropped = fetcher.inbox_dropped
    cap = fetcher._inbox.maxsize
    for _ in range(cap + 50):
        fetcher.on_chunk(Inbound("x", b"y" * 10))
    assert fetcher._inbox.qsize() == cap and fetcher.inbox_dropped == dropped + 50
    while not fetcher._inbox.empty():
        fetcher._inbox.get_nowait()


# ------------------------------------------------------------------------------------------ broker


@pytest.mark.mqtt
def test_oversized_payload_refused_by_the_broker_before_the_agent_allocates_it(broker):
    """The agent's session announces its maximum packet size in CONNECT; mosquitto then drops a bigger
    message for it instead of sending it: the agent never receives (never allocates) the bytes."""
    limit = 64 * 1024
    agent_cfg = MqttConfig(host=broker.host, port=broker.port, max_payload_bytes=limit)
    got: List[int] = []
    agent = MqttSession(agent_cfg, client_id="dev-small")
    agent.subscribe(topics.commands("edge/v1", "dev-small"), lambda m: got.append(len(m.payload)), qos=1)
    attacker = MqttSession(MqttConfig(host=broker.host, port=broker.port), client_id="attacker")
    agent.start()
    attacker.start()
    try:
        assert agent.wait_connected(10) and attacker.wait_connected(10)
        assert agent.wait_subscribed(10), agent.last_error
        topic = topics.commands("edge/v1", "dev-small")
        assert attacker.publish(topic, os.urandom(limit * 4), qos=1).wait(10)
        assert attacker.publish(topic, b"small", qos=1).wait(10)
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        # One publisher, one topic, one QoS: MQTT keeps their order, so the big one sent first would
        # have arrived before the small one.
        assert got == [5], got  # only the small one arrived
        assert agent.stats["oversize_dropped"] == 0  # refused before it reached us, not after
        assert agent.connected.is_set()
    finally:
        attacker.stop()
        agent.stop()
