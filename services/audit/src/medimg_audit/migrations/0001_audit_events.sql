-- The audit log: events with their RFC 9162 Merkle tree, and the signed checkpoints.
-- Both are append-only: the service's role may only INSERT and SELECT, and triggers
-- refuse UPDATE, DELETE and TRUNCATE even for the owner.

CREATE TABLE audit_events (
    log_index          bigint PRIMARY KEY CHECK (log_index >= 0),
    event_id           uuid NOT NULL UNIQUE,
    event_time         timestamptz NOT NULL,
    record_time        timestamptz NOT NULL,
    reporter           text NOT NULL,
    actor_workload     text NOT NULL,
    actor_user         text NOT NULL DEFAULT '',
    actor_roles        text[] NOT NULL DEFAULT '{}',
    action             smallint NOT NULL,
    outcome            smallint NOT NULL,
    resource           text NOT NULL DEFAULT '',
    patient_pseudonym  text NOT NULL DEFAULT '',
    service            text NOT NULL,
    method             text NOT NULL DEFAULT '',
    trace_id           text NOT NULL DEFAULT '',
    break_glass_reason text NOT NULL DEFAULT '',
    -- The bytes the leaf hash covers (see medimg_audit.log.canonical) and the hash.
    canonical          bytea NOT NULL,
    leaf_hash          bytea NOT NULL CHECK (length(leaf_hash) = 32),
    -- The tree, stored with the leaves: node (level, idx) covers the leaves
    -- [idx * 2^level, (idx + 1) * 2^level) and lives in the row of the last of them, as
    -- bytes [32 * (level - 1), 32 * level) here (level 0 is leaf_hash). So a root or a
    -- proof reads O(log n) rows by primary key.
    subtree_hashes     bytea NOT NULL CHECK (length(subtree_hashes) % 32 = 0)
);
-- Events arrive in about time order, so a BRIN index serves time ranges at a fraction
-- of a B-tree's cost per append. Workloads are few: their filter scans in log order.
CREATE INDEX audit_events_by_time ON audit_events USING brin (event_time);
CREATE INDEX audit_events_by_user ON audit_events (actor_user, log_index) WHERE actor_user <> '';
CREATE INDEX audit_events_by_patient ON audit_events (patient_pseudonym, log_index)
    WHERE patient_pseudonym <> '';
CREATE INDEX audit_events_by_resource ON audit_events (resource text_pattern_ops, log_index);

CREATE TABLE checkpoints (
    tree_size bigint PRIMARY KEY CHECK (tree_size >= 0),
    root_hash bytea NOT NULL CHECK (length(root_hash) = 32),
    sign_time timestamptz NOT NULL,
    body      bytea NOT NULL,
    signature bytea NOT NULL,
    key_id    text NOT NULL
);

CREATE FUNCTION audit_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_events_no_update_delete BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER checkpoints_no_update_delete BEFORE UPDATE OR DELETE ON checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER checkpoints_no_truncate BEFORE TRUNCATE ON checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();

-- The role the service works as: it can append and read, nothing else. Roles belong to
-- the whole server, so another audit database on it may have created it already.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'medimg_audit_writer') THEN
        CREATE ROLE medimg_audit_writer NOLOGIN;
    END IF;
END
$$;
GRANT SELECT, INSERT ON audit_events, checkpoints TO medimg_audit_writer;
