//! The entry point used by the CLI and the worker: photos and settings in, trained weights out.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use image::RgbImage;

use super::adapters::TrainModels;
use super::augment::{AugmentPhotos, Augmenter};
use super::data::{list_images, CaptionedPhoto, LatentSet, PhotoSource};
use super::method::{ExportContext, ExportInfo, ExportOptions, ModelsMut};
use super::registry::MethodConfig;
use super::trainer::{Callbacks, LoopConfig, LoopOutcome, TrainInputs, Trainer};
use super::TrainError;

/// Class-prior preservation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PriorConfig {
    /// e.g. `a photo of dog`.
    pub class_prompt: String,
    /// Folder of class images; missing ones are generated into it.
    pub class_dir: PathBuf,
    pub num_class_images: usize,
    /// Seed of the generated class images.
    pub seed: u64,
}

/// Samples class images from the base model (the pipeline implements it). `Sync`: a run hands
/// it to the CPU kernels' threads with the rest of its work.
pub trait ClassImageGenerator: Sync {
    /// Images `first..first + n` of `prompt` at `resolution`, image `i` seeded with `seed + i`.
    /// Returns `Ok(None)` when `cancel` was set.
    fn generate(
        &self,
        prompt: &str,
        seed: u64,
        first: usize,
        n: usize,
        resolution: u32,
        cancel: Option<&AtomicBool>,
    ) -> Result<Option<Vec<RgbImage>>, TrainError>;
}

/// Everything a training run needs besides the models.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub method: MethodConfig,
    /// Training photos with one caption each.
    pub photos: Vec<CaptionedPhoto>,
    pub prior: Option<PriorConfig>,
    /// Square training resolution in pixels (multiple of 8).
    pub resolution: u32,
    /// Random horizontal flip.
    pub flip: bool,
    pub loop_cfg: LoopConfig,
    /// The directory the method's output files are written into.
    pub output_dir: PathBuf,
    pub export_options: ExportOptions,
    pub export_info: ExportInfo,
}

impl TrainConfig {
    /// Defaults of the paper and diffusers' DreamBooth LoRA script: 512x512, no flip, 1000
    /// steps, batch 1, learning rate 1e-4 constant, AdamW (0.9, 0.999, 1e-2, 1e-8), gradient
    /// clipping at 1.0, no prior preservation, the method's default output files.
    pub fn new(
        method: MethodConfig,
        photos: Vec<CaptionedPhoto>,
        export_info: ExportInfo,
        output_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            method,
            photos,
            prior: None,
            resolution: 512,
            flip: false,
            loop_cfg: LoopConfig::default(),
            output_dir: output_dir.into(),
            export_options: ExportOptions::default(),
            export_info,
        }
    }
}

/// How a run ended. `steps` counts optimizer steps completed, including those of a resumed
/// checkpoint; a run canceled before its loop started (e.g. while generating class images)
/// reports 0.
#[derive(Debug, Clone)]
pub enum TrainOutcome {
    Completed {
        steps: u64,
        last_loss: Option<f64>,
        /// The output files, relative to the output directory.
        files: Vec<PathBuf>,
    },
    Canceled {
        steps: u64,
        last_checkpoint: Option<PathBuf>,
    },
}

/// Class image paths, generating the missing ones; `None` when canceled.
fn ensure_class_images(
    prior: &PriorConfig,
    resolution: u32,
    generator: Option<&dyn ClassImageGenerator>,
    cancel: Option<&AtomicBool>,
) -> Result<Option<Vec<PathBuf>>, TrainError> {
    std::fs::create_dir_all(&prior.class_dir)?;
    let mut have = list_images(&prior.class_dir)?;
    if have.len() < prior.num_class_images {
        let missing = prior.num_class_images - have.len();
        let gen = generator.ok_or_else(|| {
            TrainError::Config(format!(
                "{} has {} class images, {} needed, and no generator was given",
                prior.class_dir.display(),
                have.len(),
                prior.num_class_images
            ))
        })?;
        let first = have.len();
        let Some(imgs) = gen.generate(
            &prior.class_prompt,
            prior.seed,
            first,
            missing,
            resolution,
            cancel,
        )?
        else {
            return Ok(None);
        };
        for (k, img) in imgs.iter().enumerate() {
            let p = prior.class_dir.join(format!("class-{:05}.png", first + k));
            img.save(&p).map_err(|e| TrainError::Image {
                path: p.display().to_string(),
                msg: e.to_string(),
            })?;
        }
        have = list_images(&prior.class_dir)?;
    }
    have.truncate(prior.num_class_images);
    Ok(Some(have))
}

