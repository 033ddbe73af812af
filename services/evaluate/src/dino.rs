//! DINO image embeddings: transformers' `ViTModel` (layout of `facebook/dino-vits16`:
//! `config.json`, `model.safetensors`, `preprocessor_config.json`), the class token of
//! `last_hidden_state` (after the final `layernorm`), L2-normalised, as DreamBooth's DINO score
//! uses it. The pooler is not used and its weights are not read.
//!
//! Tensor names are those of the hub checkpoints (`embeddings.cls_token`,
//! `encoder.layer.{i}.attention.attention.query`, `...attention.output.dense`,
//! `...intermediate.dense`, `...output.dense`, `layernorm_before` / `layernorm_after`,
//! `layernorm`), with or without the `vit.` prefix a `ViTFor...` head model adds.

// `usize::is_multiple_of` is newer than the workspace's rust-version.
#![allow(clippy::manual_is_multiple_of)]

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sidbooth_engine::kernels::on_compute_threads;
use sidbooth_engine::nn::{Activation, LayerNorm, Linear};
use sidbooth_engine::weights::{self, NamedWeights};

use crate::error::{EvalError, Result};
use crate::preprocess::ImageProcessor;
use crate::vision::{
    existing, l2_normalize, read_json, rows, EncoderLayer, LayerWeights, PatchEmbedding,
    VisionTrunk,
};

/// `image_size` / `patch_size`: an int or `[height, width]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Size2 {
    Square(usize),
    Pair([usize; 2]),
}

impl Size2 {
    /// `(height, width)`.
    pub fn hw(self) -> (usize, usize) {
        match self {
            Size2::Square(s) => (s, s),
            Size2::Pair([h, w]) => (h, w),
        }
    }
}

fn d_768() -> usize {
    768
}
fn d_3072() -> usize {
    3072
}
fn d_12() -> usize {
    12
}
fn d_3() -> usize {
    3
}
fn d_gelu() -> String {
    "gelu".into()
}
fn d_eps() -> f64 {
    1e-12
}
fn d_224() -> Size2 {
    Size2::Square(224)
}
fn d_16() -> Size2 {
    Size2::Square(16)
}
fn d_true() -> bool {
    true
}

/// `ViTConfig` with transformers' defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    #[serde(default = "d_768")]
    pub hidden_size: usize,
    #[serde(default = "d_12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_12")]
    pub num_attention_heads: usize,
    #[serde(default = "d_3072")]
    pub intermediate_size: usize,
    #[serde(default = "d_gelu")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_224")]
    pub image_size: Size2,
    #[serde(default = "d_16")]
    pub patch_size: Size2,
    #[serde(default = "d_3")]
    pub num_channels: usize,
    #[serde(default = "d_true")]
    pub qkv_bias: bool,
}

impl VitConfig {
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let c: VitConfig = serde_json::from_value(v.clone())
            .map_err(|e| EvalError::config(path, e.to_string()))?;
        Activation::parse(&c.hidden_act).map_err(|e| EvalError::config(path, e))?;
        if c.num_attention_heads == 0 || c.hidden_size % c.num_attention_heads != 0 {
            return Err(EvalError::config(
                path,
                "hidden_size is not a multiple of num_attention_heads",
            ));
        }
        let ((h, w), (ph, pw)) = (c.image_size.hw(), c.patch_size.hw());
        if ph == 0 || pw == 0 || h % ph != 0 || w % pw != 0 {
            return Err(EvalError::config(
                path,
                "image_size is not a multiple of patch_size",
            ));
        }
        Ok(c)
    }

    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("a plain struct");
        v["architectures"] = serde_json::json!(["ViTModel"]);
        v["model_type"] = "vit".into();
        v
    }
}

/// The DINO ViT.
pub struct DinoModel {
    config: VitConfig,
    processor: ImageProcessor,
    trunk: VisionTrunk,
    layernorm: LayerNorm,
    device: Device,
}

