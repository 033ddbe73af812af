//! The evaluate stage: how well the trained model kept the subject and left the background out,
//! measured on the generated images against the reference photos (the paper's three measures,
//! DreamBooth's CLIP-I and DINO, and the identifier's attention on the subject), written as
//! `report.json` and the page `report.html`.
//!
//! Resumable: the features of the references and of each generated image are saved under the
//! job's `work/evaluate/` as soon as they exist, so a worker that takes the stage over computes
//! only the images that are not there yet.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use image::RgbImage;
use sidbooth_core::{mask_artifact_name, JobImage};
use sidbooth_describe::BoxOutcome;
use sidbooth_domain::{
    report::{MaskSource, TrainingEntry},
    Stage,
};
use sidbooth_engine::attention::map_from_npy;
use sidbooth_evaluate::{
    evaluator::Evaluators,
    mask::{Mask, PixelBox},
    measures::{without_identifier, ImageFeatures, ReferenceFeatures},
    report::{assemble, ImageInput, PromptInput, Reasons, ReferenceInput, ReportInput},
    report_html::{render, ReportAssets},
    sam::ProposalSettings,
    subject::{segment_automatically, segment_box},
};

use crate::{
    error::StageError,
    stage::{StageContext, StageOutcome, StageRunner},
    stages::{
        describe::export_name,
        generate::{attention_map_name, heatmap_name, image_name},
        train::TRAINING_JSON,
    },
};

pub const REPORT_JSON: &str = "report.json";
pub const REPORT_HTML: &str = "report.html";
const REFERENCES_WORK: &str = "evaluate/references.json";

fn image_work(name: &str) -> String {
    format!("evaluate/{}.json", name.trim_end_matches(".png"))
}

pub struct Evaluate;

impl StageRunner for Evaluate {
    fn stage(&self) -> Stage {
        Stage::Evaluate
    }

    fn run<'a>(
        &'a self,
        cx: &'a StageContext<'a>,
    ) -> BoxFuture<'a, Result<StageOutcome, StageError>> {
        Box::pin(run(cx))
    }
}

fn eval_error(e: impl std::fmt::Display) -> StageError {
    StageError::engine("evaluate_failed", e)
}

fn panic_error(e: tokio::task::JoinError) -> StageError {
    StageError::transient("worker_panic", e.to_string())
}

fn decode_png(bytes: &[u8], name: &str) -> Result<RgbImage, StageError> {
    image::load_from_memory(bytes)
        .map(|i| i.to_rgb8())
        .map_err(|e| StageError::permanent("artifact_unreadable", format!("{name}: {e}")))
}

/// Seconds per phase, for the report and for Prometheus.
#[derive(Default)]
struct Timings(BTreeMap<String, f64>);

impl Timings {
    fn add(&mut self, phase: &'static str, started: Instant) {
        let secs = started.elapsed().as_secs_f64();
        metrics::histogram!("sidbooth_evaluate_phase_seconds", "phase" => phase).record(secs);
        *self.0.entry(phase.to_owned()).or_default() += secs;
    }
}

/// One reference photo with what the report says about it.
struct Reference {
    image: JobImage,
    name: String,
    description: Option<String>,
    mask: Option<(Mask, MaskSource, f64)>,
}

/// One generated image to measure.
struct Generated {
    prompt: usize,
    k: usize,
    seed: u64,
}

