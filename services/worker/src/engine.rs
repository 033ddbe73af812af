//! The diffusion engine as the worker uses it: where the base model comes from, loading it once
//! per worker on a blocking thread, and a cancel flag that a dropped stage raises.
//!
//! The engine is synchronous and CPU/GPU bound, so every call into it runs under
//! `spawn_blocking`; Postgres and storage I/O stay on the async runtime and talk to the engine
//! thread through channels.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use candle_core::{DType, Device};
use sidbooth_engine::{
    pipeline::{LoadOptions, StableDiffusion},
    tiny::TinyModel,
    train::{adapters::BaseSource, method::svdiff::svd::SvdCache},
};
use tokio::sync::OnceCell;

use crate::error::StageError;

/// Where the base model comes from and where it runs.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// A diffusers-layout model directory (e.g. a local copy of stable-diffusion-2-1-base).
    /// Nothing is ever downloaded.
    #[arg(long, env = "SIDBOOTH_MODEL_DIR")]
    pub model_dir: Option<PathBuf>,
    /// Use the built-in tiny model built from this seed instead of a model directory. It runs the
    /// whole pipeline on a CPU in seconds (tests, demos); its images are not meaningful.
    #[arg(long, env = "SIDBOOTH_TINY_MODEL")]
    pub tiny_model: Option<u64>,
    /// Device: `cpu`, or `cuda` / `cuda:N` in a build with the `cuda` feature.
    #[arg(long, env = "SIDBOOTH_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Half precision on a GPU: `f16` or `bf16` (the CPU always runs f32).
    #[arg(long, env = "SIDBOOTH_GPU_DTYPE", default_value = "f16")]
    pub gpu_dtype: String,
    /// Save a training checkpoint to storage every this many steps, so a worker that dies
    /// resumes from the last one.
    #[arg(long, env = "SIDBOOTH_CHECKPOINT_EVERY", default_value_t = 100)]
    pub checkpoint_every: u64,
    /// Where SVDiff keeps the singular value decompositions of base weights (keyed by their
    /// contents), so the next job on the same base model does not compute them again. Without
    /// it they are kept in memory only.
    #[arg(long, env = "SIDBOOTH_SVD_CACHE_DIR")]
    pub svd_cache_dir: Option<PathBuf>,
}

impl Default for EngineArgs {
    fn default() -> Self {
        Self {
            model_dir: None,
            tiny_model: None,
            device: "cpu".into(),
            gpu_dtype: "f16".into(),
            checkpoint_every: 100,
            svd_cache_dir: None,
        }
    }
}

impl EngineArgs {
    /// A short name of the base model, stored in the exported weights' metadata.
    pub fn model_name(&self) -> String {
        match (&self.tiny_model, &self.model_dir) {
            (Some(seed), _) => format!("sidbooth-tiny-{seed}"),
            (None, Some(dir)) => dir.display().to_string(),
            (None, None) => "none".into(),
        }
    }

    /// Where the base model's files are (whole-pipeline outputs copy its unchanged parts).
    pub fn base_source(&self) -> Option<BaseSource> {
        match (&self.tiny_model, &self.model_dir) {
            (Some(seed), _) => Some(BaseSource::Tiny(*seed)),
            (None, Some(dir)) => Some(BaseSource::Dir(dir.clone())),
            (None, None) => None,
        }
    }

    /// The device alone, for models that always run in f32 (the evaluators).
    pub fn device_only(&self) -> Result<Device, StageError> {
        self.device().map(|(device, _)| device)
    }

    fn device(&self) -> Result<(Device, DType), StageError> {
        let bad = |msg: String| StageError::permanent("engine_config", msg);
        match self.device.as_str() {
            "cpu" => Ok((Device::Cpu, DType::F32)),
            cuda if cuda.starts_with("cuda") => {
                let ordinal = cuda
                    .strip_prefix("cuda")
                    .and_then(|rest| rest.strip_prefix(':'))
                    .map_or(Ok(0), |n| n.parse::<usize>())
                    .map_err(|_| bad(format!("unknown device {cuda:?}")))?;
                let device = Device::new_cuda(ordinal).map_err(|e| bad(e.to_string()))?;
                let dtype = match self.gpu_dtype.as_str() {
                    "f16" => DType::F16,
                    "bf16" => DType::BF16,
                    "f32" => DType::F32,
                    other => return Err(bad(format!("unknown dtype {other:?}"))),
                };
                Ok((device, dtype))
            }
            other => Err(bad(format!(
                "unknown device {other:?}; use cpu or cuda[:N]"
            ))),
        }
    }
}

/// The base model, loaded on first use and shared by the jobs of this worker.
pub struct EngineHandle {
    args: EngineArgs,
    base: OnceCell<Arc<StableDiffusion>>,
}

impl EngineHandle {
    pub fn new(args: EngineArgs) -> Self {
        // The decomposition cache is one per process, as the base model is.
        if let Some(dir) = &args.svd_cache_dir {
            SvdCache::shared().set_dir(Some(dir.clone()));
        }
        Self {
            args,
            base: OnceCell::new(),
        }
    }

    pub fn args(&self) -> &EngineArgs {
        &self.args
    }

    /// The base model; the first call loads it on a blocking thread.
    pub async fn base(&self) -> Result<Arc<StableDiffusion>, StageError> {
        self.base
            .get_or_try_init(|| async {
                let args = self.args.clone();
                tokio::task::spawn_blocking(move || load(&args))
                    .await
                    .map_err(|e| StageError::transient("engine_panic", e.to_string()))?
                    .map(Arc::new)
            })
            .await
            .cloned()
    }
}

fn load(args: &EngineArgs) -> Result<StableDiffusion, StageError> {
    let (device, dtype) = args.device()?;
    let engine_err = |e: sidbooth_engine::Error| StageError::permanent("model_load", e.to_string());
    match (&args.tiny_model, &args.model_dir) {
        (Some(seed), _) => Ok(TinyModel::build_on(*seed, &device, dtype)
            .map_err(engine_err)?
            .sd),
        (None, Some(dir)) => {
            let options = LoadOptions {
                device,
                dtype,
                ..LoadOptions::default()
            };
            StableDiffusion::load(dir, &options).map_err(engine_err)
        }
        (None, None) => Err(StageError::permanent(
            "model_not_configured",
            "no base model: set SIDBOOTH_MODEL_DIR to a diffusers model directory \
             (or SIDBOOTH_TINY_MODEL for the built-in test model)",
        )),
    }
}

/// A copy of the base model whose adapters can be changed without touching the base (the
/// tensors are shared, not copied).
pub fn fork(base: &StableDiffusion) -> StableDiffusion {
    StableDiffusion {
        tokenizer: base.tokenizer.clone(),
        text_encoder: base.text_encoder.clone(),
        unet: base.unet.clone(),
        vae: base.vae.clone(),
        scheduler_config: base.scheduler_config.clone(),
        device: base.device.clone(),
        dtype: base.dtype,
    }
}

/// Raised when dropped: a stage future that is dropped (canceled, lease lost, shutdown) stops
/// the engine thread at its next step.
pub struct CancelOnDrop(pub Arc<AtomicBool>);

impl Default for CancelOnDrop {
    fn default() -> Self {
        Self(Arc::new(AtomicBool::new(false)))
    }
}

impl CancelOnDrop {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}
