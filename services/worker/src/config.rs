//! Typed worker configuration from flags and environment. The VLM key is redacted in `Debug`, so
//! a config can be logged at start-up.

use sidbooth_core::QueueSettings;
use sidbooth_describe::VlmArgs;

use crate::{engine::EngineArgs, evaluators::EvaluateArgs};

/// What a worker does with the jobs it holds when it is asked to shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ShutdownMode {
    /// Finish the stage that is running, record it, then give the job back.
    #[default]
    FinishStage,
    /// Stop the running stage at once and give the job back, so another worker takes it over
    /// immediately (what was saved so far is kept; the stage resumes from there).
    Release,
}

/// Everything a worker needs besides its database pool and artifact store.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerConfig {
    #[command(flatten)]
    pub queue: QueueSettings,
    /// The vision-language model (SIDBOOTH_VLM_BASE_URL, SIDBOOTH_VLM_API_KEY,
    /// SIDBOOTH_VLM_MODEL, ...). Without a base URL or key, jobs that need a model fail with
    /// `vlm_not_configured`.
    #[command(flatten)]
    pub vlm: VlmArgs,
    /// The diffusion model for the train and generate stages.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// CLIP, DINO and SAM for subject masks and the evaluate stage.
    #[command(flatten)]
    pub evaluate: EvaluateArgs,
    /// Part size of multipart uploads of large artifacts (DreamBooth pipelines are GBs), in
    /// MiB; S3 wants at least 5.
    #[arg(long, env = "SIDBOOTH_UPLOAD_PART_MIB", default_value_t = 64)]
    pub upload_part_mib: u64,
    /// Jobs this worker runs at once.
    #[arg(long, env = "SIDBOOTH_WORKER_CONCURRENCY", default_value_t = 1)]
    pub concurrency: usize,
    /// What happens to running jobs on shutdown.
    #[arg(long, env = "SIDBOOTH_SHUTDOWN_MODE", value_enum, default_value_t = ShutdownMode::FinishStage)]
    pub shutdown_mode: ShutdownMode,
    /// In finish-stage mode, how long a running stage may take to finish once shutdown began,
    /// in seconds; past it the stage is stopped and the job given back, as in release mode. Set
    /// it below the time the platform waits before it kills the process (Kubernetes'
    /// terminationGracePeriodSeconds), so a long stage is given back instead of left to lapse.
    /// Unset: wait as long as the stage takes.
    #[arg(long, env = "SIDBOOTH_SHUTDOWN_TIMEOUT_SECS")]
    pub shutdown_timeout_secs: Option<f64>,
}

impl WorkerConfig {
    /// How long a stage may run on after shutdown began before it is stopped (None: no limit;
    /// release mode stops it at once).
    pub fn shutdown_grace(&self) -> Option<std::time::Duration> {
        match self.shutdown_mode {
            ShutdownMode::Release => Some(std::time::Duration::ZERO),
            ShutdownMode::FinishStage => self
                .shutdown_timeout_secs
                .map(|s| std::time::Duration::from_secs_f64(s.max(0.0))),
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            queue: QueueSettings::default(),
            vlm: default_vlm_args(),
            engine: EngineArgs::default(),
            evaluate: EvaluateArgs::default(),
            upload_part_mib: 64,
            concurrency: 1,
            shutdown_mode: ShutdownMode::FinishStage,
            shutdown_timeout_secs: None,
        }
    }
}

/// The VLM flags' defaults with no endpoint configured.
pub fn default_vlm_args() -> VlmArgs {
    VlmArgs {
        vlm_base_url: None,
        vlm_api_key: None,
        vlm_model: sidbooth_describe::client::DEFAULT_MODEL.to_owned(),
        vlm_image_max_px: 512,
        vlm_concurrency: 4,
        vlm_timeout_secs: 60,
        vlm_max_retries: 3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        worker: WorkerConfig,
    }

    #[test]
    fn api_key_is_redacted() {
        let config = WorkerConfig {
            vlm: VlmArgs {
                vlm_api_key: Some("sk-very-secret".parse().unwrap()),
                ..default_vlm_args()
            },
            ..WorkerConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("sk-very-secret"), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn flags_parse_with_defaults() {
        let cli =
            Cli::try_parse_from(["w", "--shutdown-mode", "release", "--concurrency", "3"]).unwrap();
        assert_eq!(cli.worker.shutdown_mode, ShutdownMode::Release);
        assert_eq!(cli.worker.concurrency, 3);
        assert_eq!(cli.worker.vlm.vlm_model, "gpt-4o");
        assert_eq!(cli.worker.queue.max_attempts, 5);
        assert_eq!(cli.worker.shutdown_grace(), Some(std::time::Duration::ZERO));
        let cli = Cli::try_parse_from(["w"]).unwrap();
        assert_eq!(cli.worker.shutdown_mode, ShutdownMode::FinishStage);
        assert_eq!(cli.worker.concurrency, 1);
        assert_eq!(cli.worker.shutdown_grace(), None);
        let cli = Cli::try_parse_from(["w", "--shutdown-timeout-secs", "540"]).unwrap();
        assert_eq!(
            cli.worker.shutdown_grace(),
            Some(std::time::Duration::from_secs(540))
        );
    }
}