#[tracing::instrument(skip_all, fields(job_id = %cx.job.id))]
async fn run(cx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
    let args = cx.evaluators.args();
    if !args.has_clip() {
        return Err(StageError::permanent(
            "evaluate_not_configured",
            "the evaluate stage needs CLIP on the worker (SIDBOOTH_CLIP_DIR: a directory in the \
             layout of openai/clip-vit-base-patch32; SIDBOOTH_DINO_DIR and SIDBOOTH_SAM_DIR add \
             the DINO and attention measures); this worker has none",
        ));
    }
    let models = cx.evaluators.get().await?;
    let spec = &cx.job.spec;
    let token = spec.token.to_string();
    let mut timings = Timings::default();

    let references = load_references(cx).await?;
    let started = Instant::now();
    let reference_features = reference_features(cx, &models, &references).await?;
    timings.add("references", started);

    let settings = spec.generate.clone().unwrap_or_default();
    let prompts = spec.prompts();
    let generated: Vec<Generated> = (0..prompts.len())
        .flat_map(|p| {
            (0..settings.images_per_prompt as usize).map(move |k| Generated {
                prompt: p,
                k,
                seed: settings.seed + k as u64,
            })
        })
        .collect();

    // Features of every generated image: saved ones first, then the rest, saved one by one.
    let mut features: Vec<Option<ImageFeatures>> = Vec::with_capacity(generated.len());
    for g in &generated {
        let saved = cx.io.work(&image_work(&image_name(g.prompt, g.k))).await?;
        features.push(match saved {
            Some(bytes) => Some(serde_json::from_slice(&bytes).map_err(eval_error)?),
            None => None,
        });
    }
    let resumed = features.iter().filter(|f| f.is_some()).count();
    if resumed > 0 {
        tracing::info!(resumed, total = generated.len(), "resuming evaluation");
    }
    let started = Instant::now();
    let mut attention_maps = 0usize;
    for (i, g) in generated.iter().enumerate() {
        if features[i].is_some() {
            continue;
        }
        let (f, had_map) = image_features(cx, &models, g).await?;
        attention_maps += usize::from(had_map);
        let bytes = serde_json::to_vec(&f).map_err(eval_error)?;
        cx.io
            .put_work(&image_work(&image_name(g.prompt, g.k)), Bytes::from(bytes))
            .await?;
        features[i] = Some(f);
        let evaluated = features.iter().filter(|f| f.is_some()).count();
        cx.progress(
            evaluated as f32 / generated.len().max(1) as f32,
            serde_json::json!({
                "evaluated": evaluated,
                "total": generated.len(),
                "resumed": resumed,
                "image": image_name(g.prompt, g.k),
            }),
        )
        .await?;
    }
    timings.add("images", started);

    let started = Instant::now();
    let texts: Vec<String> = prompts
        .iter()
        .map(|p| without_identifier(p, &token))
        .collect();
    let text_features = {
        let models = models.clone();
        let texts = texts.clone();
        tokio::task::spawn_blocking(move || models.text_features(&texts))
            .await
            .map_err(panic_error)?
            .map_err(eval_error)?
    };
    timings.add("texts", started);

    let has_sam = models.sam.is_some();
    let any_mask = references.iter().any(|r| r.mask.is_some());
    let reasons = Reasons {
        dino: models
            .dino
            .is_none()
            .then(|| "this worker has no DINO model (SIDBOOTH_DINO_DIR)".to_owned()),
        masks: (!references.iter().all(|r| r.mask.is_some())).then(|| {
            if any_mask {
                "not every reference photo has a subject mask (see the job's warnings)".to_owned()
            } else if has_sam {
                "SAM found no subject in the reference photos; upload masks".to_owned()
            } else {
                "no subject masks: none were uploaded and the worker has no SAM model \
                 (SIDBOOTH_SAM_DIR)"
                    .to_owned()
            }
        }),
        attention: Some(if !has_sam {
            "the worker has no SAM model to find the subject in the generated images".to_owned()
        } else if resumed == 0 && attention_maps == 0 {
            "no prompt contains the identifier token, so no attention maps were recorded".to_owned()
        } else {
            "SAM found no subject in the generated images".to_owned()
        }),
    };

    let training = match cx.io.artifact(TRAINING_JSON).await? {
        Some(bytes) => Some(training_entry(&bytes)?),
        None => None,
    };
    let mut prompt_inputs: Vec<PromptInput> = prompts
        .iter()
        .zip(text_features)
        .map(|(prompt, text)| PromptInput {
            prompt: prompt.clone(),
            images: Vec::new(),
            text_features: text,
        })
        .collect();
    for (g, f) in generated.iter().zip(features) {
        let overlay = heatmap_name(g.prompt, g.k);
        prompt_inputs[g.prompt].images.push(ImageInput {
            name: image_name(g.prompt, g.k),
            seed: Some(g.seed),
            attention: cx.io.has_artifact(&overlay).await?.then_some(overlay),
            features: f.expect("every image has features by now"),
        });
    }
    let mut models_used = models.models.clone();
    models_used.push(sidbooth_domain::report::ModelEntry {
        role: "base_model".into(),
        name: cx.engine.args().model_name(),
        random_weights: cx.engine.args().tiny_model.is_some(),
    });
    let mut notices: Vec<String> = cx
        .job
        .warnings
        .iter()
        .map(|w| format!("{} ({})", w.message, w.code))
        .collect();
    if resumed > 0 {
        notices.push(format!(
            "{resumed} of {} images were measured by an earlier run of this stage",
            generated.len()
        ));
    }
    let report = assemble(ReportInput {
        job_id: Some(cx.job.id.to_string()),
        created_at: chrono::Utc::now().to_rfc3339(),
        subject_class: spec.subject_class.to_string(),
        token,
        settings: serde_json::to_value(spec).map_err(eval_error)?,
        models: models_used,
        references: references
            .iter()
            .zip(reference_features)
            .map(|(r, features)| ReferenceInput {
                name: r.name.clone(),
                description: r.description.clone(),
                mask: r.mask.as_ref().map(|_| mask_artifact_name(r.image.idx)),
                mask_source: r.mask.as_ref().map(|m| m.1),
                mask_coverage: r.mask.as_ref().map(|m| m.2),
                features,
            })
            .collect(),
        prompts: prompt_inputs,
        training,
        notices,
        timings: timings.0,
        reasons,
    });

    let started = Instant::now();
    let html = render(&report, &report_assets(cx, &references, &report).await?);
    let json = serde_json::to_vec_pretty(&report).map_err(eval_error)?;
    cx.io.store(REPORT_JSON, "application/json", json).await?;
    cx.io
        .store(REPORT_HTML, "text/html; charset=utf-8", html.into_bytes())
        .await?;
    metrics::histogram!("sidbooth_evaluate_phase_seconds", "phase" => "report")
        .record(started.elapsed().as_secs_f64());
    Ok(StageOutcome::Done)
}

