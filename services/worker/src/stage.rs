//! The stage seam: what every stage receives, what it returns, and the trait it implements.
//!
//! A stage is one module under [`crate::stages`] implementing [`StageRunner`], plus one line in
//! the registry there. The claim loop knows nothing about what a stage does: it builds one
//! [`StageContext`] per stage run and records the [`StageOutcome`] or the
//! [`StageError`](crate::error::StageError).

use futures::future::BoxFuture;
use sidbooth_core::{ArtifactStore, JobRecord, JobStore, JobWarning, Lease, Queue};
use sidbooth_describe::VlmClient;
use sidbooth_domain::Stage;

use crate::{
    config::WorkerConfig, engine::EngineHandle, error::StageError, evaluators::EvaluatorHandle,
    io::JobIo,
};

/// How a stage that did not fail ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageOutcome {
    /// Finished; the job moves on.
    Done,
    /// Finished, and the job waits for the user's review before it moves on.
    AwaitReview,
}

/// What the worker shares between the jobs it runs: the queue (every write to a job goes
/// through it, fenced by the lease), the job store, storage, the VLM client and the models.
pub struct Services {
    pub queue: Queue,
    pub jobs: JobStore,
    pub store: ArtifactStore,
    pub vlm: Option<VlmClient>,
    /// The diffusion engine, loaded on first use.
    pub engine: EngineHandle,
    /// CLIP, DINO and SAM, loaded on first use.
    pub evaluators: EvaluatorHandle,
    pub config: WorkerConfig,
}

/// One run of one stage of one job.
pub struct StageContext<'a> {
    pub job: &'a JobRecord,
    pub lease: &'a Lease,
    pub stage: Stage,
    /// Reading the job's inputs, storing its artifacts and resumable state.
    pub io: JobIo<'a>,
    pub engine: &'a EngineHandle,
    pub evaluators: &'a EvaluatorHandle,
    pub vlm: Option<&'a VlmClient>,
    pub config: &'a WorkerConfig,
    services: &'a Services,
}

impl<'a> StageContext<'a> {
    pub fn new(services: &'a Services, job: &'a JobRecord, lease: &'a Lease, stage: Stage) -> Self {
        Self {
            job,
            lease,
            stage,
            io: JobIo::new(
                &services.queue,
                &services.jobs,
                &services.store,
                lease,
                services.config.upload_part_mib * 1024 * 1024,
            ),
            engine: &services.engine,
            evaluators: &services.evaluators,
            vlm: services.vlm.as_ref(),
            config: &services.config,
            services,
        }
    }

    /// Reports progress of this stage, `fraction` in [0, 1], with stage-specific fields.
    pub async fn progress(
        &self,
        fraction: f32,
        detail: serde_json::Value,
    ) -> Result<(), StageError> {
        self.services
            .queue
            .progress(self.lease, self.stage, fraction, detail)
            .await
            .map_err(Into::into)
    }

    /// Tells the user something that does not fail the job (shown on the job and as an event).
    pub async fn warn(&self, code: &str, message: impl Into<String>) -> Result<(), StageError> {
        let warning = JobWarning {
            code: code.to_owned(),
            message: message.into(),
            stage: self.stage,
        };
        tracing::warn!(code, message = %warning.message, "job warning");
        self.services
            .queue
            .warn(self.lease, &warning)
            .await
            .map_err(Into::into)
    }

    /// The queue, for the writes a stage makes besides artifacts (descriptions, masks).
    pub fn queue(&self) -> &'a Queue {
        &self.services.queue
    }

    /// The job store, for reads besides inputs and artifacts (cached VLM answers).
    pub fn jobs(&self) -> &'a JobStore {
        &self.services.jobs
    }
}

/// A stage: one module, one registration in [`crate::stages::REGISTRY`].
pub trait StageRunner: Send + Sync {
    fn stage(&self) -> Stage;

    /// Runs the stage. It must be resumable: a run that is interrupted (worker killed, lease
    /// lost) is started again on another worker, which should skip what was already saved.
    fn run<'a>(
        &'a self,
        cx: &'a StageContext<'a>,
    ) -> BoxFuture<'a, Result<StageOutcome, StageError>>;

    /// Runs once the user approved a job this stage sent to review, before the next stage
    /// (e.g. describe writes its artifacts from the approved texts). Must be idempotent.
    fn after_review<'a>(
        &'a self,
        _cx: &'a StageContext<'a>,
    ) -> BoxFuture<'a, Result<(), StageError>> {
        Box::pin(async { Ok(()) })
    }
}
