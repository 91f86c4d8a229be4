-- The audit log: append-only. Rows are never updated or deleted, by anyone:
-- the triggers refuse it even for the table's owner.
CREATE TABLE audit_events (
    log_index          bigint PRIMARY KEY CHECK (log_index >= 0),
    event_id           uuid NOT NULL UNIQUE,
    event_time         timestamptz NOT NULL,
    record_time        timestamptz NOT NULL DEFAULT now(),
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
    break_glass_reason text NOT NULL DEFAULT ''
);

CREATE FUNCTION audit_events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_events_no_update_delete
    BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_refuse_change();

CREATE TRIGGER audit_events_no_truncate
    BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_refuse_change();
