-- Several scheduler replicas share the jobs table: each active job is followed by the replica
-- holding its lease, renewed by a heartbeat. A job whose lease has expired (its replica died)
-- is claimed by another replica (FOR UPDATE SKIP LOCKED, so two replicas never claim one job).
ALTER TABLE jobs ADD COLUMN lease_owner text;
ALTER TABLE jobs ADD COLUMN lease_expires_at timestamptz;
CREATE INDEX jobs_claimable ON jobs (lease_expires_at NULLS FIRST)
    WHERE status IN ('queued', 'submitted', 'running');
