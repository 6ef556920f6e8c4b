"""`fleet keygen` and `fleet bundle build|verify|inspect`, run in-process through `fleet.cli.main`."""

from __future__ import annotations

import json
import stat
import tarfile
from pathlib import Path

import pytest

from fleet.cli import main

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "digits"


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two key pairs and a bundle of the sample models signed by `release`."""
    d = tmp_path_factory.mktemp("cli")
    assert main(["keygen", "--out", str(d / "keys")]) == 0
    assert main(["keygen", "--out", str(d / "keys"), "--name", "second"]) == 0
    assert main(["keygen", "--out", str(d / "other"), "--name", "mallory"]) == 0
    bundle = d / "digits.bundle"
    assert main(["bundle", "build", str(SAMPLES / "bundle.toml"), "--key", str(d / "keys/release.key"),
                 "--out", str(bundle)]) == 0
    return d, bundle


def test_keygen_writes_a_private_key_readable_only_by_its_owner(tmp_path, capsys):
    rc, out, _ = run(capsys, "keygen", "--out", tmp_path / "k", "--name", "ops")
    assert rc == 0
    assert "key id" in out
    assert stat.S_IMODE((tmp_path / "k/ops.key").stat().st_mode) == 0o600
    assert (tmp_path / "k/ops.pub").read_text().startswith("edge-agent-ed25519-pub ")


def test_keygen_refuses_to_overwrite_a_key(tmp_path, capsys):
    assert run(capsys, "keygen", "--out", tmp_path, "--name", "ops")[0] == 0
    before = ((tmp_path / "ops.key").read_bytes(), (tmp_path / "ops.pub").read_bytes())
    rc, _, err = run(capsys, "keygen", "--out", tmp_path, "--name", "ops")
    assert rc != 0
    assert "already exists" in err and len(err.strip().splitlines()) == 1
    assert ((tmp_path / "ops.key").read_bytes(), (tmp_path / "ops.pub").read_bytes()) == before


def test_keygen_refuses_a_lone_public_key_too(tmp_path, capsys):
    (tmp_path / "ops.pub").write_text("someone else's key")
    rc, _, err = run(capsys, "keygen", "--out", tmp_path, "--name", "ops")
    assert rc != 0 and "already exists" in err
    assert not (tmp_path / "ops.key").exists()
    assert (tmp_path / "ops.pub").read_text() == "someone else's key"


def test_keygen_refuses_a_path_as_name(tmp_path, capsys):
    rc, _, err = run(capsys, "keygen", "--out", tmp_path, "--name", "../evil")
    assert rc != 0 and "key name" in err
    assert list(tmp_path.iterdir()) == []


def test_verify_accepts_the_trusted_key(built, capsys):
    d, bundle = built
    rc, out, _ = run(capsys, "bundle", "verify", bundle, "--trusted", d / "keys/release.pub")
    assert rc == 0
    assert out.startswith("OK digits version 1")
    assert "models/large.onnx" in out and "golden/small_outputs.npz" in out


def test_verify_accepts_a_folder_of_trusted_keys(built, capsys):
    d, bundle = built
    assert run(capsys, "bundle", "verify", bundle, "--trusted", d / "keys")[0] == 0


def test_verify_refuses_an_untrusted_signer(built, capsys):
    d, bundle = built
    rc, out, err = run(capsys, "bundle", "verify", bundle, "--trusted", d / "other/mallory.pub")
    assert rc == 1 and out == ""
    assert "SignatureError" in err and "does not trust" in err


def test_verify_refuses_below_threshold(built, capsys):
    d, bundle = built
    rc, _, err = run(capsys, "bundle", "verify", bundle, "--trusted", d / "keys", "--threshold", "2")
    assert rc == 1 and "2 required" in err


def test_build_with_two_keys_meets_a_threshold_of_two(built, tmp_path, capsys):
    d, _ = built
    out = tmp_path / "two.bundle"
    rc, text, _ = run(capsys, "bundle", "build", SAMPLES / "bundle.toml", "--key", d / "keys/release.key",
                      "--key", d / "keys/second.key", "--out", out)
    assert rc == 0 and "built digits version 1" in text
    assert run(capsys, "bundle", "verify", out, "--trusted", d / "keys", "--threshold", "2")[0] == 0


def test_verify_refuses_a_tampered_file(built, tmp_path, capsys):
    d, bundle = built
    data = bytearray(bundle.read_bytes())
    with tarfile.open(bundle) as tf:
        m = tf.getmember("models/large.onnx")
    data[m.offset_data + 1000] ^= 0x01
    evil = tmp_path / "evil.bundle"
    evil.write_bytes(bytes(data))
    rc, _, err = run(capsys, "bundle", "verify", evil, "--trusted", d / "keys/release.pub")
    assert rc == 1 and "IntegrityError" in err and "models/large.onnx" in err


def test_verify_refuses_a_tampered_manifest(built, tmp_path, capsys):
    d, bundle = built
    data = bundle.read_bytes()
    evil = tmp_path / "evil.bundle"
    evil.write_bytes(data.replace(b'"version":1', b'"version":7', 1))
    rc, _, err = run(capsys, "bundle", "verify", evil, "--trusted", d / "keys/release.pub")
    assert rc == 1 and "SignatureError" in err


def test_verify_refuses_a_file_that_is_not_a_bundle(built, tmp_path, capsys):
    d, _ = built
    junk = tmp_path / "junk.bundle"
    junk.write_bytes(b"hello")
    rc, _, err = run(capsys, "bundle", "verify", junk, "--trusted", d / "keys/release.pub")
    assert rc == 1 and "ArchiveError" in err
    rc, _, err = run(capsys, "bundle", "verify", tmp_path / "missing.bundle", "--trusted", d / "keys/release.pub")
    assert rc == 1 and "cannot open" in err


def test_verify_without_trusted_keys_is_a_clear_error(built, tmp_path, capsys):
    _, bundle = built
    rc, _, err = run(capsys, "bundle", "verify", bundle, "--trusted", tmp_path)
    assert rc == 1 and "no trusted public keys" in err


def test_inspect_prints_a_summary_marked_unverified(built, capsys):
    _, bundle = built
    rc, out, _ = run(capsys, "bundle", "inspect", bundle)
    assert rc == 0
    assert "bundle digits version 1" in out and "NOT verified" in out
    assert "model small: models/small.onnx" in out and "features float32 [-1, 16]" in out
    assert "router: gate=confidence tau=0.9" in out


def test_inspect_json_is_the_manifest(built, capsys):
    _, bundle = built
    rc, out, _ = run(capsys, "bundle", "inspect", bundle, "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["verified"] is False
    assert doc["manifest"]["signed"]["name"] == "digits"
    assert doc["members"][0]["name"] == "manifest.json"
    assert len(doc["manifest_sha256"]) == 64


def test_build_refuses_a_spec_dtype_mismatch_in_one_line(built, tmp_path, capsys):
    d, _ = built
    for name in ("small.onnx", "large.onnx", "golden.npz"):
        (tmp_path / name).write_bytes((SAMPLES / name).read_bytes())
    text = (SAMPLES / "bundle.toml").read_text().replace(
        '{ name = "features", dtype = "float32"', '{ name = "features", dtype = "int32"')
    (tmp_path / "bundle.toml").write_text(text)
    out = tmp_path / "b.bundle"
    rc, _, err = run(capsys, "bundle", "build", tmp_path / "bundle.toml", "--key", d / "keys/release.key",
                     "--out", out)
    assert rc == 1
    assert err.strip() == "fleet: error: small model output 'features' is float32, the SPEC declares int32"
    assert not out.exists()


def test_build_with_a_missing_key_file_is_a_clear_error(tmp_path, capsys):
    rc, _, err = run(capsys, "bundle", "build", SAMPLES / "bundle.toml", "--key", tmp_path / "none.key",
                     "--out", tmp_path / "b.bundle")
    assert rc == 1 and "cannot read private key" in err
    assert not (tmp_path / "b.bundle").exists()


def test_build_with_an_engine_option(built, tmp_path, capsys):
    d, _ = built
    plan = tmp_path / "small.plan"
    plan.write_bytes(b"plan")
    out = tmp_path / "e.bundle"
    rc, _, _ = run(capsys, "bundle", "build", SAMPLES / "bundle.toml", "--key", d / "keys/release.key",
                   "--out", out, "--engine", "trt10.3-sm87=small:%s" % plan)
    assert rc == 0
    rc, text, _ = run(capsys, "bundle", "inspect", out)
    assert "prebuilt engine trt10.3-sm87: engines/small/trt10.3-sm87.plan" in text
    rc, _, err = run(capsys, "bundle", "build", SAMPLES / "bundle.toml", "--key", d / "keys/release.key",
                     "--out", tmp_path / "f.bundle", "--engine", "bogus")
    assert rc == 1 and "PLATFORM_KEY=MODEL:PLAN" in err


def test_verify_refuses_an_expired_bundle(built, tmp_path, capsys):
    from edge_agent.signing import PrivateKey
    from fleet.bundle_builder import build_bundle

    d, _ = built
    old = tmp_path / "old.bundle"
    build_bundle(SAMPLES / "bundle.toml", PrivateKey.load(d / "keys/release.key"), old, now=1_000_000_000)
    rc, out, err = run(capsys, "bundle", "verify", old, "--trusted", d / "keys/release.pub")
    assert rc == 1 and out == ""
    assert "ExpiredError" in err and "expired at" in err


def test_verify_refuses_a_threshold_below_one(built, capsys):
    d, bundle = built
    rc, _, err = run(capsys, "bundle", "verify", bundle, "--trusted", d / "keys", "--threshold", "0")
    assert rc == 2 and "at least 1" in err
