//! The worker: claims jobs, keeps their leases alive, runs their stages in order and records
//! how each ended.

use std::{
    future::Future,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use sidbooth_core::{
    ArtifactStore, Claimed, CoreError, JobRecord, JobStore, Lease, Queue, RetryDecision,
};
use sidbooth_describe::{VlmClient, VlmError};
use sidbooth_domain::Stage;
use sqlx::{postgres::PgListener, PgPool};
use tokio::{sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    config::WorkerConfig,
    engine::EngineHandle,
    error::StageError,
    evaluators::EvaluatorHandle,
    stage::{Services, StageContext, StageOutcome},
    stages,
};

/// Why a running stage was stopped from outside. The first reason wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    Canceled,
    LeaseLost,
    Shutdown,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid VLM configuration: {0}")]
    Vlm(#[from] VlmError),
    #[error("invalid worker configuration: {0}")]
    Config(String),
}

/// A worker. Build it with [`Worker::new`], then [`Worker::run`] it until the shutdown token
/// fires.
#[derive(Clone)]
pub struct Worker {
    ctx: Arc<Services>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("worker_id", &self.ctx.queue.worker_id())
            .field("config", &self.ctx.config)
            .finish()
    }
}

impl Worker {
    /// A worker on this database and storage. The VLM client is built from `config.vlm`; without
    /// an endpoint, jobs that need a model fail with `vlm_not_configured`.
    pub fn new(
        pool: PgPool,
        store: ArtifactStore,
        config: WorkerConfig,
    ) -> Result<Self, WorkerError> {
        if config.concurrency == 0 {
            return Err(WorkerError::Config("concurrency must be at least 1".into()));
        }
        let (heartbeat, lease) = (config.queue.heartbeat_secs, config.queue.lease_secs);
        if heartbeat.is_nan() || heartbeat <= 0.0 || heartbeat >= lease {
            return Err(WorkerError::Config(format!(
                "the heartbeat interval ({} s) must be positive and shorter than the lease ({} s)",
                heartbeat, lease
            )));
        }
        if config.queue.poll_secs.is_nan() || config.queue.poll_secs <= 0.0 {
            return Err(WorkerError::Config(
                "the poll interval must be positive".into(),
            ));
        }
        let vlm = config.vlm.config().map(VlmClient::new).transpose()?;
        Ok(Self {
            ctx: Arc::new(Services {
                queue: Queue::new(pool.clone(), config.queue.clone()),
                jobs: JobStore::new(pool),
                store,
                vlm,
                engine: EngineHandle::new(config.engine.clone()),
                evaluators: EvaluatorHandle::new(config.evaluate.clone(), config.engine.clone()),
                config,
            }),
        })
    }

    /// Replaces the VLM client built from the configuration (e.g. one with other retry timings).
    /// Call it before [`Worker::run`].
    pub fn with_vlm(mut self, vlm: VlmClient) -> Self {
        Arc::get_mut(&mut self.ctx)
            .expect("with_vlm is called before the worker runs")
            .vlm = Some(vlm);
        self
    }

    /// This worker's id, recorded as the lease owner of the jobs it holds.
    pub fn id(&self) -> uuid::Uuid {
        self.ctx.queue.worker_id()
    }

    pub fn config(&self) -> &WorkerConfig {
        &self.ctx.config
    }

    /// Claims and runs jobs until `shutdown` fires, then stops claiming and lets the running
    /// jobs finish their stage (or gives them back at once, per `config.shutdown_mode`).
    /// Returns when no job is running any more.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let ctx = self.ctx;
        let slots = Arc::new(Semaphore::new(ctx.config.concurrency));
        let mut running = JoinSet::new();
        let mut listener: Option<PgListener> = None;
        let poll = ctx.config.queue.poll();
        tracing::info!(worker_id = %ctx.queue.worker_id(), concurrency = ctx.config.concurrency,
            shutdown_mode = ?ctx.config.shutdown_mode, "worker started");

