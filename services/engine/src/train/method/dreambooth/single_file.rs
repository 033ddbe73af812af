//! One checkpoint file in the original Stable Diffusion (LDM / CompVis) layout, which A1111 and
//! ComfyUI load. The mapping is the one of diffusers'
//! `scripts/convert_diffusers_to_original_stable_diffusion.py`, written for any number of blocks
//! and layers per block (the script hard-codes SD's four blocks of two layers; diffusers'
//! `from_single_file` reads the general layout given the model's configuration).
//!
//! Keys: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE, its attention's linear
//! weights as 1x1 convolutions) and the text encoder, either OpenAI's CLIP of SD 1.x as
//! `cond_stage_model.transformer.text_model.*`, or SD 2.x's OpenCLIP as `cond_stage_model.model.*`
//! with q, k and v fused into `attn.in_proj_weight` / `in_proj_bias`. The text encoder's
//! activation tells the two apart (`quick_gelu`: OpenAI, `gelu`: OpenCLIP) where diffusers'
//! script looks for a 23rd layer; for SD 1.x and 2.x checkpoints both say the same. As the script
//! does, SD 2.x's last OpenCLIP layer and its `text_projection`, which SD 2.x does not use (it
//! reads the penultimate layer's states), are not written.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::{Device, Tensor};

use super::pipeline_dir::{TEXT_ENCODER_WEIGHTS, UNET_WEIGHTS, VAE_WEIGHTS};
use super::text_model_name;
use crate::config::{ClipTextConfig, ModelDir};
use crate::train::TrainError;

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const OPENAI_CLIP_PREFIX: &str = "cond_stage_model.transformer.";
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";

/// Writes the pipeline directory `dir` (as [`super::pipeline_dir::write`] wrote it) as one
/// checkpoint file `out`.
pub fn from_pipeline_dir(
    dir: &Path,
    out: &Path,
    metadata: &BTreeMap<String, String>,
) -> Result<(), TrainError> {
    let md = ModelDir::open(dir).map_err(|e| TrainError::Config(e.to_string()))?;
    let load = |rel: &str| candle_core::safetensors::load(dir.join(rel), &Device::Cpu);
    let mut tensors = BTreeMap::new();

    let unet = load(UNET_WEIGHTS)?;
    let layout = UNetLayout::new(md.unet.layers_per_block, unet.keys());
    for (name, t) in unet {
        tensors.insert(format!("{UNET_PREFIX}{}", layout.key(&name)?), t);
    }
    let up_blocks = md.vae.up_block_types.len();
    for (name, t) in load(VAE_WEIGHTS)? {
        let (key, conv) = vae_key(&name, up_blocks)?;
        let t = if conv && t.rank() == 2 {
            let (o, i) = t.dims2()?;
            t.reshape((o, i, 1, 1))?
        } else {
            t
        };
        tensors.insert(format!("{VAE_PREFIX}{key}"), t);
    }
    let text: BTreeMap<String, Tensor> = load(TEXT_ENCODER_WEIGHTS)?
        .into_iter()
        .map(|(n, t)| (text_model_name(&n), t))
        .collect();
    tensors.extend(text_encoder_tensors(text, &md.text_encoder)?);
    crate::train::io::save(out, &tensors, metadata)
}

fn no_name(component: &str, name: &str) -> TrainError {
    TrainError::Format(format!(
        "{component} weight {name} has no name in the original Stable Diffusion layout"
    ))
}

/// `"12.rest"` as `(12, "rest")`.
fn index(s: &str) -> Option<(usize, &str)> {
    let (i, rest) = s.split_once('.')?;
    Some((i.parse().ok()?, rest))
}

/// The blocks of a UNet as the original layout numbers them.
struct UNetLayout {
    layers_per_block: usize,
    /// Up blocks with attentions: their upsampler comes after the attention.
    up_with_attention: BTreeSet<usize>,
}

