//! DreamBooth with LoRA: low-rank adapters on the attention projections, exported in
//! diffusers' (peft) layout as `pytorch_lora_weights.safetensors`, optionally kohya's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;

use super::MethodEntry;
use super::{
    export_metadata, ExportContext, ExportInfo, ExportedWeights, ModelsMut, TrainingMethod,
};
use crate::lora::{self as lora_names, LoraPart, TEXT_ENCODER_PREFIX, UNET_PREFIX};
use crate::nn::{Linear, LoraAdapter};
use crate::pipeline::StableDiffusion;
use crate::train::rng::{self, Stream};
use crate::train::TrainError;

/// The file diffusers' `load_lora_weights` looks for in a directory.
pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";
/// The same adapters in kohya's key layout (A1111, ComfyUI), written on request.
pub const KOHYA_FILE: &str = "pytorch_lora_weights_kohya.safetensors";

pub const ENTRY: MethodEntry = MethodEntry {
    kind: "lora",
    marker: LORA_FILE,
    load: load_output,
};

fn load_output(sd: &mut StableDiffusion, dir: &Path, scale: f64) -> crate::Result<()> {
    sd.load_lora(&dir.join(LORA_FILE), scale).map(|_| ())
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

    fn write_output(
        &self,
        ctx: &ExportContext<'_>,
        dir: &Path,
    ) -> Result<Vec<PathBuf>, TrainError> {
        std::fs::create_dir_all(dir)?;
        let weights = self.export(ctx.info)?;
        weights.save(&dir.join(LORA_FILE))?;
        let mut files = vec![PathBuf::from(LORA_FILE)];
        if ctx.options.kohya {
            to_kohya(&weights)?.save(&dir.join(KOHYA_FILE))?;
            files.push(PathBuf::from(KOHYA_FILE));
        }
        Ok(files)
    }
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
