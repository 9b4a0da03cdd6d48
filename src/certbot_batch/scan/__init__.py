"""Renewal status scan: ARI (RFC 9773) first, OCSP fallback, certbot's expiry rules last."""
