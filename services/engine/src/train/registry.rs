//! The training methods, registered once: each method's settings ([`MethodConfig`], mapped
//! from the job spec's [`TrainSettings`] in one place), how to build it, the file that marks
//! its output, and how inference loads that output ([`load_weights`]).
//!
//! A new method is one module under [`super::method`] (parameterization, exporter, loader) plus
//! a variant here and its [`MethodEntry`] in [`METHODS`].

use std::path::{Path, PathBuf};

use sidbooth_domain::train::TrainSettings;

use super::method::custom_diffusion::{self, CustomDiffusionConfig, CustomDiffusionMethod};
use super::method::dreambooth::{self, DreamboothConfig, DreamboothMethod};
use super::method::svdiff::{self, SvdiffConfig, SvdiffMethod};
pub use super::method::MethodEntry;
use super::method::{
    lora, textual_inversion, ExportOptions, LoraConfig, LoraMethod, TextualInversionConfig,
    TextualInversionMethod, TrainingMethod,
};
use super::TrainError;
use crate::pipeline::StableDiffusion;

/// Which parameterization to train, with its engine-level settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum MethodConfig {
    Lora(LoraConfig),
    TextualInversion(TextualInversionConfig),
    CustomDiffusion(CustomDiffusionConfig),
    Svdiff(SvdiffConfig),
    Dreambooth(DreamboothConfig),
}

/// What the spec's settings are mapped with besides themselves.
#[derive(Debug, Clone)]
pub struct SettingsContext {
    /// The job's identifier token, e.g. `sks`.
    pub token: String,
    /// The subject class, e.g. `dog`.
    pub class: String,
}

impl MethodConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            MethodConfig::Lora(_) => lora::ENTRY.kind,
            MethodConfig::TextualInversion(_) => textual_inversion::ENTRY.kind,
            MethodConfig::CustomDiffusion(_) => custom_diffusion::ENTRY.kind,
            MethodConfig::Svdiff(_) => svdiff::ENTRY.kind,
            MethodConfig::Dreambooth(_) => dreambooth::ENTRY.kind,
        }
    }

    pub fn build(&self) -> Result<Box<dyn TrainingMethod>, TrainError> {
        Ok(match self {
            MethodConfig::Lora(c) => Box::new(LoraMethod::new(c.clone())?),
            MethodConfig::TextualInversion(c) => Box::new(TextualInversionMethod::new(c.clone())?),
            MethodConfig::CustomDiffusion(c) => Box::new(CustomDiffusionMethod::new(c.clone())?),
            MethodConfig::Svdiff(c) => Box::new(SvdiffMethod::new(c.clone())?),
            MethodConfig::Dreambooth(c) => Box::new(DreamboothMethod::new(c.clone())),
        })
    }

    /// The engine settings of a job's training settings. Methods this build cannot train are
    /// refused by name.
    pub fn from_settings(s: &TrainSettings, cx: &SettingsContext) -> Result<Self, TrainError> {
        match s {
            TrainSettings::Lora(l) => Ok(MethodConfig::Lora(LoraConfig {
                train_text_encoder: l.train_text_encoder,
                ..LoraConfig::with_rank(l.rank as usize)
            })),
            TrainSettings::TextualInversion(t) => {
                Ok(MethodConfig::TextualInversion(TextualInversionConfig {
                    token: s.prompt_token(&cx.token),
                    num_vectors: t.num_vectors as usize,
                    initializer: t.initializer.clone().unwrap_or_else(|| cx.class.clone()),
                }))
            }
            TrainSettings::CustomDiffusion(c) => {
                Ok(MethodConfig::CustomDiffusion(CustomDiffusionConfig {
                    weights: c.weights,
                    augment: c.augment,
                    ..CustomDiffusionConfig::new(s.prompt_token(&cx.token))
                }))
            }
            TrainSettings::Svdiff(v) => Ok(MethodConfig::Svdiff(SvdiffConfig {
                train_text_encoder: v.train_text_encoder,
                learning_rate: v.learning_rate,
                learning_rate_1d: v.learning_rate_1d,
            })),
            TrainSettings::Dreambooth(d) => Ok(MethodConfig::Dreambooth(DreamboothConfig {
                train_text_encoder: d.train_text_encoder,
            })),
        }
    }
}

/// The output layouts a job's settings ask for beyond the method's own files (the spec's
/// `single_file`, `a1111`, `merged_pipeline`).
pub fn export_options(s: &TrainSettings) -> ExportOptions {
    let mut options = ExportOptions::default();
    match s {
        TrainSettings::Dreambooth(d) => options.single_file = d.single_file,
        TrainSettings::TextualInversion(t) => options.a1111 = t.a1111,
        TrainSettings::Svdiff(v) => options.merged_pipeline = v.merged_pipeline,
        TrainSettings::Lora(_) | TrainSettings::CustomDiffusion(_) => {}
    }
    options
}

/// Every method's output, in the order [`detect`] tries them. DreamBooth's marker, a whole
/// pipeline's `model_index.json`, comes last: other methods may write a merged pipeline beside
/// their own files.
pub static METHODS: [&MethodEntry; 5] = [
    &lora::ENTRY,
    &textual_inversion::ENTRY,
    &custom_diffusion::ENTRY,
    &svdiff::ENTRY,
    &dreambooth::ENTRY,
];

/// The method that wrote `path`: a directory holding one of the markers, or one of the marker
/// files itself.
pub fn detect(path: &Path) -> Option<&'static MethodEntry> {
    if path.is_dir() {
        METHODS
            .iter()
            .copied()
            .find(|m| path.join(m.marker).is_file())
    } else {
        let name = path.file_name()?.to_str()?;
        METHODS.iter().copied().find(|m| m.marker == name)
    }
}

/// The directory of an output given as its directory or as its marker file.
fn output_dir(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.to_owned()
    } else {
        path.parent().map(Path::to_owned).unwrap_or_default()
    }
}

/// Loads any method's output into `sd` and returns the method's name. A single safetensors file
/// that is not named like an output is read as a LoRA (what `--lora FILE` always accepted).
pub fn load_weights(
    sd: &mut StableDiffusion,
    path: &Path,
    scale: f64,
) -> crate::Result<&'static str> {
    match detect(path) {
        Some(entry) => {
            (entry.load)(sd, &output_dir(path), scale)?;
            Ok(entry.kind)
        }
        None if path.is_file() => {
            sd.load_lora(path, scale)?;
            Ok(lora::ENTRY.kind)
        }
        None => Err(crate::Error::Invalid(format!(
            "{} holds no trained weights sidbooth knows ({})",
            path.display(),
            METHODS
                .iter()
                .map(|m| m.marker)
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}
