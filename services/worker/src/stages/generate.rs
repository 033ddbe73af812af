//! The generate stage: samples the job's prompts with the trained weights of whatever method
//! trained them (the `weights/` artifacts, loaded as the engine's registry reads that method's
//! output; DDIM, classifier-free guidance), one PNG per image with its prompt and seed in PNG
//! text chunks, plus, when the
//! prompt contains the identifier, where the identifier token looks (the paper's
//! cross-attention analysis): the overlay `attention/PP-KK.png` and the averaged map itself,
//! `attention/PP-KK.npy` (float32, latent resolution), which the evaluate stage measures.
//!
//! The prompts are the spec's, or the DreamBooth dataset's 25 for the subject's kind, with the
//! token written as the method learned it (`<sks>` for Textual Inversion and Custom Diffusion).
//! Image `k`
//! of prompt `p` uses seed `seed + k`, the same for every prompt, so prompts compare on equal
//! noise. Each image is stored as soon as it exists (its map and overlay first); a resumed
//! stage skips the images already stored.

use std::sync::Arc;

use futures::future::BoxFuture;
use sidbooth_domain::{GenerateSettings, Stage};
use sidbooth_engine::{
    attention::{map_to_npy, overlay_heatmap},
    pipeline::{GenerateRequest, StableDiffusion},
    png_text::{self, ImageSettings},
    train::registry,
};
use tokio::sync::mpsc;

use crate::{
    engine::{fork, CancelOnDrop},
    error::StageError,
    stage::{StageContext, StageOutcome, StageRunner},
    stages::train::WEIGHTS_PREFIX,
};

/// Opacity of the attention heatmap over the generated image.
const HEATMAP_ALPHA: f32 = 0.5;

pub struct Generate;

impl StageRunner for Generate {
    fn stage(&self) -> Stage {
        Stage::Generate
    }

    fn run<'a>(
        &'a self,
        cx: &'a StageContext<'a>,
    ) -> BoxFuture<'a, Result<StageOutcome, StageError>> {
        Box::pin(run(cx))
    }
}

fn engine_error(e: impl std::fmt::Display) -> StageError {
    StageError::engine("generate_failed", e)
}

pub fn image_name(prompt: usize, k: usize) -> String {
    format!("images/{prompt:02}-{k:02}.png")
}

pub fn heatmap_name(prompt: usize, k: usize) -> String {
    format!("attention/{prompt:02}-{k:02}.png")
}

/// The raw averaged attention map of an image.
pub fn attention_map_name(prompt: usize, k: usize) -> String {
    format!("attention/{prompt:02}-{k:02}.npy")
}

/// One sampled image and, when asked, its attention map and overlay.
struct Sample {
    image: image::RgbImage,
    attention: Option<(Vec<u8>, image::RgbImage)>,
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
    let attention = match &out.attention_maps {
        Some(maps) => {
            let map = maps.get(0)?;
            Some((
                map_to_npy(&map)?,
                overlay_heatmap(&image, &map, HEATMAP_ALPHA)?,
            ))
        }
        None => None,
    };
    Ok(Sample { image, attention })
}

#[tracing::instrument(skip_all, fields(job_id = %cx.job.id))]
async fn run(cx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
    let job = cx.job;
    let settings: GenerateSettings = job.spec.generate.clone().unwrap_or_default();
    let train = job.spec.train.clone().unwrap_or_default();
    let token = job.spec.token.to_string();
    let prompts: Vec<String> = job
        .spec
        .prompts()
        .iter()
        .map(|p| train.rewrite_token(p, &token))
        .collect();

    // The base model with the job's trained weights in it.
    let base = cx.engine.base().await?;
    let workdir =
        tempfile::tempdir().map_err(|e| StageError::transient("workdir", e.to_string()))?;
    let weights = workdir.path().join("weights");
    if cx.io.download_prefix(WEIGHTS_PREFIX, &weights).await? == 0 {
        return Err(StageError::permanent(
            "weights_missing",
            "the trained weights are missing",
        ));
    }
    let (model, method) = tokio::task::spawn_blocking(move || {
        let mut model = fork(&base);
        registry::load_weights(&mut model, &weights, 1.0).map(|method| (model, method))
    })
    .await
    .map_err(|e| StageError::transient("engine_panic", e.to_string()))?
    .map_err(engine_error)?;
    let model = Arc::new(model);
    let token = train.prompt_token(&token);
    let per_prompt = settings.images_per_prompt as usize;
    let total = prompts.len() * per_prompt;
    let steps = settings.steps as usize;
    let cancel = CancelOnDrop::new();
    let mut done = 0usize;
    for (p, prompt) in prompts.iter().enumerate() {
        for k in 0..per_prompt {
            let name = image_name(p, k);
            if cx.io.has_artifact(&name).await? {
                done += 1;
                continue;
            }
            let seed = sidbooth_engine::pipeline::image_seed(settings.seed, k);
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
                    cx.progress(
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
            let base_model = cx.engine.args().model_name();
            let mut text = ImageSettings {
                prompt,
                negative_prompt: settings.negative_prompt.as_deref(),
                seed,
                steps,
                guidance_scale: settings.guidance_scale,
                width: sampled.image.width(),
                height: sampled.image.height(),
                base_model: &base_model,
                method: Some(method),
                weights: Some(WEIGHTS_PREFIX),
                weight_scale: Some(1.0),
            }
            .text();
            text.push(("job_id", job.id.to_string()));
            if let Some((map, overlay)) = &sampled.attention {
                cx.io
                    .store(
                        &attention_map_name(p, k),
                        "application/octet-stream",
                        map.clone(),
                    )
                    .await?;
                let mut text = text.to_vec();
                text.push(("attention_token", token.clone()));
                let bytes = png_text::encode(overlay, &text).map_err(engine_error)?;
                cx.io.store(&heatmap_name(p, k), "image/png", bytes).await?;
            }
            let bytes = png_text::encode(&sampled.image, &text).map_err(engine_error)?;
            cx.io.store(&name, "image/png", bytes).await?;
            done += 1;
        }
    }
    drop(cancel);
    Ok(StageOutcome::Done)
}
