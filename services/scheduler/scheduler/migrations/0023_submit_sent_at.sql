-- Issue 22's wiring: when the provider call of the current submit token was made (NULL: not yet
-- made, so a takeover may send it). A RunPod submit whose answer was lost is reconciled through
-- the worker's claim until the upload URLs minted for that call have expired; only then can the
-- scheduler know that no worker will ever run it.
ALTER TABLE jobs ADD COLUMN submit_sent_at timestamptz;
