-- What the index knows of each de-identified instance, for QIDO-RS and C-FIND; the instances
-- held back for a person to look at; and the encrypted link from pseudonym to patient.
-- Every value here is taken from the de-identified instance: no PHI.
ALTER TABLE studies
    ADD COLUMN patient_pseudonym text NOT NULL DEFAULT '',
    ADD COLUMN study_date        date,
    ADD COLUMN study_time        text NOT NULL DEFAULT '',
    ADD COLUMN accession_number  text NOT NULL DEFAULT '',
    ADD COLUMN study_id          text NOT NULL DEFAULT '',
    ADD COLUMN study_description text NOT NULL DEFAULT '';
CREATE INDEX studies_by_patient ON studies (patient_pseudonym, study_date);
CREATE INDEX studies_by_date ON studies (study_date);

ALTER TABLE series
    ADD COLUMN series_number      integer,
    ADD COLUMN series_description text NOT NULL DEFAULT '',
    ADD COLUMN body_part_examined text NOT NULL DEFAULT '';

ALTER TABLE instances
    ADD COLUMN instance_number  integer,
    ADD COLUMN rows             integer,
    ADD COLUMN columns          integer,
    ADD COLUMN number_of_frames integer;

-- Stored de-identified, but in no study, series or instance above: nothing serves them.
CREATE TABLE quarantined_instances (
    sop_instance_uid  text PRIMARY KEY,
    series_uid        text NOT NULL,
    study_uid         text NOT NULL,
    sop_class_uid     text NOT NULL,
    patient_pseudonym text NOT NULL,
    reason            text NOT NULL,
    size_bytes        bigint NOT NULL,
    sha256            text NOT NULL,
    object_key        text NOT NULL,
    create_time       timestamptz NOT NULL DEFAULT now()
);

-- The way back from a pseudonym to the patient: AES-GCM sealed, the pseudonym as associated
-- data (a sealed value moved to another row does not open), readable only by Reidentify.
CREATE TABLE identities (
    patient_pseudonym text PRIMARY KEY,
    key_id            text NOT NULL,
    sealed            bytea NOT NULL,
    create_time       timestamptz NOT NULL DEFAULT now()
);
