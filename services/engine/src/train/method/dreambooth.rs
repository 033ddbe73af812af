//! DreamBooth, full fine-tuning (the paper's main method; diffusers' `train_dreambooth.py`):
//! every UNet weight and, by default, every text-encoder weight (token and position embeddings
//! included) is trained. Class-prior preservation is the trainer's.
//!
//! Output: a diffusers pipeline directory (`model_index.json`, the trained `unet/` and
//! `text_encoder/`, the base's `vae/`, `scheduler/` and `tokenizer/`) that
//! `StableDiffusionPipeline.from_pretrained` loads ([`pipeline_dir`]), and on request one
//! checkpoint file in the original Stable Diffusion layout for A1111 and ComfyUI
//! ([`single_file`], [`SINGLE_FILE`]). The base's parts come from where the base models were
//! loaded ([`crate::train::TrainModels::source`]: a diffusers directory or the built-in tiny
//! model); without it there is no pipeline to write.
//!
//! Where we differ from diffusers' script:
//! - The trained weights are f32 variables whatever the model's dtype. With a half-precision
//!   model the forward pass runs on half-precision casts of them, rebuilt before every pass
//!   (diffusers: the trained model in f32 under autocast). Use bf16 for that: the trainer has no
//!   loss scaling, and f16 gradients underflow without it. The variables start from the weights
//!   as loaded, so a base loaded in bf16 starts from its bf16 rounding.
//! - The pipeline has no safety checker or feature extractor (`model_index.json` names them
//!   `null`); diffusers' script copies them from the base when it has them.
//! - Everything is written in f32, as diffusers' script does; the single file too (its
//!   `--half` option is not offered).
//!
//! Memory, SD 2.1-base (UNet 865.9M parameters, OpenCLIP text encoder 340.4M), per trained
//! parameter: the f32 variable 4 bytes, its gradient 4, AdamW's two moments 8 in f32 or 4 in
//! bf16 ([`crate::train::optim::OptimizerState`]), and on a GPU the bf16 working copy 2; the
//! frozen base the worker keeps for class images and sampling adds 2.6 GB (UNet, text encoder
//! and VAE in bf16).
//!
//! | trained | state, f32 moments | state, bf16 moments |
//! |---|---|---|
//! | UNet + text encoder (1206M) | 24.3 GB | 19.5 GB |
//! | UNet only (866M) | 18.2 GB | 14.7 GB |
//!
//! Activations come on top. This engine keeps every intermediate of the forward pass until the
//! backward pass, with full attention matrices at 64x64 latents: LoRA training of SD 2.1-base at
//! 512², batch 1, peaked at 23.6 GiB on an H200 (`scripts/gpu/results`), almost all of it
//! activations, and DreamBooth with prior preservation runs a batch of 2. So today a full
//! DreamBooth at 512² needs an 80 GB GPU; nothing of it fits in 24 GB. Gradient checkpointing of
//! the UNet blocks (issue 8) would keep only the block inputs and recompute one block at a time
//! in the backward pass (about one more forward pass of time), bringing activations to a few
//! GB: then the UNet-only fine-tune fits in 24 GB with either optimizer state, and the UNet plus
//! text encoder only with bf16 moments and a compact attention, with little to spare.

pub mod pipeline_dir;
pub mod single_file;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor, Var};

use super::MethodEntry;
use super::{
    export_metadata, ExportContext, ExportInfo, ExportedWeights, ModelsMut, TrainingMethod,
};
use crate::clip::ClipTextModel;
use crate::config::{ModelDir, Variant};
use crate::lora::{TEXT_ENCODER_PREFIX, UNET_PREFIX};
use crate::pipeline::StableDiffusion;
use crate::train::TrainError;
use crate::unet::UNet2DConditionModel;
use crate::weights;

/// The file that marks a diffusers pipeline directory.
pub const MODEL_INDEX: &str = "model_index.json";
/// The single-file checkpoint in the original Stable Diffusion layout, written on request.
pub const SINGLE_FILE: &str = "sd_checkpoint.safetensors";

