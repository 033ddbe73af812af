//! `report.json`: what the evaluate stage (and `sidbooth evaluate`) measured, in one document.
//!
//! The measures, for references `x_i` (sorted by file name) and the generated images `y_j` of
//! one prompt `p` (sorted by file name):
//!
//! | name | value |
//! |---|---|
//! | `clip_i[i][j]` | cos(CLIP(x_i), CLIP(y_j)) (DreamBooth's CLIP-I) |
//! | `dino[i][j]` | cos(DINO(x_i), DINO(y_j)) (DreamBooth's DINO) |
//! | `subject_alignment[i][j]` | cos(CLIP(subject segment of x_i), CLIP(y_j)) |
//! | `non_subject_disentanglement[i][j]` | 1 - cos(CLIP(non-subject segment of x_i), CLIP(y_j)) |
//! | `text_alignment[j]` | cos(CLIP(y_j), CLIP_text(p without the identifier token)) (CLIP-T) |
//! | `attention_on_subject[j]` | share of the identifier token's averaged cross-attention inside the subject mask of y_j |
//!
//! Embeddings are the projected, L2-normalised pooled outputs. The subject segment is the photo
//! with everything outside the mask blacked out, cropped to the mask's bounding box and padded
//! with black to a centred square; the non-subject segment is the photo with the mask blacked
//! out. Each measure overall is the mean of its values, per prompt and over all prompts. A
//! measure that cannot be computed (no DINO model, no masks, no attention maps) is `null` and
//! named in `left_out` with the reason, never guessed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The version of this document's layout.
pub const REPORT_VERSION: u32 = 1;

/// The six measures. Each is `null` when it could not be computed (see `left_out`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MeasureValues {
    /// DreamBooth's CLIP-I: CLIP image similarity of generated images to the references.
    pub clip_i: Option<f64>,
    /// DreamBooth's DINO: DINO ViT-S/16 image similarity to the references.
    pub dino: Option<f64>,
    /// The paper's subject-alignment: similarity to the references' subject segments (higher:
    /// the subject is kept).
    pub subject_alignment: Option<f64>,
    /// The paper's non-subject-disentanglement: 1 - similarity to the references' non-subject
    /// segments (higher: the background and neighbouring objects were not copied).
    pub non_subject_disentanglement: Option<f64>,
    /// The paper's text-alignment (DreamBooth's CLIP-T): similarity of generated images to their
    /// prompt without the identifier.
    pub text_alignment: Option<f64>,
    /// Share of the identifier token's cross-attention that falls on the generated subject.
    pub attention_on_subject: Option<f64>,
}

/// Names of the measures, in report order.
pub const MEASURE_NAMES: [&str; 6] = [
    "clip_i",
    "dino",
    "subject_alignment",
    "non_subject_disentanglement",
    "text_alignment",
    "attention_on_subject",
];

impl MeasureValues {
    /// The measures with their names, in [`MEASURE_NAMES`] order.
    pub fn named(&self) -> [(&'static str, Option<f64>); 6] {
        [
            ("clip_i", self.clip_i),
            ("dino", self.dino),
            ("subject_alignment", self.subject_alignment),
            (
                "non_subject_disentanglement",
                self.non_subject_disentanglement,
            ),
            ("text_alignment", self.text_alignment),
            ("attention_on_subject", self.attention_on_subject),
        ]
    }
}

/// A measure that was not computed, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeftOut {
    /// One of the measure names.
    pub measure: String,
    pub reason: String,
}

/// Where a reference photo's subject mask came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MaskSource {
    /// Uploaded by the user with the job (or replaced during review).
    Uploaded,
    /// SAM, prompted with the subject's box from the vision-language model.
    SamVlmBox,
    /// SAM, prompted with the box of the automatic mask proposal most similar (CLIP) to
    /// "a photo of a {class}".
    SamClipRanked,
}

/// One reference photo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReferenceEntry {
    /// File name (sorted order is the row order of the pair matrices).
    pub name: String,
    /// The train description, when the job has one.
    pub description: Option<String>,
    /// CLIP tokens of the description, start and end tokens included.
    pub description_tokens: Option<u32>,
    /// True when the description is longer than the text encoder reads: the rest never trained.
    pub description_cut: bool,
    /// The subject mask's artifact name or path, when there is a mask.
    pub mask: Option<String>,
    pub mask_source: Option<MaskSource>,
    /// Share of the photo the mask covers.
    pub mask_coverage: Option<f64>,
}

/// The scores of one generated image: its column of each pair matrix averaged over the
/// references, and its own values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageEntry {
    /// File name or artifact name (sorted order is the column order of the pair matrices).
    pub name: String,
    pub seed: Option<u64>,
    /// The attention overlay's artifact name or path, when there is one.
    pub attention: Option<String>,
    pub measures: MeasureValues,
}

/// The pair matrices of one prompt: rows are references, columns generated images.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Pairs {
    /// Row names.
    pub references: Vec<String>,
    /// Column names.
    pub images: Vec<String>,
    pub clip_i: Option<Vec<Vec<f64>>>,
    pub dino: Option<Vec<Vec<f64>>>,
    pub subject_alignment: Option<Vec<Vec<f64>>>,
    pub non_subject_disentanglement: Option<Vec<Vec<f64>>>,
    /// One value per generated image.
    pub text_alignment: Option<Vec<f64>>,
    /// One value per generated image.
    pub attention_on_subject: Option<Vec<Option<f64>>>,
}

/// Everything measured for one prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromptEntry {
    pub prompt: String,
    /// The text CLIP compared the images with: the prompt without the identifier token.
    pub text: String,
    pub measures: MeasureValues,
    pub images: Vec<ImageEntry>,
    pub pairs: Pairs,
}

/// One model the numbers come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// `clip`, `dino`, `sam` or `base_model`.
    pub role: String,
    /// A directory, or the name of a built-in model.
    pub name: String,
    /// True for models built from a seed: numbers they make say nothing about the images.
    pub random_weights: bool,
}

/// The training run, as `training.json` records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainingEntry {
    pub method: String,
    pub steps: u64,
    pub last_loss: Option<f64>,
    /// `[step, loss]` pairs.
    pub losses: Vec<(u64, f64)>,
}

/// `report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// [`REPORT_VERSION`].
    pub version: u32,
    /// The job, when the service made the report.
    pub job_id: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    pub subject_class: String,
    pub token: String,
    /// False when any model that made the numbers has random weights (tests, demos): then the
    /// numbers are not meaningful.
    pub meaningful: bool,
    /// Things a reader should know (random weights, cut descriptions, missing masks).
    pub notices: Vec<String>,
    pub models: Vec<ModelEntry>,
    /// The job's spec or the command's settings, as given.
    #[schema(value_type = Object)]
    pub settings: serde_json::Value,
    /// Over all prompts: the mean of every value of each measure.
    pub measures: MeasureValues,
    pub left_out: Vec<LeftOut>,
    pub references: Vec<ReferenceEntry>,
    pub prompts: Vec<PromptEntry>,
    pub training: Option<TrainingEntry>,
    /// Seconds spent per phase (embedding, segmenting, ...).
    pub timings: BTreeMap<String, f64>,
}
