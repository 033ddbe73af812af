//! Assembling `report.json` from the features of the references and the generated images.

use std::collections::BTreeMap;

use sidbooth_domain::report::{
    ImageEntry, LeftOut, MaskSource, MeasureValues, ModelEntry, PromptEntry, ReferenceEntry,
    Report, TrainingEntry, REPORT_VERSION,
};
use sidbooth_tokenizer::{count_tokens, CONTEXT_LENGTH};

use crate::measures::{
    overall, score_prompt, without_identifier, ImageFeatures, PromptScores, ReferenceFeatures,
};

pub struct ReferenceInput {
    pub name: String,
    pub description: Option<String>,
    /// The mask's artifact name or file path.
    pub mask: Option<String>,
    pub mask_source: Option<MaskSource>,
    pub mask_coverage: Option<f64>,
    pub features: ReferenceFeatures,
}

pub struct ImageInput {
    pub name: String,
    pub seed: Option<u64>,
    /// The attention overlay's artifact name or file path.
    pub attention: Option<String>,
    pub features: ImageFeatures,
}

pub struct PromptInput {
    pub prompt: String,
    pub images: Vec<ImageInput>,
    /// CLIP text embedding of the prompt without the identifier.
    pub text_features: Vec<f32>,
}

/// Why a whole measure is missing, in words for the reader; the report uses the matching one
/// for each measure that came out `null`.
#[derive(Debug, Clone, Default)]
pub struct Reasons {
    pub dino: Option<String>,
    pub masks: Option<String>,
    pub attention: Option<String>,
}

pub struct ReportInput {
    pub job_id: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    pub subject_class: String,
    pub token: String,
    pub settings: serde_json::Value,
    pub models: Vec<ModelEntry>,
    pub references: Vec<ReferenceInput>,
    pub prompts: Vec<PromptInput>,
    pub training: Option<TrainingEntry>,
    pub notices: Vec<String>,
    pub timings: BTreeMap<String, f64>,
    pub reasons: Reasons,
}

/// The text the report gives for a measure that could not be computed.
fn reason(measure: &str, reasons: &Reasons) -> String {
    let given = match measure {
        "dino" => reasons.dino.clone(),
        "subject_alignment" | "non_subject_disentanglement" => reasons.masks.clone(),
        "attention_on_subject" => reasons.attention.clone(),
        _ => None,
    };
    given.unwrap_or_else(|| match measure {
        "dino" => "no DINO model was given".to_owned(),
        "subject_alignment" | "non_subject_disentanglement" => {
            "not every reference photo has a subject mask".to_owned()
        }
        "attention_on_subject" => {
            "no generated image has both an attention map and a subject mask".to_owned()
        }
        other => format!("{other} could not be computed"),
    })
}

