"""Shared runtime of the gRPC services: server factory, health, graceful shutdown, logs, metrics."""
