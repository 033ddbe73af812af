//! The evaluation models as the worker uses them: where they come from, loaded once per worker
//! on a blocking thread, on the engine's device.
//!
//! Describe needs SAM (and CLIP to rank SAM's proposals when there is no vision-language model)
//! to make subject masks; evaluate needs CLIP, and DINO and SAM for the measures that use them.

use std::{path::PathBuf, sync::Arc};

use sidbooth_evaluate::evaluator::Evaluators;
use tokio::sync::OnceCell;

use crate::{engine::EngineArgs, error::StageError};

/// Where CLIP, DINO and SAM come from. Nothing is ever downloaded.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EvaluateArgs {
    /// CLIP for the measures and for ranking SAM's mask proposals: a local directory in the
    /// layout of openai/clip-vit-base-patch32 (config.json, model.safetensors, tokenizer files,
    /// preprocessor_config.json).
    #[arg(long, env = "SIDBOOTH_CLIP_DIR")]
    pub clip_dir: Option<PathBuf>,
    /// DINO ViT-S/16 for DreamBooth's DINO measure: a directory in the layout of
    /// facebook/dino-vits16.
    #[arg(long, env = "SIDBOOTH_DINO_DIR")]
    pub dino_dir: Option<PathBuf>,
    /// Segment Anything (ViT-B) for subject masks: a directory with the facebookresearch
    /// checkpoint as safetensors (model.safetensors) and, for other sizes, a config.json.
    #[arg(long, env = "SIDBOOTH_SAM_DIR")]
    pub sam_dir: Option<PathBuf>,
    /// Use tiny random-weight CLIP, DINO and SAM built from this seed instead (tests, demos:
    /// their numbers mean nothing, and reports say so).
    #[arg(long, env = "SIDBOOTH_TINY_EVALUATORS")]
    pub tiny_evaluators: Option<u64>,
}

impl EvaluateArgs {
    pub fn has_clip(&self) -> bool {
        self.tiny_evaluators.is_some() || self.clip_dir.is_some()
    }

    pub fn has_dino(&self) -> bool {
        self.tiny_evaluators.is_some() || self.dino_dir.is_some()
    }

    pub fn has_sam(&self) -> bool {
        self.tiny_evaluators.is_some() || self.sam_dir.is_some()
    }
}

/// The evaluation models, loaded on first use and shared by the jobs of this worker.
pub struct EvaluatorHandle {
    args: EvaluateArgs,
    engine: EngineArgs,
    models: OnceCell<Arc<Evaluators>>,
}

impl EvaluatorHandle {
    pub fn new(args: EvaluateArgs, engine: EngineArgs) -> Self {
        Self {
            args,
            engine,
            models: OnceCell::new(),
        }
    }

    pub fn args(&self) -> &EvaluateArgs {
        &self.args
    }

    /// The models configured; the first call loads them on a blocking thread. A directory that
    /// cannot be loaded (a missing file or tensor) fails the stage with the loader's message.
    pub async fn get(&self) -> Result<Arc<Evaluators>, StageError> {
        self.models
            .get_or_try_init(|| async {
                let args = self.args.clone();
                let device = self.engine.device_only()?;
                tokio::task::spawn_blocking(move || {
                    let loaded = match args.tiny_evaluators {
                        Some(seed) => Evaluators::tiny(seed, &device),
                        None => Evaluators::load(
                            args.clip_dir.as_deref(),
                            args.dino_dir.as_deref(),
                            args.sam_dir.as_deref(),
                            &device,
                        ),
                    };
                    loaded.map(Arc::new).map_err(|e| {
                        StageError::permanent(
                            "evaluator_load",
                            format!("loading the evaluation models: {e}"),
                        )
                    })
                })
                .await
                .map_err(|e| StageError::transient("worker_panic", e.to_string()))?
            })
            .await
            .cloned()
    }
}
