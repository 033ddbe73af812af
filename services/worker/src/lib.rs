//! The sidbooth worker: claims jobs from the Postgres queue, keeps their leases alive with
//! heartbeats, runs their stages in order (resuming at the first unfinished one) and records the
//! outcome: succeeded, awaiting review, retried later after a transient error, failed, canceled,
//! or given back on shutdown.
//!
//! A stage is a module under [`stages`] implementing [`stage::StageRunner`]: it gets one
//! [`stage::StageContext`] (the job, its lease, its storage through [`io::JobIo`], the models,
//! the VLM client, progress and warnings) and returns a [`StageOutcome`].
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool, store: sidbooth_core::ArtifactStore) -> anyhow::Result<()> {
//! use sidbooth_worker::{Worker, WorkerConfig};
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let worker = Worker::new(pool, store, WorkerConfig::default())?;
//! worker.run(shutdown).await?;
//! # Ok(()) }
//! ```

pub mod config;
pub mod engine;
pub mod error;
pub mod evaluators;
pub mod io;
pub mod metrics;
pub mod stage;
pub mod stages;
pub mod worker;

pub use config::{ShutdownMode, WorkerConfig};
pub use error::StageError;
pub use stage::{StageContext, StageOutcome};
pub use worker::{Worker, WorkerError};
