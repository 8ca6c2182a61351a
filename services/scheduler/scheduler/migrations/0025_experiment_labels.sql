-- An experiment's labels (issue 28: name, tags, note; kept in the spec too) as columns: the list
-- shows and filters them without loading a spec of up to 20 MiB (see 0022).
ALTER TABLE jobs ADD COLUMN name text NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN tags text[] NOT NULL DEFAULT '{}';
ALTER TABLE jobs ADD COLUMN note text NOT NULL DEFAULT '';
UPDATE jobs SET
    name = coalesce(spec ->> 'name', ''),
    tags = CASE WHEN jsonb_typeof(spec -> 'tags') = 'array'
                THEN ARRAY(SELECT jsonb_array_elements_text(spec -> 'tags')) ELSE '{}' END,
    note = coalesce(spec ->> 'note', '')
    WHERE spec ?| ARRAY['name', 'tags', 'note'];
CREATE INDEX jobs_user_tags ON jobs USING gin (tags);
