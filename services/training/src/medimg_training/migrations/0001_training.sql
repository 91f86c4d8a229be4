-- Datasets (immutable versions), training jobs (a state machine), and the model registry.

CREATE TABLE datasets (
    dataset_id text NOT NULL,
    version integer NOT NULL CHECK (version > 0),
    task text NOT NULL CHECK (task IN ('classification', 'segmentation')),
    class_names text[] NOT NULL,
    fractions double precision[] NOT NULL,
    split_seed text NOT NULL,
    description text NOT NULL DEFAULT '',
    creator text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dataset_id, version)
);
CREATE INDEX datasets_by_time ON datasets (create_time DESC, dataset_id, version);

CREATE TABLE dataset_items (
    dataset_id text NOT NULL,
    version integer NOT NULL,
    position integer NOT NULL,
    series text NOT NULL,
    label text NOT NULL,
    label_series text NOT NULL,
    patient_pseudonym text NOT NULL,
    split text NOT NULL CHECK (split IN ('train', 'validation', 'test')),
    PRIMARY KEY (dataset_id, version, position),
    FOREIGN KEY (dataset_id, version) REFERENCES datasets
);

-- A dataset version never changes: a job, a model's lineage and a result all name it.
CREATE FUNCTION refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'dataset versions are immutable';
END $$;
CREATE TRIGGER datasets_immutable BEFORE UPDATE OR DELETE ON datasets
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER dataset_items_immutable BEFORE UPDATE OR DELETE ON dataset_items
    FOR EACH ROW EXECUTE FUNCTION refuse_change();

CREATE TABLE training_jobs (
    job_id text PRIMARY KEY,
    spec jsonb NOT NULL,
    state text NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    creator text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    start_time timestamptz,
    end_time timestamptz,
    error_reason text NOT NULL DEFAULT '',
    error_message text NOT NULL DEFAULT '',
    progress jsonb NOT NULL DEFAULT '{}',
    model_version text NOT NULL DEFAULT '',
    attempts integer NOT NULL DEFAULT 0,
    -- The process group of the running workers (its leader's pid) and its host.
    worker_pid integer,
    worker_host text NOT NULL DEFAULT '',
    resume boolean NOT NULL DEFAULT false
);
CREATE INDEX training_jobs_by_time ON training_jobs (create_time DESC, job_id);
CREATE INDEX training_jobs_active ON training_jobs (state) WHERE state IN ('queued', 'running');

CREATE TABLE models (
    model_id text PRIMARY KEY,
    create_time timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE model_versions (
    model_id text NOT NULL REFERENCES models,
    version integer NOT NULL CHECK (version > 0),
    job_id text NOT NULL REFERENCES training_jobs,
    dataset text NOT NULL,
    spec jsonb NOT NULL,
    code_version text NOT NULL,
    metrics jsonb NOT NULL,
    creator text NOT NULL,
    bundle_path text NOT NULL,
    sha256 text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, version)
);

CREATE TABLE model_aliases (
    model_id text NOT NULL REFERENCES models,
    alias text NOT NULL,
    version integer NOT NULL,
    set_by text NOT NULL,
    update_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, alias),
    FOREIGN KEY (model_id, version) REFERENCES model_versions
);
