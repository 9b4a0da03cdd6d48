"""Web servers behind one interface (``base.Server``): Apache (``apache.py``), nginx
(``nginx.py``).

The deployment, the challenge code, the journals and recovery name a server by its
``ServerRef`` (kind, control program, configuration root) and get its implementation from
:func:`server_for`; none of them knows which kind it talks to.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Type

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


#: every kind this version knows, by ``ServerRef.kind``
KINDS: dict[str, Type[Server]] = {apache.KIND: ApacheServer,
                                  nginx.KIND: NginxServer}
#: directories (by name) the kinds that serve challenge files (``SERVES_FILES``) create
#: below their challenge location: the journal may remove them once empty
CHALLENGE_DIRS = frozenset({apache.CHALLENGE_DIR_NAME})


def snippet_owner(path: str) -> Optional[Type[Server]]:
    """The kind whose challenge snippet has ``path``'s file name, or None."""
    name = os.path.basename(path)
    return next((cls for cls in KINDS.values() if cls.SNIPPET_NAME == name), None)


def owns_insert(text: str) -> bool:
    """Is ``text`` (a journaled edit) exactly the include some kind inserts?"""
    return any(cls.owns_insert(text) for cls in KINDS.values())


def ref_for(lineage_config: Any) -> Optional[ServerRef]:
    """The server instance a lineage is deployed to by a deferred reload, or None."""
    installer = getattr(lineage_config, "installer", None)
    make = DEFERRED_INSTALLERS.get(installer) if isinstance(installer, str) else None
    return make(lineage_config) if make is not None else None


def server_for(ref: ServerRef) -> Server:
    """The implementation of the instance ``ref`` names. Raises ValueError for a kind this
    version does not know (a record written by a newer certbot-batch)."""
    cls = KINDS.get(ref.kind)
    if cls is None:
        raise ValueError(f"unknown server kind {ref.kind!r}")
    return cls(ref)
