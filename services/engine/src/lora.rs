//! LoRA files in diffusers' (peft) layout.
//!
//! Keys: `<component>.<module path>.lora_A.weight` (down, `[rank, in]`) and
//! `<component>.<module path>.lora_B.weight` (up, `[out, rank]`), where component is `unet` or
//! `text_encoder`, e.g. `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`.
//! This is what `StableDiffusionPipeline.load_lora_weights` reads. An optional per-module
//! `<component>.<module path>.alpha` scalar (kohya / older diffusers) or the safetensors metadata
//! entry `lora_alpha` / `lora_adapter_metadata` gives alpha; the adapter scale is `alpha / rank`
//! (alpha defaults to rank, i.e. scale 1, as in diffusers).

/// Component prefix of UNet modules in a LoRA file.
pub const UNET_PREFIX: &str = "unet";
/// Component prefix of text-encoder modules in a LoRA file.
pub const TEXT_ENCODER_PREFIX: &str = "text_encoder";

/// Which of the two LoRA matrices a key names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraPart {
    /// `lora_A`, `[rank, in]`.
    Down,
    /// `lora_B`, `[out, rank]`.
    Up,
}

impl std::str::FromStr for LoraPart {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "down" | "lora_A" | "lora_down" => Ok(Self::Down),
            "up" | "lora_B" | "lora_up" => Ok(Self::Up),
            o => Err(format!("unknown LoRA part {o}")),
        }
    }
}

/// The safetensors key of one LoRA matrix. `module_path` is the full module path including the
/// component prefix, e.g. `unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k` or
/// `text_encoder.text_model.encoder.layers.0.self_attn.q_proj`.
pub fn key_for(module_path: &str, part: LoraPart) -> String {
    match part {
        LoraPart::Down => format!("{module_path}.lora_A.weight"),
        LoraPart::Up => format!("{module_path}.lora_B.weight"),
    }
}

/// Key of the optional per-module alpha scalar.
pub fn alpha_key_for(module_path: &str) -> String {
    format!("{module_path}.alpha")
}

/// `component.module` path, e.g. `module_path(UNET_PREFIX, "down_blocks.0...to_q")`.
pub fn module_path(component: &str, name: &str) -> String {
    format!("{component}.{name}")
}

/// Splits a LoRA key into (module path, part); `None` for keys that are not LoRA matrices.
pub fn parse_key(key: &str) -> Option<(&str, LoraPart)> {
    const SUFFIXES: [(&str, LoraPart); 4] = [
        (".lora_A.weight", LoraPart::Down),
        (".lora_B.weight", LoraPart::Up),
        (".lora_down.weight", LoraPart::Down),
        (".lora_up.weight", LoraPart::Up),
    ];
    SUFFIXES
        .iter()
        .find_map(|(suf, part)| key.strip_suffix(suf).map(|m| (m, *part)))
}

/// Safetensors metadata entry written by diffusers' `save_lora_weights`: JSON of the peft
/// `LoraConfig` fields per component, e.g. `{"unet.r": 4, "unet.lora_alpha": 8, ...}`.
pub const ADAPTER_METADATA_KEY: &str = "lora_adapter_metadata";

/// A LoRA file read into adapters, keyed by full module path (`unet.…`, `text_encoder.…`).
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub adapters: std::collections::BTreeMap<String, crate::nn::LoraAdapter>,
    pub metadata: std::collections::HashMap<String, String>,
}

fn component_alpha(meta: &std::collections::HashMap<String, String>, module: &str) -> Option<f64> {
    let comp = module.split('.').next()?;
    let j: serde_json::Value = serde_json::from_str(meta.get(ADAPTER_METADATA_KEY)?).ok()?;
    // alpha_pattern entries are keyed by module-name suffixes
    if let Some(pat) = j
        .get(format!("{comp}.alpha_pattern"))
        .and_then(|p| p.as_object())
    {
        let rest = &module[comp.len() + 1..];
        for (k, v) in pat {
            if rest == k || rest.ends_with(&format!(".{k}")) {
                return v.as_f64();
            }
        }
    }
    j.get(format!("{comp}.lora_alpha")).and_then(|v| v.as_f64())
}

