//! The columns of `jobs` that make a [`crate::JobRecord`], for every query that returns one
//! (the job store, the queue, and the status change that snapshots a row for webhooks).

pub(crate) const JOB_COLUMNS: &str = "id, tenant_id, spec, status, stage, progress, stages_done, \
    attempts, max_attempts, cancel_requested, error, warnings, image_count, run_after, \
    created_at, updated_at, finished_at";
