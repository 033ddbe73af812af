//! transformers' `CLIPModel`: the image and text towers with their projections, for image and
//! text embeddings (`get_image_features` / `get_text_features`, L2-normalised).
//!
//! A model directory is laid out as `openai/clip-vit-base-patch32`: `config.json`,
//! `model.safetensors`, `tokenizer.json` (or `vocab.json` + `merges.txt`) and
//! `preprocessor_config.json`. Every size comes from `config.json`; a key it lacks takes
//! transformers' default (`CLIPTextConfig`, `CLIPVisionConfig`). Nothing is ever filled with
//! random weights: a missing file or tensor is an error naming it.

// `usize::is_multiple_of` is newer than the workspace's rust-version.
#![allow(clippy::manual_is_multiple_of)]

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sidbooth_engine::config::ClipTextConfig;
use sidbooth_engine::kernels::on_compute_threads;
use sidbooth_engine::nn::{Activation, LayerNorm, Linear};
use sidbooth_engine::tiny::{TINY_MERGES_TXT, TINY_VOCAB_JSON};
use sidbooth_engine::tokenizer::ClipTokenizer;
use sidbooth_engine::weights::{self, NamedWeights};

use crate::error::{EvalError, Result};
use crate::preprocess::ImageProcessor;
use crate::vision::{
    existing, l2_normalize, read_json, rows, EncoderLayer, LayerWeights, PatchEmbedding,
    VisionTrunk,
};

/// Prompts per forward pass of the text tower.
const TEXT_BATCH: usize = 64;

fn d_text_vocab() -> usize {
    49408
}
fn d_512() -> usize {
    512
}
fn d_2048() -> usize {
    2048
}
fn d_12() -> usize {
    12
}
fn d_8() -> usize {
    8
}
fn d_77() -> usize {
    77
}
fn d_quick_gelu() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}
fn d_pad() -> u32 {
    1
}
fn d_bos() -> u32 {
    49406
}
fn d_eos() -> u32 {
    49407
}
fn d_768() -> usize {
    768
}
fn d_3072() -> usize {
    3072
}
fn d_3() -> usize {
    3
}
fn d_224() -> usize {
    224
}
fn d_32() -> usize {
    32
}

/// `text_config` with `CLIPTextConfig`'s defaults.
#[derive(Clone, Debug, Deserialize)]
struct TextJson {
    #[serde(default = "d_text_vocab")]
    vocab_size: usize,
    #[serde(default = "d_512")]
    hidden_size: usize,
    #[serde(default = "d_2048")]
    intermediate_size: usize,
    #[serde(default = "d_12")]
    num_hidden_layers: usize,
    #[serde(default = "d_8")]
    num_attention_heads: usize,
    #[serde(default = "d_77")]
    max_position_embeddings: usize,
    #[serde(default = "d_quick_gelu")]
    hidden_act: String,
    #[serde(default = "d_eps")]
    layer_norm_eps: f64,
    #[serde(default = "d_pad")]
    pad_token_id: u32,
    #[serde(default = "d_bos")]
    bos_token_id: u32,
    #[serde(default = "d_eos")]
    eos_token_id: u32,
}

/// `vision_config` with `CLIPVisionConfig`'s defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "d_768")]
    pub hidden_size: usize,
    #[serde(default = "d_3072")]
    pub intermediate_size: usize,
    #[serde(default = "d_12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_12")]
    pub num_attention_heads: usize,
    #[serde(default = "d_3")]
    pub num_channels: usize,
    #[serde(default = "d_224")]
    pub image_size: usize,
    #[serde(default = "d_32")]
    pub patch_size: usize,
    #[serde(default = "d_quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
}

/// A CLIPModel's `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipConfig {
    pub text: ClipTextConfig,
    pub vision: ClipVisionConfig,
    /// Width of both projections (the top-level `projection_dim`, default 512).
    pub projection_dim: usize,
}

/// A sub-config: `text_config_dict` (legacy) replaces `text_config` when present, as
/// `CLIPConfig` does it.
fn section<T: serde::de::DeserializeOwned>(v: &Value, name: &str, path: &Path) -> Result<T> {
    let legacy = format!("{name}_dict");
    let sub = [legacy.as_str(), name]
        .iter()
        .find_map(|k| v.get(*k).filter(|x| !x.is_null()))
        .cloned()
        .unwrap_or_else(|| Value::Object(Default::default()));
    serde_json::from_value(sub).map_err(|e| EvalError::config(path, format!("{name}: {e}")))
}

