//! Configurations of a diffusers-layout Stable Diffusion directory.
//!
//! ```text
//! model_index.json
//! unet/config.json            unet/diffusion_pytorch_model[.fp16].safetensors
//! text_encoder/config.json    text_encoder/model[.fp16].safetensors
//! vae/config.json             vae/diffusion_pytorch_model[.fp16].safetensors
//! scheduler/scheduler_config.json
//! tokenizer/tokenizer.json | tokenizer/vocab.json + tokenizer/merges.txt (+ tokenizer_config.json)
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `attention_head_dim` / `num_attention_heads` may be one number or one per block.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    pub fn get(&self, i: usize, n_blocks: usize) -> usize {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => {
                if v.len() == n_blocks {
                    v[i]
                } else {
                    v[i.min(v.len() - 1)]
                }
            }
        }
    }
}

fn d_true() -> bool {
    true
}
fn d_silu() -> String {
    "silu".into()
}
fn d_one_f() -> f64 {
    1.0
}
fn d_one() -> usize {
    1
}
fn d_groups() -> usize {
    32
}
fn d_eps5() -> f64 {
    1e-5
}
fn d_four() -> usize {
    4
}
fn d_two() -> usize {
    2
}

/// `unet/config.json` of `UNet2DConditionModel` (the fields Stable Diffusion 1.x/2.x use).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "d_four")]
    pub in_channels: usize,
    #[serde(default = "d_four")]
    pub out_channels: usize,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub mid_block_type: Option<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_two")]
    pub layers_per_block: usize,
    #[serde(default = "d_one")]
    pub downsample_padding: usize,
    #[serde(default = "d_one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_eps5")]
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    /// In diffusers this field is (for historical reasons) the number of heads per block.
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub only_cross_attention: bool,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub transformer_layers_per_block: Option<PerBlock>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
}

impl UNetConfig {
    /// Number of attention heads of down block `i` (diffusers: `num_attention_heads or attention_head_dim`).
    pub fn heads(&self, i: usize) -> usize {
        let n = self.block_out_channels.len();
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .get(i, n)
    }

    pub fn transformer_layers(&self, i: usize) -> usize {
        self.transformer_layers_per_block
            .as_ref()
            .map(|p| p.get(i, self.block_out_channels.len()))
            .unwrap_or(1)
    }

    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::Config(
                "unet: block type lists must match block_out_channels".into(),
            ));
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return Err(Error::Config(format!("unet: unsupported down block {t}")));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return Err(Error::Config(format!("unet: unsupported up block {t}")));
            }
        }
        if let Some(m) = &self.mid_block_type {
            if m != "UNetMidBlock2DCrossAttn" {
                return Err(Error::Config(format!("unet: unsupported mid block {m}")));
            }
        }
        if self.act_fn != "silu" {
            return Err(Error::Config(format!(
                "unet: unsupported act_fn {}",
                self.act_fn
            )));
        }
        if self.class_embed_type.is_some()
            || self.addition_embed_type.is_some()
            || self.dual_cross_attention
        {
            return Err(Error::Config(
                "unet: class/addition embeddings and dual cross attention are not supported".into(),
            ));
        }
        for (i, c) in self.block_out_channels.iter().enumerate() {
            if c % self.norm_num_groups != 0 {
                return Err(Error::Config(format!(
                    "unet: channels {c} not divisible by norm_num_groups"
                )));
            }
            if c % self.heads(i) != 0 {
                return Err(Error::Config(format!(
                    "unet: channels {c} not divisible by heads {}",
                    self.heads(i)
                )));
            }
        }
        Ok(())
    }
}

fn d_quick_gelu() -> String {
    "quick_gelu".into()
}
fn d_77() -> usize {
    77
}
fn d_pad() -> u32 {
    1
}
fn d_eos() -> u32 {
    2
}

/// `text_encoder/config.json` of transformers' `CLIPTextModel`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "d_77")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "d_eps5")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_pad")]
    pub pad_token_id: u32,
    #[serde(default)]
    pub bos_token_id: u32,
    #[serde(default = "d_eos")]
    pub eos_token_id: u32,
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

impl ClipTextConfig {
    pub fn validate(&self) -> Result<()> {
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(Error::Config(
                "text_encoder: hidden_size not divisible by heads".into(),
            ));
        }
        crate::nn::Activation::parse(&self.hidden_act).map_err(Error::Config)?;
        Ok(())
    }
}

fn d_scaling() -> f64 {
    0.18215
}
fn d_three() -> usize {
    3
}
fn d_one_l() -> usize {
    1
}

/// `vae/config.json` of `AutoencoderKL`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "d_three")]
    pub in_channels: usize,
    #[serde(default = "d_three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_one_l")]
    pub layers_per_block: usize,
    #[serde(default = "d_four")]
    pub latent_channels: usize,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
}

fn d_1000() -> usize {
    1000
}
fn d_bs() -> f64 {
    0.0001
}
fn d_be() -> f64 {
    0.02
}
fn d_linear() -> String {
    "linear".into()
}
fn d_eps_pred() -> String {
    "epsilon".into()
}
fn d_leading() -> String {
    "leading".into()
}

