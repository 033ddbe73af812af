-- Webhook endpoints a tenant registered, the outbox of events to send them, and the log of
-- every try. A status change writes its message and deliveries in the transaction that makes
-- the change, so none is lost and none is sent for a change that rolled back.
CREATE TABLE webhook_endpoints (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    url         text NOT NULL,
    -- Event types delivered, e.g. {job.succeeded,job.failed}.
    events      text[] NOT NULL,
    -- `whsec_` + base64 of the signing key; needed to sign, so it is kept as given out.
    secret      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_endpoints_tenant ON webhook_endpoints (tenant_id);

-- One event: its `webhook-id` (the same on every try and for every endpoint) and the body.
CREATE TABLE webhook_messages (
    id          text PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    job_id      uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    event_type  text NOT NULL,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_messages_job ON webhook_messages (job_id);

-- One message for one endpoint, until it is delivered or given up.
CREATE TABLE webhook_deliveries (
    id                    bigserial PRIMARY KEY,
    message_id            text NOT NULL REFERENCES webhook_messages (id) ON DELETE CASCADE,
    endpoint_id           uuid NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    status                text NOT NULL DEFAULT 'pending'
                            CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts              integer NOT NULL DEFAULT 0,
    next_attempt_at       timestamptz NOT NULL DEFAULT now(),
    -- A dispatcher holds the delivery until then; one that died is replaced after it.
    locked_until          timestamptz,
    last_response_status  integer,
    last_error            text,
    created_at            timestamptz NOT NULL DEFAULT now(),
    finished_at           timestamptz,
    UNIQUE (message_id, endpoint_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, id DESC);

-- Every try of a delivery: what the endpoint answered, or why there was no answer.
CREATE TABLE webhook_attempts (
    id               bigserial PRIMARY KEY,
    delivery_id      bigint NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempted_at     timestamptz NOT NULL DEFAULT now(),
    response_status  integer,
    error            text,
    duration_ms      integer NOT NULL
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id, id);
