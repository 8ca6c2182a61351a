"""compute-runpod service."""
