//! The files of a SAM directory: which weights file and which sizes.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use sidbooth_engine::weights::from_safetensors;

use super::config::SamConfig;
use crate::error::{EvalError, Result};

/// `config.json` of a SAM directory, or ViT-B's sizes without one.
pub fn read_config(dir: &Path) -> Result<SamConfig> {
    let path = dir.join("config.json");
    let cfg = match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str::<SamConfig>(&text)
            .map_err(|e| EvalError::config(&path, e.to_string()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => SamConfig::vit_b(),
        Err(e) => return Err(EvalError::io(&path, e)),
    };
    cfg.validate()
        .map_err(|reason| EvalError::config(&path, reason))?;
    Ok(cfg)
}

/// `model.safetensors`, else the only `*.safetensors` file of the directory.
pub fn weights_file(dir: &Path) -> Result<PathBuf> {
    let preferred = dir.join("model.safetensors");
    if preferred.is_file() {
        return Ok(preferred);
    }
    let entries = std::fs::read_dir(dir).map_err(|e| EvalError::io(dir, e))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(EvalError::io(
            dir,
            "no model.safetensors (nor any *.safetensors file)",
        )),
        _ => {
            found.sort();
            Err(EvalError::config(
                dir,
                format!("several *.safetensors files and no model.safetensors: {found:?}"),
            ))
        }
    }
}

/// Memory-maps the weights as f32 on `device`; an absent tensor is named in the error.
pub fn open<'a>(path: &Path, device: &Device) -> Result<VarBuilder<'a>> {
    Ok(from_safetensors(path, DType::F32, device)
        .map_err(|e| EvalError::loading(path, e))?
        .0)
}
