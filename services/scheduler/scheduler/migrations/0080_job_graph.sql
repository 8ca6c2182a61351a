-- Issue 27: a sharded experiment is a graph of jobs the scheduler creates (scheduler/graph.py): a
-- training job, one index-shard job per slice (a retried shard is a new job of the same shard),
-- then a shard merge. Each part names the experiment it belongs to (graph_job_id; deleting the
-- experiment deletes its parts) and, for an index shard, its shard number. The experiment holds
-- how many shards it runs and the parts' view its page shows ([{kind, shard, status, progress,
-- attempts, error}]).
ALTER TABLE jobs ADD COLUMN graph_job_id uuid REFERENCES jobs (id) ON DELETE CASCADE;
ALTER TABLE jobs ADD COLUMN shard integer;
ALTER TABLE jobs ADD COLUMN shards integer NOT NULL DEFAULT 1;
ALTER TABLE jobs ADD COLUMN parts jsonb NOT NULL DEFAULT '[]'::jsonb;
CREATE INDEX jobs_graph_created ON jobs (graph_job_id, created_at) WHERE graph_job_id IS NOT NULL;
