-- Numbered after the issue (24). The real cost of every finished job beside its estimate: the
-- GPU-seconds its provider measured (RunPod executionTime and delayTime, the Modal function's wall
-- time, compute-local's host time), the price-table GPU it ran on, and that GPU's rate.
-- The estimate's GPU and rate are kept too: a job whose worker names no GPU is priced as requested.
ALTER TABLE jobs ADD COLUMN estimated_gpu text NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN estimated_usd_per_second double precision NOT NULL DEFAULT 0;
-- NULL until the job has ended with a measurement (a job cancelled before it ran has none).
ALTER TABLE jobs ADD COLUMN actual_gpu_seconds double precision;
ALTER TABLE jobs ADD COLUMN actual_delay_s double precision;
ALTER TABLE jobs ADD COLUMN actual_gpu text;
ALTER TABLE jobs ADD COLUMN actual_device text;
ALTER TABLE jobs ADD COLUMN actual_usd_per_second double precision;
ALTER TABLE jobs ADD COLUMN actual_cost_usd double precision;
ALTER TABLE jobs ADD COLUMN actual_source text;
-- The researcher's spend cap for the job (USD; 0 = none): an estimate over it is refused, a
-- running job that reaches it is cancelled.
ALTER TABLE jobs ADD COLUMN max_cost_usd double precision NOT NULL DEFAULT 0;
