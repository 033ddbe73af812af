//! SVDiff (Han et al., "SVDiff: Compact Parameter Space for Diffusion Fine-Tuning", ICCV 2023):
//! every weight `W = U diag(S) Vᵀ` of the UNet (and, on request, of the text encoder) becomes
//! `U diag(relu(S + δ)) Vᵀ`, and only the spectral shifts `δ` learn.
//!
//! As svdiff-pytorch (`svdiff_pytorch/layers.py`, `train_svdiff.py`): linear and embedding
//! weights are decomposed as they are, convolution kernels as `[out, in * kh * kw]`, 1-D weights
//! (the norm scales) as one row `[1, n]` (so their single shift rescales the whole vector);
//! biases stay frozen; the shifts start at zero; the 1-D shifts have their own, much smaller,
//! learning rate; the output is `spectral_shifts.safetensors` (and
//! `spectral_shifts_te.safetensors`) with the keys `<module path>.delta`.
//!
//! The loader's scale is the reference's spectral shift scale (`relu(S + scale δ)`, one for the
//! UNet and the text encoder, as its `inference.py`).
//!
//! Where we differ: the decompositions are computed once per base model and cached (in memory,
//! and in [`svd::SvdCache::set_dir`]'s directory) instead of at every model load; they are
//! computed in f64 and rounded to f32 (the reference: f32 LAPACK, whose error moves some
//! gradients of near-degenerate singular directions by about 1e-4 of their tensor's largest).
//! The reference puts a parameter in the 1-D group when its name contains "norm"; here a shift
//! is 1-D when its weight is, which selects the same shifts in Stable Diffusion's UNet and CLIP
//! text encoder. On request the output also holds a diffusers pipeline with the shifts merged
//! into the weights ([`MERGED_DIR`]), which the reference does not write.

pub mod svd;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use super::dreambooth::pipeline_dir;
use super::MethodEntry;
use super::{
    export_metadata, ExportContext, ExportInfo, ExportedWeights, ModelsMut, TrainingMethod,
};
use crate::pipeline::StableDiffusion;
use crate::train::host::{Denoiser, PromptEncoder};
use crate::train::TrainError;
use svd::{Factor, SvdCache};

/// The UNet's shifts, as svdiff-pytorch's `load_unet_for_svdiff` reads them.
pub const SHIFTS_FILE: &str = "spectral_shifts.safetensors";
/// The text encoder's shifts (`load_text_encoder_for_svdiff`).
pub const SHIFTS_TE_FILE: &str = "spectral_shifts_te.safetensors";
/// The subdirectory of the merged diffusers pipeline ([`ExportOptions::merged_pipeline`]).
///
/// [`ExportOptions::merged_pipeline`]: super::ExportOptions::merged_pipeline
pub const MERGED_DIR: &str = "merged_pipeline";

pub const ENTRY: MethodEntry = MethodEntry {
    kind: "svdiff",
    marker: SHIFTS_FILE,
    load: load_output,
};

/// Prefixes of the trainable parameters' names.
const UNET: &str = "unet";
const TEXT_ENCODER: &str = "text_encoder";

/// SVDiff settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SvdiffConfig {
    /// Also shift the text encoder's weights.
    pub train_text_encoder: bool,
    /// The run's base learning rate, which the shifts of matrices, kernels and embeddings use.
    pub learning_rate: f64,
    /// The rate of the 1-D shifts when the base rate is `learning_rate` (a schedule scales both
    /// alike, as torch's schedulers scale every parameter group).
    pub learning_rate_1d: f64,
}

impl Default for SvdiffConfig {
    /// svdiff-pytorch's `train_svdiff.py` defaults.
    fn default() -> Self {
        Self {
            train_text_encoder: false,
            learning_rate: 1e-3,
            learning_rate_1d: 1e-6,
        }
    }
}

/// The shift of one weight and the factors it shifts.
struct Shift {
    /// The weight's name in the model (`named_weights`).
    weight: String,
    /// The export key, `<module path>.delta`.
    key: String,
    shape: Vec<usize>,
    factor: Factor,
    delta: Var,
}

