//! The train stage: LoRA fine-tuning of the base model on the job's photos, one (approved)
//! description per photo as its caption.
//!
//! The engine runs on a blocking thread and reports through a channel: every step (loss, lr)
//! becomes a progress event, every checkpoint is uploaded to storage under the job's `work/`
//! prefix with a `latest` pointer. A worker that takes the job over downloads the latest
//! checkpoint and continues from it, so a killed worker costs at most `checkpoint_every` steps.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::future::BoxFuture;
use sidbooth_domain::{Stage, TrainMethod};
use sidbooth_engine::train::{
    self,
    checkpoint::{OPTIMIZER_FILE, STATE_FILE, TRAINABLE_FILE},
    data::{CaptionedPhoto, PhotoSource},
    method::{ExportInfo, LoraConfig},
    run::{MethodConfig, PriorConfig, TrainConfig, TrainModels, TrainOutcome},
    schedule::LrSchedule,
    trainer::{Callbacks, LoopConfig, Resume, StepReport},
};
use tokio::sync::mpsc;

use crate::{
    engine::CancelOnDrop,
    error::StageError,
    stage::{StageContext, StageOutcome, StageRunner},
};

pub struct Train;

impl StageRunner for Train {
    fn stage(&self) -> Stage {
        Stage::Train
    }

    fn run<'a>(
        &'a self,
        cx: &'a StageContext<'a>,
    ) -> BoxFuture<'a, Result<StageOutcome, StageError>> {
        Box::pin(run(cx))
    }
}

pub const LORA_SAFETENSORS: &str = "lora.safetensors";
pub const TRAINING_JSON: &str = "training.json";
const CHECKPOINT_FILES: [&str; 3] = [TRAINABLE_FILE, OPTIMIZER_FILE, STATE_FILE];
/// Progress events are written at most this often (plus the last step).
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// What the engine thread tells the async side.
enum EngineEvent {
    Step(StepReport),
    Checkpoint(u64, PathBuf),
}

fn engine_error(e: impl std::fmt::Display) -> StageError {
    StageError::permanent("train_failed", e.to_string())
}

/// Resumable state under the job's `work/` prefix: checkpoint directories and a pointer to the
/// newest.
const LATEST: &str = "train/latest";

fn checkpoint_name(dir_name: &str, file: &str) -> String {
    format!("train/{dir_name}/{file}")
}

/// Downloads the checkpoint the `latest` pointer names into `root`, if there is one.
async fn restore_checkpoint(
    cx: &StageContext<'_>,
    root: &Path,
) -> Result<Option<String>, StageError> {
    let Some(pointer) = cx.io.work(LATEST).await? else {
        return Ok(None);
    };
    let name = String::from_utf8_lossy(&pointer).trim().to_owned();
    let dir = root.join(&name);
    std::fs::create_dir_all(&dir).map_err(|e| StageError::transient("workdir", e.to_string()))?;
    for file in CHECKPOINT_FILES {
        let bytes = cx
            .io
            .work(&checkpoint_name(&name, file))
            .await?
            .ok_or_else(|| {
                StageError::permanent(
                    "checkpoint_missing",
                    format!("checkpoint {name} lacks {file}"),
                )
            })?;
        std::fs::write(dir.join(file), &bytes)
            .map_err(|e| StageError::transient("workdir", e.to_string()))?;
    }
    Ok(Some(name))
}

/// Uploads a checkpoint directory, then moves the `latest` pointer to it.
async fn upload_checkpoint(cx: &StageContext<'_>, dir: &Path) -> Result<(), StageError> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| engine_error("checkpoint directory without a name"))?;
    for file in CHECKPOINT_FILES {
        let bytes = std::fs::read(dir.join(file))
            .map_err(|e| StageError::transient("workdir", e.to_string()))?;
        cx.io
            .put_work(&checkpoint_name(&name, file), Bytes::from(bytes))
            .await?;
    }
    cx.io.put_work(LATEST, Bytes::from(name)).await
}

