-- The control plane's metadata: jobs, idempotency keys, sessions and their
-- steps, tenant policies and the hash-chained audit log. Times are Unix
-- milliseconds; JSON is stored as text so both databases share one shape.

CREATE TABLE jobs (
    id               TEXT PRIMARY KEY,
    tenant           TEXT    NOT NULL,
    subject          TEXT    NOT NULL,
    app              TEXT,
    agent            TEXT,
    status           TEXT    NOT NULL,
    runtime          TEXT    NOT NULL,
    spec             TEXT    NOT NULL,
    labels           TEXT    NOT NULL,
    result           TEXT,
    error_code       TEXT,
    error_message    TEXT,
    attempts         BIGINT  NOT NULL DEFAULT 0,
    max_attempts     BIGINT  NOT NULL,
    lease_owner      TEXT,
    lease_expires_ms BIGINT,
    next_run_ms      BIGINT  NOT NULL,
    cancel_requested BIGINT  NOT NULL DEFAULT 0,
    created_ms       BIGINT  NOT NULL,
    updated_ms       BIGINT  NOT NULL,
    started_ms       BIGINT,
    finished_ms      BIGINT
);
CREATE INDEX jobs_by_tenant ON jobs (tenant, created_ms DESC, id DESC);
CREATE INDEX jobs_dispatch ON jobs (status, next_run_ms);

CREATE TABLE job_labels (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    tenant TEXT NOT NULL,
    name   TEXT NOT NULL,
    value  TEXT NOT NULL,
    PRIMARY KEY (job_id, name)
);
CREATE INDEX job_labels_lookup ON job_labels (tenant, name, value);

CREATE TABLE idempotency_keys (
    tenant          TEXT   NOT NULL,
    idem_key        TEXT   NOT NULL,
    request_hash    TEXT   NOT NULL,
    state           TEXT   NOT NULL,
    response_status BIGINT,
    response_body   TEXT,
    created_ms      BIGINT NOT NULL,
    expires_ms      BIGINT NOT NULL,
    PRIMARY KEY (tenant, idem_key)
);
CREATE INDEX idempotency_expiry ON idempotency_keys (expires_ms);

CREATE TABLE sessions (
    id         TEXT PRIMARY KEY,
    tenant     TEXT   NOT NULL,
    subject    TEXT   NOT NULL,
    app        TEXT,
    agent      TEXT,
    runtime    TEXT   NOT NULL,
    -- The session's default step timeout, to bound calls without one.
    timeout_ms BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    deleted_ms BIGINT
);
CREATE INDEX sessions_by_tenant ON sessions (tenant, created_ms DESC);

CREATE TABLE steps (
    id          TEXT   NOT NULL,
    session_id  TEXT   NOT NULL,
    tenant      TEXT   NOT NULL,
    seq         BIGINT NOT NULL,
    status      TEXT   NOT NULL,
    duration_ms BIGINT NOT NULL,
    code        TEXT   NOT NULL,
    result      TEXT   NOT NULL,
    created_ms  BIGINT NOT NULL,
    PRIMARY KEY (tenant, session_id, id)
);
CREATE INDEX steps_by_session ON steps (tenant, session_id, seq);

CREATE TABLE tenant_policies (
    tenant     TEXT   NOT NULL,
    version    BIGINT NOT NULL,
    rego       TEXT   NOT NULL,
    sha256     TEXT   NOT NULL,
    created_by TEXT   NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (tenant, version)
);

CREATE TABLE audit_events (
    seq        BIGINT PRIMARY KEY,
    id         TEXT   NOT NULL UNIQUE,
    ts_ms      BIGINT NOT NULL,
    tenant     TEXT   NOT NULL,
    actor      TEXT   NOT NULL,
    action     TEXT   NOT NULL,
    resource   TEXT   NOT NULL,
    outcome    TEXT   NOT NULL,
    bypass     BIGINT NOT NULL,
    request_id TEXT,
    details    TEXT   NOT NULL,
    prev_hash  TEXT   NOT NULL,
    hash       TEXT   NOT NULL
);
CREATE INDEX audit_by_tenant ON audit_events (tenant, seq);

-- Append-only: the database itself refuses edits and deletions.
CREATE FUNCTION audit_events_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only: % refused', TG_OP;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER audit_events_no_update BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();
