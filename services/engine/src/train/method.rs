//! Training methods: each is a parameterization of the frozen base models.
//!
//! A [`TrainingMethod`] creates its trainable parameters, attaches them to the models (adapters
//! on linear layers, replaced weights, trainable embedding rows, ...), lists them by name and
//! exports the result. The training loop ([`super::trainer`]) is the same for all methods.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;

use super::host::{Denoiser, PromptEncoder};
use super::rng::{self, Stream};
use super::TrainError;
use crate::lora::{self as lora_names, LoraPart, TEXT_ENCODER_PREFIX, UNET_PREFIX};
use crate::nn::{Linear, LoraAdapter};

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

/// Weights ready to be written: tensors by key and string metadata.
#[derive(Debug, Clone, Default)]
pub struct ExportedWeights {
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: BTreeMap<String, String>,
}

impl ExportedWeights {
    pub fn save(&self, path: &std::path::Path) -> Result<(), TrainError> {
        super::io::save(path, &self.tensors, &self.metadata)
    }
}

/// A personalization method.
pub trait TrainingMethod {
    /// Short name, e.g. `lora`.
    fn kind(&self) -> &'static str;

    /// Creates the trainable parameters (random initialisation derived from `seed`) and
    /// attaches them to the models. Called once, before training.
    fn attach(&mut self, models: ModelsMut<'_>, seed: u64) -> Result<(), TrainError>;

    /// The trainable parameters by stable name, sorted by name. Every one of them must receive a
    /// gradient from the loss; everything else in the models is frozen.
    fn trainable(&self) -> Vec<(String, Var)>;

    /// Whether the text encoder must run with gradients (its output depends on trainable
    /// parameters). When false, prompt embeddings are computed once and cached.
    fn trains_text_encoder(&self) -> bool;

    /// Method settings recorded in checkpoints so that a resume with other settings is refused.
    fn settings_json(&self) -> serde_json::Value;

    /// Called after every optimizer update (e.g. to restore parameters that must not move).
    fn after_step(&self) -> Result<(), TrainError> {
        Ok(())
    }

    /// The weights for inference, in the method's file format.
    fn export(&self, info: &ExportInfo) -> Result<ExportedWeights, TrainError>;

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

/// Initialisation of the LoRA down matrix (the up matrix starts at zero, so training starts
/// from the base model exactly).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraInit {
    /// `N(0, (1/rank)^2)`, peft's `init_lora_weights="gaussian"` used by diffusers'
    /// `train_dreambooth_lora.py`.
    #[default]
    Gaussian,
    /// `U(-1/sqrt(in), 1/sqrt(in))`, peft's default (`kaiming_uniform_(a=sqrt(5))`).
    KaimingUniform,
}

/// LoRA settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    /// Scale is `alpha / rank`; diffusers' DreamBooth LoRA script uses `alpha = rank`.
    pub alpha: f64,
    /// UNet module-name suffixes that get adapters.
    pub unet_targets: Vec<String>,
    /// Also adapt the text encoder.
    pub train_text_encoder: bool,
    /// Text-encoder module-name suffixes that get adapters.
    pub text_encoder_targets: Vec<String>,
    pub init: LoraInit,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 4,
            alpha: 4.0,
            unet_targets: ["to_q", "to_k", "to_v", "to_out.0"]
                .map(String::from)
                .to_vec(),
            train_text_encoder: false,
            text_encoder_targets: ["q_proj", "k_proj", "v_proj", "out_proj"]
                .map(String::from)
                .to_vec(),
            init: LoraInit::Gaussian,
        }
    }
}

