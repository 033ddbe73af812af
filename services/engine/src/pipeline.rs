//! Text-to-image sampling: diffusers' `StableDiffusionPipeline` with DDIM (eta 0), classifier-free
//! guidance, negative prompts, seeded or given initial latents, and optional attention capture.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::attention::AttentionRecorder;
use crate::clip::ClipTextModel;
use crate::config::{ModelDir, SchedulerConfig, Variant};
use crate::error::{Error, Result};
use crate::scheduler::DdimScheduler;
use crate::tokenizer::ClipTokenizer;
use crate::unet::UNet2DConditionModel;
use crate::vae::AutoencoderKL;
use crate::weights;

/// Where and in which precision to run.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub device: Device,
    /// F32 on the CPU; F16 or BF16 on a GPU.
    pub dtype: DType,
    pub variant: Variant,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            variant: Variant::Full,
        }
    }
}

/// A loaded Stable Diffusion model.
pub struct StableDiffusion {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler_config: SchedulerConfig,
    pub device: Device,
    pub dtype: DType,
}

/// One generation request; [`Default`] gives the paper's settings (DDIM 50 steps, guidance 7.5).
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub guidance_scale: f64,
    pub steps: usize,
    pub seed: u64,
    /// Image size in pixels; `None`: the UNet's `sample_size` times the VAE factor.
    pub height: Option<usize>,
    pub width: Option<usize>,
    pub num_images: usize,
    /// Initial latents `[num_images, C, h, w]` (replace the seeded noise).
    pub init_latents: Option<Tensor>,
    /// Record the cross-attention of this word's tokens (e.g. `sks`).
    pub attention_word: Option<String>,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: None,
            guidance_scale: 7.5,
            steps: 50,
            seed: 0,
            height: None,
            width: None,
            num_images: 1,
            init_latents: None,
            attention_word: None,
        }
    }
}

pub struct GenerateOutput {
    pub images: Vec<RgbImage>,
    /// Initial latents used (f32, CPU), e.g. to save with [`save_latents`].
    pub init_latents: Tensor,
    /// Final (unscaled-by-VAE) latents before decoding, f32 on the CPU.
    pub latents: Tensor,
    /// `[num_images, h, w]` averaged cross-attention of the chosen word (latent resolution).
    pub attention_maps: Option<Tensor>,
}

/// Seeded initial noise: `rand::rngs::StdRng::seed_from_u64(seed)` (ChaCha12) drawn as standard
/// normals by Box-Muller in f32, in row-major order of `shape`, on the CPU; so the same seed gives
/// the same latents on any device and dtype.
pub fn initial_latents(seed: u64, shape: &[usize]) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v = weights::randn_vec(&mut rng, n);
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// The seed of image `index` of a request seeded with `seed`. Each image's noise is drawn from
/// its own seed, so image `index` of a batch is the image that a one-image request with this
/// seed makes: the worker samples one image per call and the CLI a batch, and both number and
/// record their images by this seed.
pub fn image_seed(seed: u64, index: usize) -> u64 {
    seed.wrapping_add(index as u64)
}

/// Saves latents as `.npy` (by extension) or safetensors (tensor name `latents`).
pub fn save_latents(t: &Tensor, path: &Path) -> Result<()> {
    let t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    if path.extension().and_then(|e| e.to_str()) == Some("npy") {
        t.write_npy(path)?;
    } else {
        let mut m = std::collections::HashMap::new();
        m.insert("latents".to_string(), t);
        candle_core::safetensors::save(&m, path)?;
    }
    Ok(())
}

/// Loads latents saved by [`save_latents`] (or any `.npy`, or a safetensors file with one tensor
/// or a tensor named `latents`).
pub fn load_latents(path: &Path) -> Result<Tensor> {
    let t = if path.extension().and_then(|e| e.to_str()) == Some("npy") {
        Tensor::read_npy(path)?
    } else {
        let m = candle_core::safetensors::load(path, &Device::Cpu)?;
        match m.get("latents") {
            Some(t) => t.clone(),
            None if m.len() == 1 => m.into_values().next().expect("one tensor"),
            None => {
                return Err(Error::Invalid(format!(
                    "{}: no tensor named latents",
                    path.display()
                )))
            }
        }
    };
    Ok(t.to_dtype(DType::F32)?)
}