/// The photos in upload order (which is file-name order: export names start with the index),
/// with their descriptions and masks.
async fn load_references(cx: &StageContext<'_>) -> Result<Vec<Reference>, StageError> {
    let images = cx.io.images().await?;
    let descriptions = cx.io.descriptions().await?;
    let masks = cx.jobs().masks(cx.job.id).await?;
    let mut out = Vec::with_capacity(images.len());
    for image in images {
        let mask = match masks.iter().find(|m| m.idx == image.idx) {
            Some(row) => cx
                .io
                .subject_mask(&image)
                .await?
                .map(|mask| (mask, row.source, f64::from(row.coverage))),
            None => None,
        };
        out.push(Reference {
            name: export_name(&image),
            description: descriptions
                .iter()
                .find(|d| d.idx == image.idx)
                .map(|d| d.text.clone()),
            image,
            mask,
        });
    }
    Ok(out)
}

/// The references' features, computed once and kept for a resumed stage.
async fn reference_features(
    cx: &StageContext<'_>,
    models: &Arc<Evaluators>,
    references: &[Reference],
) -> Result<Vec<ReferenceFeatures>, StageError> {
    if let Some(bytes) = cx.io.work(REFERENCES_WORK).await? {
        let saved: Vec<ReferenceFeatures> = serde_json::from_slice(&bytes).map_err(eval_error)?;
        if saved.len() == references.len() {
            return Ok(saved);
        }
    }
    let mut photos = Vec::with_capacity(references.len());
    for r in references {
        photos.push(cx.io.photo_rgb(&r.image).await?);
    }
    let masks: Vec<Option<Mask>> = references
        .iter()
        .map(|r| r.mask.as_ref().map(|m| m.0.clone()))
        .collect();
    let models = models.clone();
    let features = tokio::task::spawn_blocking(move || {
        let masks: Vec<Option<&Mask>> = masks.iter().map(Option::as_ref).collect();
        models.reference_features(&photos, &masks)
    })
    .await
    .map_err(panic_error)?
    .map_err(eval_error)?;
    let bytes = serde_json::to_vec(&features).map_err(eval_error)?;
    cx.io.put_work(REFERENCES_WORK, Bytes::from(bytes)).await?;
    Ok(features)
}

