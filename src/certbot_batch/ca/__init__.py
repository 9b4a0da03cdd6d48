"""Respecting the CA during renewals: pacing and pauses (pacing.py), what a failed attempt
means for the lineage's next one (backoff.py)."""
