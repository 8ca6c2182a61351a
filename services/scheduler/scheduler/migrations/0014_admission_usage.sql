-- Numbered after the issue (14) so that migrations other branches add meanwhile do not collide.
-- Admission control counts per user: active jobs, submissions in the last hour and hosted
-- GPU-seconds this month (the estimate while a job is active, the time it ran once finished).
ALTER TABLE jobs ADD COLUMN started_at timestamptz;
-- Jobs that ran before this column existed count with their estimate.
UPDATE jobs SET started_at = created_at WHERE finished_at IS NOT NULL;
CREATE INDEX jobs_user_active ON jobs (user_id)
    WHERE status IN ('queued', 'submitted', 'running');