impl DinoModel {
    /// Loads a ViTModel directory onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config = VitConfig::from_json(&read_json(&config_path)?, &config_path)?;
        let processor =
            ImageProcessor::from_file(&existing(dir.join("preprocessor_config.json"))?)?;
        let weights_path = existing(dir.join("model.safetensors"))?;
        let (vb, _) = weights::from_safetensors(&weights_path, DType::F32, device)
            .map_err(|e| EvalError::loading(&weights_path, e))?;
        let vb = if vb.contains_tensor("vit.embeddings.cls_token") {
            vb.pp("vit")
        } else {
            vb
        };
        Self::build(vb, config, processor, device).map_err(|e| EvalError::loading(&weights_path, e))
    }

    fn build(
        vb: VarBuilder,
        config: VitConfig,
        processor: ImageProcessor,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let c = &config;
        let (hidden, inter, eps) = (c.hidden_size, c.intermediate_size, c.layer_norm_eps);
        let act = Activation::parse(&c.hidden_act).map_err(candle_core::Error::msg)?;
        let emb = vb.pp("embeddings");
        let proj = emb.pp("patch_embeddings.projection");
        let (ph, pw) = c.patch_size.hw();
        let kernel = proj.get((hidden, c.num_channels, ph, pw), "weight")?;
        let patches =
            PatchEmbedding::new(&kernel, Some(proj.get(hidden, "bias")?), c.image_size.hw())?;
        let class_token = emb.get((1, 1, hidden), "cls_token")?.reshape(hidden)?;
        let positions = emb
            .get(
                (1, patches.num_patches() + 1, hidden),
                "position_embeddings",
            )?
            .squeeze(0)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("encoder.layer.{i}"));
                let a = l.pp("attention");
                let qkv = |name: &str| {
                    Linear::load(a.pp("attention").pp(name), hidden, hidden, c.qkv_bias)
                };
                let w = LayerWeights {
                    q: qkv("query")?,
                    k: qkv("key")?,
                    v: qkv("value")?,
                    out: Linear::load(a.pp("output.dense"), hidden, hidden, true)?,
                    norm1: LayerNorm::load(l.pp("layernorm_before"), hidden, eps)?,
                    fc1: Linear::load(l.pp("intermediate.dense"), hidden, inter, true)?,
                    fc2: Linear::load(l.pp("output.dense"), inter, hidden, true)?,
                    norm2: LayerNorm::load(l.pp("layernorm_after"), hidden, eps)?,
                };
                EncoderLayer::new(w, c.num_attention_heads, act)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let layernorm = LayerNorm::load(vb.pp("layernorm"), hidden, eps)?;
        Ok(Self {
            processor,
            trunk: VisionTrunk {
                patches,
                class_token,
                positions,
                pre_norm: None,
                layers,
            },
            layernorm,
            device: device.clone(),
            config,
        })
    }

    pub fn config(&self) -> &VitConfig {
        &self.config
    }

    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }

    /// L2-normalised class-token embeddings, one per image (preprocessing included).
    pub fn image_embeddings(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(self.trunk.batch_size()) {
            let pixels = self.processor.preprocess_batch(chunk, &self.device)?;
            out.extend(rows(&self.features(&pixels)?)?);
        }
        Ok(out)
    }

    /// L2-normalised embeddings of `[N, 3, H, W]` pixel values: `[N, hidden]`.
    pub fn image_embeddings_preprocessed(&self, pixel_values: &Tensor) -> Result<Tensor> {
        Ok(self.trunk.in_batches(pixel_values, |x| self.features(x))?)
    }

    /// The final layer norm is per token, so normalising the class token alone is the class
    /// token of the normalised sequence.
    fn features(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        on_compute_threads(&self.device, || {
            let pixels = pixels.to_device(&self.device)?.to_dtype(DType::F32)?;
            let cls = self
                .layernorm
                .forward(&self.trunk.class_token_output(&pixels)?)?;
            l2_normalize(&cls)
        })
    }

    /// A tiny DINO with seeded random weights (the configuration of `fixtures/tiny-dino`).
    pub fn tiny(seed: u64, device: &Device) -> Result<Self> {
        Self::seeded(&tiny_config_json(), &tiny_preprocessor_json(), seed, device)
    }

    /// Writes the tiny model of `seed` as a loadable directory (config.json, model.safetensors,
    /// preprocessor_config.json).
    pub fn write_tiny_dir(seed: u64, dir: &Path) -> Result<()> {
        Self::write_seeded_dir(&tiny_config_json(), &tiny_preprocessor_json(), seed, dir)
    }

    /// A model of any configuration with seeded random weights (benchmarks at real sizes).
    pub fn seeded(
        config: &Value,
        preprocessor: &Value,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self::seeded_with_weights(config, preprocessor, seed, device)?.0)
    }

    fn seeded_with_weights(
        config: &Value,
        preprocessor: &Value,
        seed: u64,
        device: &Device,
    ) -> Result<(Self, NamedWeights)> {
        let path = Path::new("<seeded dino>");
        let config = VitConfig::from_json(config, path)?;
        let processor = ImageProcessor::from_json(preprocessor, path)?;
        let (vb, record) = weights::seeded(seed, DType::F32, device);
        let model = Self::build(vb, config, processor, device)?;
        Ok((model, record.take()))
    }

    /// Writes [`seeded`](Self::seeded)'s model as a loadable directory.
    pub fn write_seeded_dir(
        config: &Value,
        preprocessor: &Value,
        seed: u64,
        dir: &Path,
    ) -> Result<()> {
        let (model, weights) = Self::seeded_with_weights(config, preprocessor, seed, &Device::Cpu)?;
        std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
        let write = |name: &str, text: String| {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(|e| EvalError::io(&p, e))
        };
        write("config.json", model.config.to_json().to_string())?;
        write(
            "preprocessor_config.json",
            model.processor.to_json().to_string(),
        )?;
        let p = dir.join("model.safetensors");
        weights::save_safetensors(&weights, DType::F32, &p).map_err(|e| EvalError::io(&p, e))
    }
}

