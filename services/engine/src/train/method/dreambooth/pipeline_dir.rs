//! The diffusers pipeline directory of a fine-tuned model: the trained UNet and text encoder,
//! everything else as the base model has it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use super::MODEL_INDEX;
use crate::config::{ModelDir, Variant};
use crate::train::adapters::BaseSource;
use crate::train::TrainError;

/// The components written; `model_index.json` names no other.
const COMPONENTS: [&str; 5] = ["unet", "text_encoder", "vae", "scheduler", "tokenizer"];

pub const UNET_WEIGHTS: &str = "unet/diffusion_pytorch_model.safetensors";
pub const TEXT_ENCODER_WEIGHTS: &str = "text_encoder/model.safetensors";
pub const VAE_WEIGHTS: &str = "vae/diffusion_pytorch_model.safetensors";

fn engine(e: crate::Error) -> TrainError {
    TrainError::Config(e.to_string())
}

/// Writes the pipeline into `dir`: the UNet `unet` (diffusers names), the text encoder
/// `text_encoder` (transformers names) or the base's when it was not trained, and the rest of
/// `source`. The component directories are written afresh. Returns the files, relative to
/// `dir`.
pub fn write(
    source: &BaseSource,
    dir: &Path,
    unet: &BTreeMap<String, Tensor>,
    text_encoder: Option<&BTreeMap<String, Tensor>>,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<PathBuf>, TrainError> {
    std::fs::create_dir_all(dir)?;
    if let BaseSource::Dir(base) = source {
        if base.canonicalize()? == dir.canonicalize()? {
            return Err(TrainError::Config(format!(
                "{}: the output directory is the base model's",
                dir.display()
            )));
        }
    }
    for c in COMPONENTS {
        let sub = dir.join(c);
        if sub.exists() {
            std::fs::remove_dir_all(&sub)?;
        }
    }
    match source {
        BaseSource::Dir(base) => copy_base(base, dir, text_encoder.is_none())?,
        BaseSource::Tiny(seed) => crate::tiny::TinyModel::build(*seed)
            .and_then(|t| t.save_diffusers_dir(dir))
            .map_err(engine)?,
    }
    crate::train::io::save(&dir.join(UNET_WEIGHTS), unet, metadata)?;
    if let Some(te) = text_encoder {
        crate::train::io::save(&dir.join(TEXT_ENCODER_WEIGHTS), te, metadata)?;
    }
    let mut files = vec![PathBuf::from(MODEL_INDEX)];
    for c in COMPONENTS {
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir.join(c))?
            .map(|e| e.map(|e| Path::new(c).join(e.file_name())))
            .collect::<Result<_, _>>()?;
        names.sort();
        files.extend(names);
    }
    Ok(files)
}

/// Copies from the diffusers directory `base` what the pipeline keeps: `model_index.json`
/// without the components not written, the scheduler and tokenizer directories, the
/// configurations, the VAE weights and, when `with_text_encoder`, the text encoder's.
fn copy_base(base: &Path, dir: &Path, with_text_encoder: bool) -> Result<(), TrainError> {
    let md = ModelDir::open(base).map_err(engine)?;
    let index_text = std::fs::read_to_string(base.join(MODEL_INDEX))?;
    let mut index: serde_json::Value = serde_json::from_str(&index_text)
        .map_err(|e| TrainError::Format(format!("{}: {e}", base.join(MODEL_INDEX).display())))?;
    if let Some(map) = index.as_object_mut() {
        for (name, value) in map.iter_mut() {
            let is_component = value.as_array().is_some_and(|a| a.len() == 2);
            if is_component && !COMPONENTS.contains(&name.as_str()) {
                *value = serde_json::json!([null, null]);
            }
        }
        if map.contains_key("requires_safety_checker") {
            map.insert("requires_safety_checker".into(), false.into());
        }
    }
    let pretty = serde_json::to_string_pretty(&index).expect("a JSON value serializes");
    std::fs::write(dir.join(MODEL_INDEX), pretty)?;
    for c in ["scheduler", "tokenizer"] {
        std::fs::create_dir_all(dir.join(c))?;
        for entry in std::fs::read_dir(base.join(c))? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                std::fs::copy(entry.path(), dir.join(c).join(entry.file_name()))?;
            }
        }
    }
    for c in ["unet", "text_encoder", "vae"] {
        std::fs::create_dir_all(dir.join(c))?;
        std::fs::copy(
            base.join(c).join("config.json"),
            dir.join(c).join("config.json"),
        )?;
    }
    let weights = |c: &str| md.weights_path(c, Variant::Full).map_err(engine);
    std::fs::copy(weights("vae")?, dir.join(VAE_WEIGHTS))?;
    if with_text_encoder {
        std::fs::copy(weights("text_encoder")?, dir.join(TEXT_ENCODER_WEIGHTS))?;
    }
    Ok(())
}
