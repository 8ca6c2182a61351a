-- Issue 28: experiments logged to MLflow and W&B (scheduler/tracking.py). Where a researcher
-- tracks (not secret; their W&B key and MLflow token live in keyvault).
ALTER TABLE profiles ADD COLUMN mlflow_tracking_uri text NOT NULL DEFAULT '';
ALTER TABLE profiles ADD COLUMN mlflow_experiment_name text NOT NULL DEFAULT '';
ALTER TABLE profiles ADD COLUMN wandb_project text NOT NULL DEFAULT '';
ALTER TABLE profiles ADD COLUMN wandb_entity text NOT NULL DEFAULT '';
-- Each completed experiment is exported once: 'pending' until the exporter claims it,
-- 'exporting' under a lease (a replica that dies mid-export leaves it to be taken over), then
-- 'exported', 'failed' (after SCHEDULER_TRACKING_ATTEMPTS) or 'none' (no tracker configured).
-- Jobs that existed before are 'none' (added with that default, then new rows get 'pending').
ALTER TABLE jobs ADD COLUMN tracking_status text NOT NULL DEFAULT 'none'
    CHECK (tracking_status IN ('none', 'pending', 'exporting', 'exported', 'failed'));
ALTER TABLE jobs ALTER COLUMN tracking_status SET DEFAULT 'pending';
-- Per tracker ("mlflow", "wandb"): {"status", "run_id", "url", "error", "source"}.
ALTER TABLE jobs ADD COLUMN tracking jsonb NOT NULL DEFAULT '{}'::jsonb;
ALTER TABLE jobs ADD COLUMN tracking_attempts integer NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN tracking_next_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE jobs ADD COLUMN tracking_lease_until timestamptz;
CREATE INDEX jobs_tracking_due ON jobs (tracking_next_at)
    WHERE status = 'completed' AND kind = 'experiment' AND tracking_status IN ('pending', 'exporting');
