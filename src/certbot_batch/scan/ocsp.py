"""OCSP status check for the scan's fallback path (CAs without ARI).

Unlike ``certbot.ocsp`` this returns the status (good / revoked / unknown) and raises a
typed :class:`OcspError` for every failure, so the scan can tell "revoked" from "could
not find out".  Works with cryptography >= 38 (Debian 12) and current releases.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, List, Optional, Tuple

import requests
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp as x509_ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

from certbot_batch import retry
from certbot_batch.scan.http import (
    DEFAULT_MAX_WAIT,
    DEFAULT_USER_AGENT,
    HttpFailure,
    Timeout,
    http_exchange,
    take_slot,
)
from certbot_batch.scan.ratelimit import RateLimiter, key_for_url

__all__ = [
    "OCSP_KINDS",
    "CLOCK_SKEW",
    "OcspError",
    "OcspResult",
    "check",
    "not_valid_after",
    "not_valid_before",
    "ocsp_url",
]

#: Every value :attr:`OcspError.kind` can take.  The first six are the core ones;
#: ``unavailable`` (503/429/tryLater, or the responder is backed off) and ``stale``
#: (thisUpdate in the future / nextUpdate in the past) are finer-grained.
OCSP_KINDS = ("timeout", "http", "malformed", "bad_signature", "unauthorized", "connection",
              "unavailable", "stale")

#: Clock tolerance for thisUpdate/nextUpdate and the delegated responder's validity.
CLOCK_SKEW = timedelta(minutes=5)

#: Back-off after a 503/429 from an OCSP responder that gives no Retry-After.
DEFAULT_UNAVAILABLE_BACKOFF = retry.UNAVAILABLE_START

MAX_OCSP_BYTES = 256 << 10


class OcspError(Exception):
    """An OCSP check that gave no trustworthy status; ``kind`` is one of :data:`OCSP_KINDS`."""

    def __init__(self, kind: str, message: str, retry_after: Optional[float] = None, *,
                 url: Optional[str] = None, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after = retry_after
        self.url = url
        self.status = status

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, message={self.message!r})"

    def __reduce__(self) -> Any:
        return (type(self), (self.kind, self.message, self.retry_after),
                {"url": self.url, "status": self.status})


@dataclass
class OcspResult:
    """A verified OCSP answer; datetimes are aware UTC."""

    status: str  # "good" | "revoked" | "unknown"
    this_update: datetime
    next_update: Optional[datetime] = None
    revocation_time: Optional[datetime] = None
    revocation_reason: Optional[str] = None


# ----------------------------------------------------------------------------------------
# cryptography-version helpers
# ----------------------------------------------------------------------------------------
def _aware(value: Optional[datetime]) -> Optional[datetime]:
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def _utc_attr(obj: Any, name: str) -> Optional[datetime]:
    """``obj.<name>_utc`` when this cryptography has it (>= 42/43), else ``obj.<name>`` as UTC."""
    if hasattr(type(obj), name + "_utc"):
        value = getattr(obj, name + "_utc")
    else:
        value = getattr(obj, name)
    return _aware(value)


def not_valid_before(cert: x509.Certificate) -> datetime:
    """The certificate's notBefore as an aware UTC datetime, on any cryptography version."""
    value = _utc_attr(cert, "not_valid_before")
    assert value is not None
    return value


def not_valid_after(cert: x509.Certificate) -> datetime:
    """The certificate's notAfter as an aware UTC datetime, on any cryptography version."""
    value = _utc_attr(cert, "not_valid_after")
    assert value is not None
    return value


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------
def ocsp_url(cert: x509.Certificate) -> Optional[str]:
    """The first http(s) OCSP responder URL of the certificate's AIA, or ``None``."""
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except (x509.ExtensionNotFound, ValueError):
        return None
    for desc in aia:
        if desc.access_method != AuthorityInformationAccessOID.OCSP:
            continue
        loc = desc.access_location
        if isinstance(loc, x509.UniformResourceIdentifier):
            value = loc.value.strip()
            if value.lower().startswith(("http://", "https://")):
                return value
    return None


