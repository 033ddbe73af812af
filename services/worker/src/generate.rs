//! The generate stage: samples the user's prompts with the trained LoRA (DDIM, classifier-free
//! guidance), one PNG per image with its prompt and seed in PNG text chunks, plus a heatmap of
//! where the identifier token looks (the paper's cross-attention analysis) when the prompt
//! contains it.
//!
//! Image `k` of prompt `p` uses seed `seed + k`, the same for every prompt, so prompts compare
//! on equal noise. Each image is stored as soon as it exists; a resumed stage skips the images
//! already stored.

use std::sync::Arc;

use sidbooth_core::{JobRecord, Lease};
use sidbooth_domain::{GenerateSettings, Stage};
use sidbooth_engine::{
    attention::overlay_heatmap,
    pipeline::{GenerateRequest, StableDiffusion},
    png_text,
};
use tokio::sync::mpsc;

use crate::{
    artifacts::store_artifact,
    engine::{fork, CancelOnDrop},
    error::StageError,
    train::LORA_SAFETENSORS,
    worker::{Context, StageOutcome},
};

/// Opacity of the attention heatmap over the generated image.
const HEATMAP_ALPHA: f32 = 0.5;

fn engine_error(e: impl std::fmt::Display) -> StageError {
    StageError::permanent("generate_failed", e.to_string())
}

pub fn image_name(prompt: usize, k: usize) -> String {
    format!("images/{prompt:02}-{k:02}.png")
}

pub fn heatmap_name(prompt: usize, k: usize) -> String {
    format!("attention/{prompt:02}-{k:02}.png")
}

/// One sampled image and, when asked, its attention overlay.
struct Sample {
    image: image::RgbImage,
    heatmap: Option<image::RgbImage>,
}

fn sample(
    model: &StableDiffusion,
    request: &GenerateRequest,
    progress: &mpsc::UnboundedSender<usize>,
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<Sample, sidbooth_engine::Error> {
    let mut on_step = |step: usize, _total: usize| {
        let _ = progress.send(step);
    };
    let out = model.generate(request, Some(&mut on_step), Some(cancel))?;
    let image =
        out.images.into_iter().next().ok_or_else(|| {
            sidbooth_engine::Error::Invalid("the pipeline returned no image".into())
        })?;
    let heatmap = match &out.attention_maps {
        Some(maps) => Some(overlay_heatmap(&image, &maps.get(0)?, HEATMAP_ALPHA)?),
        None => None,
    };
    Ok(Sample { image, heatmap })
}

#[tracing::instrument(skip_all, fields(job_id = %job.id))]
pub async fn run(
    ctx: &Context,
    lease: &Lease,
    job: &JobRecord,
) -> Result<StageOutcome, StageError> {
    let settings: GenerateSettings = job.spec.generate.clone().unwrap_or_default();
    let artifacts = ctx.jobs.artifacts(job.id).await?;
    let stored = |name: &str| artifacts.iter().any(|a| a.name == name);
    // An object a resumed stage replaces (a heatmap stored before its image was).
    let previous_key = |name: &str| {
        artifacts
            .iter()
            .find(|a| a.name == name)
            .map(|a| a.object_key.clone())
    };

    // The base model with the job's LoRA attached.
    let base = ctx.engine.base().await?;
    let lora = artifacts
        .iter()
        .find(|a| a.name == LORA_SAFETENSORS)
        .ok_or_else(|| {
            StageError::permanent("weights_missing", "the trained LoRA weights are missing")
        })?;
    let lora_bytes = ctx.store.get(&lora.object_key).await?;
    let workdir =
        tempfile::tempdir().map_err(|e| StageError::transient("workdir", e.to_string()))?;
    let lora_path = workdir.path().join(LORA_SAFETENSORS);
    std::fs::write(&lora_path, &lora_bytes)
        .map_err(|e| StageError::transient("workdir", e.to_string()))?;
    let model = tokio::task::spawn_blocking(move || {
        let mut model = fork(&base);
        model.load_lora(&lora_path, 1.0).map(|_| model)
    })
    .await
    .map_err(|e| StageError::transient("engine_panic", e.to_string()))?
    .map_err(engine_error)?;
    let model = Arc::new(model);

    let token = job.spec.token.to_string();
    let per_prompt = settings.images_per_prompt as usize;
    let total = settings.prompts.len() * per_prompt;
    let steps = settings.steps as usize;
    let cancel = CancelOnDrop::new();
    let mut done = 0usize;
    for (p, prompt) in settings.prompts.iter().enumerate() {
        for k in 0..per_prompt {
            let name = image_name(p, k);
            if stored(&name) {
                done += 1;
                continue;
            }
            let seed = settings.seed + k as u64;
            let request = GenerateRequest {
                prompt: prompt.clone(),
                negative_prompt: settings.negative_prompt.clone(),
                guidance_scale: settings.guidance_scale,
                steps,
                seed,
                num_images: 1,
                attention_word: prompt
                    .split_whitespace()
                    .any(|w| w == token)
                    .then(|| token.clone()),
                ..GenerateRequest::default()
            };
            let (tx, mut rx) = mpsc::unbounded_channel();
            let (m, flag) = (model.clone(), cancel.flag());
            let work = tokio::task::spawn_blocking(move || sample(&m, &request, &tx, &flag));
            while let Some(step) = rx.recv().await {
                let progress =
                    (done as f32 + step as f32 / steps.max(1) as f32) / total.max(1) as f32;
                if step == steps || step % 10 == 0 {
                    ctx.queue
                        .progress(
                            lease,
                            Stage::Generate,
                            progress,
                            serde_json::json!({"image": done, "total": total, "step": step, "steps": steps}),
                        )
                        .await?;
                }
            }
            let sampled = match work
                .await
                .map_err(|e| StageError::transient("engine_panic", e.to_string()))?
            {
                Ok(s) => s,
                Err(sidbooth_engine::Error::Canceled) => return Err(StageError::Interrupted),
                Err(e) => return Err(engine_error(e)),
            };
            let text = [
                ("prompt", prompt.clone()),
                (
                    "negative_prompt",
                    settings.negative_prompt.clone().unwrap_or_default(),
                ),
                ("seed", seed.to_string()),
                ("steps", steps.to_string()),
                ("guidance_scale", settings.guidance_scale.to_string()),
                ("sampler", "DDIM".to_owned()),
                ("base_model", ctx.engine.args().model_name()),
                ("lora", LORA_SAFETENSORS.to_owned()),
                ("job_id", job.id.to_string()),
            ];
            if let Some(heatmap) = &sampled.heatmap {
                let mut text = text.to_vec();
                text.push(("attention_token", token.clone()));
                let bytes = png_text::encode(heatmap, &text).map_err(engine_error)?;
                let heatmap = heatmap_name(p, k);
                store_artifact(
                    &ctx.queue,
                    &ctx.store,
                    lease,
                    previous_key(&heatmap).as_deref(),
                    &heatmap,
                    "image/png",
                    bytes,
                )
                .await?;
            }
            let bytes = png_text::encode(&sampled.image, &text).map_err(engine_error)?;
            store_artifact(
                &ctx.queue,
                &ctx.store,
                lease,
                None,
                &name,
                "image/png",
                bytes,
            )
            .await?;
            done += 1;
        }
    }
    drop(cancel);
    Ok(StageOutcome::Done)
}
