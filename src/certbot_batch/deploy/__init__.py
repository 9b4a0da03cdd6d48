"""Deployment: Apache reloads deferred to one per run, batched deploy hooks."""
