"""Challenge provisioning: files on disk, a crash-safe journal, batching across lineages."""
