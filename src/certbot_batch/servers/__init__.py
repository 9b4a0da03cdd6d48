"""Web servers behind one interface (``base.Server``): Apache (``apache.py``), nginx
(``nginx.py``).

The deployment, the challenge code, the journals and recovery name a server by its
``ServerRef`` (kind, control program, configuration root) and get its implementation from
:func:`server_for`; none of them knows which kind it talks to.
"""
from __future__ import annotations

from typing import Any, Optional

from certbot_batch.servers import apache, nginx
from certbot_batch.servers.apache import ApacheServer
from certbot_batch.servers.base import Server, ServerRef
from certbot_batch.servers.nginx import NginxServer

#: installer plugin name -> how a lineage's settings name its server instance. These are
#: the installers whose reload a renewal session defers to one confirmed reload per server
#: at the end of the run.
DEFERRED_INSTALLERS = {"batch-apache": apache.ref_of, "batch-nginx": nginx.ref_of,
                       # inside a session certbot's own "apache" and "nginx" are the batch
                       # plugins too (catalog.STOCK_BATCHED)
                       "apache": apache.ref_of, "nginx": nginx.ref_of}


def ref_for(lineage_config: Any) -> Optional[ServerRef]:
    """The server instance a lineage is deployed to by a deferred reload, or None."""
    installer = getattr(lineage_config, "installer", None)
    make = DEFERRED_INSTALLERS.get(installer) if isinstance(installer, str) else None
    return make(lineage_config) if make is not None else None


def server_for(ref: ServerRef) -> Server:
    """The implementation of the instance ``ref`` names. Raises ValueError for a kind this
    version does not know (a record written by a newer certbot-batch)."""
    if ref.kind == "apache":
        return ApacheServer(ref)
    if ref.kind == nginx.KIND:
        return NginxServer(ref)
    raise ValueError(f"unknown server kind {ref.kind!r}")
