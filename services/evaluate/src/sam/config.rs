//! Every size of a SAM model, as our own `config.json` beside the weights spells them.
//!
//! The official checkpoints carry no configuration; `build_sam.py` hard-codes it. A directory
//! without `config.json` is therefore taken to be ViT-B (`sam_vit_b`), the model sidbooth uses;
//! ViT-L/H and the tiny test models say their sizes in the file.

// `usize::is_multiple_of` is newer than the workspace's rust-version.
#![allow(clippy::manual_is_multiple_of)]

use serde::{Deserialize, Serialize};

/// The sizes of the image encoder, prompt encoder and mask decoder. Field names follow the
/// arguments of segment-anything's `_build_sam` and module constructors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamConfig {
    /// Side of the square model input (the longest side of a photo is resized to it).
    pub image_size: usize,
    pub vit_patch_size: usize,
    pub encoder_embed_dim: usize,
    pub encoder_depth: usize,
    pub encoder_num_heads: usize,
    /// Hidden width of the encoder MLPs is `int(encoder_embed_dim * encoder_mlp_ratio)`.
    pub encoder_mlp_ratio: f64,
    /// Blocks attending over the whole image; the others attend within windows.
    pub encoder_global_attn_indexes: Vec<usize>,
    /// Side of the attention windows in patches (0: every block is global).
    pub window_size: usize,
    /// Width of the prompt embeddings, the image embedding and the decoder transformer.
    pub prompt_embed_dim: usize,
    pub decoder_depth: usize,
    pub decoder_mlp_dim: usize,
    pub decoder_num_heads: usize,
    /// The cross attentions of the decoder project to `prompt_embed_dim / rate` channels.
    pub decoder_attention_downsample_rate: usize,
    pub num_multimask_outputs: usize,
    pub iou_head_depth: usize,
    pub iou_head_hidden_dim: usize,
    /// Per-channel mean and standard deviation on the 0-255 scale, RGB.
    pub pixel_mean: [f32; 3],
    pub pixel_std: [f32; 3],
}

impl Default for SamConfig {
    fn default() -> Self {
        Self::vit_b()
    }
}

impl SamConfig {
    /// `build_sam_vit_b`.
    pub fn vit_b() -> Self {
        SamConfig {
            image_size: 1024,
            vit_patch_size: 16,
            encoder_embed_dim: 768,
            encoder_depth: 12,
            encoder_num_heads: 12,
            encoder_mlp_ratio: 4.0,
            encoder_global_attn_indexes: vec![2, 5, 8, 11],
            window_size: 14,
            prompt_embed_dim: 256,
            decoder_depth: 2,
            decoder_mlp_dim: 2048,
            decoder_num_heads: 8,
            decoder_attention_downsample_rate: 2,
            num_multimask_outputs: 3,
            iou_head_depth: 3,
            iou_head_hidden_dim: 256,
            pixel_mean: [123.675, 116.28, 103.53],
            pixel_std: [58.395, 57.12, 57.375],
        }
    }

    /// The tiny model of the tests and of `fixtures/tiny-sam`: 64² input, 8² patches of 8
    /// pixels, windows of 3 (so the 8² grid is padded to 9²), one global block.
    pub fn tiny() -> Self {
        SamConfig {
            image_size: 64,
            vit_patch_size: 8,
            encoder_embed_dim: 32,
            encoder_depth: 2,
            encoder_num_heads: 2,
            encoder_mlp_ratio: 4.0,
            encoder_global_attn_indexes: vec![1],
            window_size: 3,
            prompt_embed_dim: 32,
            decoder_depth: 2,
            decoder_mlp_dim: 64,
            decoder_num_heads: 2,
            decoder_attention_downsample_rate: 2,
            num_multimask_outputs: 3,
            iou_head_depth: 3,
            iou_head_hidden_dim: 32,
            ..Self::vit_b()
        }
    }

    /// Side of the image embedding grid.
    pub fn embedding_size(&self) -> usize {
        self.image_size / self.vit_patch_size
    }

    /// Side of the low-resolution mask logits the decoder predicts.
    pub fn low_res_size(&self) -> usize {
        4 * self.embedding_size()
    }

    pub fn encoder_mlp_dim(&self) -> usize {
        (self.encoder_embed_dim as f64 * self.encoder_mlp_ratio) as usize
    }

