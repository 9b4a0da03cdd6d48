"""certbot-batch: renew thousands of Certbot lineages per run, in batches."""
from __future__ import annotations

# The one place the version is written: pyproject.toml reads it (setuptools "attr:"), and
# so do `certbot-batch --version`, the man page and the Debian changelog check.
__version__ = "0.1.0"