/// Builds the report. References and each prompt's images are put in file-name order, the
/// order of the pair matrices' rows and columns.
pub fn assemble(mut input: ReportInput) -> Report {
    input.references.sort_by(|a, b| a.name.cmp(&b.name));
    let reference_names: Vec<String> = input.references.iter().map(|r| r.name.clone()).collect();
    let reference_features: Vec<ReferenceFeatures> = input
        .references
        .iter()
        .map(|r| r.features.clone())
        .collect();

    let mut scored: Vec<(PromptInput, PromptScores)> = Vec::new();
    for mut prompt in input.prompts {
        prompt.images.sort_by(|a, b| a.name.cmp(&b.name));
        let names: Vec<String> = prompt.images.iter().map(|i| i.name.clone()).collect();
        let features: Vec<ImageFeatures> =
            prompt.images.iter().map(|i| i.features.clone()).collect();
        let scores = score_prompt(
            &reference_names,
            &reference_features,
            &names,
            &features,
            &prompt.text_features,
        );
        scored.push((prompt, scores));
    }
    let scores: Vec<PromptScores> = scored.iter().map(|(_, s)| s.clone()).collect();
    let measures = overall(&scores);

    let left_out: Vec<LeftOut> = measures
        .named()
        .into_iter()
        .filter(|(_, value)| value.is_none())
        .map(|(name, _)| LeftOut {
            measure: name.to_owned(),
            reason: reason(name, &input.reasons),
        })
        .collect();

    let mut notices = Vec::new();
    let meaningful = !input.models.iter().any(|m| m.random_weights);
    if !meaningful {
        notices.push(
            "Made with random-weight models (a test or demo set-up): these numbers say nothing \
             about the images."
                .to_owned(),
        );
    }
    let references: Vec<ReferenceEntry> = input
        .references
        .into_iter()
        .map(|r| {
            let count = r.description.as_deref().map(count_tokens);
            if let (Some(count), Some(cut)) = (&count, count.as_ref().and_then(|c| c.cut.clone())) {
                notices.push(format!(
                    "The description of {} has {} tokens; the text encoder reads {CONTEXT_LENGTH}, \
                     so \"{cut}\" never trained.",
                    r.name, count.tokens
                ));
            }
            ReferenceEntry {
                description_tokens: count.as_ref().map(|c| c.tokens as u32),
                description_cut: count.as_ref().is_some_and(|c| !c.fits()),
                name: r.name,
                description: r.description,
                mask: r.mask,
                mask_source: r.mask_source,
                mask_coverage: r.mask_coverage,
            }
        })
        .collect();
    notices.extend(input.notices);

    let prompts = scored
        .into_iter()
        .map(|(prompt, scores)| PromptEntry {
            text: without_identifier(&prompt.prompt, &input.token),
            measures: scores.means.clone(),
            images: prompt
                .images
                .into_iter()
                .zip(scores.images.iter().cloned())
                .map(
                    |(image, measures): (ImageInput, MeasureValues)| ImageEntry {
                        name: image.name,
                        seed: image.seed,
                        attention: image.attention,
                        measures,
                    },
                )
                .collect(),
            pairs: scores.pairs,
            prompt: prompt.prompt,
        })
        .collect();

    Report {
        version: REPORT_VERSION,
        job_id: input.job_id,
        created_at: input.created_at,
        subject_class: input.subject_class,
        token: input.token,
        meaningful,
        notices,
        models: input.models,
        settings: input.settings,
        measures,
        left_out,
        references,
        prompts,
        training: input.training,
        timings: input.timings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(v: [f32; 2], masked: bool) -> ReferenceFeatures {
        ReferenceFeatures {
            clip: v.to_vec(),
            dino: None,
            subject: masked.then(|| v.to_vec()),
            non_subject: masked.then(|| vec![v[1], v[0]]),
        }
    }

    fn input(masked: bool, random: bool) -> ReportInput {
        let reference = |name: &str, v| ReferenceInput {
            name: name.into(),
            description: Some(format!(
                "a photo of sks dog {}",
                "on a sofa ".repeat(if name == "b" { 30 } else { 1 })
            )),
            mask: masked.then(|| format!("masks/{name}.png")),
            mask_source: masked.then_some(MaskSource::Uploaded),
            mask_coverage: masked.then_some(0.3),
            features: features(v, masked),
        };
        let image = |name: &str, v: [f32; 2]| ImageInput {
            name: name.into(),
            seed: Some(1),
            attention: None,
            features: ImageFeatures {
                clip: v.to_vec(),
                dino: None,
                attention_on_subject: None,
            },
        };
        ReportInput {
            job_id: None,
            created_at: "2026-12-01T00:00:00Z".into(),
            subject_class: "dog".into(),
            token: "sks".into(),
            settings: serde_json::json!({}),
            models: vec![ModelEntry {
                role: "clip".into(),
                name: "x".into(),
                random_weights: random,
            }],
            // Given out of order: the report sorts by name.
            references: vec![reference("b", [0.0, 1.0]), reference("a", [1.0, 0.0])],
            prompts: vec![PromptInput {
                prompt: "a sks dog on the beach".into(),
                images: vec![image("y1", [0.0, 1.0]), image("y0", [1.0, 0.0])],
                text_features: vec![1.0, 0.0],
            }],
            training: None,
            notices: vec![],
            timings: BTreeMap::new(),
            reasons: Reasons {
                masks: Some("no SAM".into()),
                ..Reasons::default()
            },
        }
    }

    #[test]
    fn rows_and_columns_follow_file_names() {
        let report = assemble(input(true, false));
        let p = &report.prompts[0];
        assert_eq!(p.pairs.references, ["a", "b"]);
        assert_eq!(p.pairs.images, ["y0", "y1"]);
        assert_eq!(p.images[0].name, "y0");
        // a = [1, 0] matches y0 = [1, 0].
        assert!((p.pairs.clip_i.as_ref().unwrap()[0][0] - 1.0).abs() < 1e-9);
        assert_eq!(p.text, "a dog on the beach");
        assert!(report.meaningful);
        assert_eq!(report.left_out.len(), 2, "{:?}", report.left_out);
        assert!(report.left_out.iter().any(|l| l.measure == "dino"));
        // The long description is cut and said so.
        assert!(report.references[1].description_cut);
        assert!(!report.references[0].description_cut);
        assert!(report.notices.iter().any(|n| n.contains("never trained")));
    }

    #[test]
    fn missing_masks_and_random_weights_are_reported() {
        let report = assemble(input(false, true));
        assert!(!report.meaningful);
        assert!(report.notices[0].contains("random-weight"));
        let masks: Vec<_> = report
            .left_out
            .iter()
            .filter(|l| l.reason == "no SAM")
            .map(|l| l.measure.as_str())
            .collect();
        assert_eq!(masks, ["subject_alignment", "non_subject_disentanglement"]);
        assert_eq!(report.measures.subject_alignment, None);
        let json = serde_json::to_value(&report).unwrap();
        let back: Report = serde_json::from_value(json).unwrap();
        assert_eq!(back, report);
    }
}