def check(cert: x509.Certificate, issuer: x509.Certificate, url: str, *,
          session: Optional[requests.Session] = None,
          timeout: Timeout = (5.0, 10.0),
          rate_limiter: Optional[RateLimiter] = None,
          deadline: Optional[float] = None,
          max_wait: float = DEFAULT_MAX_WAIT,
          total_timeout: Optional[float] = None,
          user_agent: Optional[str] = None,
          now: Optional[datetime] = None) -> OcspResult:
    """Ask ``url`` for the status of ``cert`` (issued by ``issuer``) and verify the answer.

    The request uses a SHA-1 certID (what CAs expect) and is POSTed as
    ``application/ocsp-request``.  The response must be SUCCESSFUL, signed by ``issuer``
    or by a delegated responder certificate included in it that ``issuer`` signed and that
    has the OCSP-signing EKU, be about this serial/issuer, have thisUpdate not in the
    future and nextUpdate not in the past (5 min skew).  Anything else raises
    :class:`OcspError`.

    ``session``: the caller's (thread-local) session; a temporary one if ``None``.
    ``rate_limiter``/``deadline``/``max_wait``: as for :meth:`AriClient.fetch`; the
    responder is backed off on 503/429.  ``now``: for tests.
    """
    now = _aware(now) or datetime.now(timezone.utc)
    try:
        request = (x509_ocsp.OCSPRequestBuilder()
                   .add_certificate(cert, issuer, hashes.SHA1())
                   .build())
        request_der = request.public_bytes(serialization.Encoding.DER)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise OcspError("malformed", f"cannot build an OCSP request for serial "
                        f"{cert.serial_number:#x}: {exc}", url=url) from exc

    key = key_for_url(url)
    refused = take_slot(rate_limiter, url, deadline, max_wait)
    if refused is not None:
        _, wait = refused
        how_long = f"for another {wait:.0f} s " if wait is not None else ""
        raise OcspError("unavailable", f"OCSP responder {key} is backed off {how_long}"
                        "(it answered 503/429 or the rate limit is exhausted); request "
                        "not sent, the certificate is re-checked later", wait, url=url)

    headers = {"Content-Type": "application/ocsp-request",
               "Accept": "application/ocsp-response"}
    if user_agent:
        headers["User-Agent"] = user_agent
    own_session = session is None
    sess = requests.Session() if session is None else session
    if own_session and not user_agent:
        headers["User-Agent"] = DEFAULT_USER_AGENT
    try:
        reply = http_exchange(sess, "POST", url, timeout=timeout, total_timeout=total_timeout,
                              max_bytes=MAX_OCSP_BYTES, headers=headers, data=request_der)
    except HttpFailure as exc:
        advice = {
            "timeout": "the responder is slow or unreachable; the certificate is re-checked "
                       "later",
            "connection": "check DNS, network and proxy settings for this host",
            "malformed": "the responder sent an oversized answer",
        }.get(exc.kind, "")
        raise OcspError(exc.kind, f"OCSP: {exc.detail}; {advice}", url=url) from exc
    finally:
        if own_session:
            sess.close()

    if reply.status != 200:
        retry_after = reply.retry_after()
        if reply.status in (429, 503):
            delay = retry_after if retry_after is not None else DEFAULT_UNAVAILABLE_BACKOFF
            if rate_limiter is not None:
                delay = rate_limiter.backoff(key, delay)
            raise OcspError("unavailable", f"OCSP responder {url} answered HTTP "
                            f"{reply.status} (overloaded); backing off {key} for "
                            f"{delay:.0f} s", delay, url=url, status=reply.status)
        raise OcspError("http", f"OCSP responder {url} answered HTTP {reply.status}"
                        f"{' (' + reply.snippet() + ')' if reply.body else ''}; check the "
                        "certificate's OCSP URL, the certificate is re-checked later",
                        retry_after, url=url, status=reply.status)

    return _evaluate(reply.body, request, cert, issuer, url, now)


# ----------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------
_STATUS_ERRORS = {
    x509_ocsp.OCSPResponseStatus.MALFORMED_REQUEST: (
        "malformed", "rejected the request as malformed"),
    x509_ocsp.OCSPResponseStatus.INTERNAL_ERROR: (
        "http", "reported an internal error; the certificate is re-checked later"),
    x509_ocsp.OCSPResponseStatus.TRY_LATER: (
        "unavailable", "asked to try later; the certificate is re-checked later"),
    x509_ocsp.OCSPResponseStatus.SIG_REQUIRED: (
        "unauthorized", "requires signed requests, which are not supported"),
    x509_ocsp.OCSPResponseStatus.UNAUTHORIZED: (
        "unauthorized", "is not authoritative for this certificate (wrong OCSP URL, or the "
        "CA no longer answers for it); renewal falls back to the expiry rules"),
}

