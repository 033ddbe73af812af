//! Prometheus metrics: the process-wide recorder, per-request HTTP metrics, and the jobs-by-status
//! gauge refreshed from the database at each scrape.
//!
//! The recorder is installed once per process. Other crates in the same process (the worker
//! in `sidbooth dev`) record through the `metrics` facade into the same recorder, so their
//! metrics (`sidbooth_stage_duration_seconds`, `sidbooth_vlm_request_duration_seconds`,
//! `sidbooth_vlm_errors_total`) appear on this endpoint too.

use std::{sync::OnceLock, time::Instant};

use axum::{
    extract::{MatchedPath, Request},
    middleware::Next,
    response::Response,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sidbooth_domain::JobStatus;

pub const HTTP_REQUESTS: &str = "sidbooth_http_requests_total";
pub const HTTP_DURATION: &str = "sidbooth_http_request_duration_seconds";
pub const JOBS: &str = "sidbooth_jobs";

/// Buckets in seconds for every `*_seconds` histogram: from a cached GET through VLM requests
/// to stages that take an hour.
const LATENCY_BUCKETS: [f64; 20] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 900.0, 1800.0, 3600.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus handle, installing the recorder on first use. When another recorder
/// was installed first (by code outside sidbooth), this returns the handle of a recorder that is
/// not global, logs a warning, and never panics.
pub fn install_recorder() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
            .expect("non-empty buckets");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if let Err(e) = metrics::set_global_recorder(recorder) {
            tracing::warn!(error = %e, "a metrics recorder was already installed; /metrics \
                shows only what this handle records");
        }
        describe();
        handle
    })
}

fn describe() {
    metrics::describe_counter!(HTTP_REQUESTS, "HTTP requests by method, route and status.");
    metrics::describe_histogram!(
        HTTP_DURATION,
        metrics::Unit::Seconds,
        "HTTP request latency by method, route and status."
    );
    metrics::describe_gauge!(
        JOBS,
        "Jobs by status, read from the database at scrape time."
    );
}

/// Middleware: counts and times each request under its route template (`/v1/jobs/{id}`), so
/// label cardinality stays bounded.
pub async fn track(request: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    let labels = [
        ("method", method),
        ("route", route),
        ("status", response.status().as_u16().to_string()),
    ];
    metrics::counter!(HTTP_REQUESTS, labels.as_slice()).increment(1);
    metrics::histogram!(HTTP_DURATION, labels.as_slice()).record(start.elapsed().as_secs_f64());
    response
}

/// Sets the jobs gauge from fresh counts; statuses with no jobs read 0.
pub fn set_job_counts(counts: &[(JobStatus, i64)]) {
    for status in JobStatus::ALL {
        let n = counts
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, n)| *n);
        metrics::gauge!(JOBS, "status" => status.as_str()).set(n as f64);
    }
}