pub const ENTRY: MethodEntry = MethodEntry {
    kind: "dreambooth",
    marker: MODEL_INDEX,
    load: load_output,
};

/// Puts the UNet and text encoder of a pipeline directory into `sd`, which must have the same
/// architecture. The weights replace the base's, so there is nothing to scale.
fn load_output(sd: &mut StableDiffusion, dir: &Path, scale: f64) -> crate::Result<()> {
    if scale != 1.0 {
        return Err(crate::Error::Invalid(format!(
            "{}: a fine-tuned pipeline replaces the base weights; its scale must be 1, not {scale}",
            dir.display()
        )));
    }
    let md = ModelDir::open(dir)?;
    if md.unet != sd.unet.config || md.text_encoder != sd.text_encoder.config {
        return Err(crate::Error::Invalid(format!(
            "{} was trained from a model of another architecture than the one loaded",
            dir.display()
        )));
    }
    let (vb, rec) = weights::from_safetensors(
        &md.weights_path("unet", Variant::Full)?,
        sd.dtype,
        &sd.device,
    )?;
    let mut unet = UNet2DConditionModel::new(vb, &sd.unet.config)?;
    unet.set_named_weights(rec.take());
    let (vb, rec) = weights::from_safetensors(
        &md.weights_path("text_encoder", Variant::Full)?,
        sd.dtype,
        &sd.device,
    )?;
    let mut text_encoder = ClipTextModel::new(vb, &sd.text_encoder.config)?;
    text_encoder.set_named_weights(rec.take());
    sd.unet = unet;
    sd.text_encoder = text_encoder;
    Ok(())
}

/// DreamBooth settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DreamboothConfig {
    /// Also fine-tune the text encoder (diffusers' `--train_text_encoder`; the paper does).
    pub train_text_encoder: bool,
}

impl Default for DreamboothConfig {
    fn default() -> Self {
        Self {
            train_text_encoder: true,
        }
    }
}

/// One trained weight: its name in the model and the variable that replaces it.
struct Param {
    weight: String,
    var: Var,
}

/// The trained weights of one model.
#[derive(Default)]
struct Component {
    params: Vec<Param>,
    /// The model computes in another dtype than the variables' f32: its weights are casts,
    /// rebuilt before every pass.
    recast: bool,
}

impl Component {
    /// Variables holding copies of `weights` (the base stays as it is).
    fn of(weights: Vec<(String, Tensor)>) -> Result<Self, TrainError> {
        let mut recast = false;
        let mut params = Vec::with_capacity(weights.len());
        for (weight, t) in weights {
            if t.is_variable() {
                return Err(TrainError::Config(format!(
                    "{weight} is already trained by another method"
                )));
            }
            recast |= t.dtype() != DType::F32;
            let var = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
            params.push(Param { weight, var });
        }
        Ok(Self { params, recast })
    }

    fn replacements(&self) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .map(|p| (p.weight.clone(), p.var.as_tensor().clone()))
            .collect()
    }
}

/// A text-encoder weight's name with transformers' `text_model.` prefix, which files written
/// by transformers 5 lack and everything else expects.
fn text_model_name(weight: &str) -> String {
    if weight.starts_with("text_model.") {
        weight.to_owned()
    } else {
        format!("text_model.{weight}")
    }
}

/// DreamBooth: every weight of the UNet (and of the text encoder) is a variable.
pub struct DreamboothMethod {
    cfg: DreamboothConfig,
    unet: Component,
    text_encoder: Component,
}

impl DreamboothMethod {
    pub fn new(cfg: DreamboothConfig) -> Self {
        Self {
            cfg,
            unet: Component::default(),
            text_encoder: Component::default(),
        }
    }
}

