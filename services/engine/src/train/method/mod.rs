//! Training methods: each is a parameterization of the frozen base models.
//!
//! A [`TrainingMethod`] creates its trainable parameters, attaches them to the models (adapters
//! on linear layers, replaced weights, trainable embedding rows, ...), lists them by name and
//! exports the result. The training loop ([`super::trainer`]) is the same for all methods.

pub mod custom_diffusion;
pub mod dreambooth;
pub mod lora;
pub mod svdiff;
pub mod textual_inversion;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Tensor, Var};

use super::adapters::TrainModels;
use super::augment::Augmentation;
use super::host::{Denoiser, PromptEncoder};
use super::TrainError;

pub use lora::{to_kohya, LoraConfig, LoraInit, LoraMethod};
pub use textual_inversion::{TextualInversionConfig, TextualInversionMethod, TOKEN_EMBEDDING};

/// The models a method attaches its parameters to.
pub struct ModelsMut<'a> {
    pub unet: &'a mut dyn Denoiser,
    pub text_encoder: &'a mut dyn PromptEncoder,
}

/// Descriptive metadata written into exported weight files.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ExportInfo {
    /// Base model name or path, e.g. `stabilityai/stable-diffusion-2-1-base`.
    pub base_model: String,
    /// Identifier token, e.g. `sks`.
    pub token: String,
    /// Subject class, e.g. `dog`.
    pub class: String,
    /// Description case of the training captions (`class_only`, `class_names`, `sid`, `full`).
    pub description_case: String,
    /// Number of optimizer steps trained.
    pub steps: u64,
}

/// Layout choices of an output beyond a method's default files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportOptions {
    /// LoRA: also the kohya / A1111 key layout.
    pub kohya: bool,
    /// Textual Inversion, Custom Diffusion: also the A1111 embedding layout.
    pub a1111: bool,
    /// DreamBooth: also one checkpoint file in the original Stable Diffusion layout.
    pub single_file: bool,
    /// SVDiff: also a merged diffusers pipeline.
    pub merged_pipeline: bool,
}

/// What a method's output may need besides its own parameters.
pub struct ExportContext<'a> {
    pub info: &'a ExportInfo,
    pub options: &'a ExportOptions,
    /// The models as trained, the method's parameters in them.
    pub unet: &'a dyn Denoiser,
    pub text_encoder: &'a dyn PromptEncoder,
    /// The base models the run started from (their VAE, schedule and configurations go into
    /// whole-pipeline outputs).
    pub base: &'a TrainModels,
}

/// Weights ready to be written: tensors by key and string metadata.
#[derive(Debug, Clone, Default)]
pub struct ExportedWeights {
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: BTreeMap<String, String>,
}

impl ExportedWeights {
    pub fn save(&self, path: &Path) -> Result<(), TrainError> {
        super::io::save(path, &self.tensors, &self.metadata)
    }

    /// Reads a file [`save`](Self::save) wrote (tensors on the CPU).
    pub fn load(path: &Path) -> Result<Self, TrainError> {
        let (tensors, metadata) = super::io::load(path, &candle_core::Device::Cpu)?;
        Ok(Self { tensors, metadata })
    }
}

/// A personalization method.
pub trait TrainingMethod {
    /// Short name, e.g. `lora`.
    fn kind(&self) -> &'static str;

    /// Creates the trainable parameters (random initialisation derived from `seed`) and
    /// attaches them to the models. Called once, before training.
    fn attach(&mut self, models: ModelsMut<'_>, seed: u64) -> Result<(), TrainError>;

    /// Called before every forward pass. A method whose model weights are computed from its
    /// variables (SVDiff: `W = U diag(relu(s + delta)) Vt`) puts the current weights into the
    /// models here ([`Denoiser::replace_weights`]), so the graph of the pass reaches the
    /// variables as they are after the last update.
    fn prepare(&self, _models: ModelsMut<'_>) -> Result<(), TrainError> {
        Ok(())
    }

    /// The trainable parameters by stable name, sorted by name. Every one of them must receive a
    /// gradient from the loss; everything else in the models is frozen.
    fn trainable(&self) -> Vec<(String, Var)>;

    /// Parameter groups: the learning rate of parameter `name` in a step whose rate is `base`
    /// (SVDiff trains its 1-D shifts a thousand times slower).
    fn learning_rate(&self, _name: &str, base: f64) -> f64 {
        base
    }

    /// Whether the text encoder must run with gradients (its output depends on trainable
    /// parameters). When false, prompt embeddings are computed once and cached.
    fn trains_text_encoder(&self) -> bool;

    /// Method settings recorded in checkpoints so that a resume with other settings is refused.
    fn settings_json(&self) -> serde_json::Value;

    /// A new view of each instance photo every step (Custom Diffusion's rescaling), which the
    /// run then encodes with the VAE every step instead of caching latents.
    fn augmentation(&self) -> Option<&dyn Augmentation> {
        None
    }

    /// Called after every optimizer update (e.g. to restore parameters that must not move).
    fn after_step(&self) -> Result<(), TrainError> {
        Ok(())
    }

    /// The weights for inference, in the method's main file format.
    fn export(&self, info: &ExportInfo) -> Result<ExportedWeights, TrainError>;

    /// Writes the method's output into `dir` (created if missing): its files named as the tools
    /// that load them expect (the [`MethodEntry::marker`] among them).
    /// Returns the files written, relative to `dir`.
    fn write_output(&self, ctx: &ExportContext<'_>, dir: &Path)
        -> Result<Vec<PathBuf>, TrainError>;

    /// Overwrites the trainable parameters with `values` (from a checkpoint). Every trainable
    /// parameter must be present with its shape.
    fn load_trainable(&self, values: &BTreeMap<String, Tensor>) -> Result<(), TrainError> {
        for (name, var) in self.trainable() {
            let v = values.get(&name).ok_or_else(|| {
                TrainError::Checkpoint(format!("missing trainable tensor {name}"))
            })?;
            if v.dims() != var.dims() {
                return Err(TrainError::Checkpoint(format!(
                    "{name}: shape {:?}, expected {:?}",
                    v.dims(),
                    var.dims()
                )));
            }
            var.set(&v.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }
}

/// Metadata common to every exported file.
pub fn export_metadata(info: &ExportInfo) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("sidbooth.base_model".into(), info.base_model.clone());
    m.insert("sidbooth.token".into(), info.token.clone());
    m.insert("sidbooth.class".into(), info.class.clone());
    m.insert(
        "sidbooth.description_case".into(),
        info.description_case.clone(),
    );
    m.insert("sidbooth.steps".into(), info.steps.to_string());
    m
}

/// One method's output on disk.
pub struct MethodEntry {
    /// The method's name (`lora`, ...), as the spec spells it.
    pub kind: &'static str,
    /// The file whose presence in an output directory says this method wrote it.
    pub marker: &'static str,
    /// Puts the output in a directory into a loaded pipeline; `scale` weighs methods that add
    /// to the base weights (LoRA).
    pub load: fn(&mut crate::pipeline::StableDiffusion, &std::path::Path, f64) -> crate::Result<()>,
}