impl LoraConfig {
    pub fn with_rank(rank: usize) -> Self {
        Self {
            rank,
            alpha: rank as f64,
            ..Self::default()
        }
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

struct LoraSlot {
    /// `unet.<path>` or `text_encoder.<path>`.
    module: String,
    down: Var,
    up: Var,
}

/// DreamBooth with LoRA: low-rank adapters on the attention projections.
pub struct LoraMethod {
    cfg: LoraConfig,
    slots: Vec<LoraSlot>,
}

fn matches_target(name: &str, targets: &[String]) -> bool {
    targets
        .iter()
        .any(|t| name == t || name.ends_with(&format!(".{t}")))
}

impl LoraMethod {
    pub fn new(cfg: LoraConfig) -> Result<Self, TrainError> {
        if cfg.rank == 0 {
            return Err(TrainError::Config("LoRA rank must be at least 1".into()));
        }
        if !(cfg.alpha > 0.0) {
            return Err(TrainError::Config("LoRA alpha must be positive".into()));
        }
        Ok(Self {
            cfg,
            slots: Vec::new(),
        })
    }

    pub fn config(&self) -> &LoraConfig {
        &self.cfg
    }

    /// Module paths (with component prefix) that carry an adapter.
    pub fn modules(&self) -> Vec<&str> {
        self.slots.iter().map(|s| s.module.as_str()).collect()
    }

    fn init_down(
        &self,
        rng: &mut rand::rngs::StdRng,
        rank: usize,
        in_f: usize,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        match self.cfg.init {
            LoraInit::Gaussian => rng::randn(rng, &[rank, in_f], dev)? * (1.0 / rank as f64),
            LoraInit::KaimingUniform => {
                let bound = 1.0 / (in_f as f64).sqrt();
                let v: Vec<f32> = (0..rank * in_f)
                    .map(|_| rng.gen_range(-bound..bound) as f32)
                    .collect();
                Tensor::from_vec(v, (rank, in_f), dev)
            }
        }
    }

    fn attach_to(
        &mut self,
        component: &str,
        linears: Vec<&mut Linear>,
        targets: &[String],
        seed: u64,
    ) -> Result<usize, TrainError> {
        let mut n = 0;
        for lin in linears {
            if !matches_target(&lin.name, targets) {
                continue;
            }
            if lin.lora.is_some() {
                return Err(TrainError::Config(format!(
                    "{} already has an adapter",
                    lin.name
                )));
            }
            let module = lora_names::module_path(component, &lin.name);
            let ordinal = self.slots.len() as u64;
            let mut r = rng::rng_for(seed, Stream::Init, ordinal);
            let dev = lin.weight.device().clone();
            let down = Var::from_tensor(&self.init_down(
                &mut r,
                self.cfg.rank,
                lin.in_features(),
                &dev,
            )?)?;
            let up = Var::zeros((lin.out_features(), self.cfg.rank), DType::F32, &dev)?;
            lin.set_lora(LoraAdapter {
                down: down.as_tensor().clone(),
                up: up.as_tensor().clone(),
                scale: self.cfg.scale(),
            });
            self.slots.push(LoraSlot { module, down, up });
            n += 1;
        }
        Ok(n)
    }
}

impl TrainingMethod for LoraMethod {
    fn kind(&self) -> &'static str {
        "lora"
    }

    fn attach(&mut self, models: ModelsMut<'_>, seed: u64) -> Result<(), TrainError> {
        if !self.slots.is_empty() {
            return Err(TrainError::Config(
                "LoRA adapters are already attached".into(),
            ));
        }
        let targets = self.cfg.unet_targets.clone();
        let n = self.attach_to(UNET_PREFIX, models.unet.linears(), &targets, seed)?;
        if n == 0 {
            return Err(TrainError::Config(format!(
                "no UNet module matches LoRA targets {targets:?}"
            )));
        }
        if self.cfg.train_text_encoder {
            let targets = self.cfg.text_encoder_targets.clone();
            let n = self.attach_to(
                TEXT_ENCODER_PREFIX,
                models.text_encoder.linears(),
                &targets,
                seed,
            )?;
            if n == 0 {
                return Err(TrainError::Config(format!(
                    "no text-encoder module matches LoRA targets {targets:?}"
                )));
            }
        }
        Ok(())
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        let mut out: Vec<(String, Var)> = self
            .slots
            .iter()
            .flat_map(|s| {
                [
                    (
                        lora_names::key_for(&s.module, LoraPart::Down),
                        s.down.clone(),
                    ),
                    (lora_names::key_for(&s.module, LoraPart::Up), s.up.clone()),
                ]
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn trains_text_encoder(&self) -> bool {
        self.cfg.train_text_encoder
    }

    fn settings_json(&self) -> serde_json::Value {
        serde_json::json!({ "method": "lora", "lora": self.cfg })
    }

    /// diffusers/peft layout. The scale `alpha / rank` is folded into `lora_B`, so every loader
    /// that assumes the default `alpha = rank` (diffusers' `load_lora_weights`, peft, ComfyUI,
    /// A1111) applies the trained update exactly; the metadata records `lora_alpha = rank`
    /// accordingly and the training alpha separately.
    fn export(&self, info: &ExportInfo) -> Result<ExportedWeights, TrainError> {
        if self.slots.is_empty() {
            return Err(TrainError::Config("no LoRA adapters attached".into()));
        }
        let scale = self.cfg.scale();
        let mut tensors = BTreeMap::new();
        for s in &self.slots {
            tensors.insert(
                lora_names::key_for(&s.module, LoraPart::Down),
                s.down.as_tensor().copy()?,
            );
            tensors.insert(
                lora_names::key_for(&s.module, LoraPart::Up),
                (s.up.as_tensor() * scale)?,
            );
        }
        let mut metadata = export_metadata(info);
        metadata.insert("format".into(), "pt".into());
        metadata.insert("sidbooth.method".into(), "lora".into());
        metadata.insert("sidbooth.rank".into(), self.cfg.rank.to_string());
        metadata.insert("sidbooth.lora_alpha".into(), self.cfg.rank.to_string());
        metadata.insert("sidbooth.train_alpha".into(), self.cfg.alpha.to_string());
        metadata.insert("sidbooth.scale_folded_into_lora_B".into(), "true".into());
        metadata.insert(
            "sidbooth.unet_targets".into(),
            self.cfg.unet_targets.join(","),
        );
        if self.cfg.train_text_encoder {
            metadata.insert(
                "sidbooth.text_encoder_targets".into(),
                self.cfg.text_encoder_targets.join(","),
            );
        }
        Ok(ExportedWeights { tensors, metadata })
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

/// Converts a peft-layout LoRA export to the kohya / A1111 layout
/// (`lora_unet_<path with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`).
pub fn to_kohya(weights: &ExportedWeights) -> Result<ExportedWeights, TrainError> {
    let mut tensors = BTreeMap::new();
    for (key, t) in &weights.tensors {
        let Some((module, part)) = lora_names::parse_key(key) else {
            continue;
        };
        let (prefix, rest) = if let Some(r) = module.strip_prefix("unet.") {
            ("lora_unet", r)
        } else if let Some(r) = module.strip_prefix("text_encoder.text_model.") {
            ("lora_te", r)
        } else if let Some(r) = module.strip_prefix("text_encoder.") {
            ("lora_te", r)
        } else {
            return Err(TrainError::Format(format!(
                "unexpected LoRA module {module}"
            )));
        };
        let base = format!("{prefix}_{}", rest.replace('.', "_"));
        match part {
            LoraPart::Down => {
                let rank = t.dims()[0];
                tensors.insert(
                    format!("{base}.alpha"),
                    Tensor::new(rank as f32, t.device())?,
                );
                tensors.insert(format!("{base}.lora_down.weight"), t.clone());
            }
            LoraPart::Up => {
                tensors.insert(format!("{base}.lora_up.weight"), t.clone());
            }
        }
    }
    let mut metadata = weights.metadata.clone();
    metadata.insert("ss_network_module".into(), "networks.lora".into());
    if let Some(r) = weights.metadata.get("sidbooth.rank") {
        metadata.insert("ss_network_dim".into(), r.clone());
        metadata.insert("ss_network_alpha".into(), r.clone());
    }
    Ok(ExportedWeights { tensors, metadata })
}

/// Textual Inversion settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TextualInversionConfig {
    /// The placeholder word whose token embeddings are learned (e.g. `sks`); it must already be
    /// in the tokenizer's vocabulary.
    pub token: String,
    /// A word whose (mean) token embedding initialises the placeholder, e.g. the class `dog`;
    /// `None` keeps the placeholder's own embedding.
    pub initializer: Option<String>,
}

/// Textual Inversion: only the embedding rows of the placeholder tokens learn.
///
/// As diffusers' `textual_inversion.py`, the whole embedding matrix is the optimizer's
/// parameter and every other row is restored after each update ([`TrainingMethod::after_step`]),
/// so weight decay and Adam cannot move them.
pub struct TextualInversionMethod {
    cfg: TextualInversionConfig,
    ids: Vec<u32>,
    embedding: Option<Var>,
    original: Option<Tensor>,
    /// `[vocab, 1]`, 1 on placeholder rows.
    mask: Option<Tensor>,
}

/// Name of the trainable embedding matrix (transformers' parameter name).
pub const TOKEN_EMBEDDING: &str = "text_encoder.text_model.embeddings.token_embedding.weight";

impl TextualInversionMethod {
    pub fn new(cfg: TextualInversionConfig) -> Result<Self, TrainError> {
        if cfg.token.trim().is_empty() {
            return Err(TrainError::Config(
                "textual inversion needs a placeholder token".into(),
            ));
        }
        Ok(Self {
            cfg,
            ids: Vec::new(),
            embedding: None,
            original: None,
            mask: None,
        })
    }

    /// Token ids of the placeholder.
    pub fn token_ids(&self) -> &[u32] {
        &self.ids
    }

    /// The learned rows `[n, hidden]`.
    pub fn learned(&self) -> Result<Tensor, TrainError> {
        let e = self
            .embedding
            .as_ref()
            .ok_or_else(|| TrainError::Config("not attached".into()))?;
        let ids = Tensor::new(self.ids.as_slice(), e.device())?;
        Ok(e.as_tensor().index_select(&ids, 0)?)
    }
}

impl TrainingMethod for TextualInversionMethod {
    fn kind(&self) -> &'static str {
        "textual_inversion"
    }

    fn attach(&mut self, models: ModelsMut<'_>, _seed: u64) -> Result<(), TrainError> {
        if self.embedding.is_some() {
            return Err(TrainError::Config(
                "textual inversion is already attached".into(),
            ));
        }
        let text = models.text_encoder;
        let ids = text.token_ids(&self.cfg.token)?;
        if ids.is_empty() {
            return Err(TrainError::Config(format!(
                "placeholder {:?} has no tokens",
                self.cfg.token
            )));
        }
        let init_ids = match &self.cfg.initializer {
            Some(w) => {
                let v = text.token_ids(w)?;
                if v.is_empty() {
                    return Err(TrainError::Config(format!(
                        "initializer {w:?} has no tokens"
                    )));
                }
                Some(v)
            }
            None => None,
        };
        let emb = text.token_embedding_mut().ok_or_else(|| {
            TrainError::Config("the text encoder exposes no token embedding".into())
        })?;
        let original = emb.detach();
        if original.dtype() != DType::F32 {
            // The model reads the variable itself; a cast copy would not follow its updates.
            return Err(TrainError::Config(
                "textual inversion needs an f32 text encoder".into(),
            ));
        }
        let (vocab, _hidden) = original.dims2()?;
        let dev = original.device().clone();
        let mut m = vec![0f32; vocab];
        for &i in &ids {
            m[i as usize] = 1.0;
        }
        let mask = Tensor::from_vec(m, (vocab, 1), &dev)?;
        let start = match init_ids {
            Some(init) => {
                let init_row = original
                    .index_select(&Tensor::new(init.as_slice(), &dev)?, 0)?
                    .mean_keepdim(0)?;
                (original.broadcast_mul(&mask.affine(-1.0, 1.0)?)?
                    + init_row.broadcast_mul(&mask)?)?
            }
            None => original.copy()?,
        };
        let var = Var::from_tensor(&start)?;
        *emb = var.as_tensor().clone();
        self.ids = ids;
        self.mask = Some(mask);
        self.original = Some(original);
        self.embedding = Some(var);
        Ok(())
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        self.embedding
            .iter()
            .map(|v| (TOKEN_EMBEDDING.to_string(), v.clone()))
            .collect()
    }

    fn trains_text_encoder(&self) -> bool {
        true
    }

    fn settings_json(&self) -> serde_json::Value {
        serde_json::json!({ "method": "textual_inversion", "textual_inversion": self.cfg })
    }

    fn after_step(&self) -> Result<(), TrainError> {
        let (Some(var), Some(orig), Some(mask)) = (&self.embedding, &self.original, &self.mask)
        else {
            return Ok(());
        };
        let keep = mask.affine(-1.0, 1.0)?;
        let restored = (var.as_tensor().broadcast_mul(mask)? + orig.broadcast_mul(&keep)?)?;
        var.set(&restored)?;
        Ok(())
    }

    /// diffusers' `learned_embeds.safetensors` layout: one tensor `[n, hidden]` named by the
    /// placeholder, read by `load_textual_inversion`.
    fn export(&self, info: &ExportInfo) -> Result<ExportedWeights, TrainError> {
        let mut tensors = BTreeMap::new();
        tensors.insert(self.cfg.token.clone(), self.learned()?);
        let mut metadata = export_metadata(info);
        metadata.insert("format".into(), "pt".into());
        metadata.insert("sidbooth.method".into(), "textual_inversion".into());
        Ok(ExportedWeights { tensors, metadata })
    }
}