/// Trains `cfg.method` on `cfg.photos` starting from `models` (which stay unchanged).
/// Synchronous; returns when done, canceled (through `callbacks.cancel`) or failed.
pub fn run(
    cfg: &TrainConfig,
    models: &TrainModels,
    class_generator: Option<&dyn ClassImageGenerator>,
    callbacks: &mut Callbacks<'_>,
) -> Result<TrainOutcome, TrainError> {
    crate::kernels::on_compute_threads(&models.device, || {
        run_here(cfg, models, class_generator, callbacks)
    })
}

fn run_here(
    cfg: &TrainConfig,
    models: &TrainModels,
    class_generator: Option<&dyn ClassImageGenerator>,
    callbacks: &mut Callbacks<'_>,
) -> Result<TrainOutcome, TrainError> {
    if cfg.export_options.kohya && !matches!(cfg.method, MethodConfig::Lora(_)) {
        return Err(TrainError::Config(
            "the kohya layout exists for LoRA only".into(),
        ));
    }
    let mut unet = models.unet.clone();
    let mut text = models.text_encoder.clone();
    let mut method = cfg.method.build()?;
    method.attach(
        ModelsMut {
            unet: &mut unet,
            text_encoder: &mut text,
        },
        cfg.loop_cfg.seed,
    )?;

    let instance = LatentSet::prepare(
        &cfg.photos,
        &models.vae,
        cfg.resolution,
        cfg.flip,
        &models.device,
    )?;
    let cancel = callbacks.cancel.clone();
    let canceled = || cancel.as_ref().is_some_and(|c| c.load(Ordering::SeqCst));
    let class = match &cfg.prior {
        None => None,
        Some(p) => {
            let Some(paths) =
                ensure_class_images(p, cfg.resolution, class_generator, cancel.as_deref())?
            else {
                return Ok(TrainOutcome::Canceled {
                    steps: 0,
                    last_checkpoint: None,
                });
            };
            let photos: Vec<CaptionedPhoto> = paths
                .into_iter()
                .map(|path| CaptionedPhoto {
                    source: PhotoSource::Path(path),
                    caption: p.class_prompt.clone(),
                    mask: None,
                })
                .collect();
            Some(LatentSet::prepare(
                &photos,
                &models.vae,
                cfg.resolution,
                cfg.flip,
                &models.device,
            )?)
        }
    };
    if canceled() {
        return Ok(TrainOutcome::Canceled {
            steps: 0,
            last_checkpoint: None,
        });
    }
    // A method that draws a new view of each photo every step encodes the views itself; the
    // cached latents still give the examples and their captions.
    let augment_photos = match method.augmentation() {
        Some(_) => Some(AugmentPhotos::prepare(
            &cfg.photos,
            cfg.resolution,
            cfg.flip,
        )?),
        None => None,
    };
    let inputs = TrainInputs {
        unet: &mut unet,
        text_encoder: &mut text,
        schedule: &models.schedule,
        method: method.as_ref(),
        instance: &instance,
        class: class.as_ref(),
    };
    let mut trainer = Trainer::new(inputs, cfg.loop_cfg.clone())?;
    if let (Some(augmentation), Some(photos)) = (method.augmentation(), &augment_photos) {
        trainer = trainer.with_augmentation(Augmenter {
            augmentation,
            photos,
            vae: &models.vae,
        })?;
    }
    match trainer.run(callbacks)? {
        LoopOutcome::Canceled {
            steps,
            last_checkpoint,
            ..
        } => Ok(TrainOutcome::Canceled {
            steps,
            last_checkpoint,
        }),
        LoopOutcome::Completed {
            steps, last_loss, ..
        } => {
            drop(trainer);
            let info = ExportInfo {
                steps,
                ..cfg.export_info.clone()
            };
            let ctx = ExportContext {
                info: &info,
                options: &cfg.export_options,
                unet: &unet,
                text_encoder: &text,
                base: models,
            };
            let files = method.write_output(&ctx, &cfg.output_dir)?;
            Ok(TrainOutcome::Completed {
                steps,
                last_loss,
                files,
            })
        }
    }
}