/// One generated image's features; also whether it had an attention map.
async fn image_features(
    cx: &StageContext<'_>,
    models: &Arc<Evaluators>,
    g: &Generated,
) -> Result<(ImageFeatures, bool), StageError> {
    let name = image_name(g.prompt, g.k);
    let bytes = cx.io.artifact(&name).await?.ok_or_else(|| {
        StageError::permanent(
            "image_missing",
            format!("the generated image {name} is missing"),
        )
    })?;
    let image = decode_png(&bytes, &name)?;
    let map = match cx.io.artifact(&attention_map_name(g.prompt, g.k)).await? {
        Some(bytes) => Some(map_from_npy(&bytes).map_err(eval_error)?),
        None => None,
    };
    // The subject of the generated image, only needed to place its attention.
    let vlm_box = match (&map, cx.vlm, &models.sam) {
        (Some(_), Some(vlm), Some(_)) => {
            match vlm
                .subject_box(&bytes, &cx.job.spec.subject_class)
                .await
                .map_err(crate::stages::describe::vlm_error)?
            {
                BoxOutcome::Found(b) => {
                    let [x0, y0, x1, y1] = b.to_pixels(image.width(), image.height());
                    Some(PixelBox {
                        x0: x0 as f32,
                        y0: y0 as f32,
                        x1: x1 as f32,
                        y1: y1 as f32,
                    })
                }
                _ => None,
            }
        }
        _ => None,
    };
    let had_map = map.is_some();
    let models = models.clone();
    let class = cx.job.spec.subject_class.to_string();
    let features = tokio::task::spawn_blocking(move || {
        let mask = match (&map, &models.sam) {
            (Some(_), Some(sam)) => match vlm_box {
                Some(b) => Some(segment_box(sam, &image, b)?.mask),
                None => segment_automatically(
                    sam,
                    models.clip()?,
                    &image,
                    &class,
                    &ProposalSettings::default(),
                )?
                .map(|s| s.mask),
            },
            _ => None,
        };
        let attention: Vec<Option<sidbooth_evaluate::evaluator::AttentionMap>> =
            vec![map.as_ref().map(|(h, w, v)| (v.as_slice(), (*h, *w)))];
        let masks = vec![mask.as_ref().filter(|m| m.area() > 0)];
        models
            .image_features(std::slice::from_ref(&image), &attention, &masks)
            .map(|mut f| f.remove(0))
    })
    .await
    .map_err(panic_error)?
    .map_err(eval_error)?;
    Ok((features, had_map))
}

fn training_entry(bytes: &[u8]) -> Result<TrainingEntry, StageError> {
    #[derive(serde::Deserialize)]
    struct Summary {
        method: String,
        steps: u64,
        last_loss: Option<f64>,
        losses: Vec<(u64, f64)>,
    }
    let s: Summary = serde_json::from_slice(bytes).map_err(eval_error)?;
    Ok(TrainingEntry {
        method: s.method,
        steps: s.steps,
        last_loss: s.last_loss,
        losses: s.losses,
    })
}

/// The images the page shows, by the names the report uses.
async fn report_assets(
    cx: &StageContext<'_>,
    references: &[Reference],
    report: &sidbooth_domain::report::Report,
) -> Result<ReportAssets, StageError> {
    let mut assets = ReportAssets::new();
    for r in references {
        let bytes = cx.io.photo(&r.image).await?;
        assets.insert(r.name.clone(), &r.image.content_type, bytes.to_vec());
        if let Some((mask, _, _)) = &r.mask {
            assets.insert(mask_artifact_name(r.image.idx), "image/png", mask.to_png());
        }
    }
    for prompt in &report.prompts {
        for image in &prompt.images {
            let names = std::iter::once(image.name.clone()).chain(image.attention.clone());
            for name in names {
                if let Some(bytes) = cx.io.artifact(&name).await? {
                    assets.insert(name, "image/png", bytes.to_vec());
                }
            }
        }
    }
    Ok(assets)
}
