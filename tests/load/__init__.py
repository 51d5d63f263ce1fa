"""Load generation against the service (and the benchmark's echo and baseline servers)."""
