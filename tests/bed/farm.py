"""Lineage farm: a throw-away CA and thousands of certbot lineages written as certbot writes them.

Plain module (no pytest): the tests, the benchmarks and the demo all use it. Also a CLI::

    python -m tests.bed.farm --config-dir /tmp/le --count 2000 --server http://127.0.0.1:14000/dir

Layout written per lineage ``NAME`` (compare ``certbot/_internal/storage.py``,
``RenewableCert.new_lineage``)::

    archive/NAME/{cert1,chain1,fullchain1,privkey1}.pem      privkey1.pem is 0600
    live/NAME/{cert,chain,fullchain,privkey}.pem -> ../../archive/NAME/<kind>1.pem
    live/NAME/README
    renewal/NAME.conf

Compatible with Python 3.9+ and cryptography 38 (Debian 12): no ``*_utc`` accessors, naive UTC
datetimes are handed to the cryptography builders.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

__all__ = [
    "FarmCA",
    "PrivateKey",
    "ALL_FOUR",
    "make_farm",
    "renew_lineage_version",
    "write_lineage",
    "load_lineage_cert",
    "lineage_names",
    "lineage_cert_ids",
    "cert_id",
    "cert_not_before",
    "cert_not_after",
    "generate_key",
    "key_pem",
    "certbot_version",
    "main",
]

PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]
ALL_FOUR = ("cert", "privkey", "chain", "fullchain")
PRIVKEY_MODE = 0o600

_LIVE_README = (
    "This directory contains your keys and certificates.\n\n"
    "`{prefix}privkey.pem`  : the private key for your certificate.\n"
    "`{prefix}fullchain.pem`: the certificate file used in most server software.\n"
    "`{prefix}chain.pem`    : used for OCSP stapling in Nginx >=1.3.7.\n"
    "`{prefix}cert.pem`     : will break many server configurations, and should not be used\n"
    "                 without reading further documentation (see link below).\n\n"
    "WARNING: DO NOT MOVE OR RENAME THESE FILES!\n"
    "         Certbot expects these files to remain in this location in order\n"
    "         to function properly!\n\n"
    "We recommend not moving these files. For more information, see the Certbot\n"
    "User Guide at https://certbot.eff.org/docs/using.html#where-are-my-certificates.\n"
)
README_LINEAGE = _LIVE_README.format(prefix="").encode()
README_BASE = _LIVE_README.format(prefix="[cert name]/").encode()


# --------------------------------------------------------------------------------------------
# small helpers (cryptography 38 compatible)


def _utcnow() -> datetime.datetime:
    """Naive UTC now (what cryptography 38's builders expect)."""
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def _naive_utc(dt: datetime.datetime) -> datetime.datetime:
    if dt.tzinfo is not None:
        dt = dt.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return dt


def cert_not_before(cert: x509.Certificate) -> datetime.datetime:
    """notBefore as an aware UTC datetime on any cryptography version."""
    value: Optional[datetime.datetime] = getattr(cert, "not_valid_before_utc", None)
    if value is None:  # cryptography < 42
        value = cert.not_valid_before.replace(tzinfo=datetime.timezone.utc)
    return value


def cert_not_after(cert: x509.Certificate) -> datetime.datetime:
    """notAfter as an aware UTC datetime on any cryptography version."""
    value: Optional[datetime.datetime] = getattr(cert, "not_valid_after_utc", None)
    if value is None:  # cryptography < 42
        value = cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)
    return value


def _b64url(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def serial_der_bytes(serial: int) -> bytes:
    """Content octets of the DER INTEGER for ``serial`` (two's complement, minimal)."""
    length = (serial.bit_length() + 8) // 8  # room for the sign bit
    return serial.to_bytes(length, "big", signed=True)


def cert_id(cert: x509.Certificate) -> str:
    """RFC 9773 certID: base64url(AKI keyIdentifier) "." base64url(serial DER bytes)."""
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    if aki.key_identifier is None:
        raise ValueError("certificate has no AKI keyIdentifier")
    return f"{_b64url(aki.key_identifier)}.{_b64url(serial_der_bytes(cert.serial_number))}"


def generate_key(key_type: str = "ecdsa", *, rsa_key_size: int = 2048,
                 curve: str = "secp256r1") -> PrivateKey:
    """A new private key as certbot would make it for ``key_type`` (ecdsa or rsa)."""
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=rsa_key_size)
    if key_type == "ecdsa":
        curves: Dict[str, Callable[[], ec.EllipticCurve]] = {
            "secp256r1": ec.SECP256R1, "secp384r1": ec.SECP384R1, "secp521r1": ec.SECP521R1,
        }
        return ec.generate_private_key(curves[curve.lower()]())
    raise ValueError(f"unknown key_type {key_type!r}")


