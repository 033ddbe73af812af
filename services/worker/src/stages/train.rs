//! The train stage: personalization of the base model on the job's photos with the spec's
//! method (LoRA, DreamBooth, Textual Inversion, Custom Diffusion, SVDiff), one (approved)
//! description per photo as its caption, optionally with the loss restricted to the subject
//! masks. The method's output files become the artifacts `weights/<file>`; class images for
//! prior preservation are cached in storage per base model and class prompt, so a second job
//! does not sample them again.
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
use sha2::{Digest, Sha256};
use sidbooth_domain::{
    train::{MaskNormalization, TrainSettings},
    Stage,
};
use sidbooth_engine::train::{
    self,
    checkpoint::{OPTIMIZER_FILE, STATE_FILE, TRAINABLE_FILE},
    data::{list_images, CaptionedPhoto, PhotoSource},
    method::ExportInfo,
    optim::AdamWConfig,
    registry::export_options,
    run::{PriorConfig, TrainConfig, TrainOutcome},
    schedule::LrSchedule,
    trainer::{
        Callbacks, LoopConfig, MaskNormalization as EngineNormalization, MaskedLossConfig, Resume,
        StepReport,
    },
    MethodConfig, SettingsContext, TrainModels,
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

/// Artifact names of the method's output files: `weights/<file>`.
pub const WEIGHTS_PREFIX: &str = "weights/";
pub const TRAINING_JSON: &str = "training.json";
const CHECKPOINT_FILES: [&str; 3] = [TRAINABLE_FILE, OPTIMIZER_FILE, STATE_FILE];
/// Progress events are written at most this often (plus the last step).
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// What the engine thread tells the async side.
enum EngineEvent {
    Step(StepReport),
    /// A checkpoint folder to store; the engine waits for `stored` before it goes on.
    Checkpoint(u64, PathBuf, tokio::sync::oneshot::Sender<()>),
}

fn engine_error(e: impl std::fmt::Display) -> StageError {
    StageError::engine("train_failed", e)
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
        if !cx
            .io
            .work_to_file(&checkpoint_name(&name, file), &dir.join(file))
            .await?
        {
            return Err(StageError::permanent(
                "checkpoint_missing",
                format!("checkpoint {name} lacks {file}"),
            ));
        }
    }
    Ok(Some(name))
}

/// The names of every checkpoint that may have files in storage, written before any of a new
/// checkpoint's files go up: a worker killed mid-upload (or between moving `latest` and deleting
/// the checkpoint before) leaves files that only this list still names, and the next owner's
/// first checkpoint deletes them.
const WRITTEN: &str = "train/written";

