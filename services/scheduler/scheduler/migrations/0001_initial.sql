-- Profiles, jobs and their progress events. The seed's Supabase tables, with the columns its
-- ALTER TABLE statements added (compute_backend, runpod_endpoint_id, runpod_job_id).
CREATE TABLE profiles (
    user_id            text PRIMARY KEY,
    compute_backend    text NOT NULL DEFAULT 'hosted'
                       CHECK (compute_backend IN ('hosted', 'runpod')),
    runpod_endpoint_id text,
    endpoint_status    text NOT NULL DEFAULT 'none'
                       CHECK (endpoint_status IN ('none', 'creating', 'ready', 'error')),
    endpoint_error     text NOT NULL DEFAULT '',
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE jobs (
    id                 uuid PRIMARY KEY,
    user_id            text NOT NULL,
    compute_backend    text NOT NULL DEFAULT 'hosted'
                       CHECK (compute_backend IN ('hosted', 'runpod')),
    provider           text NOT NULL CHECK (provider IN ('local', 'modal', 'runpod')),
    provider_job_id    text,
    runpod_job_id      text,
    status             text NOT NULL DEFAULT 'queued'
                       CHECK (status IN ('queued', 'submitted', 'running',
                                         'completed', 'failed', 'cancelled')),
    stage              text NOT NULL DEFAULT '',
    progress           double precision NOT NULL DEFAULT 0,
    stage_message      text NOT NULL DEFAULT '',
    latest_metrics     jsonb NOT NULL DEFAULT '{}'::jsonb,
    spec               jsonb NOT NULL,
    result             jsonb,
    error              text NOT NULL DEFAULT '',
    estimated_time_s   double precision NOT NULL DEFAULT 0,
    estimated_cost_usd double precision NOT NULL DEFAULT 0,
    idempotency_key    text,
    provider_cursor    text NOT NULL DEFAULT '',
    last_seq           bigint NOT NULL DEFAULT 0,
    submit_attempts    integer NOT NULL DEFAULT 0,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    finished_at        timestamptz
);

CREATE UNIQUE INDEX jobs_user_idempotency_key ON jobs (user_id, idempotency_key);
CREATE INDEX jobs_user_created ON jobs (user_id, created_at DESC);
-- Start-up resumes every non-terminal job; this keeps that scan small.
CREATE INDEX jobs_active ON jobs (created_at)
    WHERE status IN ('queued', 'submitted', 'running');

CREATE TABLE job_events (
    job_id     uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq        bigint NOT NULL,
    event      jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, seq)
);
