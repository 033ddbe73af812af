//! Custom Diffusion (Kumari et al. 2023): the key and value projections of every UNet
//! cross-attention (`attn2.to_k`, `attn2.to_v`; with `weights: all` also `to_q` and `to_out.0`)
//! plus a new token `<sks>`, the start token's key and value detached, and the rescaling
//! augmentation with its loss mask; class-prior preservation comes from the trainer.
//!
//! Output, in the layout of diffusers' `train_custom_diffusion.py`:
//! `pytorch_custom_diffusion_weights.safetensors` with
//! `<block>.attn2.processor.to_k_custom_diffusion.weight`, `...to_v_custom_diffusion.weight`
//! (and `...to_q_custom_diffusion.weight`, `...to_out_custom_diffusion.0.weight` / `.bias`),
//! plus `<sks>.safetensors` = `{"<sks>": [hidden]}`.
//!
//! Loading it in diffusers: `pipe.unet.load_attn_procs(dir, weight_name=...)` installs nothing
//! when called directly (diffusers issue 9320: the processors are set only under the private
//! `_pipeline` argument), and with it refuses a safetensors file, which cannot hold the empty
//! entries of the self-attention processors. Build the processors instead:
//!
//! ```python
//! import torch
//! from diffusers import StableDiffusionPipeline
//! from diffusers.models.attention_processor import CustomDiffusionAttnProcessor
//! from safetensors.torch import load_file
//!
//! pipe = StableDiffusionPipeline.from_pretrained(BASE_MODEL)
//! weights = load_file(f"{OUT}/pytorch_custom_diffusion_weights.safetensors")
//! procs = {}
//! for name, proc in pipe.unet.attn_processors.items():
//!     mine = {k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")}
//!     if not mine:  # self-attention: unchanged
//!         procs[name] = proc
//!         continue
//!     k = mine["to_k_custom_diffusion.weight"]
//!     procs[name] = CustomDiffusionAttnProcessor(
//!         train_kv=True, train_q_out="to_q_custom_diffusion.weight" in mine,
//!         hidden_size=k.shape[0], cross_attention_dim=k.shape[1])
//!     procs[name].load_state_dict(mine)
//!     procs[name].to(pipe.device)
//! pipe.unet.set_attn_processor(procs)
//! pipe.load_textual_inversion(OUT, weight_name="<sks>.safetensors")
//! image = pipe("a <sks> dog on the beach").images[0]
//! ```
//!
//! Where we differ from the reference:
//! - The augmented instance loss is the mean squared error over the valid (photo) region. The
//!   reference sums the error over the 4 latent channels but the mask over one, so its instance
//!   loss is 4 times that mean, and in diffusers' port (whose prior loss is a plain mean) weighs
//!   4 times the prior loss; the original code scales both by 4, so our 1:1 is the original's
//!   balance. Without the augmentation the loss is the plain mean (the reference still masks
//!   the outer ring of latent cells then).
//! - The rescaling works on the photo as every method here preprocesses it (resized and
//!   centre-cropped to the training resolution), as the original code centre-crops; diffusers'
//!   port resizes the whole photo to a square, squashing a photo that is not square. Otherwise
//!   it is diffusers' (the original keeps photos of 0.6 to 1 times the size unscaled).
//! - Only the new token's row trains: the reference zeroes the other rows' gradients, but
//!   AdamW's weight decay still shrinks them by `1 - lr * 0.01` every step.
//! - The token is initialised from `initializer` (default the reference's `ktn`) as Textual
//!   Inversion does here; the defaults are the job spec's (500 steps at 1e-5, batch 1; the
//!   reference trains 250 steps at batch 2).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor, Var};
use rand::rngs::StdRng;
use rand::Rng;
use sidbooth_domain::train::CrossAttentionWeights;
use sidbooth_imaging::resample::{resize_gray, resize_rgb, Filter};

use super::textual_inversion::{load_embedding, NewToken, TOKEN_EMBEDDING};
use super::MethodEntry;
use super::{
    export_metadata, ExportContext, ExportInfo, ExportedWeights, ModelsMut, TrainingMethod,
};
use crate::pipeline::StableDiffusion;
use crate::train::augment::{Augmentation, Augmented, View};
use crate::train::loss::{MaskNormalization, MaskedLossConfig};
use crate::train::TrainError;