        loop {
            while let Some(done) = running.try_join_next() {
                log_task_end(done);
            }
            let permit = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            };
            if listener.is_none() {
                // Listen before claiming, so a job queued between an empty claim and the wait is
                // not missed.
                listener = match ctx.queue.listen().await {
                    Ok(l) => Some(l),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot LISTEN for new jobs; polling");
                        None
                    }
                };
            }
            match ctx.queue.claim().await {
                Ok(Some(claimed)) => {
                    metrics::counter!("sidbooth_jobs_claimed_total").increment(1);
                    let ctx = ctx.clone();
                    let shutdown = shutdown.clone();
                    // Boxed: a job's future is deep, and the run loop's stays small.
                    running.spawn(Box::pin(async move {
                        // A job that succeeds hands over the next one, claimed in the same
                        // statement (Queue::succeed_and_claim); the slot runs it at once.
                        let mut next = Some(claimed);
                        while let Some(claimed) = next.take() {
                            next = run_job(&ctx, claimed, &shutdown).await;
                            if let Some(chained) = &next {
                                metrics::counter!("sidbooth_jobs_claimed_total").increment(1);
                                if shutdown.is_cancelled() {
                                    give_back(&ctx, &chained.lease).await;
                                    break;
                                }
                            }
                        }
                        drop(permit);
                    }));
                }
                Ok(None) => {
                    drop(permit);
                    wait_for_work(&mut listener, poll, &shutdown, &mut running).await;
                }
                Err(e) => {
                    drop(permit);
                    tracing::warn!(error = %e, "claiming failed; trying again");
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(poll.min(Duration::from_secs(1))) => {}
                    }
                }
            }
        }

        tracing::info!(running = running.len(), "shutting down: no new claims");
        while let Some(done) = running.join_next().await {
            log_task_end(done);
        }
        // Successes still to be recorded, and jobs claimed ahead to give back.
        ctx.queue.flush().await;
        tracing::info!("worker stopped");
        Ok(())
    }
}

fn log_task_end(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            tracing::error!(error = %e, "a job task panicked; its lease will lapse and another worker resumes it");
        }
    }
}