def key_pem(key: PrivateKey) -> bytes:
    """PKCS#8 PEM, as ``certbot.crypto_util.make_key`` writes it."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def certbot_version() -> str:
    """Version string for renewal confs: the installed certbot's, else 5.8.0."""
    try:
        from importlib.metadata import version

        return version("certbot")
    except Exception:  # pragma: no cover - certbot missing
        return "5.8.0"


def _name(common_name: str, org: str = "certbot-batch test farm") -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


# --------------------------------------------------------------------------------------------
# the CA


class FarmCA:
    """A throw-away CA: EC P-256 root and an optional EC P-256 intermediate that issues leaves.

    ``issuer_cert``/``issuer_key`` are the intermediate when there is one, else the root. Leaves
    carry AKI = SKI of the issuer key (RFC 5280 method 1, SHA-1 of the public key bits).
    """

    def __init__(self, root_key: ec.EllipticCurvePrivateKey, root_cert: x509.Certificate,
                 intermediate_key: Optional[ec.EllipticCurvePrivateKey] = None,
                 intermediate_cert: Optional[x509.Certificate] = None) -> None:
        if (intermediate_key is None) != (intermediate_cert is None):
            raise ValueError("intermediate key and cert go together")
        self.root_key = root_key
        self.root_cert = root_cert
        self.intermediate_key = intermediate_key
        self.intermediate_cert = intermediate_cert
        self._prepare()

    def _prepare(self) -> None:
        self.issuer_key: ec.EllipticCurvePrivateKey = self.intermediate_key or self.root_key
        self.issuer_cert: x509.Certificate = self.intermediate_cert or self.root_cert
        self.issuer_name: x509.Name = self.issuer_cert.subject
        self._aki_ext = x509.AuthorityKeyIdentifier.from_issuer_public_key(
            self.issuer_key.public_key())
        self.aki: bytes = self._aki_ext.key_identifier or b""
        self.root_pem: bytes = self.root_cert.public_bytes(serialization.Encoding.PEM)
        self.issuer_pem: bytes = self.issuer_cert.public_bytes(serialization.Encoding.PEM)
        # chain.pem: what the CA sends after the leaf (the intermediate, or the root itself).
        self.chain_pem: bytes = self.issuer_pem
        self._aia_cache: Dict[str, x509.AuthorityInformationAccess] = {}
        self._ski_cache: Dict[bytes, x509.SubjectKeyIdentifier] = {}

    # -- construction --------------------------------------------------------------------

    @classmethod
    def create(cls, name: str = "certbot-batch Farm", *, intermediate: bool = True,
               valid_days: int = 3650) -> FarmCA:
        """Make a new root (and intermediate). Valid from one day ago for ``valid_days``."""
        now = _utcnow()
        nb, na = now - datetime.timedelta(days=1), now + datetime.timedelta(days=valid_days)
        root_key = ec.generate_private_key(ec.SECP256R1())
        root_cert = cls._ca_cert(_name(f"{name} Root"), root_key, _name(f"{name} Root"),
                                 root_key, nb, na, path_length=1)
        if not intermediate:
            return cls(root_key, root_cert)
        int_key = ec.generate_private_key(ec.SECP256R1())
        int_cert = cls._ca_cert(_name(f"{name} Intermediate"), int_key, root_cert.subject,
                                root_key, nb, na, path_length=0)
        return cls(root_key, root_cert, int_key, int_cert)

    @staticmethod
    def _ca_cert(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
                 issuer_key: ec.EllipticCurvePrivateKey, nb: datetime.datetime,
                 na: datetime.datetime, path_length: int) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(nb)
            .not_valid_after(na)
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuer_key.public_key()), critical=False)
        )
        return builder.sign(issuer_key, hashes.SHA256())

    # -- persistence ---------------------------------------------------------------------

    def save(self, directory: str) -> str:
        """Write root.pem/root.key (+ intermediate.pem/.key, chain.pem) to ``directory``."""
        os.makedirs(directory, exist_ok=True)
        files: Dict[str, bytes] = {"root.pem": self.root_pem, "root.key": key_pem(self.root_key)}
        if self.intermediate_cert is not None and self.intermediate_key is not None:
            files["intermediate.pem"] = self.issuer_pem
            files["intermediate.key"] = key_pem(self.intermediate_key)
        files["chain.pem"] = self.chain_pem
        for fname, data in files.items():
            path = os.path.join(directory, fname)
            mode = PRIVKEY_MODE if fname.endswith(".key") else 0o644
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        return directory

    @classmethod
    def load(cls, directory: str) -> FarmCA:
        """Inverse of :meth:`save`."""

        def read(fname: str) -> bytes:
            with open(os.path.join(directory, fname), "rb") as f:
                return f.read()

        def ec_key(data: bytes) -> ec.EllipticCurvePrivateKey:
            key = serialization.load_pem_private_key(data, password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError("FarmCA keys are EC")
            return key

        root_cert = x509.load_pem_x509_certificate(read("root.pem"))
        root_key = ec_key(read("root.key"))
        if os.path.exists(os.path.join(directory, "intermediate.pem")):
            return cls(root_key, root_cert, ec_key(read("intermediate.key")),
                       x509.load_pem_x509_certificate(read("intermediate.pem")))
        return cls(root_key, root_cert)

    @classmethod
    def load_or_create(cls, directory: str, **kwargs: Any) -> FarmCA:
        if os.path.exists(os.path.join(directory, "root.pem")):
            return cls.load(directory)
        ca = cls.create(**kwargs)
        ca.save(directory)
        return ca

    # -- issuance ------------------------------------------------------------------------

    def _aia(self, ocsp_url: str) -> x509.AuthorityInformationAccess:
        ext = self._aia_cache.get(ocsp_url)
        if ext is None:
            ext = x509.AuthorityInformationAccess([
                x509.AccessDescription(AuthorityInformationAccessOID.OCSP,
                                       x509.UniformResourceIdentifier(ocsp_url)),
            ])
            self._aia_cache[ocsp_url] = ext
        return ext

    def _ski(self, public_key: Any) -> x509.SubjectKeyIdentifier:
        der = public_key.public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo)
        ext = self._ski_cache.get(der)
        if ext is None:
            ext = x509.SubjectKeyIdentifier.from_public_key(public_key)
            if len(self._ski_cache) < 64:
                self._ski_cache[der] = ext
        return ext

    def issue(self, names: Sequence[str], public_key: Any, *,
              not_before: datetime.datetime, not_after: datetime.datetime,
              ocsp_url: Optional[str] = None, serial: Optional[int] = None,
              ski: bool = True, aki: bool = True,
              common_name: Optional[str] = None) -> x509.Certificate:
        """Issue a leaf for ``names`` (DNS SANs; the first is the CN) over ``public_key``."""
        if not names:
            raise ValueError("a leaf needs at least one name")
        cn = names[0] if common_name is None else common_name
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]) if cn else x509.Name([])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.issuer_name)
            .public_key(public_key)
            .serial_number(serial if serial is not None else x509.random_serial_number())
            .not_valid_before(_naive_utc(not_before))
            .not_valid_after(_naive_utc(not_after))
            .add_extension(_LEAF_KU, critical=True)
            .add_extension(_LEAF_EKU, critical=False)
            .add_extension(_LEAF_BC, critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=not cn)
        )
        if ski:
            builder = builder.add_extension(self._ski(public_key), critical=False)
        if aki:
            builder = builder.add_extension(self._aki_ext, critical=False)
        if ocsp_url:
            builder = builder.add_extension(self._aia(ocsp_url), critical=False)
        return builder.sign(self.issuer_key, hashes.SHA256())

    def issue_pem(self, names: Sequence[str], public_key: Any, **kwargs: Any) -> bytes:
        return self.issue(names, public_key, **kwargs).public_bytes(serialization.Encoding.PEM)

    def ocsp_responder_cert(self, key: Optional[ec.EllipticCurvePrivateKey] = None,
                            days: int = 365) -> Tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A delegated OCSP signing cert (EKU id-kp-OCSPSigning) issued by the issuer."""
        key = key or ec.generate_private_key(ec.SECP256R1())
        now = _utcnow()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name("Farm OCSP Responder"))
            .issuer_name(self.issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]),
                           critical=False)
            .add_extension(self._aki_ext, critical=False)
            .sign(self.issuer_key, hashes.SHA256())
        )
        return cert, key


_LEAF_KU = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
    encipher_only=False, decipher_only=False)
_LEAF_EKU = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
_LEAF_BC = x509.BasicConstraints(ca=False, path_length=None)


# --------------------------------------------------------------------------------------------
# renewal conf writing (the text configobj writes, without a configobj round trip per lineage)

_SAFE = re.compile(r"^[A-Za-z0-9_./:@*+~-]+( [A-Za-z0-9_./:@*+~-]+)*$")
_QUOTER: Any = None
_NAME_PH = "FARMLINEAGENAMEPLACEHOLDER"
_MAP_PH = "FARMWEBROOTMAPPLACEHOLDER"


def _quote(value: str) -> str:
    """Quote ``value`` the way configobj's writer does (fast path for plain strings)."""
    global _QUOTER
    if _SAFE.match(value):
        return value
    if _QUOTER is None:
        import configobj

        _QUOTER = configobj.ConfigObj(encoding="utf-8", default_encoding="utf-8")
    return str(_QUOTER._quote(value, multiline=True))