/// The file `save_attn_procs` writes and `load_attn_procs` reads.
pub const WEIGHTS_FILE: &str = "pytorch_custom_diffusion_weights.safetensors";

pub const ENTRY: MethodEntry = MethodEntry {
    kind: "custom_diffusion",
    marker: WEIGHTS_FILE,
    load: load_output,
};

/// `(weight suffix of a cross-attention, suffix of its processor's key)`.
const KEY_VALUE: [(&str, &str); 2] = [
    ("to_k.weight", "to_k_custom_diffusion.weight"),
    ("to_v.weight", "to_v_custom_diffusion.weight"),
];
const QUERY_OUT: [(&str, &str); 3] = [
    ("to_q.weight", "to_q_custom_diffusion.weight"),
    ("to_out.0.weight", "to_out_custom_diffusion.0.weight"),
    ("to_out.0.bias", "to_out_custom_diffusion.0.bias"),
];

fn suffixes(weights: CrossAttentionWeights) -> Vec<(&'static str, &'static str)> {
    match weights {
        CrossAttentionWeights::KeyValue => KEY_VALUE.to_vec(),
        CrossAttentionWeights::All => KEY_VALUE.iter().chain(&QUERY_OUT).copied().collect(),
    }
}

/// The processor key of a UNet weight (`<block>.attn2.to_k.weight` ->
/// `<block>.attn2.processor.to_k_custom_diffusion.weight`), if the weight is one of `of`.
fn processor_key(weight: &str, of: &[(&str, &str)]) -> Option<String> {
    of.iter().find_map(|(w, p)| {
        let block = weight.strip_suffix(&format!(".attn2.{w}"))?;
        Some(format!("{block}.attn2.processor.{p}"))
    })
}

/// The UNet module path and parameter (`weight` / `bias`) a processor key replaces.
fn module_of(key: &str) -> Option<(String, &'static str)> {
    let (block, p) = key.split_once(".attn2.processor.")?;
    let (w, _) = KEY_VALUE.iter().chain(&QUERY_OUT).find(|(_, s)| *s == p)?;
    let (module, param) = w.rsplit_once('.')?;
    let param = if param == "bias" { "bias" } else { "weight" };
    Some((format!("{block}.attn2.{module}"), param))
}

