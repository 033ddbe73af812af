//! The job spec: the JSON part a user posts beside the photos.
//!
//! Parsing is strict (`deny_unknown_fields`, typed newtypes) and [`JobSpec::validate`] checks
//! the rules that span fields and the image count, so that a spec that reaches the database is
//! one a worker can run.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::prompts::{dreambooth_prompts, SubjectKind};
pub use crate::spec_error::SpecError;
use crate::text::{IdentifierToken, SubjectClass};
use crate::train::{TrainMethod, TrainSettings};

/// The paper trains on 1-7 reference photos; more is refused rather than silently truncated.
pub const MAX_IMAGES: usize = 7;
/// Upper bound on one manual or edited description, in characters. CLIP reads 77 tokens; a few
/// sentences fit well inside this, a pasted essay does not.
pub const MAX_DESCRIPTION_CHARS: usize = 1000;

/// What the identifier stands for: an object (a dog, a backpack) or a painting style.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Object,
    Style,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Object => "object",
            Mode::Style => "style",
        }
    }

    /// The prompt of the class images that DreamBooth's prior-preservation loss trains on.
    pub fn class_prompt(self, class: &SubjectClass) -> String {
        match self {
            Mode::Object => format!("a photo of {class}"),
            Mode::Style => "a painting".to_owned(),
        }
    }

    /// The fixed start of every train description (the paper's baseline text).
    /// Object: "a photo of sks dog"; style: "a painting in the style of sks art".
    pub fn prefix(self, token: &IdentifierToken, class: &SubjectClass) -> String {
        match self {
            Mode::Object => format!("a photo of {token} {class}"),
            Mode::Style => format!("a painting in the style of {token} {class}"),
        }
    }
}

/// The four description cases of the paper (Tab. 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DescriptionCase {
    /// Case 1: only "a photo of [v] [class]".
    ClassOnly,
    /// Case 2: the subject plus the class names of the other objects.
    ClassNames,
    /// Case 3, the Selectively Informative Description: everything but the subject in detail.
    #[default]
    Sid,
    /// Case 4: everything in detail, the subject included.
    Full,
}

impl DescriptionCase {
    pub const ALL: [DescriptionCase; 4] = [
        DescriptionCase::ClassOnly,
        DescriptionCase::ClassNames,
        DescriptionCase::Sid,
        DescriptionCase::Full,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DescriptionCase::ClassOnly => "class_only",
            DescriptionCase::ClassNames => "class_names",
            DescriptionCase::Sid => "sid",
            DescriptionCase::Full => "full",
        }
    }

    /// Case 1 is the fixed prefix alone; no model needs to look at the photo.
    pub fn needs_model(self) -> bool {
        self != DescriptionCase::ClassOnly
    }
}

/// Where the descriptions come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DescriptionSource {
    /// A vision-language model writes one per photo.
    #[default]
    Vlm,
    /// The user sends one text per photo in `descriptions.texts`.
    Manual,
}

/// How the train descriptions are written.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DescriptionsSpec {
    /// Which of the paper's four description cases to write.
    #[serde(default)]
    pub case: DescriptionCase,
    #[serde(default)]
    pub source: DescriptionSource,
    /// One text per image, in upload order; required with `source: manual`, refused otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub texts: Option<Vec<String>>,
}

/// The stages of a job, in the order they run.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Describe,
    Train,
    Generate,
    Evaluate,
}

impl Stage {
    pub const ALL: [Stage; 4] = [
        Stage::Describe,
        Stage::Train,
        Stage::Generate,
        Stage::Evaluate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Describe => "describe",
            Stage::Train => "train",
            Stage::Generate => "generate",
            Stage::Evaluate => "evaluate",
        }
    }

    pub fn parse(s: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|stage| stage.as_str() == s)
    }

    /// The stages a worker of this build can run. A spec naming any other stage is refused at
    /// the door instead of being accepted and never finished.
    pub fn implemented(self) -> bool {
        matches!(
            self,
            Stage::Describe | Stage::Train | Stage::Generate | Stage::Evaluate
        )
    }
}