ConfValue = Union[str, bool, int, Sequence[str], Mapping[str, Any]]


def _conf_lines(items: Mapping[str, Any], depth: int) -> List[str]:
    """configobj-style lines: scalars first, then sub-sections ([[x]] at depth 2)."""
    lines: List[str] = []
    indent = ""  # configobj writes new files without indentation
    sections: List[Tuple[str, Mapping[str, Any]]] = []
    for key, value in items.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            sections.append((key, value))
            continue
        if isinstance(value, bool):
            text = "True" if value else "False"
        elif isinstance(value, (int, float)):
            text = str(value)
        elif isinstance(value, str):
            text = _quote(value)
        else:
            seq = [_quote(str(v)) for v in value]
            text = ", ".join(seq) if len(seq) != 1 else seq[0] + ","
            if not seq:
                text = ","
        lines.append(f"{indent}{_quote(key)} = {text}")
    for key, section in sections:
        lines.append(f"{indent}{'[' * (depth + 1)}{_quote(key)}{']' * (depth + 1)}")
        lines.extend(_conf_lines(section, depth + 1))
    return lines


def renewal_conf_text(*, version: str, archive_dir: str, live_dir: str,
                      renewalparams: Mapping[str, Any],
                      renew_before_expiry: Optional[str] = None,
                      extra_top: Optional[Mapping[str, Any]] = None) -> str:
    """Text of ``renewal/NAME.conf`` as certbot 5.x writes it (via configobj)."""
    top: Dict[str, Any] = {"version": version, "archive_dir": archive_dir}
    if renew_before_expiry is not None:
        top["renew_before_expiry"] = renew_before_expiry
    for kind in ALL_FOUR:
        top[kind] = os.path.join(live_dir, kind + ".pem")
    if extra_top:
        top.update(extra_top)
    top["renewalparams"] = renewalparams
    return "\n".join(_conf_lines(top, 0)) + "\n"