_CERT_STATUS = {
    x509_ocsp.OCSPCertStatus.GOOD: "good",
    x509_ocsp.OCSPCertStatus.REVOKED: "revoked",
    x509_ocsp.OCSPCertStatus.UNKNOWN: "unknown",
}


def _evaluate(body: bytes, request: x509_ocsp.OCSPRequest, cert: x509.Certificate,
              issuer: x509.Certificate, url: str, now: datetime) -> OcspResult:
    serial = cert.serial_number
    try:
        response = x509_ocsp.load_der_ocsp_response(body)
        response_status = response.response_status
    except ValueError as exc:
        raise OcspError("malformed", f"OCSP responder {url} sent something that is not an "
                        f"OCSP response ({exc}); check the certificate's OCSP URL",
                        url=url) from exc
    if response_status != x509_ocsp.OCSPResponseStatus.SUCCESSFUL:
        kind, what = _STATUS_ERRORS.get(response_status,
                                        ("malformed", f"answered {response_status}"))
        raise OcspError(kind, f"OCSP responder {url} {what} (responseStatus "
                        f"{response_status.name}) for serial {serial:#x}", url=url)

    try:
        _verify_response_signature(response, issuer, now)
    except OcspError as exc:
        exc.url = url
        exc.message = f"OCSP response from {url} for serial {serial:#x}: {exc.message}"
        exc.args = (exc.message,)
        raise
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise OcspError("bad_signature", f"OCSP response from {url} for serial {serial:#x} "
                        f"could not be verified: {exc}", url=url) from exc

    single = _matching_single(response, request)
    if single is None:
        raise OcspError("malformed", f"OCSP response from {url} is not about serial "
                        f"{serial:#x} of issuer {issuer.subject.rfc4514_string()}", url=url)

    try:
        this_update = _utc_attr(single, "this_update")
        next_update = _utc_attr(single, "next_update")
        status = _CERT_STATUS.get(single.certificate_status, "unknown")
        revocation_time = _utc_attr(single, "revocation_time") if status == "revoked" else None
        reason = single.revocation_reason if status == "revoked" else None
    except ValueError as exc:
        raise OcspError("malformed", f"OCSP response from {url} is malformed: {exc}",
                        url=url) from exc
    if this_update is None:
        raise OcspError("malformed", f"OCSP response from {url} has no thisUpdate", url=url)
    if this_update > now + CLOCK_SKEW:
        raise OcspError("stale", f"OCSP response from {url} has thisUpdate "
                        f"{this_update.isoformat()} in the future; check this machine's "
                        "clock", url=url)
    if next_update is not None and next_update < now - CLOCK_SKEW:
        raise OcspError("stale", f"OCSP response from {url} expired at nextUpdate "
                        f"{next_update.isoformat()} (stale responder or cache); the "
                        "certificate is re-checked later", url=url)
    return OcspResult(status=status, this_update=this_update, next_update=next_update,
                      revocation_time=revocation_time,
                      revocation_reason=reason.value if reason is not None else None)


def _matching_single(response: x509_ocsp.OCSPResponse,
                     request: x509_ocsp.OCSPRequest) -> Optional[Any]:
    try:
        singles: List[Any] = list(response.responses)
    except AttributeError:  # pragma: no cover - cryptography < 37
        singles = [response]
    for single in singles:
        if (single.serial_number == request.serial_number
                and isinstance(single.hash_algorithm, type(request.hash_algorithm))
                and single.issuer_key_hash == request.issuer_key_hash
                and single.issuer_name_hash == request.issuer_name_hash):
            return single
    return None


def _key_hash(cert: x509.Certificate) -> bytes:
    return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest  # type: ignore[arg-type]


def _is_responder(response: x509_ocsp.OCSPResponse, cert: x509.Certificate) -> bool:
    name = response.responder_name
    if name is not None:
        return bool(name == cert.subject)
    key_hash = response.responder_key_hash
    return key_hash is not None and key_hash == _key_hash(cert)


