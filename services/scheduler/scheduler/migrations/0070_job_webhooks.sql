-- RunPod's webhook (issue 22 item 4): the sha256 of the per-job secret in the webhook URL sent with
-- the job's /run, never the secret itself. NULL: no webhook (polling only).
ALTER TABLE jobs ADD COLUMN webhook_secret_sha256 bytea;