/// Captions from a file: a JSON object with a `descriptions` array (as
/// `examples/dog6/manual-descriptions.json`), a JSON array of strings, or one caption per
/// non-empty line.
pub fn captions_from_file(path: &Path) -> Result<Vec<String>, TrainError> {
    let text = std::fs::read_to_string(path)?;
    let bad = |m: &str| TrainError::Format(format!("{}: {m}", path.display()));
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(&e.to_string()))?;
        let arr = match &v {
            serde_json::Value::Array(a) => a,
            serde_json::Value::Object(o) => o
                .get("descriptions")
                .and_then(|d| d.as_array())
                .ok_or_else(|| bad("no \"descriptions\" array"))?,
            _ => return Err(bad("expected an array or an object")),
        };
        arr.iter()
            .map(|d| {
                d.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad("descriptions must be strings"))
            })
            .collect()
    } else {
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }
}

/// Photos of `dir` (sorted) with captions from `captions` (one per line, same order) or, when
/// `captions` is `None`, all with `default_caption`.
pub fn photos_from_dir(
    dir: &Path,
    captions: Option<&[String]>,
    default_caption: &str,
) -> Result<Vec<CaptionedPhoto>, TrainError> {
    let paths = list_images(dir)?;
    if let Some(c) = captions {
        if c.len() != paths.len() {
            return Err(TrainError::Config(format!(
                "{} photos in {} but {} captions",
                paths.len(),
                dir.display(),
                c.len()
            )));
        }
    }
    Ok(paths
        .into_iter()
        .enumerate()
        .map(|(i, p)| CaptionedPhoto {
            source: PhotoSource::Path(p),
            caption: captions
                .map(|c| c[i].clone())
                .unwrap_or_else(|| default_caption.to_string()),
            mask: None,
        })
        .collect())
}

/// Class images sampled from the base model with DDIM (50 steps, guidance 7.5), image `i` with
/// seed `seed + i`, as diffusers' DreamBooth scripts do before training.
impl ClassImageGenerator for crate::pipeline::StableDiffusion {
    fn generate(
        &self,
        prompt: &str,
        seed: u64,
        first: usize,
        n: usize,
        resolution: u32,
        cancel: Option<&AtomicBool>,
    ) -> Result<Option<Vec<RgbImage>>, TrainError> {
        let mut out = Vec::with_capacity(n);
        for i in first..first + n {
            let req = crate::pipeline::GenerateRequest {
                prompt: prompt.to_string(),
                seed: seed.wrapping_add(i as u64),
                height: Some(resolution as usize),
                width: Some(resolution as usize),
                num_images: 1,
                ..Default::default()
            };
            match crate::pipeline::StableDiffusion::generate(self, &req, None, cancel) {
                Ok(o) => out.extend(o.images),
                Err(crate::Error::Canceled) => return Ok(None),
                Err(e) => return Err(TrainError::Config(format!("class image generation: {e}"))),
            }
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_from_json_and_lines() {
        let dir = std::env::temp_dir().join(format!("sidbooth-captions-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let j = dir.join("d.json");
        std::fs::write(
            &j,
            r#"{"token": "sks", "descriptions": ["a sks dog", "a sks dog on a bed"]}"#,
        )
        .unwrap();
        assert_eq!(
            captions_from_file(&j).unwrap(),
            vec!["a sks dog", "a sks dog on a bed"]
        );
        let l = dir.join("c.txt");
        std::fs::write(&l, "a sks dog\n\n  a sks dog on grass \n").unwrap();
        assert_eq!(
            captions_from_file(&l).unwrap(),
            vec!["a sks dog", "a sks dog on grass"]
        );
        std::fs::write(&j, r#"{"x": 1}"#).unwrap();
        assert!(captions_from_file(&j).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