async fn written_checkpoints(cx: &StageContext<'_>) -> Result<Vec<String>, StageError> {
    let mut names: Vec<String> = match cx.io.work(WRITTEN).await? {
        Some(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
        None => Vec::new(),
    };
    // A journal lost or unreadable still knows the checkpoint `latest` names.
    if let Some(latest) = cx.io.work(LATEST).await? {
        names.push(String::from_utf8_lossy(&latest).trim().to_owned());
    }
    names.sort();
    names.dedup();
    Ok(names)
}

async fn put_written(cx: &StageContext<'_>, names: &[String]) -> Result<(), StageError> {
    let body = serde_json::to_vec(names).map_err(engine_error)?;
    cx.io.put_work(WRITTEN, Bytes::from(body)).await
}

/// Uploads a checkpoint directory, moves the `latest` pointer to it, then deletes every other
/// checkpoint: only the newest is ever resumed from, and older ones would pile up (gigabytes
/// each for full fine-tuning).
async fn upload_checkpoint(cx: &StageContext<'_>, dir: &Path) -> Result<(), StageError> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| engine_error("checkpoint directory without a name"))?;
    let mut written = written_checkpoints(cx).await?;
    if !written.contains(&name) {
        written.push(name.clone());
        put_written(cx, &written).await?;
    }
    for file in CHECKPOINT_FILES {
        cx.io
            .put_work_file(&checkpoint_name(&name, file), &dir.join(file))
            .await?;
    }
    cx.io.put_work(LATEST, Bytes::from(name.clone())).await?;
    let mut kept = vec![name.clone()];
    for old in written.iter().filter(|w| **w != name) {
        for file in CHECKPOINT_FILES {
            if let Err(e) = cx.io.delete_work_file(&checkpoint_name(old, file)).await {
                // Still listed, so a later checkpoint tries again.
                tracing::warn!(checkpoint = %old, error = ?e, "could not delete an old checkpoint");
                kept.push(old.clone());
                break;
            }
        }
    }
    put_written(cx, &kept).await
}

/// The photos with their descriptions (the token rewritten for the methods that learn
/// `<token>`) and, for masked-loss training, their subject masks.
async fn photos(
    cx: &StageContext<'_>,
    settings: &TrainSettings,
) -> Result<Vec<CaptionedPhoto>, StageError> {
    let images = cx.io.images().await?;
    let descriptions = cx.io.descriptions().await?;
    if descriptions.len() != images.len() || descriptions.iter().any(|d| d.problem.is_some()) {
        return Err(StageError::permanent(
            "descriptions_missing",
            "training needs one valid description per photo",
        ));
    }
    let token = cx.job.spec.token.to_string();
    let mut photos = Vec::with_capacity(images.len());
    for (image, description) in images.iter().zip(&descriptions) {
        let mask = match settings.masked_loss() {
            None => None,
            Some(_) => {
                let mask = cx.io.subject_mask(image).await?.ok_or_else(|| {
                    StageError::permanent(
                        "mask_missing",
                        format!(
                            "masked-loss training needs a subject mask for every photo; photo {} \
                             ({}) has none (upload masks or configure SAM)",
                            image.idx, image.file_name
                        ),
                    )
                })?;
                Some(mask.as_gray().clone())
            }
        };
        photos.push(CaptionedPhoto {
            source: PhotoSource::Image(cx.io.photo_rgb(image).await?),
            caption: settings.rewrite_token(&description.text, &token),
            mask,
        });
    }
    Ok(photos)
}

/// Where the class images of a (base model, prompt, resolution, seed) live in storage.
fn class_cache(model: &str, prompt: &str, resolution: u32, seed: u64) -> String {
    let id = hex::encode(Sha256::digest(
        format!("{model}\n{prompt}\n{resolution}\n{seed}").as_bytes(),
    ));
    format!("class-images/{}", &id[..32])
}

/// Downloads the cached class images into `dir`; returns their names.
async fn restore_class_images(
    cx: &StageContext<'_>,
    prefix: &str,
    dir: &Path,
) -> Result<Vec<String>, StageError> {
    std::fs::create_dir_all(dir).map_err(|e| StageError::transient("workdir", e.to_string()))?;
    let mut names = Vec::new();
    for key in cx.io.list_shared(prefix).await? {
        let Some(name) = key.rsplit('/').next().map(str::to_owned) else {
            continue;
        };
        if let Some(bytes) = cx.io.shared(&key).await? {
            std::fs::write(dir.join(&name), &bytes)
                .map_err(|e| StageError::transient("workdir", e.to_string()))?;
            names.push(name);
        }
    }
    Ok(names)
}

/// Uploads the class images the run sampled (those not in `cached`).
async fn cache_class_images(
    cx: &StageContext<'_>,
    prefix: &str,
    dir: &Path,
    cached: &[String],
) -> Result<(), StageError> {
    let paths = list_images(dir).map_err(|e| StageError::transient("workdir", e.to_string()))?;
    for path in paths {
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if cached.contains(&name) {
            continue;
        }
        let bytes =
            std::fs::read(&path).map_err(|e| StageError::transient("workdir", e.to_string()))?;
        cx.io
            .put_shared(&format!("{prefix}/{name}"), Bytes::from(bytes))
            .await?;
    }
    Ok(())
}

#[tracing::instrument(skip_all, fields(job_id = %cx.job.id))]
async fn run(cx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
    let job = cx.job;
    let spec = &job.spec;
    let settings = spec.train.clone().unwrap_or_default();
    let method = MethodConfig::from_settings(
        &settings,
        &SettingsContext {
            token: spec.token.to_string(),
            class: spec.subject_class.to_string(),
        },
    )
    .map_err(|e| StageError::permanent("method_not_available", e.to_string()))?;
    let engine = cx.engine.base().await?;
    let photos = photos(cx, &settings).await?;

    let workdir =
        tempfile::tempdir().map_err(|e| StageError::transient("workdir", e.to_string()))?;
    let checkpoints = workdir.path().join("checkpoints");
    let resumed_from = restore_checkpoint(cx, &checkpoints).await?;
    if let Some(name) = &resumed_from {
        tracing::info!(checkpoint = %name, "resuming training");
    }

    let resolution = (engine.unet.config.sample_size.unwrap_or(64) * engine.vae_scale()) as u32;
    let max_steps = u64::from(settings.steps());
    let seed = settings.seed();
    let output = workdir.path().join("output");
    let mut config = TrainConfig::new(
        method,
        photos,
        ExportInfo {
            base_model: cx.engine.args().model_name(),
            token: spec.token.to_string(),
            class: spec.subject_class.to_string(),
            description_case: spec.descriptions.case.as_str().to_owned(),
            steps: 0,
        },
        &output,
    );
    config.resolution = resolution;
    config.export_options = export_options(&settings);
    config.loop_cfg = LoopConfig {
        seed,
        adamw: AdamWConfig {
            moments: settings.optimizer_state(),
            ..AdamWConfig::default()
        },
        max_steps,
        lr: LrSchedule::constant(settings.learning_rate()),
        prior_loss_weight: settings.prior().map_or(1.0, |(w, _)| w),
        masked_loss: settings.masked_loss().map(|m| MaskedLossConfig {
            normalization: match m.normalization {
                MaskNormalization::Kohya => EngineNormalization::Kohya,
                MaskNormalization::MaskedArea => EngineNormalization::MaskedArea,
            },
            unmasked_weight: m.unmasked_weight,
        }),
        gradient_checkpointing: settings.gradient_checkpointing(),
        checkpoint_every: cx.engine.args().checkpoint_every.min(max_steps.max(1)),
        checkpoint_dir: Some(checkpoints.clone()),
        keep_checkpoints: 3,
        resume: Resume::Latest,
        ..LoopConfig::default()
    };
    let class_images = workdir.path().join("class-images");
    let mut class_cache_key = None;
    if let Some((_, n)) = settings.prior() {
        let prompt = spec.mode.class_prompt(&spec.subject_class);
        let key = class_cache(&cx.engine.args().model_name(), &prompt, resolution, seed);
        let cached = restore_class_images(cx, &key, &class_images).await?;
        tracing::info!(cached = cached.len(), needed = n, "class images");
        class_cache_key = Some((key, cached));
        config.prior = Some(PriorConfig {
            class_prompt: prompt,
            class_dir: class_images.clone(),
            num_class_images: n as usize,
            seed,
        });
    }

    // The engine thread.
    let cancel = CancelOnDrop::new();
    let flag = cancel.flag();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut models = TrainModels::from_pipeline(&engine).map_err(engine_error)?;
    if let Some(source) = cx.engine.args().base_source() {
        models = models.with_source(source);
    }
    let training = tokio::task::spawn_blocking(move || {
        let step_tx = tx.clone();
        let mut callbacks = Callbacks::default()
            .on_step(move |report: &StepReport| {
                let _ = step_tx.send(EngineEvent::Step(report.clone()));
            })
            .on_checkpoint(move |step, dir: &Path| {
                let (stored, wait) = tokio::sync::oneshot::channel();
                if tx
                    .send(EngineEvent::Checkpoint(step, dir.to_owned(), stored))
                    .is_ok()
                {
                    // Wait until the checkpoint is stored: the trainer prunes old checkpoint
                    // folders as it goes, and a fast one (the tiny model takes milliseconds a
                    // step) would delete a folder still being uploaded.
                    let _ = wait.blocking_recv();
                }
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
            EngineEvent::Checkpoint(step, dir, stored) => {
                upload_checkpoint(cx, &dir).await?;
                tracing::debug!(step, "checkpoint stored");
                let _ = stored.send(());
            }
        }
    }
    let outcome = training
        .await
        .map_err(|e| StageError::transient("engine_panic", e.to_string()))?
        .map_err(engine_error)?;
    drop(cancel);
    let (steps, last_loss, files) = match outcome {
        TrainOutcome::Completed {
            steps,
            last_loss,
            files,
        } => (steps, last_loss, files),
        TrainOutcome::Canceled { .. } => return Err(StageError::Interrupted),
    };

    if let Some((key, cached)) = &class_cache_key {
        cache_class_images(cx, key, &class_images, cached).await?;
    }
    for file in &files {
        let name = format!("{WEIGHTS_PREFIX}{}", file.display());
        let content_type = match file.extension().and_then(|e| e.to_str()) {
            Some("json") => "application/json",
            Some("txt") => "text/plain",
            _ => "application/octet-stream",
        };
        cx.io
            .store_file(&name, content_type, &output.join(file))
            .await?;
    }
    let summary = serde_json::json!({
        "method": settings.method().as_str(),
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
