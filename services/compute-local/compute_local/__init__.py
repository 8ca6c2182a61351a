"""compute-local service."""
