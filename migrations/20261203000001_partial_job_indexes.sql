-- A job's status changes are never HOT updates (status is indexed), so each one adds an entry
-- to every index on jobs whose predicate the new row matches. Two of them only ever serve
-- unfinished jobs or set keys: making them partial leaves a job's success two index entries
-- to write instead of four, and its claim four instead of five.

-- Quotas and the claim's running limit count a tenant's queued and running jobs only.
DROP INDEX jobs_tenant_status;
CREATE INDEX jobs_tenant_status ON jobs (tenant_id, status)
    WHERE status = 'queued' OR status = 'running';

-- Idempotency keys are optional; jobs posted without one need no entry.
ALTER TABLE jobs DROP CONSTRAINT jobs_tenant_id_idempotency_key_key;
CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