impl ClipConfig {
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let t: TextJson = section(v, "text_config", path)?;
        let vision: ClipVisionConfig = section(v, "vision_config", path)?;
        let projection_dim = match v.get("projection_dim").filter(|x| !x.is_null()) {
            None => 512,
            Some(x) => x
                .as_u64()
                .ok_or_else(|| EvalError::config(path, "projection_dim is not an integer"))?
                as usize,
        };
        let text = ClipTextConfig {
            vocab_size: t.vocab_size,
            hidden_size: t.hidden_size,
            intermediate_size: t.intermediate_size,
            num_hidden_layers: t.num_hidden_layers,
            num_attention_heads: t.num_attention_heads,
            max_position_embeddings: t.max_position_embeddings,
            hidden_act: t.hidden_act,
            layer_norm_eps: t.layer_norm_eps,
            pad_token_id: t.pad_token_id,
            bos_token_id: t.bos_token_id,
            eos_token_id: t.eos_token_id,
            projection_dim: Some(projection_dim),
        };
        text.validate()
            .map_err(|e| EvalError::config(path, e.to_string()))?;
        let c = Self {
            text,
            vision,
            projection_dim,
        };
        c.check_vision(path)?;
        Ok(c)
    }

    fn check_vision(&self, path: &Path) -> Result<()> {
        let v = &self.vision;
        Activation::parse(&v.hidden_act).map_err(|e| EvalError::config(path, e))?;
        if v.num_attention_heads == 0 || v.hidden_size % v.num_attention_heads != 0 {
            return Err(EvalError::config(
                path,
                "vision_config: hidden_size is not a multiple of num_attention_heads",
            ));
        }
        if v.patch_size == 0 || v.image_size % v.patch_size != 0 {
            return Err(EvalError::config(
                path,
                "vision_config: image_size is not a multiple of patch_size",
            ));
        }
        Ok(())
    }

    /// The config as transformers writes it.
    pub fn to_json(&self) -> Value {
        let t = &self.text;
        serde_json::json!({
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": self.projection_dim,
            "text_config": {
                "model_type": "clip_text_model",
                "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "max_position_embeddings": t.max_position_embeddings, "hidden_act": t.hidden_act,
                "layer_norm_eps": t.layer_norm_eps, "pad_token_id": t.pad_token_id,
                "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
                "projection_dim": self.projection_dim,
            },
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": self.vision.hidden_size,
                "intermediate_size": self.vision.intermediate_size,
                "num_hidden_layers": self.vision.num_hidden_layers,
                "num_attention_heads": self.vision.num_attention_heads,
                "num_channels": self.vision.num_channels,
                "image_size": self.vision.image_size, "patch_size": self.vision.patch_size,
                "hidden_act": self.vision.hidden_act, "layer_norm_eps": self.vision.layer_norm_eps,
                "projection_dim": self.projection_dim,
            },
        })
    }
}

/// The position `CLIPTextModel` pools, per sequence: with the legacy `eos_token_id == 2` of the
/// openai configs the first largest id (the end token has the largest id of the original
/// vocabulary), else the first `eos_token_id` (position 0 when there is none, as `argmax` of all
/// zeros gives).
pub fn pooled_position(ids: &[u32], eos_token_id: u32) -> usize {
    if eos_token_id == 2 {
        let max = ids.iter().copied().max().unwrap_or(0);
        ids.iter().position(|&i| i == max).unwrap_or(0)
    } else {
        ids.iter().position(|&i| i == eos_token_id).unwrap_or(0)
    }
}

/// One of CLIP's encoder layers (both towers name them alike).
fn clip_layer(
    vb: VarBuilder,
    hidden: usize,
    intermediate: usize,
    heads: usize,
    act: Activation,
    eps: f64,
) -> candle_core::Result<EncoderLayer> {
    let a = vb.pp("self_attn");
    let proj = |name: &str| Linear::load(a.pp(name), hidden, hidden, true);
    let w = LayerWeights {
        q: proj("q_proj")?,
        k: proj("k_proj")?,
        v: proj("v_proj")?,
        out: proj("out_proj")?,
        norm1: LayerNorm::load(vb.pp("layer_norm1"), hidden, eps)?,
        fc1: Linear::load(vb.pp("mlp.fc1"), hidden, intermediate, true)?,
        fc2: Linear::load(vb.pp("mlp.fc2"), intermediate, hidden, true)?,
        norm2: LayerNorm::load(vb.pp("layer_norm2"), hidden, eps)?,
    };
    EncoderLayer::new(w, heads, act)
}