/// Images `[B, 3, H, W]` in `[0, 1]` to RGB (`round(x * 255)`, as diffusers' `numpy_to_pil`).
pub fn tensor_to_images(x: &Tensor) -> Result<Vec<RgbImage>> {
    let x = x.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    let (b, c, h, w) = x.dims4()?;
    if c != 3 {
        return Err(Error::Invalid(format!("expected 3 channels, got {c}")));
    }
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let v = x
            .get(i)?
            .permute((1, 2, 0))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let bytes: Vec<u8> = v
            .iter()
            .map(|p| (p.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect();
        out.push(
            RgbImage::from_raw(w as u32, h as u32, bytes)
                .ok_or_else(|| Error::Image("buffer size".into()))?,
        );
    }
    Ok(out)
}

impl StableDiffusion {
    /// Loads a diffusers directory.
    pub fn load(dir: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        let md = ModelDir::open(dir)?;
        let (dev, dt) = (&opts.device, opts.dtype);
        let tokenizer = ClipTokenizer::from_dir(md.tokenizer_dir())?;
        let (vb, rec) =
            weights::from_safetensors(&md.weights_path("text_encoder", opts.variant)?, dt, dev)?;
        let mut text_encoder = ClipTextModel::new(vb, &md.text_encoder)?;
        text_encoder.set_named_weights(rec.take());
        let (vb, rec) =
            weights::from_safetensors(&md.weights_path("unet", opts.variant)?, dt, dev)?;
        let mut unet = UNet2DConditionModel::new(vb, &md.unet)?;
        unet.set_named_weights(rec.take());
        let (vb, _) = weights::from_safetensors(&md.weights_path("vae", opts.variant)?, dt, dev)?;
        let vae = AutoencoderKL::new(vb, &md.vae)?;
        Ok(Self {
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler_config: md.scheduler,
            device: dev.clone(),
            dtype: dt,
        })
    }

    pub fn scheduler(&self) -> Result<DdimScheduler> {
        DdimScheduler::new(&self.scheduler_config)
    }

    /// Adds a learned token (Textual Inversion, Custom Diffusion) with its embedding `rows`
    /// `[n, hidden]` to the tokenizer and the text encoder, as diffusers' `load_textual_inversion`
    /// does: several rows become `token`, `token_1`, ..., all of them wherever a prompt says
    /// `token`. Returns the new token ids.
    pub fn add_token_embeddings(&mut self, token: &str, rows: &Tensor) -> Result<Vec<u32>> {
        self.text_encoder
            .add_token(&mut self.tokenizer, token, rows)
    }

    /// Attaches the UNet and text-encoder adapters of a diffusers LoRA file (scale multiplied by
    /// `multiplier`); returns the number of adapted layers.
    pub fn load_lora(&mut self, path: &Path, multiplier: f64) -> Result<usize> {
        let f = crate::lora::load_lora(path, &self.device, self.dtype, multiplier)?;
        let n = crate::lora::apply_lora(crate::lora::UNET_PREFIX, self.unet.linears_mut(), &f)?
            + crate::lora::apply_lora(
                crate::lora::TEXT_ENCODER_PREFIX,
                self.text_encoder.linears_mut(),
                &f,
            )?;
        if n == 0 {
            return Err(Error::Lora(format!(
                "{}: no adapter matched the model",
                path.display()
            )));
        }
        Ok(n)
    }

    /// Token ids `[B, 77]` (u32) of the prompts.
    pub fn tokenize(&self, prompts: &[&str]) -> Result<Tensor> {
        let mut all = Vec::new();
        for p in prompts {
            all.extend(self.tokenizer.encode(p)?);
        }
        Ok(Tensor::from_vec(
            all,
            (prompts.len(), self.tokenizer.max_length),
            &self.device,
        )?)
    }

    /// Text-encoder hidden states `[B, 77, dim]` of the prompts.
    pub fn encode_prompt(&self, prompts: &[&str]) -> Result<Tensor> {
        Ok(self.text_encoder.forward(&self.tokenize(prompts)?)?)
    }

    /// VAE factor between pixels and latents.
    pub fn vae_scale(&self) -> usize {
        self.vae.scale()
    }

    /// Decodes (scaled) diffusion latents to images in `[0, 1]`, `[B, 3, H, W]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = (latents.to_dtype(self.dtype)? / self.vae.scaling_factor())?;
        let x = self.vae.decode(&z)?;
        Ok(((x / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
    }

    /// Generates images. `progress(i, n)` is called after each denoising step; `cancel` is checked
    /// before each step (then [`Error::Canceled`] is returned).
    pub fn generate(
        &self,
        req: &GenerateRequest,
        progress: Option<&mut (dyn FnMut(usize, usize) + Send)>,
        cancel: Option<&AtomicBool>,
    ) -> Result<GenerateOutput> {
        crate::kernels::on_compute_threads(&self.device, || {
            self.generate_here(req, progress, cancel)
        })
    }

    fn generate_here(
        &self,
        req: &GenerateRequest,
        mut progress: Option<&mut (dyn FnMut(usize, usize) + Send)>,
        cancel: Option<&AtomicBool>,
    ) -> Result<GenerateOutput> {
        let n = req.num_images.max(1);
        let f = self.vae_scale();
        let default_px = self.unet.config.sample_size.unwrap_or(64) * f;
        let (h, w) = (
            req.height.unwrap_or(default_px),
            req.width.unwrap_or(default_px),
        );
        if h % f != 0 || w % f != 0 {
            return Err(Error::Invalid(format!(
                "height and width must be multiples of {f}"
            )));
        }
        let (lh, lw) = (h / f, w / f);
        let shape = [n, self.unet.config.in_channels, lh, lw];
        let init = match &req.init_latents {
            Some(t) => {
                if t.dims() != shape {
                    return Err(Error::Invalid(format!(
                        "init latents {:?}, expected {:?}",
                        t.dims(),
                        shape
                    )));
                }
                t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?
            }
            None => {
                let one = [1, shape[1], lh, lw];
                let each = (0..n)
                    .map(|i| initial_latents(image_seed(req.seed, i), &one))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&each, 0)?
            }
        };
        let mut sched = self.scheduler()?;
        sched.set_timesteps(req.steps)?;
        let cfg = req.guidance_scale > 1.0;

        let cond = self.encode_prompt(&[req.prompt.as_str()])?;
        let cond = cond.repeat((n, 1, 1))?;
        let context = if cfg {
            let neg = req.negative_prompt.as_deref().unwrap_or("");
            let unc = self.encode_prompt(&[neg])?.repeat((n, 1, 1))?;
            Tensor::cat(&[&unc, &cond], 0)?
        } else {
            cond
        };

        let mut recorder = match &req.attention_word {
            Some(word) => {
                let pos = self.tokenizer.token_positions(&req.prompt, word)?;
                if pos.is_empty() {
                    return Err(Error::Invalid(format!(
                        "'{word}' does not occur in the prompt"
                    )));
                }
                let mut r = AttentionRecorder::new(pos, (lh, lw));
                if cfg {
                    r.rows = Some((n, n));
                }
                Some(r)
            }
            None => None,
        };

        let mut latents =
            (init.to_device(&self.device)?.to_dtype(self.dtype)? * sched.init_noise_sigma())?;
        let timesteps = sched.timesteps().to_vec();
        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Err(Error::Canceled);
            }
            let input = if cfg {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let tt = Tensor::new(&[t as f32], &self.device)?;
            let pred = self
                .unet
                .forward_with(&input, &tt, &context, recorder.as_mut())?;
            let pred = if cfg {
                let u = pred.narrow(0, 0, n)?;
                let c = pred.narrow(0, n, n)?;
                (&u + ((c - &u)? * req.guidance_scale)?)?
            } else {
                pred
            };
            latents = sched.step(&pred, t, &latents)?;
            if let Some(p) = progress.as_deref_mut() {
                p(i + 1, total);
            }
        }
        let images = tensor_to_images(&self.decode(&latents)?)?;
        let attention_maps = match &recorder {
            Some(r) => r.maps()?,
            None => None,
        };
        Ok(GenerateOutput {
            images,
            init_latents: init,
            latents: latents.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
            attention_maps,
        })
    }
}
