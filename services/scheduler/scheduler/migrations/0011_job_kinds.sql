-- Later jobs of an experiment (gpu_core.jobs kinds, e.g. a counterfactual check): what kind a job
-- is, the experiment it builds on, and its request. Existing rows are experiments.
ALTER TABLE jobs ADD COLUMN kind text NOT NULL DEFAULT 'experiment';
ALTER TABLE jobs ADD COLUMN parent_job_id uuid REFERENCES jobs (id) ON DELETE CASCADE;
ALTER TABLE jobs ADD COLUMN request jsonb;
CREATE INDEX jobs_parent_created ON jobs (parent_job_id, created_at DESC)
    WHERE parent_job_id IS NOT NULL;
