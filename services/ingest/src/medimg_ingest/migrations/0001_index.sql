-- The study / series / instance index. UIDs are the DICOM UIDs of the stored objects.
CREATE TABLE studies (
    study_uid   text PRIMARY KEY,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX studies_by_update ON studies (update_time DESC, study_uid DESC);

CREATE TABLE series (
    series_uid  text PRIMARY KEY,
    study_uid   text NOT NULL REFERENCES studies,
    modality    text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX series_by_study ON series (study_uid);

CREATE TABLE instances (
    sop_instance_uid text PRIMARY KEY,
    series_uid       text NOT NULL REFERENCES series,
    study_uid        text NOT NULL REFERENCES studies,
    sop_class_uid    text NOT NULL,
    transfer_syntax  text NOT NULL,
    size_bytes       bigint NOT NULL,
    sha256           text NOT NULL,
    object_key       text NOT NULL,
    create_time      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX instances_by_series ON instances (series_uid);
CREATE INDEX instances_by_study ON instances (study_uid);
