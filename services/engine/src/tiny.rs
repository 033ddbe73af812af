//! A tiny Stable Diffusion (SD 2.x-like: linear projections, per-block heads, gelu text tower)
//! with seeded random weights, for tests, `sidbooth dev` and CPU benchmarks. Its configuration
//! is the one of the parity fixtures (`fixtures/tiny-sd`, written by
//! `scripts/parity/make_fixtures.py`); its tokenizer is the first 3000 entries of the CLIP BPE
//! vocabulary (`fixtures/tiny-tokenizer`, embedded in the library).

use std::path::Path;

use candle_core::{DType, Device};

use crate::clip::ClipTextModel;
use crate::config::{ClipTextConfig, ModelDir, SchedulerConfig, UNetConfig, VaeConfig};
use crate::error::{Error, Result};
use crate::pipeline::StableDiffusion;
use crate::tokenizer::ClipTokenizer;
use crate::unet::UNet2DConditionModel;
use crate::vae::AutoencoderKL;
use crate::weights::{self, NamedWeights};

pub const TINY_VOCAB_JSON: &str = include_str!("../fixtures/tiny-tokenizer/vocab.json");
pub const TINY_MERGES_TXT: &str = include_str!("../fixtures/tiny-tokenizer/merges.txt");

fn unet_json() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "UNet2DConditionModel",
        "sample_size": 16, "in_channels": 4, "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [16, 32, 32], "layers_per_block": 1,
        "attention_head_dim": [2, 4, 4], "cross_attention_dim": 32, "norm_num_groups": 8,
        "norm_eps": 1e-5, "use_linear_projection": true, "flip_sin_to_cos": true, "freq_shift": 0,
        "act_fn": "silu", "downsample_padding": 1, "mid_block_scale_factor": 1
    })
}

fn text_json() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": 3002, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "gelu",
        "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 3000, "eos_token_id": 3001,
        "projection_dim": 32
    })
}

fn vae_json() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": [16, 32], "layers_per_block": 1, "latent_channels": 4,
        "norm_num_groups": 8, "sample_size": 32, "act_fn": "silu", "scaling_factor": 0.18215
    })
}

fn scheduler_json() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": false,
        "set_alpha_to_one": false, "steps_offset": 1, "prediction_type": "epsilon",
        "timestep_spacing": "leading"
    })
}

fn parse<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).expect("built-in tiny config parses")
}

/// The tiny model: a ready pipeline plus the weights it was built from.
pub struct TinyModel {
    pub sd: StableDiffusion,
    pub unet_weights: NamedWeights,
    pub text_encoder_weights: NamedWeights,
    pub vae_weights: NamedWeights,
}

impl TinyModel {
    pub fn unet_config() -> UNetConfig {
        parse(unet_json())
    }
    pub fn text_config() -> ClipTextConfig {
        parse(text_json())
    }
    pub fn vae_config() -> VaeConfig {
        parse(vae_json())
    }
    pub fn scheduler_config() -> SchedulerConfig {
        parse(scheduler_json())
    }
    /// The tiny tokenizer (pads with `!`, like SD 2.x).
    pub fn tokenizer() -> Result<ClipTokenizer> {
        ClipTokenizer::from_vocab_merges(TINY_VOCAB_JSON, TINY_MERGES_TXT, Some("!"))
    }

    /// Builds the tiny model with weights drawn from `seed`, f32 on the CPU.
    pub fn build(seed: u64) -> Result<Self> {
        Self::build_on(seed, &Device::Cpu, DType::F32)
    }

    pub fn build_on(seed: u64, device: &Device, dtype: DType) -> Result<Self> {
        let (sd, vae_weights) = seeded_pipeline(
            &SeededShapes {
                unet: &Self::unet_config(),
                text_encoder: &Self::text_config(),
                vae: &Self::vae_config(),
                scheduler: &Self::scheduler_config(),
            },
            seed,
            device,
            dtype,
        )?;
        Ok(Self {
            unet_weights: sd.unet.named_weights().clone(),
            text_encoder_weights: sd.text_encoder.named_weights().clone(),
            sd,
            vae_weights,
        })
    }