/// `scheduler/scheduler_config.json` (any diffusers scheduler class; DDIM reads these fields).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default, rename = "_class_name")]
    pub class_name: Option<String>,
    #[serde(default = "d_1000")]
    pub num_train_timesteps: usize,
    #[serde(default = "d_bs")]
    pub beta_start: f64,
    #[serde(default = "d_be")]
    pub beta_end: f64,
    #[serde(default = "d_linear")]
    pub beta_schedule: String,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default)]
    pub clip_sample: bool,
    #[serde(default = "d_one_f")]
    pub clip_sample_range: f64,
    #[serde(default = "d_true")]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "d_eps_pred")]
    pub prediction_type: String,
    #[serde(default = "d_leading")]
    pub timestep_spacing: String,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

/// `model_index.json`: component name -> [library, class].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelIndex {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    #[serde(flatten)]
    pub components: std::collections::BTreeMap<String, serde_json::Value>,
}

/// Which weight file variant to prefer when loading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Variant {
    /// `*.safetensors`, falling back to `*.fp16.safetensors`.
    #[default]
    Full,
    /// `*.fp16.safetensors`, falling back to `*.safetensors`.
    Fp16,
}

/// A parsed diffusers model directory (configs only; weights are opened by the loaders).
#[derive(Clone, Debug)]
pub struct ModelDir {
    pub root: PathBuf,
    pub index: ModelIndex,
    pub unet: UNetConfig,
    pub text_encoder: ClipTextConfig,
    pub vae: VaeConfig,
    pub scheduler: SchedulerConfig,
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(p: &Path) -> Result<T> {
    let s = std::fs::read_to_string(p).map_err(|e| Error::Io(format!("{}: {e}", p.display())))?;
    serde_json::from_str(&s).map_err(|e| Error::Config(format!("{}: {e}", p.display())))
}

impl ModelDir {
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let index: ModelIndex = read_json(&root.join("model_index.json"))?;
        let unet: UNetConfig = read_json(&root.join("unet/config.json"))?;
        unet.validate()?;
        let text_encoder: ClipTextConfig = read_json(&root.join("text_encoder/config.json"))?;
        text_encoder.validate()?;
        let vae: VaeConfig = read_json(&root.join("vae/config.json"))?;
        let scheduler: SchedulerConfig = read_json(&root.join("scheduler/scheduler_config.json"))?;
        Ok(Self {
            root,
            index,
            unet,
            text_encoder,
            vae,
            scheduler,
        })
    }

    /// The weight file of a component (`unet`, `vae`, `text_encoder`).
    pub fn weights_path(&self, component: &str, variant: Variant) -> Result<PathBuf> {
        let stem = if component == "text_encoder" {
            "model"
        } else {
            "diffusion_pytorch_model"
        };
        let dir = self.root.join(component);
        let full = dir.join(format!("{stem}.safetensors"));
        let half = dir.join(format!("{stem}.fp16.safetensors"));
        let order = match variant {
            Variant::Full => [full, half],
            Variant::Fp16 => [half, full],
        };
        order
            .iter()
            .find(|p| p.exists())
            .cloned()
            .ok_or_else(|| Error::Io(format!("no safetensors weights in {}", dir.display())))
    }

    pub fn tokenizer_dir(&self) -> PathBuf {
        self.root.join("tokenizer")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(p: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/configs")
            .join(p)
    }

    #[test]
    fn sd21_base_configs_parse() {
        let u: UNetConfig = read_json(&fixture("sd21-base/unet/config.json")).unwrap();
        u.validate().unwrap();
        assert!(u.use_linear_projection);
        assert_eq!(
            (0..4).map(|i| u.heads(i)).collect::<Vec<_>>(),
            vec![5, 10, 20, 20]
        );
        assert_eq!(u.block_out_channels[0] / u.heads(0), 64);
        assert_eq!(u.cross_attention_dim, 1024);
        let t: ClipTextConfig = read_json(&fixture("sd21-base/text_encoder/config.json")).unwrap();
        t.validate().unwrap();
        assert_eq!(t.num_hidden_layers, 23);
        assert_eq!(t.hidden_act, "gelu");
        assert_eq!(t.hidden_size, 1024);
        let s: SchedulerConfig =
            read_json(&fixture("sd21-base/scheduler/scheduler_config.json")).unwrap();
        assert_eq!(s.beta_schedule, "scaled_linear");
        assert_eq!(s.steps_offset, 1);
        assert!(!s.set_alpha_to_one);
        assert_eq!(s.timestep_spacing, "leading");
        let v: VaeConfig = read_json(&fixture("sd21-base/vae/config.json")).unwrap();
        assert_eq!(v.scaling_factor, 0.18215);
        let m = ModelDir::open(fixture("sd21-base"));
        // configs only, no weights: open still succeeds, weights lookup fails cleanly
        let m = m.unwrap();
        assert!(m.weights_path("unet", Variant::Full).is_err());
        assert_eq!(m.index.class_name, "StableDiffusionPipeline");
    }

    #[test]
    fn sd15_configs_parse() {
        let m = ModelDir::open(fixture("sd15")).unwrap();
        assert!(!m.unet.use_linear_projection);
        assert_eq!(m.unet.heads(0), 8);
        assert_eq!(m.unet.heads(3), 8);
        assert_eq!(m.unet.cross_attention_dim, 768);
        assert_eq!(m.text_encoder.hidden_act, "quick_gelu");
        assert_eq!(m.text_encoder.num_hidden_layers, 12);
        assert_eq!(m.scheduler.prediction_type, "epsilon");
    }
}
