-- Uploads bounded in size by the store (issue 25): a worker asks for each file's PUT URL when it
-- knows the file's size and sha256 (POST /api/uploads/{job id}/{secret} on the gateway, RPC
-- GrantUpload), and the scheduler signs that exact Content-Length into it.
-- The sha256 of each per-job upload secret sent with the job, never the secret itself: one per
-- submit call (a call sent again after a lost answer carries a new one, and the provider may hand
-- back the job of the first call, whose worker holds the first). NULL: no upload route for it.
ALTER TABLE jobs ADD COLUMN upload_secret_sha256s bytea[];
-- Every URL granted, per name the largest size it was granted for: what the job's uploads may add
-- up to at most (SCHEDULER_UPLOAD_MAX_JOB_BYTES bounds their sum). Gone with the job.
CREATE TABLE upload_grants (
    job_id     uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    name       text NOT NULL,
    bytes      bigint NOT NULL CHECK (bytes >= 0),
    granted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, name)
);
