//! The engine's models seen through the training traits of [`super::host`].

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

use super::host::{Denoiser, LatentEncoder, NoiseSchedule, Prediction, PromptEncoder};
use super::TrainError;
use crate::clip::ClipTextModel;
use crate::nn::{Linear, VisitLinears};
use crate::recompute::GradSink;
use crate::scheduler::{DdimScheduler, Prediction as SchedPrediction};
use crate::tokenizer::ClipTokenizer;
use crate::unet::UNet2DConditionModel;
use crate::vae::AutoencoderKL;
use crate::weights;

/// The named weights of a model with some replaced, as a map a model can be built from.
fn merged(
    base: &[(String, Tensor)],
    replaced: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    if let Some(unknown) = replaced.keys().find(|k| !base.iter().any(|(n, _)| n == *k)) {
        candle_core::bail!("replace_weights: the model has no weight {unknown}");
    }
    Ok(base
        .iter()
        .map(|(n, t)| (n.clone(), replaced.get(n).unwrap_or(t).clone()))
        .collect())
}

fn engine_err(e: crate::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

fn linears_of<T: VisitLinears>(m: &mut T) -> Vec<&mut Linear> {
    let mut out = Vec::new();
    m.visit_linears(&mut out);
    out
}

/// The UNet with the dtype of its weights (inputs are cast to it, outputs back to f32).
#[derive(Clone)]
pub struct UNetDenoiser {
    pub model: UNet2DConditionModel,
    pub dtype: DType,
    /// Gradient checkpointing, kept across rebuilds of the model.
    pub recompute: Option<Arc<GradSink>>,
}

impl Denoiser for UNetDenoiser {
    fn predict(&self, latents: &Tensor, timesteps: &[u32], context: &Tensor) -> Result<Tensor> {
        let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
        let t = Tensor::from_vec(t, timesteps.len(), latents.device())?;
        self.model
            .forward(
                &latents.to_dtype(self.dtype)?,
                &t,
                &context.to_dtype(self.dtype)?,
            )?
            .to_dtype(DType::F32)
    }
    fn linears(&mut self) -> Vec<&mut Linear> {
        linears_of(&mut self.model)
    }
    fn named_weights(&self) -> Vec<(String, Tensor)> {
        self.model.named_weights().clone()
    }
    fn replace_weights(&mut self, weights: &HashMap<String, Tensor>) -> Result<()> {
        let map = merged(self.model.named_weights(), weights)?;
        let device = self.model.named_weights()[0].1.device().clone();
        let (vb, record) = weights::from_tensors(map, self.dtype, &device);
        let mut model = UNet2DConditionModel::new(vb, &self.model.config)?;
        // The rebuilt model names its weights too, so that it can be rebuilt again (a method
        // that replaces weights before every step).
        model.set_named_weights(record.take());
        model.set_gradient_checkpointing(self.recompute.clone());
        self.model = model;
        Ok(())
    }
    fn detach_cross_attention_bos(&mut self, on: bool) -> Result<()> {
        self.model.set_cross_attention_detach_bos(on);
        Ok(())
    }
    fn set_gradient_checkpointing(&mut self, sink: Option<Arc<GradSink>>) -> Result<()> {
        self.model.set_gradient_checkpointing(sink.clone());
        self.recompute = sink;
        Ok(())
    }
}

/// The token embedding's name among the text encoder's weights (transformers' parameter name).
const TOKEN_EMBEDDING_NAME: &str = "text_model.embeddings.token_embedding.weight";

/// The CLIP text encoder with its tokenizer.
#[derive(Clone)]
pub struct ClipPromptEncoder {
    pub model: ClipTextModel,
    pub tokenizer: ClipTokenizer,
}

impl PromptEncoder for ClipPromptEncoder {
    fn tokenize(&self, prompt: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(prompt).map_err(engine_err)
    }
    fn encode_ids(&self, ids: &Tensor) -> Result<Tensor> {
        self.model.forward(ids)?.to_dtype(DType::F32)
    }
    fn linears(&mut self) -> Vec<&mut Linear> {
        linears_of(&mut self.model)
    }
    fn token_ids(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.tokenize(text).map_err(engine_err)
    }
    fn token_embedding_mut(&mut self) -> Option<&mut Tensor> {
        Some(&mut self.model.token_embedding)
    }
    fn add_token(&mut self, token: &str, vectors: usize) -> Result<Vec<u32>> {
        let emb = &self.model.token_embedding;
        let rows = Tensor::zeros((vectors, emb.dim(1)?), emb.dtype(), emb.device())?;
        self.model
            .add_token(&mut self.tokenizer, token, &rows)
            .map_err(engine_err)
    }
    fn replace_weights(&mut self, weights: &HashMap<String, Tensor>) -> Result<()> {
        let map = merged(&self.named_weights(), weights)?;
        let device = self.model.token_embedding.device().clone();
        let (vb, record) = weights::from_tensors(map, self.model.token_embedding.dtype(), &device);
        let mut model = ClipTextModel::new(vb, &self.model.config)?;
        // As for the UNet: the rebuilt model can be rebuilt again.
        model.set_named_weights(record.take());
        model.set_gradient_checkpointing(self.model.gradient_checkpointing().cloned());
        self.model = model;
        Ok(())
    }
    fn set_gradient_checkpointing(&mut self, sink: Option<Arc<GradSink>>) -> Result<()> {
        self.model.set_gradient_checkpointing(sink);
        Ok(())
    }
    fn named_weights(&self) -> Vec<(String, Tensor)> {
        let mut w = self.model.named_weights().clone();
        let tok = &self.model.token_embedding;
        if !w.iter().any(|(_, t)| t.id() == tok.id()) {
            w.push((TOKEN_EMBEDDING_NAME.into(), tok.clone()));
        }
        w
    }
}

/// The VAE with the dtype of its weights.
#[derive(Clone)]
pub struct VaeEncoder {
    pub model: AutoencoderKL,
    pub dtype: DType,
}

impl LatentEncoder for VaeEncoder {
    fn encode_dist(&self, pixels: &Tensor) -> Result<(Tensor, Tensor)> {
        let d = self.model.encode(&pixels.to_dtype(self.dtype)?)?;
        Ok((
            d.mean.detach().to_dtype(DType::F32)?,
            d.std.detach().to_dtype(DType::F32)?,
        ))
    }
    fn scaling_factor(&self) -> f64 {
        self.model.scaling_factor()
    }
    fn downsampling_factor(&self) -> Option<u32> {
        Some(self.model.scale() as u32)
    }
}

impl NoiseSchedule {
    /// The training noise schedule of a diffusers scheduler configuration.
    pub fn from_ddim(s: &DdimScheduler) -> std::result::Result<Self, TrainError> {
        let prediction = match s.prediction {
            SchedPrediction::Epsilon => Prediction::Epsilon,
            SchedPrediction::VPrediction => Prediction::VPrediction,
            SchedPrediction::Sample => {
                return Err(TrainError::Config(
                    "training with prediction_type=sample is not supported".into(),
                ))
            }
        };
        Ok(Self {
            alphas_cumprod: s.alphas_cumprod.clone(),
            prediction,
        })
    }
}

/// The frozen base models training starts from. Cloning is cheap (tensors are shared); `run`
/// never modifies them.
#[derive(Clone)]
pub struct TrainModels {
    pub unet: UNetDenoiser,
    pub text_encoder: ClipPromptEncoder,
    pub vae: VaeEncoder,
    pub schedule: NoiseSchedule,
    pub device: Device,
    /// Where the base model's files are, for outputs that include its unchanged parts (a
    /// DreamBooth pipeline directory copies its VAE, scheduler and tokenizer).
    pub source: Option<BaseSource>,
}

/// The files a base model was loaded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseSource {
    /// A diffusers directory.
    Dir(std::path::PathBuf),
    /// The built-in tiny model of this seed ([`crate::tiny::TinyModel::build`]).
    Tiny(u64),
}

