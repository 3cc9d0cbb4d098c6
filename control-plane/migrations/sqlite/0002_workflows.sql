-- Workflows (issue 19, section 1): an ordered plan run in one session. One
-- row per workflow (claimed by a worker with a lease, like a job) and one
-- row per step, recorded `running` before the step is sent so that a lost
-- worker never leaves a step whose run could be repeated unnoticed.

CREATE TABLE workflows (
    id               TEXT PRIMARY KEY,
    tenant           TEXT    NOT NULL,
    subject          TEXT    NOT NULL,
    app              TEXT,
    agent            TEXT,
    -- The submitter's roles (JSON), so the worker acts with its identity.
    roles            TEXT    NOT NULL,
    status           TEXT    NOT NULL,
    runtime          TEXT    NOT NULL,
    spec             TEXT    NOT NULL,
    labels           TEXT    NOT NULL,
    session_id       TEXT,
    artifacts        TEXT    NOT NULL,
    teardown         TEXT,
    error_code       TEXT,
    error_message    TEXT,
    attempts         INTEGER  NOT NULL DEFAULT 0,
    max_attempts     INTEGER  NOT NULL,
    lease_owner      TEXT,
    lease_expires_ms INTEGER,
    next_run_ms      INTEGER  NOT NULL,
    cancel_requested INTEGER  NOT NULL DEFAULT 0,
    created_ms       INTEGER  NOT NULL,
    updated_ms       INTEGER  NOT NULL,
    started_ms       INTEGER,
    finished_ms      INTEGER
);
CREATE INDEX workflows_by_tenant ON workflows (tenant, created_ms DESC, id DESC);
CREATE INDEX workflows_dispatch ON workflows (status, next_run_ms);

CREATE TABLE workflow_steps (
    workflow_id   TEXT    NOT NULL REFERENCES workflows (id),
    tenant        TEXT    NOT NULL,
    idx           INTEGER  NOT NULL,
    status        TEXT    NOT NULL,
    output        TEXT,
    error_code    TEXT,
    error_message TEXT,
    started_ms    INTEGER,
    finished_ms   INTEGER,
    PRIMARY KEY (workflow_id, idx)
);
