//! The engine's models seen through the training traits of [`super::host`].

use candle_core::{DType, Result, Tensor};

use super::host::{Denoiser, LatentEncoder, NoiseSchedule, Prediction, PromptEncoder};
use crate::clip::ClipTextModel;
use crate::nn::{Linear, VisitLinears};
use crate::scheduler::{DdimScheduler, Prediction as SchedPrediction};
use crate::tokenizer::ClipTokenizer;
use crate::unet::UNet2DConditionModel;
use crate::vae::AutoencoderKL;

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
}

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
    fn named_weights(&self) -> Vec<(String, Tensor)> {
        let mut w = self.model.named_weights().clone();
        let tok = &self.model.token_embedding;
        if !w.iter().any(|(_, t)| t.id() == tok.id()) {
            w.push((
                "text_model.embeddings.token_embedding.weight".into(),
                tok.clone(),
            ));
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
}

impl NoiseSchedule {
    /// The training noise schedule of a diffusers scheduler configuration.
    pub fn from_ddim(s: &DdimScheduler) -> std::result::Result<Self, super::TrainError> {
        let prediction = match s.prediction {
            SchedPrediction::Epsilon => Prediction::Epsilon,
            SchedPrediction::VPrediction => Prediction::VPrediction,
            SchedPrediction::Sample => {
                return Err(super::TrainError::Config(
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
