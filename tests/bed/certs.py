"""Throw-away keys and certificates for the test bed (cryptography only)."""
from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import re
from pathlib import Path
from typing import Optional, Sequence, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_ONE_DAY = datetime.timedelta(days=1)


@dataclasses.dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())

    def write(self, cert_path: Path, key_path: Path) -> None:
        cert_path.write_bytes(self.cert_pem())
        key_path.write_bytes(self.key_pem())
        key_path.chmod(0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_ca(common_name: str = "certbot-batch test bed CA") -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _ONE_DAY)
        .not_valid_after(now + 30 * _ONE_DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def make_leaf(names: Sequence[str], issuer: Optional[Issued] = None) -> Issued:
    """A TLS server certificate for ``names`` (DNS names or IPs); self-signed without issuer."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = _name(names[0])
    signer_key: ec.EllipticCurvePrivateKey = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _ONE_DAY)
        .not_valid_after(now + 30 * _ONE_DAY)
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False)
    return Issued(builder.sign(signer_key, hashes.SHA256()), key)


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----",
                       re.S)


def load_pem_chain(path: Union[str, Path]) -> list[x509.Certificate]:
    """Every certificate of a PEM file, in order. (x509.load_pem_x509_certificates needs
    cryptography 39; Debian 12 has 38.)"""
    data = Path(path).read_bytes()
    chain = [x509.load_pem_x509_certificate(m.group(0)) for m in _PEM_CERT.finditer(data)]
    if not chain:
        raise ValueError(f"no PEM certificate in {path}")
    return chain


def _utc(cert: x509.Certificate, name: str) -> datetime.datetime:
    # cryptography >= 42 has the aware *_utc accessors; before, naive datetimes in UTC.
    aware: Optional[datetime.datetime] = getattr(cert, name + "_utc", None)
    if aware is not None:
        return aware
    naive: datetime.datetime = getattr(cert, name)
    return naive.replace(tzinfo=datetime.timezone.utc)


def not_valid_after(cert: x509.Certificate) -> datetime.datetime:
    """notAfter as an aware UTC datetime (cryptography 38 to latest)."""
    return _utc(cert, "not_valid_after")


def not_valid_before(cert: x509.Certificate) -> datetime.datetime:
    """notBefore as an aware UTC datetime (cryptography 38 to latest)."""
    return _utc(cert, "not_valid_before")


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def san_names(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return [str(v) for v in ext.value.get_values_for_type(x509.DNSName)] + [
        str(v) for v in ext.value.get_values_for_type(x509.IPAddress)]