    /// Mask tokens of the decoder: one single-mask output plus the multimask outputs.
    pub fn num_mask_tokens(&self) -> usize {
        self.num_multimask_outputs + 1
    }

    /// The sizes a model can be built with; the message names the first that is off.
    pub fn validate(&self) -> Result<(), String> {
        let c = self;
        let checks: [(bool, String); 12] = [
            (
                c.vit_patch_size > 0,
                "vit_patch_size must be positive".into(),
            ),
            (
                c.image_size > 0 && c.image_size % c.vit_patch_size.max(1) == 0,
                format!(
                    "image_size {} is not a positive multiple of vit_patch_size {}",
                    c.image_size, c.vit_patch_size
                ),
            ),
            (
                c.encoder_num_heads > 0 && c.encoder_embed_dim % c.encoder_num_heads == 0,
                format!(
                    "encoder_embed_dim {} is not divisible by encoder_num_heads {}",
                    c.encoder_embed_dim, c.encoder_num_heads
                ),
            ),
            (c.encoder_depth > 0, "encoder_depth must be positive".into()),
            (
                c.encoder_global_attn_indexes
                    .iter()
                    .all(|&i| i < c.encoder_depth),
                format!(
                    "encoder_global_attn_indexes {:?} name blocks past encoder_depth {}",
                    c.encoder_global_attn_indexes, c.encoder_depth
                ),
            ),
            (
                c.encoder_mlp_dim() > 0,
                "encoder_mlp_ratio must be positive".into(),
            ),
            (
                c.prompt_embed_dim > 0 && c.prompt_embed_dim % 8 == 0,
                format!(
                    "prompt_embed_dim {} must be a positive multiple of 8 (the mask upscaling \
                     divides it by 4 and 8)",
                    c.prompt_embed_dim
                ),
            ),
            (
                c.decoder_attention_downsample_rate > 0
                    && c.prompt_embed_dim % c.decoder_attention_downsample_rate == 0,
                "decoder_attention_downsample_rate must divide prompt_embed_dim".into(),
            ),
            (
                c.decoder_num_heads > 0
                    && (c.prompt_embed_dim / c.decoder_attention_downsample_rate.max(1))
                        % c.decoder_num_heads
                        == 0,
                format!(
                    "decoder_num_heads {} must divide the decoder's attention widths",
                    c.decoder_num_heads
                ),
            ),
            (
                c.decoder_mlp_dim > 0,
                "decoder_mlp_dim must be positive".into(),
            ),
            (
                c.num_multimask_outputs > 0,
                "num_multimask_outputs must be positive".into(),
            ),
            (
                c.iou_head_depth > 0 && c.iou_head_hidden_dim > 0,
                "iou_head_depth and iou_head_hidden_dim must be positive".into(),
            ),
        ];
        match checks.into_iter().find(|(ok, _)| !ok) {
            Some((_, message)) => Err(message),
            None if c.pixel_std.iter().any(|s| *s <= 0.0) => {
                Err("pixel_std must be positive".into())
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_fields_take_vit_b_values_and_unknown_ones_are_refused() {
        let c: SamConfig = serde_json::from_str(r#"{"image_size": 512}"#).unwrap();
        assert_eq!(
            c,
            SamConfig {
                image_size: 512,
                ..SamConfig::vit_b()
            }
        );
        assert_eq!(c.embedding_size(), 32);
        assert!(serde_json::from_str::<SamConfig>(r#"{"image_sise": 512}"#).is_err());
    }

    #[test]
    fn validation_names_the_bad_size() {
        assert_eq!(SamConfig::vit_b().validate(), Ok(()));
        assert_eq!(SamConfig::tiny().validate(), Ok(()));
        let bad = SamConfig {
            image_size: 1000,
            ..SamConfig::vit_b()
        };
        assert!(bad.validate().unwrap_err().contains("image_size 1000"));
        let bad = SamConfig {
            encoder_global_attn_indexes: vec![12],
            ..SamConfig::vit_b()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .contains("encoder_global_attn_indexes"));
        let bad = SamConfig {
            prompt_embed_dim: 36,
            ..SamConfig::vit_b()
        };
        assert!(bad.validate().unwrap_err().contains("prompt_embed_dim 36"));
    }
}
