"""certbot-batch: renew thousands of Certbot lineages per run, in batches."""

__version__ = "0.1.0"