fn check_range<T: PartialOrd + std::fmt::Display>(
    field: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), SpecError> {
    if value < min || value > max {
        return Err(SpecError::Invalid(format!(
            "{field} is {value}; it must be between {min} and {max}"
        )));
    }
    Ok(())
}

/// Longest accepted prompt, in characters (CLIP reads 77 tokens).
pub const MAX_PROMPT_CHARS: usize = 500;
/// Most prompts per job.
pub const MAX_PROMPTS: usize = 50;

impl GenerateSettings {
    pub fn validate(&self) -> Result<(), SpecError> {
        check_range(
            "generate.prompts (count)",
            self.prompts.len(),
            0,
            MAX_PROMPTS,
        )?;
        for prompt in self.prompts.iter().chain(&self.negative_prompt) {
            if prompt.trim().is_empty() || prompt.chars().count() > MAX_PROMPT_CHARS {
                return Err(SpecError::Invalid(format!(
                    "every prompt must have 1 to {MAX_PROMPT_CHARS} characters"
                )));
            }
        }
        check_range("generate.images_per_prompt", self.images_per_prompt, 1, 64)?;
        check_range("generate.steps", self.steps, 1, 1000)?;
        if !(0.0..=50.0).contains(&self.guidance_scale) {
            return Err(SpecError::Invalid(format!(
                "generate.guidance_scale is {}; it must be between 0 and 50",
                self.guidance_scale
            )));
        }
        Ok(())
    }
}

/// Sampling settings; defaults follow the paper (DDIM 50 steps, guidance 7.5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct GenerateSettings {
    /// Prompts with the identifier, e.g. "a sks dog on the beach". Empty: the DreamBooth
    /// dataset's 25 prompts for the subject's kind (see `subject_kind`), with the job's token
    /// and class.
    pub prompts: Vec<String>,
    pub images_per_prompt: u32,
    pub steps: u32,
    pub guidance_scale: f64,
    pub seed: u64,
    pub negative_prompt: Option<String>,
}

impl Default for GenerateSettings {
    fn default() -> Self {
        Self {
            prompts: Vec::new(),
            images_per_prompt: 4,
            steps: 50,
            guidance_scale: 7.5,
            seed: 0,
            negative_prompt: None,
        }
    }
}

/// The training methods this build of sidbooth runs; a spec naming another is refused at the
/// door instead of being accepted and never finished.
pub fn method_available(method: TrainMethod) -> bool {
    matches!(
        method,
        TrainMethod::Lora
            | TrainMethod::Dreambooth
            | TrainMethod::TextualInversion
            | TrainMethod::CustomDiffusion
            | TrainMethod::Svdiff
    )
}

/// What a user asks sidbooth to do with the photos they upload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// The subject's class noun, e.g. "dog".
    #[schema(value_type = String, example = "dog")]
    pub subject_class: SubjectClass,
    /// The identifier token that stands for the subject.
    #[serde(default)]
    #[schema(value_type = String, example = "sks")]
    pub token: IdentifierToken,
    #[serde(default)]
    pub mode: Mode,
    /// Object or live subject: picks the DreamBooth prompt list used when `generate.prompts` is
    /// empty. Default: live for animal classes (dog, cat, ...), object otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_kind: Option<SubjectKind>,
    #[serde(default)]
    pub descriptions: DescriptionsSpec,
    /// Stop after describing so the user can edit and approve the descriptions.
    #[serde(default)]
    pub review: bool,
    /// The stages to run, in any order; they always run in pipeline order.
    #[serde(default = "default_stages")]
    #[schema(min_items = 1)]
    pub stages: Vec<Stage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<TrainSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate: Option<GenerateSettings>,
}

fn default_stages() -> Vec<Stage> {
    vec![Stage::Describe]
}

impl JobSpec {
    /// The fixed prefix every description of this job starts with.
    pub fn prefix(&self) -> String {
        self.mode.prefix(&self.token, &self.subject_class)
    }

    /// The subject kind the spec names, or the one its class suggests.
    pub fn subject_kind(&self) -> SubjectKind {
        self.subject_kind
            .unwrap_or_else(|| SubjectKind::for_class(&self.subject_class))
    }

