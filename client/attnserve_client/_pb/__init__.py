"""Generated; do not edit. Regenerate with `make protos`."""
