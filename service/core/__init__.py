"""The core: protocol-neutral request handling (dataplane), limits, types, errors, weights view, memory budget."""