impl TrainingMethod for DreamboothMethod {
    fn kind(&self) -> &'static str {
        ENTRY.kind
    }

    fn attach(&mut self, models: ModelsMut<'_>, _seed: u64) -> Result<(), TrainError> {
        if !self.unet.params.is_empty() {
            return Err(TrainError::Config("DreamBooth is already attached".into()));
        }
        self.unet = Component::of(models.unet.named_weights())?;
        if self.unet.params.is_empty() {
            return Err(TrainError::Config("the UNet names no weights".into()));
        }
        models.unet.replace_weights(&self.unet.replacements())?;
        if self.cfg.train_text_encoder {
            self.text_encoder = Component::of(models.text_encoder.named_weights())?;
            models
                .text_encoder
                .replace_weights(&self.text_encoder.replacements())?;
        }
        Ok(())
    }

    fn prepare(&self, models: ModelsMut<'_>) -> Result<(), TrainError> {
        if self.unet.recast {
            models.unet.replace_weights(&self.unet.replacements())?;
        }
        if self.text_encoder.recast {
            models
                .text_encoder
                .replace_weights(&self.text_encoder.replacements())?;
        }
        Ok(())
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        let unet = self
            .unet
            .params
            .iter()
            .map(|p| (format!("{UNET_PREFIX}.{}", p.weight), p.var.clone()));
        let text = self.text_encoder.params.iter().map(|p| {
            (
                format!("{TEXT_ENCODER_PREFIX}.{}", text_model_name(&p.weight)),
                p.var.clone(),
            )
        });
        let mut out: Vec<_> = unet.chain(text).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn trains_text_encoder(&self) -> bool {
        self.cfg.train_text_encoder
    }

    fn settings_json(&self) -> serde_json::Value {
        serde_json::json!({ "method": ENTRY.kind, "dreambooth": self.cfg })
    }

    /// The trained weights by their names in [`TrainingMethod::trainable`]: diffusers' UNet
    /// names under `unet.`, transformers' text-encoder names under `text_encoder.`.
    fn export(&self, info: &ExportInfo) -> Result<ExportedWeights, TrainError> {
        if self.unet.params.is_empty() {
            return Err(TrainError::Config("DreamBooth is not attached".into()));
        }
        let tensors = self
            .trainable()
            .into_iter()
            .map(|(name, var)| (name, var.as_tensor().clone()))
            .collect();
        Ok(ExportedWeights {
            tensors,
            metadata: weights_metadata(info),
        })
    }

    fn write_output(
        &self,
        ctx: &ExportContext<'_>,
        dir: &Path,
    ) -> Result<Vec<PathBuf>, TrainError> {
        if self.unet.params.is_empty() {
            return Err(TrainError::Config("DreamBooth is not attached".into()));
        }
        let source = ctx.base.source.as_ref().ok_or_else(|| {
            TrainError::Config(
                "a DreamBooth pipeline copies the base model's VAE, scheduler and tokenizer: \
                 the base models must name their source"
                    .into(),
            )
        })?;
        let exported = self.export(ctx.info)?;
        let component = |prefix: &str| -> BTreeMap<String, Tensor> {
            exported
                .tensors
                .iter()
                .filter_map(|(k, t)| Some((k.strip_prefix(prefix)?.to_owned(), t.clone())))
                .collect()
        };
        let unet = component(&format!("{UNET_PREFIX}."));
        let text_encoder = self
            .cfg
            .train_text_encoder
            .then(|| component(&format!("{TEXT_ENCODER_PREFIX}.")));
        let metadata = &exported.metadata;
        let mut files = pipeline_dir::write(source, dir, &unet, text_encoder.as_ref(), metadata)?;
        if ctx.options.single_file {
            single_file::from_pipeline_dir(dir, &dir.join(SINGLE_FILE), metadata)?;
            files.push(PathBuf::from(SINGLE_FILE));
        }
        Ok(files)
    }
}

/// Metadata of the written weight files.
fn weights_metadata(info: &ExportInfo) -> BTreeMap<String, String> {
    let mut m = export_metadata(info);
    m.insert("format".into(), "pt".into());
    m.insert("sidbooth.method".into(), ENTRY.kind.into());
    m
}
