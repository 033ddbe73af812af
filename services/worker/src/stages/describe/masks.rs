//! The subject mask of every photo, made during describe so the user reviews it with the
//! descriptions (and can replace it) before training and evaluation use it.
//!
//! Per photo, the first that applies:
//! 1. the mask uploaded with the photo;
//! 2. SAM prompted with the subject's box from the vision-language model (when one is
//!    configured);
//! 3. SAM prompted with the box of its own best proposal, ranked by CLIP against
//!    "a photo of a {class}".
//!
//! Each mask is the artifact `masks/NN.png` plus a row saying where it came from. Photos that
//! already have one (a resumed stage) are skipped. Without SAM the job gets a warning and the
//! mask-based measures are left out later: masks are never guessed.

use std::sync::Arc;

use image::RgbImage;
use sidbooth_core::{mask_artifact_name, JobImage};
use sidbooth_describe::BoxOutcome;
use sidbooth_domain::{report::MaskSource, Mode};
use sidbooth_evaluate::{
    evaluator::Evaluators,
    mask::{Mask, PixelBox},
    sam::ProposalSettings,
    subject::{segment_automatically, segment_box, SubjectMask},
};

use super::vlm_error;
use crate::{error::StageError, stage::StageContext};

fn eval_error(e: impl std::fmt::Display) -> StageError {
    StageError::permanent("segment_failed", e.to_string())
}

/// Makes the masks the job does not have yet.
pub async fn make(cx: &StageContext<'_>, images: &[JobImage]) -> Result<(), StageError> {
    let done: Vec<i32> = cx
        .jobs()
        .masks(cx.job.id)
        .await?
        .into_iter()
        .map(|m| m.idx)
        .collect();
    let pending: Vec<&JobImage> = images.iter().filter(|i| !done.contains(&i.idx)).collect();
    let mut automatic = Vec::new();
    for image in pending {
        match cx.io.uploaded_mask(image).await? {
            Some(bytes) => {
                let mask = Mask::from_png(&bytes).map_err(|e| {
                    StageError::permanent(
                        "mask_invalid",
                        format!("the mask of photo {}: {e}", image.idx),
                    )
                })?;
                save(cx, image.idx, &mask, MaskSource::Uploaded, None).await?;
            }
            None => automatic.push(image),
        }
    }
    if automatic.is_empty() {
        return Ok(());
    }
    if cx.job.spec.mode == Mode::Style {
        return cx
            .warn(
                "masks_not_applicable",
                "style jobs have no subject region to mask; the mask-based measures are left out",
            )
            .await;
    }
    let args = cx.evaluators.args();
    if !args.has_sam() {
        return cx
            .warn(
                "masks_unavailable",
                "no subject masks: none were uploaded and this worker has no SAM model \
                 (SIDBOOTH_SAM_DIR); subject-alignment and non-subject-disentanglement will be \
                 left out",
            )
            .await;
    }
    if cx.vlm.is_none() && !args.has_clip() {
        return cx
            .warn(
                "masks_unavailable",
                "no subject masks: without a vision-language model to box the subject, SAM's \
                 proposals are ranked with CLIP, and this worker has none (SIDBOOTH_CLIP_DIR)",
            )
            .await;
    }
    let models = cx.evaluators.get().await?;
    let class = cx.job.spec.subject_class.to_string();
    for (n, image) in automatic.iter().enumerate() {
        let photo = cx.io.photo_rgb(image).await?;
        let vlm_box = match cx.vlm {
            Some(vlm) => {
                let bytes = cx.io.photo(image).await?;
                match vlm
                    .subject_box(&bytes, &cx.job.spec.subject_class)
                    .await
                    .map_err(vlm_error)?
                {
                    BoxOutcome::Found(b) => {
                        let [x0, y0, x1, y1] = b.to_pixels(photo.width(), photo.height());
                        Some(PixelBox {
                            x0: x0 as f32,
                            y0: y0 as f32,
                            x1: x1 as f32,
                            y1: y1 as f32,
                        })
                    }
                    BoxOutcome::NotFound => None,
                    BoxOutcome::Problem { problem, .. } => {
                        tracing::info!(
                            image = image.idx,
                            code = problem.code(),
                            "no usable subject box; ranking SAM's proposals"
                        );
                        None
                    }
                }
            }
            None => None,
        };
        let made = segment(models.clone(), photo, vlm_box, class.clone()).await?;
        match made {
            Some(subject) if subject.mask.area() > 0 => {
                let b = subject.prompt_box;
                save(
                    cx,
                    image.idx,
                    &subject.mask,
                    subject.source,
                    Some([b.x0, b.y0, b.x1, b.y1]),
                )
                .await?;
            }
            _ => {
                cx.warn(
                    "mask_empty",
                    format!(
                        "SAM found no subject in photo {} ({}); upload or draw its mask during \
                         review, or the mask-based measures are left out",
                        image.idx, image.file_name
                    ),
                )
                .await?;
            }
        }
        cx.progress(
            1.0,
            serde_json::json!({ "masks": n + 1, "total": automatic.len(), "image": image.idx }),
        )
        .await?;
    }
    Ok(())
}

/// SAM (and CLIP) on a blocking thread.
async fn segment(
    models: Arc<Evaluators>,
    photo: RgbImage,
    vlm_box: Option<PixelBox>,
    class: String,
) -> Result<Option<SubjectMask>, StageError> {
    tokio::task::spawn_blocking(move || {
        let sam = models
            .sam
            .as_ref()
            .ok_or_else(|| eval_error("no SAM model is loaded"))?;
        match vlm_box {
            Some(b) => segment_box(sam, &photo, b).map(Some),
            None => {
                let clip = models.clip().map_err(eval_error)?;
                segment_automatically(sam, clip, &photo, &class, &ProposalSettings::default())
            }
        }
        .map_err(eval_error)
    })
    .await
    .map_err(|e| StageError::transient("worker_panic", e.to_string()))?
}

/// Stores the mask PNG as `masks/NN.png` and records its source.
async fn save(
    cx: &StageContext<'_>,
    idx: i32,
    mask: &Mask,
    source: MaskSource,
    prompt_box: Option<[f32; 4]>,
) -> Result<(), StageError> {
    cx.io
        .store(&mask_artifact_name(idx), "image/png", mask.to_png())
        .await?;
    cx.queue()
        .save_mask(cx.lease, idx, source, prompt_box, mask.coverage() as f32)
        .await?;
    Ok(())
}