/// The weights that carry a shift: every `.weight` of the component (linear, convolution,
/// embedding and norm weights; the reference replaces every such layer of the UNet and of the
/// text encoder by its SVD version).
pub fn shiftable(named: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    let mut w: Vec<(String, Tensor)> = named
        .iter()
        .filter(|(n, _)| n.ends_with(".weight"))
        .cloned()
        .collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

/// svdiff-pytorch's key of a weight's shift: the module path with `.delta`, the text encoder's
/// under `text_model.` (its CLIPTextModel is transformers 4's, whose layers live there) also when
/// the checkpoint names them without it.
pub fn delta_key(component: &str, weight: &str) -> String {
    let module = weight.strip_suffix(".weight").unwrap_or(weight);
    if component == TEXT_ENCODER && !module.starts_with("text_model.") {
        format!("text_model.{module}.delta")
    } else {
        format!("{module}.delta")
    }
}

/// `U diag(relu(S + scale δ)) Vᵀ` in the weight's shape, in f32, differentiable in `δ`. The
/// ReLU passes no gradient where `S + scale δ <= 0` (as torch's; candle's `relu` passes it at 0).
fn shifted_weight(
    f: &Factor,
    delta: &Tensor,
    scale: f64,
    shape: &[usize],
) -> candle_core::Result<Tensor> {
    let x = f.s.add(&(delta.to_dtype(DType::F32)? * scale)?)?;
    let open = x.gt(0f64)?.to_dtype(DType::F32)?;
    let s = x.mul(&open)?;
    f.u.broadcast_mul(&s.unsqueeze(0)?)?
        .matmul(&f.vt)?
        .reshape(shape)
}

fn factor_on(f: &Factor, dev: &Device) -> candle_core::Result<Factor> {
    Ok(Factor {
        u: f.u.to_device(dev)?,
        s: f.s.to_device(dev)?,
        vt: f.vt.to_device(dev)?,
    })
}

/// A zero shift for every shiftable weight of a component.
fn shifts_for(component: &str, named: &[(String, Tensor)]) -> Result<Vec<Shift>, TrainError> {
    let weights = shiftable(named);
    if weights.is_empty() {
        return Err(TrainError::Config(format!(
            "SVDiff: the {component} has no weights"
        )));
    }
    let (factors, _) = SvdCache::shared().factors(&weights)?;
    weights
        .iter()
        .map(|(name, w)| {
            let factor = factor_on(&factors.by_name[name], w.device())?;
            let delta = Var::zeros(factor.s.dims1()?, DType::F32, w.device())?;
            Ok(Shift {
                weight: name.clone(),
                key: delta_key(component, name),
                shape: w.dims().to_vec(),
                factor,
                delta,
            })
        })
        .collect()
}

/// The current shifted weights of a component, by weight name.
fn current(shifts: &[Shift]) -> candle_core::Result<HashMap<String, Tensor>> {
    shifts
        .iter()
        .map(|s| {
            let w = shifted_weight(&s.factor, s.delta.as_tensor(), 1.0, &s.shape)?;
            Ok((s.weight.clone(), w))
        })
        .collect()
}

/// SVDiff: spectral shifts of every UNet (and optionally text-encoder) weight.
pub struct SvdiffMethod {
    cfg: SvdiffConfig,
    unet: Vec<Shift>,
    text: Vec<Shift>,
    /// Trainable names of the shifts of 1-D weights.
    one_d: HashSet<String>,
}

impl SvdiffMethod {
    pub fn new(cfg: SvdiffConfig) -> Result<Self, TrainError> {
        for (what, lr) in [
            ("learning_rate", cfg.learning_rate),
            ("learning_rate_1d", cfg.learning_rate_1d),
        ] {
            if lr.is_nan() || lr <= 0.0 {
                return Err(TrainError::Config(format!(
                    "SVDiff {what} must be positive, not {lr}"
                )));
            }
        }
        Ok(Self {
            cfg,
            unet: Vec::new(),
            text: Vec::new(),
            one_d: HashSet::new(),
        })
    }

    /// The trainable name of a shift, e.g. `unet.conv_in.delta`.
    fn param_name(component: &str, s: &Shift) -> String {
        format!("{component}.{}", s.key)
    }

    fn components(&self) -> [(&'static str, &[Shift]); 2] {
        [(UNET, &self.unet), (TEXT_ENCODER, &self.text)]
    }

    /// The shifts of one component in svdiff-pytorch's layout (`<module path>.delta`).
    fn export_shifts(
        &self,
        shifts: &[Shift],
        info: &ExportInfo,
    ) -> Result<ExportedWeights, TrainError> {
        if shifts.is_empty() {
            return Err(TrainError::Config("SVDiff is not attached".into()));
        }
        let mut tensors = BTreeMap::new();
        for s in shifts {
            tensors.insert(s.key.clone(), s.delta.as_tensor().copy()?);
        }
        Ok(ExportedWeights {
            tensors,
            metadata: weights_metadata(info),
        })
    }

    /// The diffusers pipeline with the shifts applied (for tools without an SVDiff loader): the
    /// shifted UNet and, when it was trained, text encoder; the rest of the base model as it is.
    /// Returns its files relative to the output directory.
    fn write_merged(
        &self,
        ctx: &ExportContext<'_>,
        dir: &Path,
    ) -> Result<Vec<PathBuf>, TrainError> {
        let source = ctx.base.source.as_ref().ok_or_else(|| {
            TrainError::Config(
                "a merged SVDiff pipeline copies the base model's VAE, scheduler and tokenizer: \
                 the base models must name their source"
                    .into(),
            )
        })?;
        let unet = merged(&Denoiser::named_weights(&ctx.base.unet), &self.unet)?;
        let text = if self.text.is_empty() {
            None
        } else {
            Some(merged(
                &PromptEncoder::named_weights(&ctx.base.text_encoder),
                &self.text,
            )?)
        };
        let mut metadata = weights_metadata(ctx.info);
        metadata.insert("sidbooth.merged".into(), "true".into());
        let files = pipeline_dir::write(source, dir, &unet, text.as_ref(), &metadata)?;
        Ok(files
            .into_iter()
            .map(|f| Path::new(MERGED_DIR).join(f))
            .collect())
    }
}

impl TrainingMethod for SvdiffMethod {
    fn kind(&self) -> &'static str {
        ENTRY.kind
    }

    fn attach(&mut self, models: ModelsMut<'_>, _seed: u64) -> Result<(), TrainError> {
        if !self.unet.is_empty() {
            return Err(TrainError::Config("SVDiff is already attached".into()));
        }
        self.unet = shifts_for(UNET, &models.unet.named_weights())?;
        if self.cfg.train_text_encoder {
            self.text = shifts_for(TEXT_ENCODER, &models.text_encoder.named_weights())?;
        }
        self.one_d = self
            .components()
            .into_iter()
            .flat_map(|(c, shifts)| {
                shifts
                    .iter()
                    .filter(|s| s.shape.len() == 1)
                    .map(move |s| Self::param_name(c, s))
            })
            .collect();
        Ok(())
    }

    fn prepare(&self, models: ModelsMut<'_>) -> Result<(), TrainError> {
        models.unet.replace_weights(&current(&self.unet)?)?;
        if !self.text.is_empty() {
            models.text_encoder.replace_weights(&current(&self.text)?)?;
        }
        Ok(())
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        let mut out: Vec<(String, Var)> = self
            .components()
            .into_iter()
            .flat_map(|(c, shifts)| {
                shifts
                    .iter()
                    .map(move |s| (Self::param_name(c, s), s.delta.clone()))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn learning_rate(&self, name: &str, base: f64) -> f64 {
        if self.one_d.contains(name) {
            base * self.cfg.learning_rate_1d / self.cfg.learning_rate
        } else {
            base
        }
    }

    fn trains_text_encoder(&self) -> bool {
        self.cfg.train_text_encoder
    }

    fn settings_json(&self) -> serde_json::Value {
        serde_json::json!({ "method": "svdiff", "svdiff": self.cfg })
    }

    /// The UNet's shifts, `spectral_shifts.safetensors`.
    fn export(&self, info: &ExportInfo) -> Result<ExportedWeights, TrainError> {
        self.export_shifts(&self.unet, info)
    }

    fn write_output(
        &self,
        ctx: &ExportContext<'_>,
        dir: &Path,
    ) -> Result<Vec<PathBuf>, TrainError> {
        std::fs::create_dir_all(dir)?;
        self.export(ctx.info)?.save(&dir.join(SHIFTS_FILE))?;
        let mut files = vec![PathBuf::from(SHIFTS_FILE)];
        if !self.text.is_empty() {
            self.export_shifts(&self.text, ctx.info)?
                .save(&dir.join(SHIFTS_TE_FILE))?;
            files.push(PathBuf::from(SHIFTS_TE_FILE));
        }
        if ctx.options.merged_pipeline {
            files.extend(self.write_merged(ctx, &dir.join(MERGED_DIR))?);
        }
        Ok(files)
    }
}

/// Metadata of the written weight files.
fn weights_metadata(info: &ExportInfo) -> BTreeMap<String, String> {
    let mut m = export_metadata(info);
    m.insert("format".into(), "pt".into());
    m.insert("sidbooth.method".into(), ENTRY.kind.into());
    m
}

/// All weights of a component in f32, the shifted ones as the shifts make them now.
fn merged(
    base: &[(String, Tensor)],
    shifts: &[Shift],
) -> candle_core::Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (name, w) in base {
        out.insert(name.clone(), w.to_dtype(DType::F32)?);
    }
    for s in shifts {
        let w = shifted_weight(&s.factor, s.delta.as_tensor(), 1.0, &s.shape)?;
        out.insert(s.weight.clone(), w.detach());
    }
    Ok(out)
}

/// Reads the shifts of one component; `None` when the file does not exist.
fn read_shifts(path: &Path) -> crate::Result<Option<HashMap<String, Tensor>>> {
    if !path.is_file() {
        return Ok(None);
    }
    Ok(Some(candle_core::safetensors::load(path, &Device::Cpu)?))
}

/// The weights of a component with `deltas` (svdiff-pytorch keys) applied at `scale`, merged
/// into all of its named weights. A key that names no weight of the model is an error.
fn apply_shifts(
    component: &str,
    named: &[(String, Tensor)],
    deltas: &HashMap<String, Tensor>,
    scale: f64,
) -> crate::Result<HashMap<String, Tensor>> {
    let weights = shiftable(named);
    let by_key: HashMap<String, &(String, Tensor)> = weights
        .iter()
        .map(|nw| (delta_key(component, &nw.0), nw))
        .collect();
    if let Some(unknown) = deltas.keys().find(|k| !by_key.contains_key(*k)) {
        return Err(crate::Error::Invalid(format!(
            "spectral shift {unknown} names no {component} weight"
        )));
    }
    let (factors, _) = SvdCache::shared().factors(&weights)?;
    let mut out: HashMap<String, Tensor> = named.iter().cloned().collect();
    for (key, delta) in deltas {
        let (name, w) = by_key[key];
        let f = factor_on(&factors.by_name[name], w.device())?;
        if delta.dims() != f.s.dims() {
            return Err(crate::Error::Invalid(format!(
                "spectral shift {key}: shape {:?}, the weight has {:?} singular values",
                delta.dims(),
                f.s.dims()
            )));
        }
        let shifted = shifted_weight(&f, &delta.to_device(w.device())?, scale, w.dims())?;
        out.insert(name.clone(), shifted.to_dtype(w.dtype())?);
    }
    Ok(out)
}

/// Applies an SVDiff output to a loaded pipeline: the UNet's shifts and, when the output has
/// them, the text encoder's, at `scale` (svdiff-pytorch's spectral shift scale; 1 as trained).
fn load_output(sd: &mut StableDiffusion, dir: &Path, scale: f64) -> crate::Result<()> {
    let unet = read_shifts(&dir.join(SHIFTS_FILE))?
        .ok_or_else(|| crate::Error::Invalid(format!("{} has no {SHIFTS_FILE}", dir.display())))?;
    let w = apply_shifts(UNET, sd.unet.named_weights(), &unet, scale)?;
    let (vb, record) = crate::weights::from_tensors(w, sd.dtype, &sd.device);
    let mut model = crate::unet::UNet2DConditionModel::new(vb, &sd.unet.config)?;
    model.set_named_weights(record.take());
    sd.unet = model;
    if let Some(text) = read_shifts(&dir.join(SHIFTS_TE_FILE))? {
        let w = apply_shifts(TEXT_ENCODER, sd.text_encoder.named_weights(), &text, scale)?;
        let (vb, record) = crate::weights::from_tensors(w, sd.dtype, &sd.device);
        let mut model = crate::clip::ClipTextModel::new(vb, &sd.text_encoder.config)?;
        model.set_named_weights(record.take());
        sd.text_encoder = model;
    }
    Ok(())
}
