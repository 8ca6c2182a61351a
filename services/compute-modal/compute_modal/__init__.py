"""compute-modal service."""