/// Files of an output directory named like a token (`<sks>.safetensors`), sorted.
fn token_files(dir: &Path) -> crate::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| crate::Error::Io(format!("{}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('<') && n.ends_with(">.safetensors"))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Puts the trained cross-attention weights into the pipeline's UNet and adds the learned
/// tokens; `scale` does not apply (the weights replace the base weights).
fn load_output(sd: &mut StableDiffusion, dir: &Path, _scale: f64) -> crate::Result<()> {
    let path = dir.join(WEIGHTS_FILE);
    let weights = candle_core::safetensors::load(&path, &sd.device)?;
    let (dtype, dev) = (sd.dtype, sd.device.clone());
    let mut linears: HashMap<String, &mut crate::nn::Linear> =
        sd.unet.linears_mut().into_iter().collect();
    for (key, t) in &weights {
        let bad = |why: String| crate::Error::Invalid(format!("{}: {key}: {why}", path.display()));
        let (module, param) =
            module_of(key).ok_or_else(|| bad("not a Custom Diffusion weight".into()))?;
        let lin = linears
            .get_mut(&module)
            .ok_or_else(|| bad(format!("the UNet has no {module}")))?;
        let slot = match param {
            "bias" => lin
                .bias
                .as_mut()
                .ok_or_else(|| bad(format!("{module} has no bias")))?,
            _ => &mut lin.weight,
        };
        if slot.dims() != t.dims() {
            return Err(bad(format!(
                "shape {:?}, the UNet's is {:?}",
                t.dims(),
                slot.dims()
            )));
        }
        *slot = t.to_dtype(dtype)?.to_device(&dev)?;
    }
    if weights.is_empty() {
        return Err(crate::Error::Invalid(format!(
            "{}: no weights",
            path.display()
        )));
    }
    for f in token_files(dir)? {
        load_embedding(sd, &f)?;
    }
    Ok(())
}

/// Custom Diffusion settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CustomDiffusionConfig {
    /// The new token, e.g. `<sks>`.
    pub token: String,
    /// The word whose (mean) embedding initialises the token.
    #[serde(default = "default_initializer")]
    pub initializer: String,
    #[serde(default)]
    pub weights: CrossAttentionWeights,
    /// The rescaling augmentation with its loss mask.
    #[serde(default = "yes")]
    pub augment: bool,
}

fn default_initializer() -> String {
    "ktn".into()
}

fn yes() -> bool {
    true
}

impl CustomDiffusionConfig {
    pub fn new(token: impl Into<String>) -> Self {
        Self {
            token: token.into(),
            initializer: default_initializer(),
            weights: CrossAttentionWeights::default(),
            augment: true,
        }
    }
}

/// Custom Diffusion: cross-attention weights and a new token.
pub struct CustomDiffusionMethod {
    cfg: CustomDiffusionConfig,
    /// `(processor key, UNet weight name, variable)`, sorted by key.
    weights: Vec<(String, String, Var)>,
    token: Option<NewToken>,
}

impl CustomDiffusionMethod {
    pub fn new(cfg: CustomDiffusionConfig) -> Result<Self, TrainError> {
        if cfg.token.trim().is_empty() || cfg.token.contains(char::is_whitespace) {
            return Err(TrainError::Config(format!(
                "custom diffusion needs a one-word token, not {:?}",
                cfg.token
            )));
        }
        Ok(Self {
            cfg,
            weights: Vec::new(),
            token: None,
        })
    }

    fn attached(&self) -> Result<&NewToken, TrainError> {
        self.token
            .as_ref()
            .ok_or_else(|| TrainError::Config("custom diffusion is not attached".into()))
    }

    /// Token id of the new token (`None` before [`TrainingMethod::attach`]).
    pub fn token_id(&self) -> Option<u32> {
        self.token.as_ref().map(|t| t.ids()[0])
    }

    /// The new token's learned row `[hidden]`.
    pub fn learned_token(&self) -> Result<Tensor, TrainError> {
        Ok(self.attached()?.rows().as_tensor().get(0)?)
    }

    fn put_weights(&self, models: &mut ModelsMut<'_>) -> Result<(), TrainError> {
        let map: HashMap<String, Tensor> = self
            .weights
            .iter()
            .map(|(_, name, var)| (name.clone(), var.as_tensor().clone()))
            .collect();
        models.unet.replace_weights(&map)?;
        models.unet.detach_cross_attention_bos(true)?;
        Ok(())
    }

    /// The diffusers key layout of the trained weights.
    fn weight_tensors(&self) -> Result<BTreeMap<String, Tensor>, TrainError> {
        self.weights
            .iter()
            .map(|(key, _, var)| Ok((key.clone(), var.as_tensor().copy()?)))
            .collect()
    }
}

impl TrainingMethod for CustomDiffusionMethod {
    fn kind(&self) -> &'static str {
        ENTRY.kind
    }

    fn attach(&mut self, mut models: ModelsMut<'_>, _seed: u64) -> Result<(), TrainError> {
        if self.token.is_some() {
            return Err(TrainError::Config(
                "custom diffusion is already attached".into(),
            ));
        }
        let of = suffixes(self.cfg.weights);
        let mut weights = Vec::new();
        for (name, w) in models.unet.named_weights() {
            if let Some(key) = processor_key(&name, &of) {
                let var = Var::from_tensor(&w.to_dtype(DType::F32)?)?;
                weights.push((key, name, var));
            }
        }
        if weights.is_empty() {
            return Err(TrainError::Config(
                "the UNet has no cross-attention weights to train".into(),
            ));
        }
        weights.sort_by(|a, b| a.0.cmp(&b.0));
        self.weights = weights;
        self.put_weights(&mut models)?;
        self.token = Some(NewToken::attach(
            models.text_encoder,
            &self.cfg.token,
            1,
            &self.cfg.initializer,
        )?);
        Ok(())
    }

    fn prepare(&self, mut models: ModelsMut<'_>) -> Result<(), TrainError> {
        self.put_weights(&mut models)?;
        self.attached()?.prepare(models.text_encoder)
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        let mut out: Vec<(String, Var)> = self
            .weights
            .iter()
            .map(|(key, _, var)| (key.clone(), var.clone()))
            .chain(
                self.token
                    .iter()
                    .map(|t| (TOKEN_EMBEDDING.to_string(), t.rows().clone())),
            )
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn trains_text_encoder(&self) -> bool {
        true
    }

    fn settings_json(&self) -> serde_json::Value {
        serde_json::json!({ "method": ENTRY.kind, "custom_diffusion": self.cfg })
    }

    fn augmentation(&self) -> Option<&dyn Augmentation> {
        self.cfg.augment.then_some(&Rescale as &dyn Augmentation)
    }

    /// The cross-attention weights in diffusers' processor layout.
    fn export(&self, info: &ExportInfo) -> Result<ExportedWeights, TrainError> {
        let mut metadata = export_metadata(info);
        metadata.insert("format".into(), "pt".into());
        metadata.insert("sidbooth.method".into(), ENTRY.kind.into());
        metadata.insert(
            "sidbooth.weights".into(),
            serde_json::to_value(self.cfg.weights)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
        );
        Ok(ExportedWeights {
            tensors: self.weight_tensors()?,
            metadata,
        })
    }

    fn write_output(
        &self,
        ctx: &ExportContext<'_>,
        dir: &Path,
    ) -> Result<Vec<PathBuf>, TrainError> {
        if ctx.options.a1111 {
            return Err(TrainError::Config(
                "no A1111 loader reads Custom Diffusion's attention weights; the A1111 layout \
                 exists for Textual Inversion"
                    .into(),
            ));
        }
        std::fs::create_dir_all(dir)?;
        let weights = self.export(ctx.info)?;
        weights.save(&dir.join(WEIGHTS_FILE))?;
        let token = self.attached()?.token().to_string();
        let embedding = ExportedWeights {
            tensors: BTreeMap::from([(token.clone(), self.learned_token()?)]),
            metadata: weights.metadata,
        };
        let token_file = format!("{token}.safetensors");
        embedding.save(&dir.join(&token_file))?;
        Ok(vec![PathBuf::from(WEIGHTS_FILE), PathBuf::from(token_file)])
    }
}

/// Where a rescaled photo lands in the training square (`CustomDiffusionDataset.preprocess`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Side of the resized photo in pixels.
    pub scale: u32,
    /// Offset of the photo in the square (smaller photos) or of the square in the photo
    /// (larger ones).
    pub top: u32,
    pub left: u32,
}

