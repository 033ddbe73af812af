//! The worker's metrics, recorded through the `metrics` facade (the binary installs a Prometheus
//! exporter; a library user installs whatever recorder it likes).
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `sidbooth_jobs_claimed_total` | counter | |
//! | `sidbooth_jobs_finished_total` | counter | `status`: succeeded, failed, canceled, awaiting_review |
//! | `sidbooth_stage_duration_seconds` | histogram | `stage`, `outcome` |
//! | `sidbooth_vlm_request_duration_seconds` | histogram | `outcome` (recorded by the VLM client) |
//! | `sidbooth_vlm_errors_total` | counter | `kind`: the VLM error code |
//! | `sidbooth_vlm_cache_hits_total` | counter | |
//! | `sidbooth_evaluate_phase_seconds` | histogram | `phase`: references, images, texts, report |

/// Registers descriptions and units with the installed recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_histogram, Unit};
    describe_counter!(
        "sidbooth_jobs_claimed_total",
        "Jobs claimed by this worker."
    );
    describe_counter!(
        "sidbooth_jobs_finished_total",
        "Jobs this worker left in a final or review state."
    );
    describe_histogram!(
        "sidbooth_stage_duration_seconds",
        Unit::Seconds,
        "Duration of one run of a stage."
    );
    describe_histogram!(
        "sidbooth_vlm_request_duration_seconds",
        Unit::Seconds,
        "Duration of one request to the vision-language model."
    );
    describe_counter!(
        "sidbooth_vlm_errors_total",
        "Descriptions that got no answer from the model, by error kind."
    );
    describe_counter!(
        "sidbooth_vlm_cache_hits_total",
        "Descriptions taken from the cache instead of the model."
    );
    describe_histogram!(
        "sidbooth_evaluate_phase_seconds",
        Unit::Seconds,
        "Time the evaluate stage spent per phase (embedding the references, measuring the \
         generated images, the prompts, writing the report)."
    );
}
