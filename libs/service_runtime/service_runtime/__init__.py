"""Shared runtime of the services: settings base, server factory, health, lifecycle, logs, metrics."""