def _verify_response_signature(response: x509_ocsp.OCSPResponse,
                               issuer: x509.Certificate, now: datetime) -> None:
    if _is_responder(response, issuer):
        signer = issuer
    else:
        candidates = [c for c in response.certificates if _is_responder(response, c)]
        if not candidates:
            raise OcspError("bad_signature", "signed neither by the issuer nor by a responder "
                            "certificate included in the response")
        signer = candidates[0]
        if signer.issuer != issuer.subject:
            raise OcspError("bad_signature", "the delegated responder certificate "
                            f"({signer.subject.rfc4514_string()}) was not issued by the "
                            "certificate's issuer")
        try:
            eku = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            authorized = ExtendedKeyUsageOID.OCSP_SIGNING in eku
        except x509.ExtensionNotFound:
            authorized = False
        if not authorized:
            raise OcspError("bad_signature", "the delegated responder certificate "
                            f"({signer.subject.rfc4514_string()}) lacks the OCSP-signing "
                            "extended key usage")
        if not (not_valid_before(signer) - CLOCK_SKEW <= now
                <= not_valid_after(signer) + CLOCK_SKEW):
            raise OcspError("bad_signature", "the delegated responder certificate "
                            f"({signer.subject.rfc4514_string()}) is not valid now "
                            f"({not_valid_before(signer).isoformat()} to "
                            f"{not_valid_after(signer).isoformat()})")
        if not _verify(issuer.public_key(), signer.signature, signer.tbs_certificate_bytes,
                       _hash_of(signer), _is_pss(signer.signature_algorithm_oid)):
            raise OcspError("bad_signature", "the delegated responder certificate "
                            f"({signer.subject.rfc4514_string()}) has an invalid signature "
                            "from the issuer")
    if not _verify(signer.public_key(), response.signature, response.tbs_response_bytes,
                   _hash_of(response), _is_pss(response.signature_algorithm_oid)):
        raise OcspError("bad_signature", "the signature does not verify against the "
                        f"{'issuer' if signer is issuer else 'delegated responder'} "
                        f"({signer.subject.rfc4514_string()}) - forged, corrupted or signed "
                        "by another key")


def _hash_of(obj: Any) -> Optional[hashes.HashAlgorithm]:
    try:
        algorithm = obj.signature_hash_algorithm
    except UnsupportedAlgorithm as exc:
        raise OcspError("bad_signature", f"unsupported signature algorithm: {exc}") from exc
    return algorithm if isinstance(algorithm, hashes.HashAlgorithm) else None


def _is_pss(oid: x509.ObjectIdentifier) -> bool:
    return oid.dotted_string == "1.2.840.113549.1.1.10"


def _verify(key: Any, signature: bytes, data: bytes,
            algorithm: Optional[hashes.HashAlgorithm], pss: bool = False) -> bool:
    """Verify a signature with an RSA, EC, Ed25519/Ed448 or DSA public key."""
    try:
        if isinstance(key, rsa.RSAPublicKey):
            if algorithm is None:
                return False
            pads: List[padding.AsymmetricPadding] = []
            if pss:
                salt_lengths: Tuple[Any, ...] = (
                    (padding.PSS.AUTO,) if hasattr(padding.PSS, "AUTO") else ()
                ) + (padding.PSS.MAX_LENGTH, algorithm.digest_size)
                pads.extend(padding.PSS(mgf=padding.MGF1(algorithm), salt_length=s)
                            for s in salt_lengths)
            else:
                pads.append(padding.PKCS1v15())
            for pad in pads:
                try:
                    key.verify(signature, data, pad, algorithm)
                    return True
                except InvalidSignature:
                    continue
            return False
        if isinstance(key, ec.EllipticCurvePublicKey):
            if algorithm is None:
                return False
            key.verify(signature, data, ec.ECDSA(algorithm))
            return True
        if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            key.verify(signature, data)
            return True
        if isinstance(key, dsa.DSAPublicKey):
            if algorithm is None:
                return False
            key.verify(signature, data, algorithm)
            return True
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    raise OcspError("bad_signature", f"unsupported signer key type {type(key).__name__}")