/// Waits for a notification, the poll interval, the shutdown, or a job slot freeing up.
async fn wait_for_work(
    listener: &mut Option<PgListener>,
    poll: Duration,
    shutdown: &CancellationToken,
    running: &mut JoinSet<()>,
) {
    let notified = async {
        match listener.as_mut() {
            Some(l) => {
                if let Err(e) = l.recv().await {
                    tracing::warn!(error = %e, "lost the LISTEN connection; reconnecting");
                    return false;
                }
                true
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        ok = notified => if !ok { *listener = None },
        _ = tokio::time::sleep(poll) => {}
        Some(done) = running.join_next(), if !running.is_empty() => log_task_end(done),
    }
}

/// Gives back a job claimed as shutdown began, before any of its work started.
async fn give_back(ctx: &Services, lease: &Lease) {
    match ctx.queue.release(lease).await {
        Ok(_) => tracing::info!(job_id = %lease.job_id, "shutdown: gave back the job claimed last"),
        Err(e) => {
            tracing::warn!(job_id = %lease.job_id, error = %e, "could not give the job back; its lease will lapse")
        }
    }
}

/// Runs one claimed job until it finishes, waits for review, fails, is canceled, is given back
/// or its lease is lost. The heartbeat runs inside this future, so aborting the task stops it
/// too (and the lease then lapses). A job that succeeds returns the worker's next job when one
/// was claimed with the success.
async fn run_job(
    ctx: &Services,
    claimed: Claimed,
    shutdown: &CancellationToken,
) -> Option<Claimed> {
    let Claimed { lease, job } = claimed;
    let span = tracing::info_span!("job", job_id = %lease.job_id, tenant_id = %lease.tenant_id, epoch = lease.epoch);
    async {
        tracing::info!(attempt = job.attempts, next_stage = ?job.next_stage(), "claimed");
        let stop = CancellationToken::new();
        let reason = OnceLock::new();
        let guard = guard(ctx, &lease, &stop, &reason, shutdown);
        tokio::select! {
            next = drive(ctx, lease, job, &stop, &reason, shutdown) => next,
            never = guard => match never {},
        }
    }
    .instrument(span)
    .await
}

/// Renews the lease every heartbeat interval and trips `stop` on a cancel request, a lost
/// lease, or (in release mode) shutdown. Never returns.
async fn guard(
    ctx: &Services,
    lease: &Lease,
    stop: &CancellationToken,
    reason: &OnceLock<StopReason>,
    shutdown: &CancellationToken,
) -> std::convert::Infallible {
    let trip = |why: StopReason| {
        let _ = reason.set(why);
        stop.cancel();
    };
    let release_on_shutdown = async {
        if let Some(grace) = ctx.config.shutdown_grace() {
            shutdown.cancelled().await;
            if !grace.is_zero() {
                tokio::time::sleep(grace).await;
                tracing::info!(
                    timeout_secs = grace.as_secs_f64(),
                    "shutdown: the stage did not finish in time"
                );
            }
            tracing::info!("shutdown: stopping the stage to release the job");
            trip(StopReason::Shutdown);
        }
        std::future::pending::<()>().await
    };
    let heartbeat = async {
        let every = ctx.config.queue.heartbeat();
        let mut last_renewed = Instant::now();
        loop {
            tokio::time::sleep(every).await;
            match ctx.queue.heartbeat(lease).await {
                Ok(beat) => {
                    last_renewed = Instant::now();
                    if beat.cancel_requested {
                        tracing::info!("cancellation requested");
                        trip(StopReason::Canceled);
                        break;
                    }
                }
                Err(CoreError::LeaseLost) => {
                    tracing::warn!("lease lost to another worker");
                    trip(StopReason::LeaseLost);
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "heartbeat failed");
                    if last_renewed.elapsed() >= ctx.config.queue.lease() {
                        tracing::warn!("lease expired without a heartbeat; stopping");
                        trip(StopReason::LeaseLost);
                        break;
                    }
                }
            }
        }
        std::future::pending::<()>().await
    };
    tokio::join!(release_on_shutdown, heartbeat);
    unreachable!("both futures are pending forever")
}

/// The stage after `stage` in the job's pipeline that has not finished yet.
fn following(job: &JobRecord, stage: Stage) -> Option<Stage> {
    job.spec
        .ordered_stages()
        .into_iter()
        .find(|s| *s > stage && !job.stages_done.contains(s))
}

async fn drive(
    ctx: &Services,
    lease: Lease,
    mut job: JobRecord,
    stop: &CancellationToken,
    reason: &OnceLock<StopReason>,
    shutdown: &CancellationToken,
) -> Option<Claimed> {
    // A job that comes back from review: each stage that ran before lets the approval take
    // effect (describe writes its artifacts from the approved texts) before any later stage.
    if job.spec.review {
        for done in job.stages_done.clone() {
            let Some(runner) = stages::runner(done) else {
                continue;
            };
            let started = Instant::now();
            let span = tracing::info_span!("stage", job_id = %lease.job_id, stage = done.as_str(), step = "after_review");
            let cx = StageContext::new(ctx, &job, &lease, done);
            let settled = guarded(stop, Box::pin(runner.after_review(&cx).instrument(span))).await;
            if let Err(e) = settled {
                record_duration(done, e.outcome(), started);
                settle(ctx, &lease, Some(done), e, reason).await;
                return None;
            }
        }
    }
    loop {
        if job.cancel_requested {
            let _ = reason.set(StopReason::Canceled);
            settle(
                ctx,
                &lease,
                job.next_stage(),
                StageError::Interrupted,
                reason,
            )
            .await;
            return None;
        }
        let Some(stage) = job.next_stage() else {
            return succeed(ctx, &lease, reason, shutdown).await;
        };

        let started = Instant::now();
        let span = tracing::info_span!("stage", job_id = %lease.job_id, stage = stage.as_str());
        let result = match stages::runner(stage) {
            Some(runner) => {
                let cx = StageContext::new(ctx, &job, &lease, stage);
                guarded(stop, Box::pin(runner.run(&cx).instrument(span.clone()))).await
            }
            None => Err(StageError::permanent(
                "stage_not_implemented",
                format!("this worker cannot run the {} stage", stage.as_str()),
            )),
        };
        let outcome = match &result {
            Ok(StageOutcome::Done) => "succeeded",
            Ok(StageOutcome::AwaitReview) => "awaiting_review",
            Err(e) => e.outcome(),
        };
        record_duration(stage, outcome, started);
        if uses_accelerator(stage) {
            // Counted whatever the outcome: a failed try used the device too.
            if let Err(e) = ctx
                .queue
                .add_gpu_seconds(&lease, started.elapsed().as_secs_f64())
                .await
            {
                tracing::warn!(error = %e, "could not count the stage's accelerator time");
            }
        }
        let _enter = span.enter();
        tracing::info!(
            outcome,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "stage ended"
        );
        drop(_enter);

        let next = following(&job, stage);
        match result {
            Ok(StageOutcome::Done) => match ctx.queue.complete_stage(&lease, stage, next).await {
                Ok(record) => {
                    job = record;
                    if shutdown.is_cancelled() && job.next_stage().is_some() {
                        tracing::info!("shutdown: stage finished, giving the job back");
                        let _ = reason.set(StopReason::Shutdown);
                        settle(ctx, &lease, next, StageError::Interrupted, reason).await;
                        return None;
                    }
                }
                Err(e) => {
                    settle(ctx, &lease, Some(stage), e.into(), reason).await;
                    return None;
                }
            },
            Ok(StageOutcome::AwaitReview) => {
                match ctx
                    .queue
                    .complete_stage_for_review(&lease, stage, next)
                    .await
                {
                    Ok(_) => {
                        metrics::counter!("sidbooth_jobs_finished_total", "status" => "awaiting_review").increment(1);
                        tracing::info!("awaiting review");
                    }
                    Err(e) => settle(ctx, &lease, Some(stage), e.into(), reason).await,
                }
                return None;
            }
            Err(e) => {
                settle(ctx, &lease, Some(stage), e, reason).await;
                return None;
            }
        }
    }
}

/// Marks the job succeeded; unless the worker is shutting down, the same statement claims its
/// next job, which is returned.
async fn succeed(
    ctx: &Services,
    lease: &Lease,
    reason: &OnceLock<StopReason>,
    shutdown: &CancellationToken,
) -> Option<Claimed> {
    // While jobs are quick the next one may come at once, claimed ahead, and the success is
    // recorded by the queue's next statement (Queue::finish_and_claim); `flush` at the end of
    // `run` waits for it.
    let done = if shutdown.is_cancelled() {
        ctx.queue.succeed(lease).await.map(|_| None)
    } else {
        ctx.queue.finish_and_claim(lease).await
    };
    match done {
        Ok(next) => {
            metrics::counter!("sidbooth_jobs_finished_total", "status" => "succeeded").increment(1);
            tracing::info!("job succeeded");
            next
        }
        Err(e) => {
            settle(ctx, lease, None, e.into(), reason).await;
            None
        }
    }
}

/// Runs `work` unless `stop` fires first; then the work is dropped where it stands.
async fn guarded<T>(
    stop: &CancellationToken,
    work: impl Future<Output = Result<T, StageError>>,
) -> Result<T, StageError> {
    tokio::select! {
        biased;
        _ = stop.cancelled() => Err(StageError::Interrupted),
        r = work => r,
    }
}

/// The stages that run the model, whose time counts against a tenant's daily seconds.
fn uses_accelerator(stage: Stage) -> bool {
    matches!(stage, Stage::Train | Stage::Generate | Stage::Evaluate)
}

fn record_duration(stage: Stage, outcome: &'static str, started: Instant) {
    metrics::histogram!("sidbooth_stage_duration_seconds", "stage" => stage.as_str(), "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
}

/// Records how a job that stopped running ended.
async fn settle(
    ctx: &Services,
    lease: &Lease,
    stage: Option<Stage>,
    error: StageError,
    reason: &OnceLock<StopReason>,
) {
    let stopped_by = reason.get().copied();
    // A cancel or a lost lease explains whatever the interrupted stage reported.
    let error = match (stopped_by, error) {
        (_, StageError::LeaseLost) => StageError::LeaseLost,
        (Some(StopReason::Canceled | StopReason::LeaseLost), _) => StageError::Interrupted,
        (_, e) => e,
    };
    let finished = |status: &'static str| {
        metrics::counter!("sidbooth_jobs_finished_total", "status" => status).increment(1);
    };
    let result = match error {
        StageError::LeaseLost => {
            tracing::info!("lease lost; another worker owns the job now");
            Ok(())
        }
        StageError::Interrupted => match stopped_by {
            Some(StopReason::Canceled) => ctx.queue.mark_canceled(lease).await.map(|_| {
                finished("canceled");
                tracing::info!("job canceled");
            }),
            Some(StopReason::LeaseLost) => {
                tracing::info!("stopped: the lease was lost");
                Ok(())
            }
            Some(StopReason::Shutdown) | None => ctx.queue.release(lease).await.map(|_| {
                tracing::info!("job released for another worker");
            }),
        },
        StageError::Transient { .. } => {
            let job_error = error
                .job_error(stage)
                .expect("transient errors are recorded");
            match ctx.queue.retry_later(lease, &job_error).await {
                Ok(RetryDecision::RetryAfter(delay)) => {
                    tracing::warn!(code = %job_error.code, error = %job_error.message,
                        retry_in_ms = delay.as_millis() as u64, "transient failure; retrying later");
                    Ok(())
                }
                Ok(RetryDecision::Failed) => {
                    finished("failed");
                    tracing::error!(code = %job_error.code, error = %job_error.message,
                        "transient failure and no attempts left; job failed");
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
        StageError::Permanent { .. } => {
            let job_error = error
                .job_error(stage)
                .expect("permanent errors are recorded");
            ctx.queue.fail(lease, &job_error).await.map(|_| {
                finished("failed");
                tracing::error!(code = %job_error.code, error = %job_error.message, "job failed");
            })
        }
    };
    match result {
        Ok(()) => {}
        Err(CoreError::LeaseLost) => tracing::info!("lease lost; another worker owns the job now"),
        Err(e) => {
            tracing::warn!(error = %e, "could not record how the job ended; its lease will lapse and it will be retried")
        }
    }
}