#[tracing::instrument(skip_all, fields(job_id = %cx.job.id))]
async fn run(cx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
    let job = cx.job;
    let settings = job.spec.train.clone().unwrap_or_default();
    if settings.method != TrainMethod::Lora {
        return Err(StageError::permanent(
            "method_not_available",
            format!(
                "training method {} is not available",
                settings.method.as_str()
            ),
        ));
    }
    let engine = cx.engine.base().await?;

    // Photos with their descriptions, in upload order.
    let images = cx.io.images().await?;
    let descriptions = cx.io.descriptions().await?;
    if descriptions.len() != images.len() || descriptions.iter().any(|d| d.problem.is_some()) {
        return Err(StageError::permanent(
            "descriptions_missing",
            "training needs one valid description per photo",
        ));
    }
    let mut photos = Vec::with_capacity(images.len());
    for (image, description) in images.iter().zip(&descriptions) {
        let bytes = cx.io.photo(image).await?;
        let decoded = image::load_from_memory(&bytes).map_err(|e| {
            StageError::permanent("input_unreadable", format!("{}: {e}", image.file_name))
        })?;
        photos.push(CaptionedPhoto {
            source: PhotoSource::Image(decoded.to_rgb8()),
            caption: description.text.clone(),
        });
    }

    let workdir =
        tempfile::tempdir().map_err(|e| StageError::transient("workdir", e.to_string()))?;
    let checkpoints = workdir.path().join("checkpoints");
    let resumed_from = restore_checkpoint(cx, &checkpoints).await?;
    if let Some(name) = &resumed_from {
        tracing::info!(checkpoint = %name, "resuming training");
    }

    let resolution = (engine.unet.config.sample_size.unwrap_or(64) * engine.vae_scale()) as u32;
    let max_steps = u64::from(settings.steps);
    let spec = &job.spec;
    let mut config = TrainConfig::new(
        MethodConfig::Lora(LoraConfig {
            rank: settings.rank as usize,
            alpha: settings.rank as f64,
            train_text_encoder: settings.train_text_encoder,
            ..LoraConfig::default()
        }),
        photos,
        ExportInfo {
            base_model: cx.engine.args().model_name(),
            token: spec.token.to_string(),
            class: spec.subject_class.to_string(),
            description_case: spec.descriptions.case.as_str().to_owned(),
            steps: 0,
        },
    );
    config.resolution = resolution;
    config.loop_cfg = LoopConfig {
        seed: settings.seed,
        max_steps,
        lr: LrSchedule::constant(settings.learning_rate),
        checkpoint_every: cx.engine.args().checkpoint_every.min(max_steps.max(1)),
        checkpoint_dir: Some(checkpoints.clone()),
        keep_checkpoints: 3,
        resume: Resume::Latest,
        ..LoopConfig::default()
    };
    if settings.prior_preservation {
        config.prior = Some(PriorConfig {
            class_prompt: spec.mode.class_prompt(&spec.subject_class),
            class_dir: workdir.path().join("class-images"),
            num_class_images: settings.num_class_images as usize,
            seed: settings.seed,
        });
    }
    let output = workdir.path().join(LORA_SAFETENSORS);
    config.output = Some(output.clone());

    // The engine thread.
    let cancel = CancelOnDrop::new();
    let flag = cancel.flag();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let models = TrainModels::from_pipeline(&engine).map_err(engine_error)?;
    let training = tokio::task::spawn_blocking(move || {
        let step_tx = tx.clone();
        let mut callbacks = Callbacks::default()
            .on_step(move |report: &StepReport| {
                let _ = step_tx.send(EngineEvent::Step(report.clone()));
            })
            .on_checkpoint(move |step, dir: &Path| {
                let _ = tx.send(EngineEvent::Checkpoint(step, dir.to_owned()));
            })
            .cancel_flag(flag);
        train::run::run(&config, &models, Some(engine.as_ref()), &mut callbacks)
    });

    let mut losses: Vec<(u64, f64)> = Vec::new();
    let mut last_report = Instant::now() - PROGRESS_EVERY;
    while let Some(event) = rx.recv().await {
        match event {
            EngineEvent::Step(report) => {
                losses.push((report.step, report.loss));
                let last = report.step == report.max_steps;
                if last || last_report.elapsed() >= PROGRESS_EVERY {
                    last_report = Instant::now();
                    cx.progress(
                        report.step as f32 / report.max_steps.max(1) as f32,
                        serde_json::json!({
                            "step": report.step,
                            "max_steps": report.max_steps,
                            "loss": report.loss,
                            "lr": report.lr,
                        }),
                    )
                    .await?;
                }
            }
            EngineEvent::Checkpoint(step, dir) => {
                upload_checkpoint(cx, &dir).await?;
                tracing::debug!(step, "checkpoint stored");
            }
        }
    }
    let outcome = training
        .await
        .map_err(|e| StageError::transient("engine_panic", e.to_string()))?
        .map_err(engine_error)?;
    drop(cancel);
    let (steps, last_loss) = match outcome {
        TrainOutcome::Completed {
            steps, last_loss, ..
        } => (steps, last_loss),
        TrainOutcome::Canceled { .. } => return Err(StageError::Interrupted),
    };

    let weights =
        std::fs::read(&output).map_err(|e| StageError::transient("workdir", e.to_string()))?;
    cx.io
        .store(LORA_SAFETENSORS, "application/octet-stream", weights)
        .await?;
    let summary = serde_json::json!({
        "method": "lora",
        "base_model": cx.engine.args().model_name(),
        "steps": steps,
        "resolution": resolution,
        "resumed_from": resumed_from,
        "last_loss": last_loss,
        "losses": losses,
        "settings": settings,
    });
    cx.io
        .store(
            TRAINING_JSON,
            "application/json",
            serde_json::to_vec_pretty(&summary).map_err(engine_error)?,
        )
        .await?;
    Ok(StageOutcome::Done)
}
