//! What training needs from the models, as small traits.
//!
//! The trainer and the training methods talk to the UNet, the text encoder, the VAE and the
//! noise schedule only through these traits, so a method (LoRA, Textual Inversion, ...) is a
//! parameterization of the models and not a new training loop.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Result, Tensor};

use crate::nn::Linear;
use crate::recompute::GradSink;

/// The noise-prediction network (the UNet).
pub trait Denoiser {
    /// Predicts the model output (epsilon or v) for `latents` `[B, C, H, W]` at the
    /// integer timesteps `timesteps` (one per batch element) given text states `context`
    /// `[B, L, D]`.
    fn predict(&self, latents: &Tensor, timesteps: &[u32], context: &Tensor) -> Result<Tensor>;
    fn linears(&mut self) -> Vec<&mut Linear>;
    /// Every base weight by its module path (e.g. for full fine-tuning and for checking that
    /// frozen weights receive no gradient).
    fn named_weights(&self) -> Vec<(String, Tensor)>;
    /// Rebuilds the network with `weights` in place of the weights of the same names (as
    /// [`named_weights`](Self::named_weights) names them); the others stay shared and adapters
    /// are dropped. Gradients reach whatever the given tensors derive from (variables for full
    /// fine-tuning, spectral shifts for SVDiff).
    fn replace_weights(&mut self, weights: &HashMap<String, Tensor>) -> Result<()>;
    /// Detaches the first context token's (BOS) key and value in every cross-attention, as
    /// Custom Diffusion's attention processor does: the same outputs, but no gradient reaches
    /// the key and value weights through the start token, which every prompt shares.
    fn detach_cross_attention_bos(&mut self, _on: bool) -> Result<()> {
        candle_core::bail!("this denoiser cannot detach the cross-attention start token")
    }
    /// Gradient checkpointing ([`crate::recompute`]): blocks are recomputed in the backward
    /// pass, and the gradients of the variables they use are added to `sink` (None: off).
    fn set_gradient_checkpointing(&mut self, _sink: Option<Arc<GradSink>>) -> Result<()> {
        candle_core::bail!("this denoiser cannot recompute its blocks")
    }
}

/// The text encoder together with its tokenizer.
pub trait PromptEncoder {
    /// Token ids of `prompt`, padded/truncated to the model's length.
    fn tokenize(&self, prompt: &str) -> Result<Vec<u32>>;
    /// Hidden states fed to the UNet's cross-attention for a batch of token ids `[B, L]`.
    fn encode_ids(&self, ids: &Tensor) -> Result<Tensor>;
    fn linears(&mut self) -> Vec<&mut Linear>;
    fn named_weights(&self) -> Vec<(String, Tensor)>;
    /// As [`Denoiser::replace_weights`].
    fn replace_weights(&mut self, weights: &HashMap<String, Tensor>) -> Result<()>;
    /// Token ids of `text` without start, end or padding tokens.
    fn token_ids(&self, text: &str) -> Result<Vec<u32>>;
    /// The token embedding matrix `[vocab, hidden]`, read at every forward pass, so that a method
    /// can replace it by a variable (textual inversion). `None` if the encoder has none.
    fn token_embedding_mut(&mut self) -> Option<&mut Tensor> {
        None
    }
    /// Adds a new whole-word token with `vectors` embedding rows (diffusers' multi-vector
    /// convention: `token`, `token_1`, ..., and a prompt's `token` stands for all of them) and
    /// grows the token embedding by that many zero rows, for the caller to set. Returns the new
    /// ids, which follow the existing rows.
    fn add_token(&mut self, token: &str, _vectors: usize) -> Result<Vec<u32>> {
        candle_core::bail!("this text encoder cannot add the token {token}")
    }
    /// As [`Denoiser::set_gradient_checkpointing`], for the encoder's layers; asked only of a
    /// text encoder that a gradient passes through.
    fn set_gradient_checkpointing(&mut self, _sink: Option<Arc<GradSink>>) -> Result<()> {
        candle_core::bail!("this text encoder cannot recompute its layers")
    }
}

/// The VAE encoder half.
pub trait LatentEncoder {
    /// Mean and standard deviation of the latent distribution of `pixels` `[B, 3, H, W]` in
    /// `[-1, 1]`, before the scaling factor.
    fn encode_dist(&self, pixels: &Tensor) -> Result<(Tensor, Tensor)>;
    fn scaling_factor(&self) -> f64;
    /// Pixels per latent cell along each side (8 for Stable Diffusion's VAE).
    fn downsampling_factor(&self) -> Option<u32> {
        None
    }
}

