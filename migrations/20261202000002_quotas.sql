-- Per-tenant limits that differ from the configured defaults (a null column: the default;
-- 0: no limit), and each tenant's accelerator time per UTC day.
CREATE TABLE tenant_limits (
    tenant_id             uuid PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    max_queued_jobs       integer CHECK (max_queued_jobs >= 0),
    max_running_jobs      integer CHECK (max_running_jobs >= 0),
    gpu_seconds_per_day   double precision CHECK (gpu_seconds_per_day >= 0),
    job_posts_per_minute  integer CHECK (job_posts_per_minute >= 0),
    updated_at            timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tenant_usage (
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    day          date NOT NULL,
    -- Wall time of the stages that run the model (train, generate, evaluate).
    gpu_seconds  double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, day)
);

-- Counting a tenant's queued and running jobs (quotas, the claim's running limit).
CREATE INDEX jobs_tenant_status ON jobs (tenant_id, status);