/// `CLIPTextTransformer`: token and position embeddings, causal layers, the final layer norm.
struct TextTower {
    /// `[vocab, hidden]`.
    token_embedding: Tensor,
    /// `[max_position_embeddings, hidden]`.
    positions: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
}

impl TextTower {
    /// `vb` rooted at `text_model`.
    fn load(vb: VarBuilder, c: &ClipTextConfig) -> candle_core::Result<Self> {
        let act = Activation::parse(&c.hidden_act).map_err(candle_core::Error::msg)?;
        let emb = vb.pp("embeddings");
        let hidden = c.hidden_size;
        Ok(Self {
            token_embedding: emb.get((c.vocab_size, hidden), "token_embedding.weight")?,
            positions: emb.get(
                (c.max_position_embeddings, hidden),
                "position_embedding.weight",
            )?,
            layers: (0..c.num_hidden_layers)
                .map(|i| {
                    let l = vb.pp(format!("encoder.layers.{i}"));
                    let (inter, heads) = (c.intermediate_size, c.num_attention_heads);
                    clip_layer(l, hidden, inter, heads, act, c.layer_norm_eps)
                })
                .collect::<candle_core::Result<Vec<_>>>()?,
            final_layer_norm: LayerNorm::load(vb.pp("final_layer_norm"), hidden, c.layer_norm_eps)?,
        })
    }

    /// The final hidden states at `pooled` (indices into the flattened `[B * N]` tokens) of
    /// `ids` `[B, N]`: `[len(pooled), hidden]`. The layer norm is per token, so it runs on the
    /// pooled rows alone.
    fn pooled(&self, ids: &Tensor, pooled: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n) = ids.dims2()?;
        let hidden = self.token_embedding.dim(1)?;
        let tokens = self.token_embedding.index_select(&ids.flatten_all()?, 0)?;
        let mut x = tokens
            .reshape((b, n, hidden))?
            .broadcast_add(&self.positions.narrow(0, 0, n)?)?;
        let causal: Vec<f32> = (0..n)
            .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(causal, (1, 1, n, n), ids.device())?;
        for layer in &self.layers {
            x = layer.forward(&x, Some(&mask))?;
        }
        let rows = x.reshape((b * n, hidden))?.index_select(pooled, 0)?;
        self.final_layer_norm.forward(&rows)
    }
}

/// CLIP's two towers.
pub struct ClipModel {
    config: ClipConfig,
    processor: ImageProcessor,
    tokenizer: ClipTokenizer,
    text: TextTower,
    /// `[projection, text hidden]`.
    text_projection: Tensor,
    vision: VisionTrunk,
    post_layernorm: LayerNorm,
    /// `[projection, vision hidden]`.
    visual_projection: Tensor,
    device: Device,
}

/// `tokenizer.json`, else `vocab.json` + `merges.txt`, of a model directory.
fn tokenizer_from_dir(dir: &Path) -> Result<ClipTokenizer> {
    if !dir.join("tokenizer.json").is_file() {
        existing(dir.join("vocab.json"))?;
        existing(dir.join("merges.txt"))?;
    }
    ClipTokenizer::from_dir(dir)
        .map_err(|e| EvalError::Tokenizer(format!("{}: {e}", dir.display())))
}

