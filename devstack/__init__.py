"""Development stack: embedded PostgreSQL and every service on loopback (`make run`, e2e tests)."""