/// What the network is trained to predict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    Epsilon,
    VPrediction,
}

/// The forward (noising) process of the training scheduler.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    /// `alphas_cumprod[t]` for `t` in `0..num_train_timesteps`.
    pub alphas_cumprod: Vec<f64>,
    pub prediction: Prediction,
}

impl NoiseSchedule {
    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// `(sqrt(a_t), sqrt(1 - a_t))` as `[B, 1, 1, 1]` tensors for the batch timesteps.
    fn coefs(&self, timesteps: &[u32], like: &Tensor) -> Result<(Tensor, Tensor)> {
        let b = timesteps.len();
        let mut s = Vec::with_capacity(b);
        let mut s1 = Vec::with_capacity(b);
        for &t in timesteps {
            let a = *self
                .alphas_cumprod
                .get(t as usize)
                .ok_or_else(|| candle_core::Error::Msg(format!("timestep {t} out of range")))?;
            s.push(a.sqrt() as f32);
            s1.push((1.0 - a).sqrt() as f32);
        }
        let dev = like.device();
        let dt = like.dtype();
        Ok((
            Tensor::from_vec(s, (b, 1, 1, 1), dev)?.to_dtype(dt)?,
            Tensor::from_vec(s1, (b, 1, 1, 1), dev)?.to_dtype(dt)?,
        ))
    }

    /// `sqrt(a_t) x0 + sqrt(1 - a_t) noise` (diffusers' `add_noise`).
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[u32]) -> Result<Tensor> {
        let (a, s) = self.coefs(timesteps, x0)?;
        x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?
    }

    /// The regression target: the noise, or `sqrt(a_t) noise - sqrt(1 - a_t) x0` (diffusers'
    /// `get_velocity`).
    pub fn target(&self, x0: &Tensor, noise: &Tensor, timesteps: &[u32]) -> Result<Tensor> {
        match self.prediction {
            Prediction::Epsilon => Ok(noise.clone()),
            Prediction::VPrediction => {
                let (a, s) = self.coefs(timesteps, x0)?;
                noise.broadcast_mul(&a)? - x0.broadcast_mul(&s)?
            }
        }
    }

    /// The "scaled_linear" schedule of Stable Diffusion (beta 0.00085 to 0.012, 1000 steps).
    pub fn scaled_linear(
        num_train_timesteps: usize,
        beta_start: f64,
        beta_end: f64,
        prediction: Prediction,
    ) -> Self {
        let n = num_train_timesteps;
        let (a, b) = (beta_start.sqrt(), beta_end.sqrt());
        let mut acc = 1.0;
        let alphas_cumprod = (0..n)
            .map(|i| {
                let x = if n > 1 {
                    a + (b - a) * i as f64 / (n - 1) as f64
                } else {
                    a
                };
                acc *= 1.0 - x * x;
                acc
            })
            .collect();
        Self {
            alphas_cumprod,
            prediction,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn scaled_linear_matches_diffusers_endpoints() {
        let s = NoiseSchedule::scaled_linear(1000, 0.00085, 0.012, Prediction::Epsilon);
        // diffusers DDIMScheduler(beta_schedule="scaled_linear").alphas_cumprod[0] and [-1]
        assert!((s.alphas_cumprod[0] - 0.99915).abs() < 1e-9);
        assert!(
            (s.alphas_cumprod[999] - 0.00466).abs() < 1e-4,
            "{}",
            s.alphas_cumprod[999]
        );
    }

    #[test]
    fn velocity_and_noising_are_consistent() -> Result<()> {
        let dev = Device::Cpu;
        let s = NoiseSchedule::scaled_linear(1000, 0.00085, 0.012, Prediction::VPrediction);
        let x0 = Tensor::randn(0f32, 1.0, (2, 4, 3, 3), &dev)?;
        let n = Tensor::randn(0f32, 1.0, (2, 4, 3, 3), &dev)?;
        let ts = [10u32, 900];
        let xt = s.add_noise(&x0, &n, &ts)?;
        let v = s.target(&x0, &n, &ts)?;
        // x0 = sqrt(a) x_t - sqrt(1-a) v
        let (a, b) = s.coefs(&ts, &x0)?;
        let back = (xt.broadcast_mul(&a)? - v.broadcast_mul(&b)?)?;
        let d = (back - x0)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        Ok(())
    }
}