impl ClipModel {
    /// Loads a CLIPModel directory (see the module docs) onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config = ClipConfig::from_json(&read_json(&config_path)?, &config_path)?;
        let processor =
            ImageProcessor::from_file(&existing(dir.join("preprocessor_config.json"))?)?;
        let tokenizer = tokenizer_from_dir(dir)?;
        let weights_path = existing(dir.join("model.safetensors"))?;
        let (vb, _) = weights::from_safetensors(&weights_path, DType::F32, device)
            .map_err(|e| EvalError::loading(&weights_path, e))?;
        Self::build(vb, config, processor, tokenizer, device)
            .map_err(|e| EvalError::loading(&weights_path, e))
    }

    fn build(
        vb: VarBuilder,
        config: ClipConfig,
        processor: ImageProcessor,
        mut tokenizer: ClipTokenizer,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let text = TextTower::load(vb.pp("text_model"), &config.text)?;
        let t = &config.text;
        let text_projection = vb.get(
            (config.projection_dim, t.hidden_size),
            "text_projection.weight",
        )?;
        let v = &config.vision;
        let act = Activation::parse(&v.hidden_act).map_err(candle_core::Error::msg)?;
        let vm = vb.pp("vision_model");
        let emb = vm.pp("embeddings");
        let kernel = emb.get(
            (v.hidden_size, v.num_channels, v.patch_size, v.patch_size),
            "patch_embedding.weight",
        )?;
        let patches = PatchEmbedding::new(&kernel, None, (v.image_size, v.image_size))?;
        let class_token = emb.get(v.hidden_size, "class_embedding")?;
        let positions = emb.get(
            (patches.num_patches() + 1, v.hidden_size),
            "position_embedding.weight",
        )?;
        let pre_norm = LayerNorm::load(vm.pp("pre_layrnorm"), v.hidden_size, v.layer_norm_eps)?;
        let layers = (0..v.num_hidden_layers)
            .map(|i| {
                let l = vm.pp(format!("encoder.layers.{i}"));
                let (inter, heads) = (v.intermediate_size, v.num_attention_heads);
                clip_layer(l, v.hidden_size, inter, heads, act, v.layer_norm_eps)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let post_layernorm =
            LayerNorm::load(vm.pp("post_layernorm"), v.hidden_size, v.layer_norm_eps)?;
        let visual_projection = vb.get(
            (config.projection_dim, v.hidden_size),
            "visual_projection.weight",
        )?;
        tokenizer.max_length = t.max_position_embeddings;
        Ok(Self {
            processor,
            tokenizer,
            text,
            text_projection,
            vision: VisionTrunk {
                patches,
                class_token,
                positions,
                pre_norm: Some(pre_norm),
                layers,
            },
            post_layernorm,
            visual_projection,
            device: device.clone(),
            config,
        })
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// L2-normalised image embeddings, one per image (preprocessing included).
    pub fn image_embeddings(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(self.vision.batch_size()) {
            let pixels = self.processor.preprocess_batch(chunk, &self.device)?;
            out.extend(rows(&self.image_features(&pixels)?)?);
        }
        Ok(out)
    }

    /// L2-normalised `get_image_features` of `[N, 3, H, W]` pixel values: `[N, projection]`.
    pub fn image_embeddings_preprocessed(&self, pixel_values: &Tensor) -> Result<Tensor> {
        Ok(self
            .vision
            .in_batches(pixel_values, |x| self.image_features(x))?)
    }

    /// One batch; like every pass here, on the engine's CPU threads (see
    /// [`on_compute_threads`]).
    fn image_features(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        on_compute_threads(&self.device, || {
            let pixels = pixels.to_device(&self.device)?.to_dtype(DType::F32)?;
            let cls = self
                .post_layernorm
                .forward(&self.vision.class_token_output(&pixels)?)?;
            l2_normalize(&cls.matmul(&self.visual_projection.t()?)?)
        })
    }

    /// Token ids as `CLIPTokenizer(truncation=True, max_length=max_position_embeddings)` gives
    /// them: start token, at most `max - 2` tokens, end token.
    fn token_ids(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.tokenizer.tokenize(text)?;
        ids.truncate(self.tokenizer.max_length.saturating_sub(2));
        ids.insert(0, self.tokenizer.bos_id);
        ids.push(self.tokenizer.eos_id);
        Ok(ids)
    }

    /// L2-normalised text embeddings (`get_text_features`), one per text.
    pub fn text_embeddings(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(TEXT_BATCH) {
            let ids = chunk
                .iter()
                .map(|t| self.token_ids(t))
                .collect::<Result<Vec<_>>>()?;
            out.extend(rows(&self.text_features(&ids)?)?);
        }
        Ok(out)
    }

    /// Sequences padded to the longest with the pad token: attention is causal, so what follows
    /// the pooled position does not change it.
    fn text_features(&self, ids: &[Vec<u32>]) -> candle_core::Result<Tensor> {
        let n = ids.iter().map(Vec::len).max().unwrap_or(0);
        let b = ids.len();
        let mut flat = Vec::with_capacity(b * n);
        let mut pooled = Vec::with_capacity(b);
        for (i, seq) in ids.iter().enumerate() {
            pooled.push((i * n + pooled_position(seq, self.config.text.eos_token_id)) as u32);
            flat.extend(
                seq.iter()
                    .copied()
                    .chain(std::iter::repeat(self.tokenizer.pad_id))
                    .take(n),
            );
        }
        let input = Tensor::from_vec(flat, (b, n), &self.device)?;
        let at = Tensor::from_vec(pooled, b, &self.device)?;
        on_compute_threads(&self.device, || {
            let pooled = self.text.pooled(&input, &at)?;
            l2_normalize(&pooled.matmul(&self.text_projection.t()?)?)
        })
    }

    /// A tiny CLIP with seeded random weights (the configuration of `fixtures/tiny-clip`).
    pub fn tiny(seed: u64, device: &Device) -> Result<Self> {
        Self::seeded(&tiny_config_json(), &tiny_preprocessor_json(), seed, device)
    }

    /// Writes the tiny model of `seed` as a loadable directory (config.json, model.safetensors,
    /// vocab.json, merges.txt, preprocessor_config.json).
    pub fn write_tiny_dir(seed: u64, dir: &Path) -> Result<()> {
        Self::write_seeded_dir(&tiny_config_json(), &tiny_preprocessor_json(), seed, dir)
    }

    /// A model of any configuration with seeded random weights (`weights::seeded`) and the
    /// engine's 3000-entry tokenizer (benchmarks at real sizes).
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
        let path = Path::new("<seeded clip>");
        let config = ClipConfig::from_json(config, path)?;
        let processor = ImageProcessor::from_json(preprocessor, path)?;
        let tokenizer = ClipTokenizer::from_vocab_merges(TINY_VOCAB_JSON, TINY_MERGES_TXT, None)?;
        let (vb, record) = weights::seeded(seed, DType::F32, device);
        let model = Self::build(vb, config, processor, tokenizer, device)?;
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
        write("vocab.json", TINY_VOCAB_JSON.to_string())?;
        write("merges.txt", TINY_MERGES_TXT.to_string())?;
        let p = dir.join("model.safetensors");
        weights::save_safetensors(&weights, DType::F32, &p).map_err(|e| EvalError::io(&p, e))
    }
}

/// The tiny model's `config.json`: small towers, openai's legacy token ids (end-token pooling
/// by the largest id), and a different activation and epsilon per tower so that a tower
/// reading the other's shows.
pub fn tiny_config_json() -> Value {
    serde_json::json!({
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 16,
        "text_config": {
            "vocab_size": 3002, "hidden_size": 32, "intermediate_size": 37,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2
        },
        "vision_config": {
            "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
            "num_attention_heads": 4, "image_size": 32, "patch_size": 8,
            "hidden_act": "gelu", "layer_norm_eps": 1e-6
        }
    })
}

/// The tiny model's `preprocessor_config.json`: openai's, at the tiny image size.
pub fn tiny_preprocessor_json() -> Value {
    serde_json::json!({
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": true, "size": {"shortest_edge": 32}, "resample": 3,
        "do_center_crop": true, "crop_size": {"height": 32, "width": 32},
        "do_rescale": true, "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": crate::preprocess::CLIP_MEAN, "image_std": crate::preprocess::CLIP_STD,
        "do_convert_rgb": true
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_follows_the_eos_rule() {
        // legacy id 2: the first largest id, even when an added token outranks the end token
        assert_eq!(pooled_position(&[49406, 320, 49408, 49407, 49407], 2), 2);
        assert_eq!(pooled_position(&[49406, 320, 49407, 49407], 2), 2);
        // otherwise the first end token
        assert_eq!(
            pooled_position(&[49406, 320, 49408, 49407, 49407], 49407),
            3
        );
        assert_eq!(pooled_position(&[49406, 320], 49407), 0);
    }

    #[test]
    fn missing_keys_take_transformers_defaults() {
        let c = ClipConfig::from_json(&serde_json::json!({}), Path::new("c.json")).unwrap();
        assert_eq!(c.projection_dim, 512);
        assert_eq!(c.text.hidden_size, 512);
        assert_eq!(c.text.eos_token_id, 49407);
        assert_eq!(c.vision.hidden_size, 768);
        assert_eq!(c.vision.patch_size, 32);
        assert_eq!(c.vision.hidden_act, "quick_gelu");
        // the legacy *_dict wins over the plain section
        let c = ClipConfig::from_json(
            &serde_json::json!({"text_config": {"hidden_size": 64, "num_attention_heads": 4},
                                "text_config_dict": {"hidden_size": 128}}),
            Path::new("c.json"),
        )
        .unwrap();
        assert_eq!((c.text.hidden_size, c.text.num_attention_heads), (128, 8));
    }

    #[test]
    fn tiny_model_embeds_unit_vectors() {
        let m = ClipModel::tiny(0, &Device::Cpu).unwrap();
        let img = RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8 * 6, y as u8 * 8, 90]));
        let e = m.image_embeddings(&[img.clone(), img]).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].len(), 16);
        assert_eq!(e[0], e[1]);
        let norm: f32 = e[0].iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
        let t = m.text_embeddings(&["a photo of a dog", "a dog"]).unwrap();
        assert_ne!(t[0], t[1]);
    }
}