impl UNetLayout {
    fn new<'a>(layers_per_block: usize, names: impl Iterator<Item = &'a String>) -> Self {
        let up_with_attention = names
            .filter_map(|n| n.strip_prefix("up_blocks."))
            .filter_map(index)
            .filter(|(_, rest)| rest.starts_with("attentions."))
            .map(|(i, _)| i)
            .collect();
        Self {
            layers_per_block,
            up_with_attention,
        }
    }

    /// The original name of the diffusers UNet weight `name` (without [`UNET_PREFIX`]).
    fn key(&self, name: &str) -> Result<String, TrainError> {
        const FIXED: [(&str, &str); 5] = [
            ("time_embedding.linear_1.", "time_embed.0."),
            ("time_embedding.linear_2.", "time_embed.2."),
            ("conv_in.", "input_blocks.0.0."),
            ("conv_norm_out.", "out.0."),
            ("conv_out.", "out.2."),
        ];
        for (diffusers, original) in FIXED {
            if let Some(rest) = name.strip_prefix(diffusers) {
                return Ok(format!("{original}{rest}"));
            }
        }
        let bad = || no_name("UNet", name);
        // Each down block is `layers_per_block` layers and a downsampler, after `conv_in`;
        // each up block one layer more, its upsampler inside the last.
        let per_block = self.layers_per_block + 1;
        let last = self.layers_per_block;
        if let Some((i, rest)) = name.strip_prefix("down_blocks.").and_then(index) {
            let first = 1 + i * per_block;
            if let Some((j, rest)) = rest.strip_prefix("resnets.").and_then(index) {
                return Ok(format!("input_blocks.{}.0.{}", first + j, resnet(rest)));
            }
            if let Some((j, rest)) = rest.strip_prefix("attentions.").and_then(index) {
                return Ok(format!("input_blocks.{}.1.{rest}", first + j));
            }
            if let Some(rest) = rest.strip_prefix("downsamplers.0.conv.") {
                return Ok(format!("input_blocks.{}.0.op.{rest}", first + last));
            }
        }
        if let Some(rest) = name.strip_prefix("mid_block.") {
            if let Some((k, rest)) = rest.strip_prefix("resnets.").and_then(index) {
                return Ok(format!("middle_block.{}.{}", 2 * k, resnet(rest)));
            }
            if let Some(rest) = rest.strip_prefix("attentions.0.") {
                return Ok(format!("middle_block.1.{rest}"));
            }
        }
        if let Some((i, rest)) = name.strip_prefix("up_blocks.").and_then(index) {
            let first = i * per_block;
            if let Some((j, rest)) = rest.strip_prefix("resnets.").and_then(index) {
                return Ok(format!("output_blocks.{}.0.{}", first + j, resnet(rest)));
            }
            if let Some((j, rest)) = rest.strip_prefix("attentions.").and_then(index) {
                return Ok(format!("output_blocks.{}.1.{rest}", first + j));
            }
            if let Some(rest) = rest.strip_prefix("upsamplers.0.conv.") {
                let slot = if self.up_with_attention.contains(&i) {
                    2
                } else {
                    1
                };
                return Ok(format!("output_blocks.{}.{slot}.conv.{rest}", first + last));
            }
        }
        Err(bad())
    }
}

/// A UNet resnet's parameter path in the original layout (`norm1.weight` -> `in_layers.0.weight`).
fn resnet(rest: &str) -> String {
    const NAMES: [(&str, &str); 6] = [
        ("norm1.", "in_layers.0."),
        ("conv1.", "in_layers.2."),
        ("norm2.", "out_layers.0."),
        ("conv2.", "out_layers.3."),
        ("time_emb_proj.", "emb_layers.1."),
        ("conv_shortcut.", "skip_connection."),
    ];
    for (diffusers, original) in NAMES {
        if let Some(p) = rest.strip_prefix(diffusers) {
            return format!("{original}{p}");
        }
    }
    rest.to_owned()
}

/// The original name of a diffusers VAE weight (without [`VAE_PREFIX`]), and whether it is a
/// linear weight the original keeps as a 1x1 convolution. `up_blocks` is the number of
/// decoder blocks (the original numbers them from the output side).
fn vae_key(name: &str, up_blocks: usize) -> Result<(String, bool), TrainError> {
    let bad = || no_name("VAE", name);
    if name.starts_with("quant_conv.") || name.starts_with("post_quant_conv.") {
        return Ok((name.to_owned(), false));
    }
    let (side, rest) = name.split_once('.').ok_or_else(bad)?;
    if side != "encoder" && side != "decoder" {
        return Err(bad());
    }
    let resnet = |r: &str| r.replace("conv_shortcut.", "nin_shortcut.");
    let key = |k: String| Ok((format!("{side}.{k}"), false));
    if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        return key(rest.to_owned());
    }
    if let Some(p) = rest.strip_prefix("conv_norm_out.") {
        return key(format!("norm_out.{p}"));
    }
    if let Some((i, r)) = rest.strip_prefix("down_blocks.").and_then(index) {
        if let Some((j, r)) = r.strip_prefix("resnets.").and_then(index) {
            return key(format!("down.{i}.block.{j}.{}", resnet(r)));
        }
        if let Some(r) = r.strip_prefix("downsamplers.0.") {
            return key(format!("down.{i}.downsample.{r}"));
        }
    }
    if let Some((i, r)) = rest.strip_prefix("up_blocks.").and_then(index) {
        let b = up_blocks.checked_sub(i + 1).ok_or_else(bad)?;
        if let Some((j, r)) = r.strip_prefix("resnets.").and_then(index) {
            return key(format!("up.{b}.block.{j}.{}", resnet(r)));
        }
        if let Some(r) = r.strip_prefix("upsamplers.0.") {
            return key(format!("up.{b}.upsample.{r}"));
        }
    }
    if let Some((k, r)) = rest.strip_prefix("mid_block.resnets.").and_then(index) {
        return key(format!("mid.block_{}.{}", k + 1, resnet(r)));
    }
    if let Some(r) = rest.strip_prefix("mid_block.attentions.0.") {
        const NAMES: [(&str, &str); 8] = [
            ("group_norm.", "norm."),
            ("to_q.", "q."),
            ("to_k.", "k."),
            ("to_v.", "v."),
            ("to_out.0.", "proj_out."),
            ("query.", "q."),
            ("key.", "k."),
            ("value.", "v."),
        ];
        let (module, p) = NAMES
            .iter()
            .find_map(|(d, o)| r.strip_prefix(d).map(|p| (*o, p)))
            .or_else(|| r.strip_prefix("proj_attn.").map(|p| ("proj_out.", p)))
            .ok_or_else(bad)?;
        let conv = module != "norm." && p == "weight";
        return Ok((format!("{side}.mid.attn_1.{module}{p}"), conv));
    }
    Err(bad())
}

