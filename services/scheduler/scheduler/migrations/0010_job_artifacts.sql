-- The files of a job (result contract v2): [{name, bytes, sha256, media_type}], each verified
-- against the worker's manifest and stored under jobs/{id}/ in the artifact store.
ALTER TABLE jobs ADD COLUMN artifacts jsonb NOT NULL DEFAULT '[]'::jsonb;
-- The retention sweep looks for finished jobs that still hold artifacts.
CREATE INDEX jobs_finished_with_artifacts ON jobs (finished_at)
    WHERE artifacts <> '[]'::jsonb;
