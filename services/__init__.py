"""The gRPC services. Each is its own package; they never import each other."""
