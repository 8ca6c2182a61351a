-- Stored datasets (issue 27): a training or eval file uploaded once, its bytes in the artifact store
-- under datasets/{id}/{filename}, named by a spec (training_dataset_id / eval_dataset_id). The row
-- holds what the upload's read found: the count and sizes price a job without reading the file.
CREATE TABLE datasets (
    id            text PRIMARY KEY,
    user_id       text NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('train', 'eval')),
    filename      text NOT NULL,
    format        text NOT NULL,
    count         bigint NOT NULL CHECK (count > 0),
    text_chars    bigint NOT NULL,
    answer_chars  bigint NOT NULL,
    bytes         bigint NOT NULL,
    sha256        text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX datasets_user_created ON datasets (user_id, created_at DESC);
-- "Is a job still using this dataset?" without reading every spec (DELETE refuses then).
CREATE INDEX jobs_active_training_dataset ON jobs ((spec ->> 'training_dataset_id'))
    WHERE status IN ('queued', 'submitted', 'running') AND spec ? 'training_dataset_id';
CREATE INDEX jobs_active_eval_dataset ON jobs ((spec ->> 'eval_dataset_id'))
    WHERE status IN ('queued', 'submitted', 'running') AND spec ? 'eval_dataset_id';