/// Custom Diffusion's augmentation (`CustomDiffusionDataset`): the photo is resized to a random
/// side between a third of the resolution and the resolution (two times in three) and placed at
/// a random spot on an empty square (zero in `[-1, 1]`), the loss masked to the photo's latent
/// cells less a one-cell border; or enlarged 1.2 to 1.4 times and cropped at a random spot. A
/// photo under 0.6 times the resolution gets "a far away " or "very small " before its caption,
/// an enlarged one "zoomed in " or "close up ".
#[derive(Debug, Clone, Copy, Default)]
pub struct Rescale;

impl Rescale {
    /// Draws a placement for a square of side `size`, as the reference draws it.
    pub fn draw(size: u32, rng: &mut StdRng) -> Placement {
        let scale = if rng.gen::<f64>() < 0.66 {
            rng.gen_range(size / 3..size + 1)
        } else {
            let (lo, hi) = ((1.2 * size as f64) as u32, (1.4 * size as f64) as u32);
            rng.gen_range(lo..hi.max(lo + 1))
        };
        let room = scale.abs_diff(size);
        let top = rng.gen_range(0..room + 1);
        let left = rng.gen_range(0..room + 1);
        Placement { scale, top, left }
    }

    /// The caption prefix of a placement's scale, if any.
    fn prefix(size: u32, scale: u32, rng: &mut StdRng) -> Option<&'static str> {
        let pick = |a, b, rng: &mut StdRng| if rng.gen_bool(0.5) { a } else { b };
        if (scale as f64) < 0.6 * size as f64 {
            Some(pick("a far away ", "very small ", rng))
        } else if scale > size {
            Some(pick("zoomed in ", "close up ", rng))
        } else {
            None
        }
    }

    /// The pixels `[3, R, R]` in `[-1, 1]` and the latent-cell weights `[R/f, R/f]` of `view`
    /// at `placement` (the reference's `preprocess`, with Pillow's bilinear resize).
    pub fn place(view: View<'_>, p: Placement) -> Result<(Vec<f32>, Vec<f32>), TrainError> {
        let (size, h) = view.image.dimensions();
        if size != h {
            return Err(TrainError::Config(
                "augmentation needs square photos".into(),
            ));
        }
        let f = view.latent_factor;
        let n = (size / f) as usize;
        if p.scale == 0 || p.top.max(p.left) > p.scale.abs_diff(size) {
            return Err(TrainError::Config(format!(
                "placement {p:?} does not fit {size}"
            )));
        }
        let (s, r) = (p.scale as usize, size as usize);
        let (top, left) = (p.top as usize, p.left as usize);
        let photo = resize_rgb(view.image, p.scale, p.scale, Filter::Bilinear);
        let subject = view
            .subject
            .map(|m| resize_gray(m, p.scale, p.scale, Filter::Bilinear));
        // (row, col) of the square -> (row, col) of the resized photo, if it shows there
        let source = |y: usize, x: usize| -> Option<(usize, usize)> {
            if s > r {
                Some((y + top, x + left))
            } else {
                (y >= top && y < top + s && x >= left && x < left + s).then(|| (y - top, x - left))
            }
        };
        let mut pixels = vec![0f32; 3 * r * r];
        let mut share = vec![0f32; n * n];
        for y in 0..r {
            for x in 0..r {
                let Some((sy, sx)) = source(y, x) else {
                    continue;
                };
                let px = photo.get_pixel(sx as u32, sy as u32).0;
                for c in 0..3 {
                    pixels[c * r * r + y * r + x] = (px[c] as f64 / 127.5 - 1.0) as f32;
                }
                let (cy, cx) = (y / f as usize, x / f as usize);
                if cy < n && cx < n {
                    share[cy * n + cx] += match &subject {
                        Some(m) => m.get_pixel(sx as u32, sy as u32).0[0] as f32 / 255.0,
                        None => 1.0,
                    };
                }
            }
        }
        let valid = |c: usize, at: usize| -> bool {
            if s > r {
                return true;
            }
            let (lo, hi) = (at / f as usize + 1, (at + s) / f as usize);
            c >= lo && c + 1 < hi
        };
        let area = (f * f) as f32;
        let weights = (0..n * n)
            .map(|i| {
                let (cy, cx) = (i / n, i % n);
                if valid(cy, top) && valid(cx, left) {
                    if subject.is_some() {
                        share[i] / area
                    } else {
                        1.0
                    }
                } else {
                    0.0
                }
            })
            .collect();
        Ok((pixels, weights))
    }
}

impl Augmentation for Rescale {
    fn apply(&self, view: View<'_>, rng: &mut StdRng) -> Result<Augmented, TrainError> {
        let size = view.image.width();
        let p = Self::draw(size, rng);
        let (pixels, weights) = Self::place(view, p)?;
        let caption = match Self::prefix(size, p.scale, rng) {
            Some(prefix) => format!("{prefix}{}", view.caption),
            None => view.caption.to_string(),
        };
        Ok(Augmented {
            pixels,
            caption,
            weights,
        })
    }

    /// The mean over the valid region.
    fn loss(&self) -> MaskedLossConfig {
        MaskedLossConfig {
            normalization: MaskNormalization::MaskedArea,
            unmasked_weight: 0.0,
        }
    }
}