def _is_webroot_style(authenticator: str) -> bool:
    return "webroot" in authenticator


def build_renewalparams(*, names: Sequence[str], server: str, authenticator: str = "webroot",
                        installer: Optional[str] = None, webroot: Optional[str] = None,
                        account: Optional[str] = None, key_type: str = "ecdsa",
                        autorenew: Optional[bool] = None,
                        extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The ``[renewalparams]`` mapping certbot would store for these options."""
    params: Dict[str, Any] = {}
    if account is not None:
        params["account"] = account
    params["authenticator"] = authenticator
    if installer is not None:
        params["installer"] = installer
    if webroot is not None and _is_webroot_style(authenticator):
        params["webroot_path"] = [webroot]
    params["server"] = server
    params["key_type"] = key_type
    if autorenew is not None:
        # certbot reads autorenew from [renewalparams] (RenewableCert.autorenewal_is_enabled)
        params["autorenew"] = bool(autorenew)
    if extra:
        params.update(extra)
    if webroot is not None and _is_webroot_style(authenticator) and "webroot_map" not in params:
        params["webroot_map"] = {n: webroot for n in names}
    return params


# --------------------------------------------------------------------------------------------
# lineage writing


def _write(path: str, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _ensure_base(config_dir: str) -> Tuple[str, str, str]:
    archive, live, renewal = (os.path.join(config_dir, d) for d in ("archive", "live", "renewal"))
    for d in (archive, live, renewal):
        if not os.path.isdir(d):
            os.makedirs(d, 0o700)
    base_readme = os.path.join(live, "README")
    if not os.path.exists(base_readme):
        _write(base_readme, README_BASE)
    return archive, live, renewal


def write_lineage(config_dir: str, name: str, *, cert_pem: bytes, chain_pem: bytes,
                  privkey_pem: bytes, renewalparams: Mapping[str, Any],
                  renew_before_expiry: Optional[str] = None, version: Optional[str] = None,
                  overwrite: bool = False) -> str:
    """Write one lineage (version 1) exactly as ``RenewableCert.new_lineage`` lays it out.

    Returns the renewal conf path. ``config_dir`` should be absolute (it is made absolute).
    """
    config_dir = os.path.abspath(config_dir)
    archive, live, renewal = _ensure_base(config_dir)
    return _write_lineage_fast(
        archive, live, renewal, name, cert_pem, chain_pem, privkey_pem,
        renewal_conf_text(version=version or certbot_version(),
                          archive_dir=os.path.join(archive, name),
                          live_dir=os.path.join(live, name),
                          renewalparams=renewalparams,
                          renew_before_expiry=renew_before_expiry).encode("utf-8"),
        overwrite=overwrite)


def _write_lineage_fast(archive: str, live: str, renewal: str, name: str, cert_pem: bytes,
                        chain_pem: bytes, privkey_pem: bytes, conf: bytes,
                        overwrite: bool = False) -> str:
    adir = os.path.join(archive, name)
    ldir = os.path.join(live, name)
    conf_path = os.path.join(renewal, name + ".conf")
    if overwrite:
        import shutil

        for d in (adir, ldir):
            if os.path.lexists(d):
                shutil.rmtree(d)
    os.mkdir(adir)  # certbot: filesystem.makedirs(archive) -> 0o777 & ~umask
    os.mkdir(ldir)
    _write(os.path.join(adir, "cert1.pem"), cert_pem)
    _write(os.path.join(adir, "chain1.pem"), chain_pem)
    _write(os.path.join(adir, "fullchain1.pem"), cert_pem + chain_pem)
    _write(os.path.join(adir, "privkey1.pem"), privkey_pem, PRIVKEY_MODE)
    rel = "../../archive/" + name + "/"
    for kind in ALL_FOUR:
        os.symlink(rel + kind + "1.pem", os.path.join(ldir, kind + ".pem"))
    _write(os.path.join(ldir, "README"), README_LINEAGE)
    _write(conf_path, conf)
    return conf_path


def _as_timedelta(value: Union[datetime.timedelta, float, int]) -> datetime.timedelta:
    """Numbers are days."""
    if isinstance(value, datetime.timedelta):
        return value
    return datetime.timedelta(days=float(value))


def make_farm(config_dir: str, count: int, *, ca: FarmCA, server: str,
              lifetime: Union[datetime.timedelta, float] = datetime.timedelta(days=90),
              age: Union[datetime.timedelta, float] = datetime.timedelta(days=10),
              ocsp_url: Optional[str] = None, authenticator: str = "webroot",
              installer: Optional[str] = None, webroot: Optional[str] = None,
              account: Optional[str] = None, names_per_lineage: int = 1,
              name_fmt: str = "lin{i:05d}.test",
              extra_renewalparams: Optional[Mapping[str, Any]] = None,
              share_key: bool = True, key_type: str = "ecdsa", start_index: int = 0,
              renew_before_expiry: Optional[str] = None, autorenew: Optional[bool] = None,
              key: Optional[PrivateKey] = None, now: Optional[datetime.datetime] = None,
              version: Optional[str] = None,
              names_for: Optional[Callable[[int], Sequence[str]]] = None,
              workers: int = 1) -> List[str]:
    """Write ``count`` certbot lineages under ``config_dir``; return their names.

    Lineage ``i`` (``start_index <= i < start_index + count``) is named ``name_fmt.format(i=i)``
    and covers that name plus ``names_per_lineage - 1`` more (``alt{j}.`` + name), or whatever
    ``names_for(i)`` returns (the first name is the lineage name). Its cert has
    ``notBefore = now - age`` and ``notAfter = notBefore + lifetime`` (numbers are days).

    ``share_key`` reuses one key (``key``, or one generated for ``key_type``) for every lineage;
    otherwise each lineage gets its own (slow for RSA). ``webroot`` is stored as
    ``webroot_path`` plus a ``[[webroot_map]]`` when the authenticator's name contains
    "webroot". ``autorenew`` goes into ``[renewalparams]`` (where certbot reads it),
    ``renew_before_expiry`` at the top level.

    ``workers > 1`` forks that many writer processes (POSIX; only for ``count >= 400``). Do not
    use it from a process with other busy threads (e.g. with a Responder running in it).
    """
    if count < 0:
        raise ValueError("count must be >= 0")
    config_dir = os.path.abspath(config_dir)
    archive, live, renewal = _ensure_base(config_dir)
    life, ago = _as_timedelta(lifetime), _as_timedelta(age)
    now = _naive_utc(now) if now is not None else _utcnow()
    not_before = now - ago
    not_after = not_before + life
    version = version or certbot_version()
    chain_pem = ca.chain_pem

    shared_key = key if key is not None else (generate_key(key_type) if share_key else None)
    shared_pem = key_pem(shared_key) if shared_key is not None else b""

    # Everything but the names is the same for every lineage: render the conf once around
    # placeholders and substitute per lineage.
    webroot_style = webroot is not None and _is_webroot_style(authenticator)
    params = build_renewalparams(names=[], server=server, authenticator=authenticator,
                                 installer=installer, webroot=webroot, account=account,
                                 key_type=key_type, autorenew=autorenew,
                                 extra=extra_renewalparams)
    per_name_map = webroot_style and "webroot_map" not in (extra_renewalparams or {})
    map_value = _quote(webroot) if webroot is not None else ""
    map_line = f"{_MAP_PH} = {map_value}\n"
    if per_name_map:
        params["webroot_map"] = {_MAP_PH: webroot}
    template = renewal_conf_text(
        version=version, archive_dir=os.path.join(archive, _NAME_PH),
        live_dir=os.path.join(live, _NAME_PH), renewalparams=params,
        renew_before_expiry=renew_before_expiry)
    head, tail = (template.split(map_line) if per_name_map else (template, ""))

    def one(i: int) -> str:
        if names_for is not None:
            dns = list(names_for(i))
        else:
            first = name_fmt.format(i=i)
            dns = [first] + [f"alt{j}.{first}" for j in range(1, names_per_lineage)]
        name = dns[0]
        if shared_key is None:
            lkey = generate_key(key_type)
            pub, kpem = lkey.public_key(), key_pem(lkey)
        else:
            pub, kpem = shared_key.public_key(), shared_pem
        cert_pem = ca.issue(dns, pub, not_before=not_before, not_after=not_after,
                            ocsp_url=ocsp_url).public_bytes(serialization.Encoding.PEM)
        if all(_SAFE.match(n) for n in dns):
            conf = head.replace(_NAME_PH, name)
            if per_name_map:
                conf += "".join(f"{n} = {map_value}\n" for n in dns)
                conf += tail.replace(_NAME_PH, name)
        else:  # names that need quoting: the slow, exact path
            conf = renewal_conf_text(
                version=version, archive_dir=os.path.join(archive, name),
                live_dir=os.path.join(live, name),
                renewalparams=build_renewalparams(
                    names=dns, server=server, authenticator=authenticator,
                    installer=installer, webroot=webroot, account=account, key_type=key_type,
                    autorenew=autorenew, extra=extra_renewalparams),
                renew_before_expiry=renew_before_expiry)
        _write_lineage_fast(archive, live, renewal, name, cert_pem, chain_pem, kpem,
                            conf.encode("utf-8"))
        return name

    indices = range(start_index, start_index + count)
    if workers > 1 and count >= 2 * _MIN_CHUNK and hasattr(os, "fork"):
        return _forked(indices, one, workers)
    return [one(i) for i in indices]


_MIN_CHUNK = 200


def _forked(indices: range, one: Callable[[int], str], workers: int) -> List[str]:
    """Run ``one`` over ``indices`` in ``workers`` forked children; names come back in order
    through a pipe per child."""
    n = min(workers, max(1, len(indices) // _MIN_CHUNK))
    bounds = [indices.start + len(indices) * k // n for k in range(n + 1)]
    children: List[Tuple[int, int]] = []
    for k in range(n):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: no exceptions may escape
            code = 0
            try:
                os.close(r)
                out = "\n".join(one(i) for i in range(bounds[k], bounds[k + 1]))
                with os.fdopen(w, "wb") as f:
                    f.write(out.encode("utf-8"))
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        children.append((pid, r))
    names: List[str] = []
    failed = False
    for pid, r in children:
        with os.fdopen(r, "rb") as f:
            data = f.read().decode("utf-8")
        _, status = os.waitpid(pid, 0)
        failed = failed or status != 0
        names.extend(data.split("\n") if data else [])
    if failed or len(names) != len(indices):
        raise RuntimeError("make_farm: a worker process failed (see stderr)")
    return names


def _versions(adir: str, kind: str) -> List[int]:
    out = []
    for fname in os.listdir(adir):
        m = re.match(rf"^{kind}(\d+)\.pem$", fname)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


def renew_lineage_version(config_dir: str, name: str, ca: FarmCA, *,
                          lifetime: Union[datetime.timedelta, float, None] = None,
                          age: Union[datetime.timedelta, float] = datetime.timedelta(0),
                          ocsp_url: Optional[str] = None, names: Optional[Sequence[str]] = None,
                          reuse_key: bool = False, key: Optional[PrivateKey] = None,
                          now: Optional[datetime.datetime] = None,
                          update_links: bool = True) -> int:
    """Add the next version of lineage ``name`` (as stock certbot's renewal would) and point
    ``live/NAME/*`` at it. Returns the new version number.

    Defaults: same names as the current cert, same lifetime, ``notBefore = now - age``, same OCSP
    URL (pass ``ocsp_url=""`` to drop it). ``reuse_key`` writes ``privkeyN.pem`` as a symlink to
    the previous key (certbot's ``save_successor`` with reuse_key); otherwise a new key of the
    same type is written (or ``key``).
    """
    config_dir = os.path.abspath(config_dir)
    adir = os.path.join(config_dir, "archive", name)
    ldir = os.path.join(config_dir, "live", name)
    prev = max(_versions(adir, "cert"))
    new = max(max(_versions(adir, k) or [0]) for k in ALL_FOUR) + 1
    with open(os.path.join(adir, f"cert{prev}.pem"), "rb") as f:
        old = x509.load_pem_x509_certificate(f.read())
    if names is None:
        san = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
    life = (_as_timedelta(lifetime) if lifetime is not None
            else cert_not_after(old) - cert_not_before(old))
    if ocsp_url is None:
        try:
            aia = old.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
            urls = [d.access_location.value for d in aia
                    if d.access_method == AuthorityInformationAccessOID.OCSP]
            ocsp_url = urls[0] if urls else None
        except x509.ExtensionNotFound:
            ocsp_url = None
    nb = (_naive_utc(now) if now is not None else _utcnow()) - _as_timedelta(age)

    prev_key_path = os.path.join(adir, f"privkey{prev}.pem")
    new_key_path = os.path.join(adir, f"privkey{new}.pem")
    if reuse_key and key is None:
        with open(prev_key_path, "rb") as f:
            loaded = serialization.load_pem_private_key(f.read(), password=None)
        pub = loaded.public_key()
        target = os.readlink(prev_key_path) if os.path.islink(prev_key_path) \
            else f"privkey{prev}.pem"
        os.symlink(target, new_key_path)
    else:
        if key is None:
            with open(prev_key_path, "rb") as f:
                loaded = serialization.load_pem_private_key(f.read(), password=None)
            if isinstance(loaded, rsa.RSAPrivateKey):
                key = generate_key("rsa", rsa_key_size=loaded.key_size)
            elif isinstance(loaded, ec.EllipticCurvePrivateKey):
                key = generate_key("ecdsa", curve=loaded.curve.name)
            else:
                raise ValueError(f"unsupported key type in {prev_key_path}")
        pub = key.public_key()
        _write(new_key_path, key_pem(key), PRIVKEY_MODE)
    cert_pem = ca.issue_pem(list(names), pub, not_before=nb, not_after=nb + life,
                            ocsp_url=ocsp_url or None)
    _write(os.path.join(adir, f"cert{new}.pem"), cert_pem)
    _write(os.path.join(adir, f"chain{new}.pem"), ca.chain_pem)
    _write(os.path.join(adir, f"fullchain{new}.pem"), cert_pem + ca.chain_pem)
    if update_links:
        for kind in ALL_FOUR:
            link = os.path.join(ldir, kind + ".pem")
            tmp = link + ".farmtmp"
            os.symlink(f"../../archive/{name}/{kind}{new}.pem", tmp)
            os.replace(tmp, link)
    return new


# --------------------------------------------------------------------------------------------
# reading back


def lineage_names(config_dir: str) -> List[str]:
    """Names of all lineages with a renewal conf, sorted."""
    rdir = os.path.join(config_dir, "renewal")
    return sorted(f[:-5] for f in os.listdir(rdir) if f.endswith(".conf"))


def load_lineage_cert(config_dir: str, name: str,
                      version: Optional[int] = None) -> x509.Certificate:
    """The live cert of lineage ``name`` (or archive version ``version``)."""
    if version is None:
        path = os.path.join(config_dir, "live", name, "cert.pem")
    else:
        path = os.path.join(config_dir, "archive", name, f"cert{version}.pem")
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def lineage_cert_ids(config_dir: str, names: Optional[Iterable[str]] = None) -> Dict[str, str]:
    """``{lineage name: certID}`` of the live certs."""
    if names is None:
        names = lineage_names(config_dir)
    return {n: cert_id(load_lineage_cert(config_dir, n)) for n in names}


# --------------------------------------------------------------------------------------------
# CLI


def _parse_kv(items: Sequence[str]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
        out[k.strip()] = v.strip()
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bed.farm",
                                description="Write a farm of certbot lineages.")
    p.add_argument("--config-dir", required=True, help="certbot config dir to populate")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--server", required=True, help="ACME directory URL stored in the confs")
    p.add_argument("--ca-dir", help="FarmCA directory: loaded if present, else created there "
                   "(default: CONFIG_DIR/../farm-ca)")
    p.add_argument("--no-intermediate", action="store_true", help="issue from the root")
    p.add_argument("--ocsp-url")
    p.add_argument("--lifetime-days", type=float, default=90.0)
    p.add_argument("--age-days", type=float, default=10.0)
    p.add_argument("--authenticator", default="webroot")
    p.add_argument("--installer")
    p.add_argument("--webroot")
    p.add_argument("--account")
    p.add_argument("--names-per-lineage", type=int, default=1)
    p.add_argument("--name-fmt", default="lin{i:05d}.test")
    p.add_argument("--start-index", type=int, default=0)
    p.add_argument("--key-type", choices=["ecdsa", "rsa"], default="ecdsa")
    p.add_argument("--no-share-key", action="store_true", help="one key per lineage")
    p.add_argument("--renew-before-expiry")
    p.add_argument("--autorenew", choices=["true", "false"])
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="writer processes (default: CPU count)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="extra [renewalparams] entry (repeatable)")
    args = p.parse_args(argv)

    config_dir = os.path.abspath(args.config_dir)
    ca_dir = args.ca_dir or os.path.join(os.path.dirname(config_dir), "farm-ca")
    ca = FarmCA.load_or_create(ca_dir, intermediate=not args.no_intermediate)
    t0 = time.monotonic()
    names = make_farm(
        config_dir, args.count, ca=ca, server=args.server,
        lifetime=datetime.timedelta(days=args.lifetime_days),
        age=datetime.timedelta(days=args.age_days), ocsp_url=args.ocsp_url,
        authenticator=args.authenticator, installer=args.installer, webroot=args.webroot,
        account=args.account, names_per_lineage=args.names_per_lineage, name_fmt=args.name_fmt,
        extra_renewalparams=_parse_kv(args.param) or None, share_key=not args.no_share_key,
        key_type=args.key_type, start_index=args.start_index,
        renew_before_expiry=args.renew_before_expiry,
        autorenew=None if args.autorenew is None else args.autorenew == "true",
        workers=args.workers)
    elapsed = time.monotonic() - t0
    first = names[0] if names else "-"
    print(f"wrote {len(names)} lineages to {config_dir} in {elapsed:.2f}s "
          f"(first: {first}); CA in {ca_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
