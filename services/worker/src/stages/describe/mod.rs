//! The describe stage: one train description per photo.
//!
//! * `source: manual`: the spec's texts, validated again (they were validated at submission);
//! * `case: class_only`: the fixed prefix alone, no model;
//! * otherwise the VLM: for every photo that has no saved description yet (a resumed stage
//!   skips those), the Postgres cache is asked first, then the model. Each description is saved
//!   (fenced by the lease) and reported as progress the moment it exists, so a worker that dies
//!   loses at most the requests in flight.
//!
//! Descriptions that still fail validation after the client's corrections go to review with the
//! problem when the job has review on, and fail the job with `description_invalid` otherwise.
//!
//! Then each photo gets its subject mask ([`masks`]), so that masks are reviewed with the
//! descriptions, before training and evaluation use them.

mod captions;
mod masks;

use std::collections::HashSet;

use futures::{future::BoxFuture, StreamExt};
use sidbooth_core::{JobImage, NewDescription};
use sidbooth_describe::{
    cache_key, validate_description, DescriptionProblem, DescriptionRules, Outcome, VlmError,
    INSTRUCTION_VERSION,
};
use sidbooth_domain::{DescriptionSource, Stage};

pub use captions::{
    caption_name, captions_zip, descriptions_json, entries, export_name, DescriptionEntry,
    CAPTIONS_ZIP, DESCRIPTIONS_JSON,
};

use crate::{
    error::StageError,
    stage::{StageContext, StageOutcome, StageRunner},
};

/// The model name stored for texts the user wrote.
pub const MANUAL_MODEL: &str = "manual";

pub struct Describe;

impl StageRunner for Describe {
    fn stage(&self) -> Stage {
        Stage::Describe
    }

    fn run<'a>(
        &'a self,
        cx: &'a StageContext<'a>,
    ) -> BoxFuture<'a, Result<StageOutcome, StageError>> {
        Box::pin(run(cx))
    }

    /// After approval the artifacts hold the approved (possibly edited) descriptions.
    fn after_review<'a>(
        &'a self,
        cx: &'a StageContext<'a>,
    ) -> BoxFuture<'a, Result<(), StageError>> {
        Box::pin(async move {
            if cx.io.has_artifact(DESCRIPTIONS_JSON).await?
                && cx.io.has_artifact(CAPTIONS_ZIP).await?
            {
                return Ok(());
            }
            captions::write(cx).await
        })
    }
}

fn problem_json(problem: &DescriptionProblem) -> serde_json::Value {
    serde_json::json!({ "code": problem.code(), "message": problem.message() })
}

fn invalid(image: &JobImage, problem: &DescriptionProblem) -> StageError {
    StageError::permanent(
        "description_invalid",
        format!(
            "the description of photo {} ({}) is invalid: {problem}",
            image.idx, image.file_name
        ),
    )
}

/// Maps a VLM failure to a stage error, counting it.
pub(crate) fn vlm_error(e: VlmError) -> StageError {
    metrics::counter!("sidbooth_vlm_errors_total", "kind" => e.code()).increment(1);
    if e.is_transient() {
        StageError::transient(e.code(), e.to_string())
    } else {
        StageError::permanent(e.code(), e.to_string())
    }
}

/// Saves descriptions and reports progress as they come.
struct Saver<'a> {
    cx: &'a StageContext<'a>,
    described: usize,
    total: usize,
}

impl Saver<'_> {
    async fn save(&mut self, d: NewDescription) -> Result<(), StageError> {
        self.cx.queue().save_description(self.cx.lease, &d).await?;
        self.described += 1;
        let progress = self.described as f32 / self.total.max(1) as f32;
        self.cx
            .progress(
                progress,
                serde_json::json!({ "image": d.idx, "described": self.described, "total": self.total }),
            )
            .await?;
        tracing::debug!(
            image = d.idx,
            described = self.described,
            total = self.total,
            "description saved"
        );
        Ok(())
    }
}