    /// The prompts the generate and evaluate stages use: the spec's own, or the DreamBooth
    /// dataset's 25 for the subject's kind.
    pub fn prompts(&self) -> Vec<String> {
        match &self.generate {
            Some(g) if !g.prompts.is_empty() => g.prompts.clone(),
            _ => dreambooth_prompts(self.subject_kind(), &self.token, &self.subject_class),
        }
    }

    /// Stages sorted into pipeline order, duplicates removed.
    pub fn ordered_stages(&self) -> Vec<Stage> {
        let mut stages = self.stages.clone();
        stages.sort();
        stages.dedup();
        stages
    }

    /// Checks the rules that span fields and the number of uploaded images.
    pub fn validate(&self, image_count: usize) -> Result<(), SpecError> {
        let stages = self.ordered_stages();
        if stages.is_empty() {
            return Err(SpecError::Invalid(
                "stages must name at least one stage".into(),
            ));
        }
        if let Some(stage) = stages.iter().find(|stage| !stage.implemented()) {
            return Err(SpecError::StageNotImplemented(stage.as_str()));
        }
        for (later, needs) in [
            (Stage::Train, Stage::Describe),
            (Stage::Generate, Stage::Train),
            (Stage::Evaluate, Stage::Generate),
        ] {
            if stages.contains(&later) && !stages.contains(&needs) {
                return Err(SpecError::Invalid(format!(
                    "stage {} needs stage {}",
                    later.as_str(),
                    needs.as_str()
                )));
            }
        }
        if self.train.is_some() && !stages.contains(&Stage::Train) {
            return Err(SpecError::Invalid(
                "train settings given without the train stage".into(),
            ));
        }
        if let Some(train) = &self.train {
            if !method_available(train.method()) {
                return Err(SpecError::MethodNotImplemented(
                    train.method().as_str().into(),
                ));
            }
            train.validate()?;
        }
        if let Some(generate) = &self.generate {
            generate.validate()?;
        }
        if self.generate.is_some() && !stages.contains(&Stage::Generate) {
            return Err(SpecError::Invalid(
                "generate settings given without the generate stage".into(),
            ));
        }
        match (self.descriptions.source, &self.descriptions.texts) {
            (DescriptionSource::Manual, None) => {
                return Err(SpecError::Invalid(
                    "descriptions.texts is required when descriptions.source is manual".into(),
                ))
            }
            (DescriptionSource::Manual, Some(texts)) if texts.len() != image_count => {
                return Err(SpecError::Invalid(format!(
                    "descriptions.texts has {} texts for {} images; give one per image",
                    texts.len(),
                    image_count
                )))
            }
            (DescriptionSource::Vlm, Some(_)) => {
                return Err(SpecError::Invalid(
                    "descriptions.texts is only allowed when descriptions.source is manual".into(),
                ))
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Result<JobSpec, serde_json::Error> {
        serde_json::from_value(json)
    }

    #[test]
    fn defaults_are_the_paper_product_defaults() {
        let s = spec(serde_json::json!({"subject_class": "dog"})).unwrap();
        assert_eq!(s.token.as_str(), "sks");
        assert_eq!(s.mode, Mode::Object);
        assert_eq!(s.descriptions.case, DescriptionCase::Sid);
        assert_eq!(s.descriptions.source, DescriptionSource::Vlm);
        assert_eq!(s.stages, vec![Stage::Describe]);
        assert!(!s.review);
        assert_eq!(s.prefix(), "a photo of sks dog");
        s.validate(3).unwrap();
    }

    #[test]
    fn style_prefix() {
        let s = spec(serde_json::json!({"subject_class": "art", "mode": "style"})).unwrap();
        assert_eq!(s.prefix(), "a painting in the style of sks art");
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_refused() {
        assert!(spec(serde_json::json!({"subject_class": "dog", "colour": 1})).is_err());
        assert!(spec(serde_json::json!({"subject_class": 7})).is_err());
        assert!(spec(serde_json::json!({"subject_class": "dog", "review": "yes"})).is_err());
        assert!(spec(serde_json::json!({"subject_class": "dog",
            "descriptions": {"case": "sid", "extra": true}}))
        .is_err());
    }

    #[test]
    fn evaluate_needs_the_stages_before_it() {
        let s = spec(serde_json::json!({"subject_class": "dog",
            "stages": ["describe", "evaluate"]}))
        .unwrap();
        assert!(
            matches!(s.validate(1), Err(SpecError::Invalid(m)) if m.contains("needs stage generate"))
        );
        let s = spec(serde_json::json!({"subject_class": "dog",
            "stages": ["describe", "train", "generate", "evaluate"]}))
        .unwrap();
        s.validate(1).unwrap();
    }

    #[test]
    fn prompts_default_to_the_dreambooth_lists() {
        let s = spec(serde_json::json!({"subject_class": "dog",
            "stages": ["describe", "train", "generate"]}))
        .unwrap();
        let prompts = s.prompts();
        assert_eq!(prompts.len(), 25);
        assert_eq!(prompts[10], "a sks dog wearing a red hat");
        let s = spec(
            serde_json::json!({"subject_class": "dog", "subject_kind": "object",
            "token": "ohwx", "stages": ["describe", "train", "generate"]}),
        )
        .unwrap();
        assert_eq!(
            s.prompts()[10],
            "a ohwx dog with a wheat field in the background"
        );
        let s = spec(serde_json::json!({"subject_class": "dog",
            "stages": ["describe", "train", "generate"],
            "generate": {"prompts": ["a sks dog on the moon"]}}))
        .unwrap();
        assert_eq!(s.prompts(), vec!["a sks dog on the moon"]);
    }

    #[test]
    fn train_and_generate_settings_are_checked() {
        let ok = spec(serde_json::json!({"subject_class": "dog",
            "stages": ["describe", "train", "generate"],
            "generate": {"prompts": ["a sks dog on the beach"]}}))
        .unwrap();
        ok.validate(3).unwrap();
        assert_eq!(ok.train, None, "defaults apply when train is absent");
        let no_prompts = spec(serde_json::json!({"subject_class": "dog",
            "stages": ["describe", "train", "generate"]}))
        .unwrap();
        no_prompts.validate(3).unwrap();
        let bad_steps = spec(serde_json::json!({"subject_class": "dog",
            "stages": ["describe", "train"], "train": {"steps": 0}}))
        .unwrap();
        assert!(
            matches!(bad_steps.validate(3), Err(SpecError::Invalid(m)) if m.contains("train.steps"))
        );
        let method = spec(serde_json::json!({"subject_class": "dog",
            "stages": ["describe", "train"], "train": {"method": "svdiff"}}))
        .unwrap();
        method.validate(3).unwrap();
        let guidance = spec(serde_json::json!({"subject_class": "dog",
            "stages": ["describe", "train", "generate"],
            "generate": {"prompts": ["x"], "guidance_scale": 99.0}}))
        .unwrap();
        assert!(matches!(guidance.validate(3), Err(SpecError::Invalid(_))));
    }

    #[test]
    fn manual_texts_must_match_images() {
        let s = spec(serde_json::json!({"subject_class": "dog",
            "descriptions": {"source": "manual", "texts": ["a photo of sks dog"]}}))
        .unwrap();
        s.validate(1).unwrap();
        assert!(matches!(s.validate(2), Err(SpecError::Invalid(_))));
        let s = spec(serde_json::json!({"subject_class": "dog",
            "descriptions": {"source": "manual"}}))
        .unwrap();
        assert!(matches!(s.validate(1), Err(SpecError::Invalid(_))));
        let s = spec(serde_json::json!({"subject_class": "dog",
            "descriptions": {"texts": ["x"]}}))
        .unwrap();
        assert!(matches!(s.validate(1), Err(SpecError::Invalid(_))));
    }

    #[test]
    fn stage_order_is_canonical() {
        let s = spec(serde_json::json!({"subject_class": "dog",
            "stages": ["describe", "describe"]}))
        .unwrap();
        assert_eq!(s.ordered_stages(), vec![Stage::Describe]);
    }
}