/// The tiny ViT's `config.json`.
pub fn tiny_config_json() -> Value {
    serde_json::json!({
        "architectures": ["ViTModel"], "model_type": "vit",
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 37, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
        "image_size": 32, "patch_size": 8, "num_channels": 3, "qkv_bias": true
    })
}

/// DINO's `preprocessor_config.json` at the tiny image size: exact resize, bilinear, ImageNet
/// mean and std.
pub fn tiny_preprocessor_json() -> Value {
    serde_json::json!({
        "image_processor_type": "ViTImageProcessor",
        "do_resize": true, "size": {"height": 32, "width": 32}, "resample": 2,
        "do_rescale": true, "rescale_factor": 1.0 / 255.0, "do_normalize": true,
        "image_mean": crate::preprocess::IMAGENET_MEAN, "image_std": crate::preprocess::IMAGENET_STD
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_ints_and_pairs() {
        let c = VitConfig::from_json(
            &serde_json::json!({"image_size": [64, 32], "patch_size": 16}),
            Path::new("c.json"),
        )
        .unwrap();
        assert_eq!(c.image_size.hw(), (64, 32));
        assert_eq!(c.patch_size.hw(), (16, 16));
        assert_eq!(c.layer_norm_eps, 1e-12);
        assert!(
            VitConfig::from_json(&serde_json::json!({"image_size": 20}), Path::new("c.json"))
                .is_err()
        );
    }

    #[test]
    fn tiny_model_embeds_unit_vectors() {
        let m = DinoModel::tiny(0, &Device::Cpu).unwrap();
        let a = RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8 * 6, y as u8 * 8, 90]));
        let b = RgbImage::from_pixel(40, 30, image::Rgb([10, 200, 30]));
        let e = m.image_embeddings(&[a, b]).unwrap();
        assert_eq!(e[0].len(), 32);
        assert_ne!(e[0], e[1]);
        let norm: f32 = e[1].iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
}
