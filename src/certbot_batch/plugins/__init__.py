"""Certbot plugins of certbot-batch (registered in the ``certbot.plugins`` entry-point group).

Importing this package is how certbot meets us: it loads every plugin entry point at the
start of each command, so this is where the renewal engine is wired into certbot.
"""
from certbot_batch import engine

engine.install()