/// The text encoder's weights (transformers names, `text_model.` prefixed) in the original
/// layout of its architecture.
fn text_encoder_tensors(
    weights: BTreeMap<String, Tensor>,
    config: &ClipTextConfig,
) -> Result<BTreeMap<String, Tensor>, TrainError> {
    match config.hidden_act.as_str() {
        "quick_gelu" => Ok(weights
            .into_iter()
            .map(|(n, t)| (format!("{OPENAI_CLIP_PREFIX}{n}"), t))
            .collect()),
        "gelu" => open_clip(weights),
        other => Err(TrainError::Config(format!(
            "a text encoder with hidden_act {other} has no original Stable Diffusion layout"
        ))),
    }
}

/// SD 2.x's OpenCLIP layout: `resblocks`, `ln_1`, `mlp.c_fc`, and one `in_proj` for q, k, v.
fn open_clip(weights: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, TrainError> {
    const FIXED: [(&str, &str); 3] = [
        (
            "embeddings.token_embedding.weight",
            "token_embedding.weight",
        ),
        (
            "embeddings.position_embedding.weight",
            "positional_embedding",
        ),
        ("final_layer_norm.", "ln_final."),
    ];
    const LAYER: [(&str, &str); 5] = [
        ("self_attn.out_proj.", "attn.out_proj."),
        ("layer_norm1.", "ln_1."),
        ("layer_norm2.", "ln_2."),
        ("mlp.fc1.", "mlp.c_fc."),
        ("mlp.fc2.", "mlp.c_proj."),
    ];
    let mut out = BTreeMap::new();
    // (layer, "weight" | "bias") -> [q, k, v]
    let mut qkv: BTreeMap<(usize, String), [Option<Tensor>; 3]> = BTreeMap::new();
    'names: for (name, t) in weights {
        let bad = || no_name("text encoder", &name);
        let rest = name.strip_prefix("text_model.").ok_or_else(bad)?;
        if rest == "embeddings.position_ids" {
            continue;
        }
        for (d, o) in FIXED {
            if let Some(p) = rest.strip_prefix(d) {
                out.insert(format!("{OPEN_CLIP_PREFIX}{o}{p}"), t);
                continue 'names;
            }
        }
        let (i, r) = rest
            .strip_prefix("encoder.layers.")
            .and_then(index)
            .ok_or_else(bad)?;
        for (slot, proj) in ["q_proj.", "k_proj.", "v_proj."].into_iter().enumerate() {
            if let Some(p) = r
                .strip_prefix("self_attn.")
                .and_then(|r| r.strip_prefix(proj))
            {
                qkv.entry((i, p.to_owned())).or_default()[slot] = Some(t);
                continue 'names;
            }
        }
        let (d, o) = LAYER
            .iter()
            .find(|(d, _)| r.starts_with(d))
            .ok_or_else(bad)?;
        let p = &r[d.len()..];
        out.insert(
            format!("{OPEN_CLIP_PREFIX}transformer.resblocks.{i}.{o}{p}"),
            t,
        );
    }
    for ((i, p), parts) in qkv {
        let [Some(q), Some(k), Some(v)] = parts else {
            return Err(TrainError::Format(format!(
                "text encoder layer {i}: q, k and v {p} are not all there"
            )));
        };
        out.insert(
            format!("{OPEN_CLIP_PREFIX}transformer.resblocks.{i}.attn.in_proj_{p}"),
            Tensor::cat(&[q, k, v], 0)?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SD 2.1's names, as diffusers' conversion script's tables give them.
    #[test]
    fn sd_unet_names_match_the_conversion_script() {
        let names: Vec<String> = ["up_blocks.1.attentions.0.norm.weight".to_string()].into();
        let layout = UNetLayout::new(2, names.iter());
        let cases = [
            ("time_embedding.linear_2.bias", "time_embed.2.bias"),
            (
                "down_blocks.0.resnets.1.norm1.weight",
                "input_blocks.2.0.in_layers.0.weight",
            ),
            (
                "down_blocks.1.attentions.0.proj_in.weight",
                "input_blocks.4.1.proj_in.weight",
            ),
            (
                "down_blocks.2.downsamplers.0.conv.bias",
                "input_blocks.9.0.op.bias",
            ),
            (
                "down_blocks.3.resnets.1.conv2.weight",
                "input_blocks.11.0.out_layers.3.weight",
            ),
            (
                "mid_block.resnets.1.time_emb_proj.weight",
                "middle_block.2.emb_layers.1.weight",
            ),
            (
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "up_blocks.0.resnets.2.conv_shortcut.weight",
                "output_blocks.2.0.skip_connection.weight",
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                "output_blocks.2.1.conv.weight",
            ),
            (
                "up_blocks.1.upsamplers.0.conv.weight",
                "output_blocks.5.2.conv.weight",
            ),
            (
                "up_blocks.3.attentions.2.proj_out.bias",
                "output_blocks.11.1.proj_out.bias",
            ),
            ("conv_norm_out.weight", "out.0.weight"),
        ];
        for (diffusers, original) in cases {
            assert_eq!(layout.key(diffusers).unwrap(), original, "{diffusers}");
        }
        assert!(layout.key("up_blocks.0.frobnicate.weight").is_err());
    }

    #[test]
    fn sd_vae_names_match_the_conversion_script() {
        let cases = [
            (
                "encoder.down_blocks.2.resnets.0.conv_shortcut.bias",
                "encoder.down.2.block.0.nin_shortcut.bias",
                false,
            ),
            (
                "encoder.down_blocks.0.downsamplers.0.conv.weight",
                "encoder.down.0.downsample.conv.weight",
                false,
            ),
            (
                "decoder.up_blocks.0.resnets.2.norm1.weight",
                "decoder.up.3.block.2.norm1.weight",
                false,
            ),
            (
                "decoder.up_blocks.2.upsamplers.0.conv.bias",
                "decoder.up.1.upsample.conv.bias",
                false,
            ),
            (
                "decoder.mid_block.resnets.1.conv2.weight",
                "decoder.mid.block_2.conv2.weight",
                false,
            ),
            (
                "encoder.mid_block.attentions.0.to_out.0.weight",
                "encoder.mid.attn_1.proj_out.weight",
                true,
            ),
            (
                "encoder.mid_block.attentions.0.to_q.bias",
                "encoder.mid.attn_1.q.bias",
                false,
            ),
            (
                "decoder.mid_block.attentions.0.group_norm.weight",
                "decoder.mid.attn_1.norm.weight",
                false,
            ),
            ("encoder.conv_norm_out.bias", "encoder.norm_out.bias", false),
            ("post_quant_conv.weight", "post_quant_conv.weight", false),
        ];
        for (diffusers, original, conv) in cases {
            assert_eq!(
                vae_key(diffusers, 4).unwrap(),
                (original.to_string(), conv),
                "{diffusers}"
            );
        }
    }

    #[test]
    fn open_clip_fuses_q_k_v() {
        let dev = Device::Cpu;
        let t = |v: f32, n: usize| Tensor::full(v, (n, 2), &dev).unwrap();
        let layer = "text_model.encoder.layers.0.self_attn.";
        let weights = BTreeMap::from([
            (format!("{layer}q_proj.weight"), t(1.0, 2)),
            (format!("{layer}k_proj.weight"), t(2.0, 2)),
            (format!("{layer}v_proj.weight"), t(3.0, 2)),
            (
                "text_model.encoder.layers.0.mlp.fc1.bias".to_string(),
                t(4.0, 1),
            ),
        ]);
        let out = open_clip(weights).unwrap();
        let fused = &out["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"];
        assert_eq!(
            fused.to_vec2::<f32>().unwrap(),
            [1.0, 1.0, 2.0, 2.0, 3.0, 3.0].map(|v| vec![v, v]).to_vec()
        );
        assert!(out.contains_key("cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.bias"));
        let partial = BTreeMap::from([(format!("{layer}q_proj.bias"), t(1.0, 1))]);
        assert!(open_clip(partial).is_err());
    }
}
