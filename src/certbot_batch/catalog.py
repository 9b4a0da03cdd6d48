"""certbot-batch's plugins and the stock plugins they stand for: the one list.

Every other module (the seam's settings restore, the session's engagement, the challenge
batching, the deferred deployment) reads the names from here; a new batch plugin is one
entry here plus its entry point in pyproject.toml.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BatchPlugin:
    #: the name certbot knows it by (entry point, -a/-i, renewal confs)
    name: str
    #: the stock plugin whose saved settings it reads (webroot_map, apache_*, ...)
    stock: str
    #: its perform() joins the wave's challenge batch
    authenticator: bool
    #: its restart() is deferred to one confirmed reload per server at the end of a run
    installer: bool


PLUGINS: tuple[BatchPlugin, ...] = (
    BatchPlugin("batch-webroot", "webroot", authenticator=True, installer=False),
    BatchPlugin("batch-apache", "apache", authenticator=True, installer=True),
    BatchPlugin("batch-nginx", "nginx", authenticator=True, installer=True),
    BatchPlugin("batch-standalone", "standalone", authenticator=True, installer=False),
)

NAMES: tuple[str, ...] = tuple(p.name for p in PLUGINS)
#: batch plugin -> the stock plugin whose settings it takes over
STOCK_EQUIVALENT: dict[str, str] = {p.name: p.stock for p in PLUGINS}
AUTHENTICATORS: tuple[str, ...] = tuple(p.name for p in PLUGINS if p.authenticator)
INSTALLERS: tuple[str, ...] = tuple(p.name for p in PLUGINS if p.installer)
#: Inside a renewal session, a lineage saved with one of these stock plugins is handled by
#: its batch counterpart (same settings, same saved name: its renewal conf is not touched,
#: and without certbot-batch it renews with stock certbot as before).
STOCK_BATCHED: dict[str, str] = {p.stock: p.name for p in PLUGINS}
