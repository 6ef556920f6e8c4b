"""The `fleet` CLI over client certificates: with no `mqtt.username`, its reply topic is named by the
certificate's CN (the username mosquitto gives it with `use_identity_as_username`)."""

from __future__ import annotations

import datetime

import pytest

from edge_agent.config import MqttConfig, TlsConfig
from edge_agent.errors import ConfigError
from fleet.rpc import certificate_cn, reply_topic, rpc_username


def _cert(path, cn, *, der=False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test")]
    if cn is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    name = x509.Name(attrs)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM))
    return path


def _cfg(tmp_path, cert=None, username=None) -> MqttConfig:
    tls = TlsConfig(ca_file=tmp_path / "ca.crt", cert_file=cert, key_file=tmp_path / "k.key") if cert else None
    return MqttConfig(username=username, tls=tls)


def test_certificate_cn_names_the_reply_topic_when_no_username_is_set(tmp_path):
    cfg = _cfg(tmp_path, _cert(tmp_path / "op.crt", "ops-alice"))
    assert rpc_username(cfg) == "ops-alice"
    assert reply_topic("edge/v1", rpc_username(cfg), "cli-1") == "edge/v1/fleet/rpc-reply/ops-alice/cli-1"


def test_der_certificate_is_read_too(tmp_path):
    assert certificate_cn(_cert(tmp_path / "op.der", "ops-bob", der=True)) == "ops-bob"


def test_explicit_username_wins_over_the_certificate(tmp_path):
    assert rpc_username(_cfg(tmp_path, _cert(tmp_path / "op.crt", "ops-alice"), username="fleet-operator")) == (
        "fleet-operator")


def test_without_certificate_or_username_the_client_is_anonymous(tmp_path):
    assert rpc_username(_cfg(tmp_path)) is None


@pytest.mark.parametrize("cn", [None, "a/b", "ops+", "#"])
def test_certificate_without_a_topic_safe_cn_is_a_config_error(tmp_path, cn):
    cfg = _cfg(tmp_path, _cert(tmp_path / "op.crt", cn))
    with pytest.raises(ConfigError, match=r"set mqtt\.username"):
        rpc_username(cfg)


def test_unreadable_or_garbage_certificate_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        certificate_cn(tmp_path / "missing.crt")
    (tmp_path / "junk.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match=r"not an X\.509 certificate"):
        certificate_cn(tmp_path / "junk.crt")