impl TrainModels {
    /// The built-in tiny model (seeded random weights, f32 on the CPU) for tests and `dev`.
    pub fn tiny(seed: u64) -> std::result::Result<Self, TrainError> {
        let t =
            crate::tiny::TinyModel::build(seed).map_err(|e| TrainError::Config(e.to_string()))?;
        Ok(Self::from_pipeline(&t.sd)?.with_source(BaseSource::Tiny(seed)))
    }

    /// The same models, known to come from `source`.
    pub fn with_source(mut self, source: BaseSource) -> Self {
        self.source = Some(source);
        self
    }

    /// The models of a loaded pipeline (shares its tensors).
    pub fn from_pipeline(
        sd: &crate::pipeline::StableDiffusion,
    ) -> std::result::Result<Self, TrainError> {
        let sched = sd
            .scheduler()
            .map_err(|e| TrainError::Config(e.to_string()))?;
        Ok(Self {
            unet: UNetDenoiser {
                model: sd.unet.clone(),
                dtype: sd.dtype,
                recompute: None,
            },
            text_encoder: ClipPromptEncoder {
                model: sd.text_encoder.clone(),
                tokenizer: sd.tokenizer.clone(),
            },
            vae: VaeEncoder {
                model: sd.vae.clone(),
                dtype: sd.dtype,
            },
            schedule: NoiseSchedule::from_ddim(&sched)?,
            device: sd.device.clone(),
            source: None,
        })
    }
}
