-- Tenants and their API keys. Only a SHA-256 of each key is stored; the key itself is shown
-- once, when it is created.
CREATE TABLE tenants (
    id          uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    key_hash    bytea NOT NULL UNIQUE,
    -- The first characters of the key, so an operator can tell keys apart without the secret.
    prefix      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- One row per job: the user's spec, where the job stands, and the queue's bookkeeping.
CREATE TABLE jobs (
    id                uuid PRIMARY KEY,
    tenant_id         uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    spec              jsonb NOT NULL,
    status            text NOT NULL CHECK (status IN
                        ('queued', 'running', 'awaiting_review', 'succeeded', 'failed', 'canceled')),
    -- The stage running now (or next to run while queued), null when finished.
    stage             text,
    -- Progress of the current stage in [0, 1].
    progress          real NOT NULL DEFAULT 0,
    stages_done       text[] NOT NULL DEFAULT '{}',
    attempts          integer NOT NULL DEFAULT 0,
    max_attempts      integer NOT NULL,
    run_after         timestamptz NOT NULL DEFAULT now(),
    -- Lease: which worker holds the job until when. lease_epoch grows by one on every claim and
    -- fences writes: a worker whose lease was taken over writes with a stale epoch and is refused.
    lease_owner       uuid,
    lease_expires_at  timestamptz,
    lease_epoch       bigint NOT NULL DEFAULT 0,
    cancel_requested  boolean NOT NULL DEFAULT false,
    error             jsonb,
    idempotency_key   text,
    request_hash      bytea,
    image_count       integer NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    UNIQUE (tenant_id, idempotency_key)
);

-- The claim query scans only jobs a worker could take.
CREATE INDEX jobs_claimable ON jobs (run_after, created_at)
    WHERE status = 'queued' OR status = 'running';
-- Listing: a tenant's jobs, newest first (ids are UUIDv7, so they sort by creation time).
CREATE INDEX jobs_tenant_id ON jobs (tenant_id, id DESC);

CREATE TABLE job_images (
    job_id        uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx           integer NOT NULL,
    file_name     text NOT NULL,
    object_key    text NOT NULL,
    content_type  text NOT NULL,
    sha256        text NOT NULL,
    width         integer NOT NULL,
    height        integer NOT NULL,
    bytes         bigint NOT NULL,
    PRIMARY KEY (job_id, idx)
);

CREATE TABLE descriptions (
    job_id               uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx                  integer NOT NULL,
    text                 text NOT NULL,
    description_case     text NOT NULL,
    model                text NOT NULL,
    instruction          text NOT NULL,
    instruction_version  text NOT NULL,
    -- A validation problem the worker could not repair; shown to the reviewer.
    problem              jsonb,
    edited               boolean NOT NULL DEFAULT false,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, idx)
);

CREATE TABLE artifacts (
    job_id        uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    name          text NOT NULL,
    object_key    text NOT NULL,
    content_type  text NOT NULL,
    size          bigint NOT NULL,
    sha256        text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, name)
);

-- Status changes and progress, kept so that an SSE client that connects late or reconnects
-- (Last-Event-ID) gets what it missed.
CREATE TABLE job_events (
    id          bigserial PRIMARY KEY,
    job_id      uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    kind        text NOT NULL,
    data        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_events_job ON job_events (job_id, id);

-- VLM answers by (image hash, case, mode, model, instruction version), so a retried or
-- repeated job does not pay twice.
CREATE TABLE vlm_cache (
    cache_key   text PRIMARY KEY,
    text        text NOT NULL,
    model       text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
