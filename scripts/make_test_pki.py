#!/usr/bin/env python3
"""Create a TEST certificate authority and certificates for the broker, devices, controller and operators.

For labs, CI and trying the TLS setup out. A production fleet keeps its CA key offline (or in an HSM) and
issues device certificates at provisioning time; the layout below is the same either way.

Writes into OUT_DIR:

    ca.crt ca.key        the test CA (ECDSA P-256)
    ca.crl               certificate revocation list signed by the CA (lists --revoke names)
    server.crt server.key  broker certificate, SAN = the --server-name / --server-ip values
    <name>.crt <name>.key  one client certificate per device / controller / operator; CN = <name>,
                          which mosquitto turns into the MQTT username (`use_identity_as_username true`)

Run again with the same OUT_DIR to add clients: an existing CA is reused, existing client files are kept.

    python scripts/make_test_pki.py /tmp/pki --device cam-01 --device cam-02 \
        --controller fleet-controller --operator fleet-operator
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_agent.protocol import topics

DEFAULT_DAYS = 825


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: every OpenSSL that mosquitto and Python link against on JetPack 5/6 supports it.
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def check_client_name(name: str) -> str:
    """A client CN becomes the MQTT username and, for devices, a topic level: same rule as a device id."""
    try:
        topics.status(topics.DEFAULT_PREFIX, name)
    except ValueError as e:
        raise SystemExit("error: %s" % e) from None
    return name


def make_ca(common_name: str, days: int) -> Tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA certificate that may sign end-entity certificates and CRLs only."""
    key = _new_key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    *,
    server: bool,
    days: int,
    dns_names: Iterable[str] = (),
    ips: Iterable[str] = (),
) -> Tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """An end-entity certificate signed by the CA (serverAuth or clientAuth)."""
    key = _new_key()
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    sans: List[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def make_crl(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, revoked: Iterable[x509.Certificate], days: int
) -> x509.CertificateRevocationList:
    """A CRL listing `revoked`. OpenSSL refuses every client once next_update has passed: renew it in time."""
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - datetime.timedelta(minutes=5))
        .next_update(now + datetime.timedelta(days=days))
    )
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(now).build()
        )
    return builder.sign(ca_key, hashes.SHA256())


def _load_or_make_ca(out: Path, common_name: str, days: int) -> Tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_path, cert_path = out / "ca.key", out / "ca.crt"
    if key_path.exists() and cert_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SystemExit("error: %s is not an EC key" % key_path)
        return key, x509.load_pem_x509_certificate(cert_path.read_bytes())
    key, cert = make_ca(common_name, days)
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return key, cert


def build(
    out: Path,
    *,
    clients: Iterable[str],
    revoke: Iterable[str] = (),
    server_names: Iterable[str] = ("localhost",),
    server_ips: Iterable[str] = ("127.0.0.1",),
    ca_name: str = "edge-agent test CA",
    days: int = DEFAULT_DAYS,
    crl_days: int = 30,
) -> None:
    """Create (or extend) the PKI in `out`; see the module docstring for the file layout."""
    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _load_or_make_ca(out, ca_name, days)
    if not (out / "server.crt").exists():
        key, cert = issue(
            ca_key, ca_cert, "mqtt-broker", server=True, days=days, dns_names=server_names, ips=server_ips
        )
        _write_key(out / "server.key", key)
        _write_cert(out / "server.crt", cert)
    for name in clients:
        check_client_name(name)
        if (out / ("%s.crt" % name)).exists():
            continue
        key, cert = issue(ca_key, ca_cert, name, server=False, days=days)
        _write_key(out / ("%s.key" % name), key)
        _write_cert(out / ("%s.crt" % name), cert)
    revoked = []
    for name in revoke:
        path = out / ("%s.crt" % check_client_name(name))
        if not path.exists():
            raise SystemExit("error: cannot revoke %r: %s does not exist" % (name, path))
        revoked.append(x509.load_pem_x509_certificate(path.read_bytes()))
    crl = make_crl(ca_key, ca_cert, revoked, crl_days)
    (out / "ca.crl").write_bytes(crl.public_bytes(serialization.Encoding.PEM))


def main(argv: Optional[List[str]] = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path, help="directory for the CA, server and client files")
    p.add_argument("--device", action="append", default=[], metavar="ID", help="device id (repeatable)")
    p.add_argument("--controller", action="append", default=[], metavar="NAME", help="controller identity")
    p.add_argument("--operator", action="append", default=[], metavar="NAME", help="operator CLI identity")
    p.add_argument("--revoke", action="append", default=[], metavar="NAME", help="put NAME's certificate on the CRL")
    p.add_argument("--server-name", action="append", default=None, metavar="DNS", help="broker DNS name (SAN)")
    p.add_argument("--server-ip", action="append", default=None, metavar="IP", help="broker IP address (SAN)")
    p.add_argument("--ca-name", default="edge-agent test CA", help="CA common name")
    p.add_argument("--days", type=int, default=DEFAULT_DAYS, help="certificate validity in days")
    p.add_argument("--crl-days", type=int, default=30, help="CRL validity in days (renew before it lapses)")
    a = p.parse_args(argv)
    if a.days < 1 or a.crl_days < 1:
        p.error("--days and --crl-days must be positive")
    try:
        for ip in a.server_ip or []:
            ipaddress.ip_address(ip)
    except ValueError as e:
        p.error(str(e))
    build(
        a.out_dir,
        clients=list(a.device) + list(a.controller) + list(a.operator),
        revoke=a.revoke,
        server_names=a.server_name or ["localhost"],
        server_ips=a.server_ip or ["127.0.0.1"],
        ca_name=a.ca_name,
        days=a.days,
        crl_days=a.crl_days,
    )
    print("wrote test PKI to %s" % a.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