/// Reads a diffusers/peft (or kohya-style `lora_down`/`lora_up` with `.alpha`) LoRA safetensors
/// file. Each adapter's scale is `multiplier * alpha / rank`, alpha from the module's `.alpha`
/// tensor, else the `lora_adapter_metadata` entry, else rank (scale 1, as diffusers).
pub fn load_lora(
    path: &std::path::Path,
    device: &candle_core::Device,
    dtype: candle_core::DType,
    multiplier: f64,
) -> crate::Result<LoraFile> {
    use std::collections::{BTreeMap, HashMap};
    let data = std::fs::read(path)?;
    let (_, st_meta) = safetensors::SafeTensors::read_metadata(&data)?;
    let metadata: HashMap<String, String> = st_meta.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&data, device)?;
    let mut downs: BTreeMap<String, candle_core::Tensor> = BTreeMap::new();
    let mut ups: BTreeMap<String, candle_core::Tensor> = BTreeMap::new();
    for (k, t) in &tensors {
        if let Some((m, part)) = parse_key(k) {
            let t = t.to_dtype(dtype)?;
            match part {
                LoraPart::Down => downs.insert(m.to_string(), t),
                LoraPart::Up => ups.insert(m.to_string(), t),
            };
        }
    }
    let mut adapters = BTreeMap::new();
    for (m, down) in downs {
        let up = ups
            .remove(&m)
            .ok_or_else(|| crate::Error::Lora(format!("{m}: lora_A without lora_B")))?;
        let rank = down.dims()[0];
        if up.dims().len() != 2 || up.dims()[1] != rank {
            return Err(crate::Error::Lora(format!(
                "{m}: rank mismatch {:?} vs {:?}",
                down.dims(),
                up.dims()
            )));
        }
        let alpha = match tensors.get(&alpha_key_for(&m)) {
            Some(a) => a
                .to_dtype(candle_core::DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()?[0],
            None => component_alpha(&metadata, &m).unwrap_or(rank as f64),
        };
        adapters.insert(
            m,
            crate::nn::LoraAdapter {
                down,
                up,
                scale: multiplier * alpha / rank as f64,
            },
        );
    }
    if let Some(m) = ups.keys().next() {
        return Err(crate::Error::Lora(format!("{m}: lora_B without lora_A")));
    }
    Ok(LoraFile { adapters, metadata })
}

/// Attaches the adapters of `component` (e.g. [`UNET_PREFIX`]) to the matching linears; returns how
/// many were attached. Fails when the file names a module of that component that does not exist
/// or whose shape does not match.
pub fn apply_lora(
    component: &str,
    linears: Vec<(String, &mut crate::nn::Linear)>,
    file: &LoraFile,
) -> crate::Result<usize> {
    let mut by_name: std::collections::HashMap<String, &mut crate::nn::Linear> = linears
        .into_iter()
        .map(|(n, l)| (module_path(component, &n), l))
        .collect();
    // text-encoder LoRAs written against transformers 5 omit the `text_model.` level
    let alias = |m: &str| -> String {
        let inner = format!("{component}.text_model.");
        match m.strip_prefix(&format!("{component}.")) {
            Some(rest) if !m.starts_with(&inner) && rest.starts_with("encoder.") => {
                format!("{inner}{rest}")
            }
            _ => m.to_string(),
        }
    };
    let prefix = format!("{component}.");
    let mut n = 0;
    for (m, a) in &file.adapters {
        if !m.starts_with(&prefix) {
            continue;
        }
        let lin = by_name
            .get_mut(&alias(m))
            .ok_or_else(|| crate::Error::Lora(format!("{m}: no such linear layer in the model")))?;
        if a.down.dims()[1] != lin.in_features() || a.up.dims()[0] != lin.out_features() {
            return Err(crate::Error::Lora(format!(
                "{m}: adapter {:?}/{:?} does not fit weight {:?}",
                a.down.dims(),
                a.up.dims(),
                lin.weight.dims()
            )));
        }
        lin.set_lora(a.clone());
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let m = module_path(
            UNET_PREFIX,
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        );
        let k = key_for(&m, LoraPart::Down);
        assert_eq!(
            k,
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight"
        );
        assert_eq!(parse_key(&k), Some((m.as_str(), LoraPart::Down)));
        assert_eq!(
            parse_key(&key_for(&m, LoraPart::Up)),
            Some((m.as_str(), LoraPart::Up))
        );
        assert_eq!(parse_key("unet.conv_in.weight"), None);
        assert_eq!("down".parse::<LoraPart>(), Ok(LoraPart::Down));
    }
}
