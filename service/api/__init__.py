"""The gRPC edge: thin servicers, protobuf <-> numpy codecs, and the one error -> status table."""
