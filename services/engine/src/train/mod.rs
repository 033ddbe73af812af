//! Training: methods (parameterizations), optimizer, learning-rate schedule, data preparation,
//! the training loop with checkpoints, and weight export.
//!
//! - [`run`]: the entry point (`TrainConfig` + [`TrainModels`] + optional class-image generator +
//!   [`Callbacks`] -> [`TrainOutcome`]); synchronous, the worker calls it on a blocking thread.
//! - [`method`]: [`method::TrainingMethod`] (attach parameters to the models, list them, write
//!   the output), one module per method; [`registry`]: the methods registered once, their
//!   settings mapped from the job spec, and [`registry::load_weights`] for inference.
//! - [`trainer`]: the loop ([`trainer::Trainer`]): seeded per-step randomness, MSE on epsilon or
//!   v, prior preservation, gradient accumulation, clipping, AdamW, checkpoints, resume, cancel;
//!   [`trainer::eval_loss`] on a fixed (noise, timestep) set.
//! - [`data`]: photo preprocessing and cached VAE latent distributions.
//! - [`optim`], [`schedule`], [`checkpoint`], [`rng`], [`io`]: AdamW with exportable state,
//!   learning-rate schedules, checkpoint directories, derived generators, safetensors with metadata.
//! - [`host`] and [`adapters`]: the small traits the loop needs from the models, implemented for
//!   the engine's UNet, CLIP text encoder + tokenizer, VAE and DDIM schedule.

pub mod adapters;
pub mod augment;
pub mod checkpoint;
pub mod data;
pub mod host;
pub mod io;
pub mod loss;
pub mod method;
pub mod optim;
pub mod registry;
pub mod rng;
pub mod run;
pub mod schedule;
pub mod trainer;

pub use adapters::TrainModels;
pub use registry::{MethodConfig, MethodEntry, SettingsContext};
pub use run::{run, ClassImageGenerator, PriorConfig, TrainConfig, TrainOutcome};
pub use trainer::{Callbacks, LoopConfig, Resume, StepReport};

/// Errors of the training half of the engine.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("file format: {0}")]
    Format(String),
    #[error("image {path}: {msg}")]
    Image { path: String, msg: String },
    #[error("invalid training configuration: {0}")]
    Config(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
}