async fn run(cx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
    let spec = &cx.job.spec;
    let rules = DescriptionRules::for_spec(spec);
    let images = cx.io.images().await?;
    if images.is_empty() {
        return Err(StageError::permanent("no_images", "the job has no photos"));
    }
    let saved: HashSet<i32> = cx
        .io
        .descriptions()
        .await?
        .into_iter()
        .map(|d| d.idx)
        .collect();
    let pending: Vec<&JobImage> = images.iter().filter(|i| !saved.contains(&i.idx)).collect();
    let mut saver = Saver {
        cx,
        described: images.len() - pending.len(),
        total: images.len(),
    };
    tracing::info!(total = images.len(), pending = pending.len(), "describing");

    if spec.descriptions.source == DescriptionSource::Manual {
        let texts = spec.descriptions.texts.as_deref().unwrap_or_default();
        for image in pending {
            let raw = texts.get(image.idx as usize).ok_or_else(|| {
                StageError::permanent(
                    "description_missing",
                    format!(
                        "no manual description for photo {} ({})",
                        image.idx, image.file_name
                    ),
                )
            })?;
            let (text, problem) = match validate_description(raw, &rules) {
                Ok(text) => (text, None),
                Err(problem) if spec.review => (raw.clone(), Some(problem_json(&problem))),
                Err(problem) => return Err(invalid(image, &problem)),
            };
            saver
                .save(NewDescription {
                    idx: image.idx,
                    text,
                    case: rules.case,
                    model: MANUAL_MODEL.into(),
                    instruction: String::new(),
                    instruction_version: INSTRUCTION_VERSION.into(),
                    problem,
                })
                .await?;
        }
    } else if let Some(prefix) = rules.fixed_description() {
        for image in pending {
            saver
                .save(NewDescription {
                    idx: image.idx,
                    text: prefix.clone(),
                    case: rules.case,
                    model: String::new(),
                    instruction: String::new(),
                    instruction_version: INSTRUCTION_VERSION.into(),
                    problem: None,
                })
                .await?;
        }
    } else {
        describe_with_vlm(cx, &rules, spec.review, pending, &mut saver).await?;
    }
    masks::make(cx, &images).await?;

    if spec.review {
        return Ok(StageOutcome::AwaitReview);
    }
    captions::write(cx).await?;
    Ok(StageOutcome::Done)
}

async fn describe_with_vlm(
    cx: &StageContext<'_>,
    rules: &DescriptionRules,
    review: bool,
    pending: Vec<&JobImage>,
    saver: &mut Saver<'_>,
) -> Result<(), StageError> {
    if pending.is_empty() {
        return Ok(());
    }
    let vlm = cx.vlm.ok_or_else(|| {
        StageError::permanent(
            "vlm_not_configured",
            "this job needs a vision-language model and none is configured \
             (set SIDBOOTH_VLM_BASE_URL and SIDBOOTH_VLM_API_KEY)",
        )
    })?;
    let model = vlm.config().model.clone();
    let instruction = rules.instruction();

    // The cache first: photos described before (by this or another job) cost nothing.
    let mut to_ask = Vec::new();
    for image in pending {
        let key = cache_key(
            &image.sha256,
            rules.case,
            rules.mode,
            &model,
            instruction.version,
        );
        let cached = cx.jobs().cached_description(&key).await?;
        // The key leaves out token and class; validation tells whether the text fits this job.
        match cached
            .and_then(|(text, model)| Some((validate_description(&text, rules).ok()?, model)))
        {
            Some((text, cached_model)) => {
                metrics::counter!("sidbooth_vlm_cache_hits_total").increment(1);
                saver
                    .save(NewDescription {
                        idx: image.idx,
                        text,
                        case: rules.case,
                        model: cached_model,
                        instruction: instruction.text.clone(),
                        instruction_version: instruction.version.into(),
                        problem: None,
                    })
                    .await?;
            }
            None => to_ask.push((image, key)),
        }
    }
    if to_ask.is_empty() {
        return Ok(());
    }

    let photos =
        futures::future::try_join_all(to_ask.iter().map(|(image, _)| cx.io.photo(image))).await?;
    let mut answers = std::pin::pin!(vlm.describe_stream(&photos, rules));
    while let Some((i, result)) = answers.next().await {
        let (image, key) = &to_ask[i];
        let outcome = result.map_err(vlm_error)?;
        match outcome {
            Outcome::Described {
                text,
                model,
                instruction,
                instruction_version,
                attempts,
            } => {
                tracing::debug!(image = image.idx, attempts, "described");
                saver
                    .save(NewDescription {
                        idx: image.idx,
                        text: text.clone(),
                        case: rules.case,
                        model: model.clone(),
                        instruction,
                        instruction_version: instruction_version.into(),
                        problem: None,
                    })
                    .await?;
                // A cache write that fails costs a request next time, nothing more.
                if let Err(e) = cx.jobs().cache_description(key, &text, &model).await {
                    tracing::warn!(error = %e, "could not cache a description");
                }
            }
            Outcome::Problem {
                last_text,
                problem,
                attempts,
            } => {
                tracing::info!(
                    image = image.idx,
                    attempts,
                    code = problem.code(),
                    "description still invalid"
                );
                if !review {
                    return Err(invalid(image, &problem));
                }
                saver
                    .save(NewDescription {
                        idx: image.idx,
                        text: last_text.unwrap_or_default(),
                        case: rules.case,
                        model: model.clone(),
                        instruction: instruction.text.clone(),
                        instruction_version: instruction.version.into(),
                        problem: Some(problem_json(&problem)),
                    })
                    .await?;
            }
        }
    }
    Ok(())
}
