-- Numbered after the issue (22). The jobs table becomes the outbox of a durable state machine:
-- submit only inserts; a dispatcher claims queued jobs and submits them exactly once.
-- submit_token is written (under the lease) before the provider call: a queued job with a token
-- and no provider job id is "submitting", and is reconciled rather than blindly sent again.
ALTER TABLE jobs ADD COLUMN submit_token uuid;
-- The RunPod endpoint a job was submitted on: it is followed and cancelled there, not on the
-- profile's current endpoint.
ALTER TABLE jobs ADD COLUMN endpoint_id text NOT NULL DEFAULT '';
-- Jobs submitted before this column existed ran on their user's endpoint of the time.
UPDATE jobs SET endpoint_id = coalesce(p.runpod_endpoint_id, '')
    FROM profiles p
    WHERE p.user_id = jobs.user_id AND jobs.provider = 'runpod' AND jobs.compute_backend = 'runpod';
-- The trace context (W3C traceparent) of the request that submitted the job: the dispatcher
-- and the follower continue that trace, so the provider's log lines carry it.
ALTER TABLE jobs ADD COLUMN trace_context jsonb NOT NULL DEFAULT '{}'::jsonb;
-- Hot reads (lists, owned-job RPCs, the follower) never load the spec (up to 20 MiB): what they
-- show of it is kept in columns.
ALTER TABLE jobs ADD COLUMN model_id text NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN influence_method text NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN n_train integer NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN n_eval integer NOT NULL DEFAULT 0;
UPDATE jobs SET
    model_id = coalesce(spec ->> 'model_id', ''),
    influence_method = coalesce(spec ->> 'influence_method', ''),
    n_train = CASE WHEN jsonb_typeof(spec -> 'training_data') = 'array'
                   THEN jsonb_array_length(spec -> 'training_data') ELSE 0 END,
    n_eval = CASE WHEN jsonb_typeof(spec -> 'eval_data') = 'array'
                  THEN jsonb_array_length(spec -> 'eval_data') ELSE 0 END;

-- Usage is an append-only ledger: deleting a job refunds nothing. 'admitted' is written with the
-- job (its admission estimate), 'settled' when it ends (the GPU-seconds it ran). period_at is the
-- job's creation time: a job counts in the hour and the month it was submitted in.
CREATE TABLE usage_ledger (
    id          bigserial PRIMARY KEY,
    user_id     text NOT NULL,
    job_id      uuid NOT NULL,  -- no foreign key: the entries outlive the job
    backend     text NOT NULL,
    entry       text NOT NULL CHECK (entry IN ('admitted', 'settled')),
    gpu_seconds double precision NOT NULL DEFAULT 0,
    period_at   timestamptz NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX usage_ledger_once ON usage_ledger (job_id, entry);
CREATE INDEX usage_ledger_user_period ON usage_ledger (user_id, backend, period_at);
INSERT INTO usage_ledger (user_id, job_id, backend, entry, gpu_seconds, period_at)
    SELECT user_id, id, compute_backend, 'admitted', estimated_time_s, created_at FROM jobs;
INSERT INTO usage_ledger (user_id, job_id, backend, entry, gpu_seconds, period_at)
    SELECT user_id, id, compute_backend, 'settled',
           coalesce(extract(epoch FROM finished_at - started_at), 0), created_at
    FROM jobs WHERE finished_at IS NOT NULL;
