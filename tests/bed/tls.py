"""What a private web server of the bed (apache.py, nginx.py) serves over TLS."""
from __future__ import annotations

import socket
import ssl
import time
from typing import Callable, Optional

from cryptography import x509


def served_leaf(port: int, name: str, timeout: float = 5.0) -> Optional[x509.Certificate]:
    """The leaf certificate served on 127.0.0.1:``port`` for SNI ``name`` (None: none)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None


def wait_for(fetch: Callable[[], x509.Certificate], expected: x509.Certificate,
             timeout: float) -> x509.Certificate:
    """Poll ``fetch`` until it returns ``expected``; the last certificate either way. Until a
    reload's new generation answers, old workers may still serve the port without TLS
    (WRONG_VERSION_NUMBER, an OSError): polled through too, until the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            served = fetch()
        except OSError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)
            continue
        if served == expected or time.monotonic() >= deadline:
            return served
        time.sleep(0.05)