    /// Writes a diffusers-layout directory (fp32 safetensors) that [`StableDiffusion::load`] and
    /// diffusers' `StableDiffusionPipeline.from_pretrained` read.
    pub fn save_diffusers_dir(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let w = |p: &Path, v: &serde_json::Value| -> Result<()> {
            std::fs::write(
                p,
                serde_json::to_string_pretty(v).map_err(|e| Error::Io(e.to_string()))?,
            )?;
            Ok(())
        };
        for sub in ["unet", "text_encoder", "vae", "scheduler", "tokenizer"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        w(
            &dir.join("model_index.json"),
            &serde_json::json!({
                "_class_name": "StableDiffusionPipeline",
                "feature_extractor": [null, null], "safety_checker": [null, null],
                "requires_safety_checker": false,
                "scheduler": ["diffusers", "DDIMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"]
            }),
        )?;
        w(&dir.join("unet/config.json"), &unet_json())?;
        w(&dir.join("text_encoder/config.json"), &text_json())?;
        w(&dir.join("vae/config.json"), &vae_json())?;
        w(
            &dir.join("scheduler/scheduler_config.json"),
            &scheduler_json(),
        )?;
        std::fs::write(dir.join("tokenizer/vocab.json"), TINY_VOCAB_JSON)?;
        std::fs::write(dir.join("tokenizer/merges.txt"), TINY_MERGES_TXT)?;
        w(
            &dir.join("tokenizer/tokenizer_config.json"),
            &serde_json::json!({"tokenizer_class": "CLIPTokenizer", "pad_token": "!", "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "model_max_length": 77, "do_lower_case": true}),
        )?;
        weights::save_safetensors(
            &self.unet_weights,
            DType::F32,
            &dir.join("unet/diffusion_pytorch_model.safetensors"),
        )?;
        weights::save_safetensors(
            &self.text_encoder_weights,
            DType::F32,
            &dir.join("text_encoder/model.safetensors"),
        )?;
        weights::save_safetensors(
            &self.vae_weights,
            DType::F32,
            &dir.join("vae/diffusion_pytorch_model.safetensors"),
        )?;
        Ok(())
    }
}

/// The configurations a [`seeded_pipeline`] is built to.
pub struct SeededShapes<'a> {
    pub unet: &'a UNetConfig,
    pub text_encoder: &'a ClipTextConfig,
    pub vae: &'a VaeConfig,
    pub scheduler: &'a SchedulerConfig,
}

impl<'a> From<&'a ModelDir> for SeededShapes<'a> {
    fn from(md: &'a ModelDir) -> Self {
        Self {
            unet: &md.unet,
            text_encoder: &md.text_encoder,
            vae: &md.vae,
            scheduler: &md.scheduler,
        }
    }
}

/// A pipeline of `shapes` with weights drawn from `seed` (text encoder), `seed + 1` (UNet) and
/// `seed + 2` (VAE) and the tiny tokenizer: the tiny model, or a real model's size without its
/// files (the benchmarks). The UNet's and text encoder's weights are named as loaded ones are,
/// so every method trains on it; the VAE's are returned.
pub fn seeded_pipeline(
    shapes: &SeededShapes<'_>,
    seed: u64,
    device: &Device,
    dtype: DType,
) -> Result<(StableDiffusion, NamedWeights)> {
    let (vb, rec) = weights::seeded(seed, dtype, device);
    let mut text_encoder = ClipTextModel::new(vb, shapes.text_encoder)?;
    text_encoder.set_named_weights(rec.take());
    let (vb, rec) = weights::seeded(seed.wrapping_add(1), dtype, device);
    let mut unet = UNet2DConditionModel::new(vb, shapes.unet)?;
    unet.set_named_weights(rec.take());
    let (vb, rec) = weights::seeded(seed.wrapping_add(2), dtype, device);
    let vae = AutoencoderKL::new(vb, shapes.vae)?;
    let sd = StableDiffusion {
        tokenizer: TinyModel::tokenizer()?,
        text_encoder,
        unet,
        vae,
        scheduler_config: shapes.scheduler.clone(),
        device: device.clone(),
        dtype,
    };
    Ok((sd, rec.take()))
}
