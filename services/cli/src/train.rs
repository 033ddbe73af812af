//! `sidbooth train`: personalization of a model on a folder of photos, no service needed, with
//! any of the methods (`--method lora|dreambooth|textual_inversion|custom_diffusion|svdiff`);
//! `--output DIR` receives the method's files.
//!
//! The method's settings are built as the job spec's (`sidbooth_domain::train::TrainSettings`,
//! with the same defaults) and mapped to the engine by the same function as in the worker.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use image::RgbImage;
use sidbooth_domain::train::{MaskNormalization, TrainMethod, TrainSettings};
use sidbooth_engine::pipeline::{GenerateRequest, StableDiffusion};
use sidbooth_engine::train::data::{list_images, CaptionedPhoto};
use sidbooth_engine::train::method::svdiff::svd::SvdCache;
use sidbooth_engine::train::method::{ExportInfo, ExportOptions};
use sidbooth_engine::train::optim::AdamWConfig;
use sidbooth_engine::train::registry::export_options;
use sidbooth_engine::train::schedule::{LrDecay, LrSchedule};
use sidbooth_engine::train::trainer::{MaskNormalization as EngineNormalization, MaskedLossConfig};
use sidbooth_engine::train::TrainError;
use sidbooth_engine::train::{
    self, Callbacks, ClassImageGenerator, LoopConfig, MethodConfig, PriorConfig, Resume,
    SettingsContext, StepReport, TrainConfig, TrainModels, TrainOutcome,
};

use crate::model::{default_resolution, progress_bar, ModelArgs};

fn parse_method(s: &str) -> Result<TrainMethod, String> {
    TrainMethod::parse(s).ok_or_else(|| {
        format!(
            "unknown method {s:?}; one of {}",
            TrainMethod::ALL.map(|m| m.as_str()).join(", ")
        )
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LrScheduleArg {
    Constant,
    Cosine,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    /// The method's diffusers files only.
    Diffusers,
    /// LoRA: also kohya / A1111 keys (`lora_unet_*.lora_down.weight`, `.alpha`) in
    /// `pytorch_lora_weights_kohya.safetensors`.
    Kohya,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NormalizationArg {
    /// kohya sd-scripts: averaged over the whole latent.
    Kohya,
    /// OneTrainer's normalize_masked_area_loss: divided by the mask's mean.
    MaskedArea,
}

/// The paper's description cases (recorded in the LoRA metadata).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CaseArg {
    #[value(name = "class_only")]
    ClassOnly,
    #[value(name = "class_names")]
    ClassNames,
    #[value(name = "sid")]
    Sid,
    #[value(name = "full")]
    Full,
}

impl CaseArg {
    fn as_str(self) -> &'static str {
        match self {
            CaseArg::ClassOnly => "class_only",
            CaseArg::ClassNames => "class_names",
            CaseArg::Sid => "sid",
            CaseArg::Full => "full",
        }
    }
}

/// Where training starts: `latest` (newest checkpoint in --checkpoint-dir, or from scratch) or
/// a checkpoint directory.
#[derive(Clone, Debug, PartialEq)]
pub enum ResumeArg {
    Latest,
    Path(PathBuf),
}

fn parse_resume(s: &str) -> Result<ResumeArg, String> {
    match s {
        "" => Err("empty --resume (expected latest or a checkpoint directory)".into()),
        "latest" => Ok(ResumeArg::Latest),
        p => Ok(ResumeArg::Path(PathBuf::from(p))),
    }
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{s:?}: expected on or off")),
    }
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Folder of training photos (jpg, jpeg, png, webp; sorted by file name).
    #[arg(long, value_name = "DIR")]
    pub images: PathBuf,
    /// Subject class, e.g. dog (default captions, class prompt, metadata).
    #[arg(long = "class", value_name = "NAME")]
    pub class: String,
    /// Captions: a text file with one caption per line in sorted photo order, or a JSON file
    /// (`descriptions.json` of the service: a list, or {"descriptions": [...]}, of
    /// {file_name, text} entries matched by file name, or of strings in photo order).
    #[arg(long, value_name = "FILE")]
    pub captions: Option<PathBuf>,
    /// Caption of every photo without one in --captions (default: "a photo of TOKEN CLASS").
    #[arg(long, value_name = "TEXT")]
    pub caption: Option<String>,
    /// Identifier token of the subject.
    #[arg(long, default_value = "sks")]
    pub token: String,
    /// Description case of the captions, recorded in the LoRA metadata.
    #[arg(long, value_enum)]
    pub description_case: Option<CaseArg>,
    /// lora, dreambooth, textual_inversion, custom_diffusion or svdiff.
    #[arg(long, default_value = "lora", value_parser = parse_method)]
    pub method: TrainMethod,
    /// The method's settings as JSON, as in the job spec's `train` (e.g.
    /// '{"num_vectors": 2}'); the flags below override them.
    #[arg(long, value_name = "JSON")]
    pub settings: Option<String>,
    /// Optimizer steps (default: the method's).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Learning rate of AdamW (default: the method's).
    #[arg(long = "learning-rate", alias = "lr", value_name = "X")]
    pub learning_rate: Option<f64>,
    #[arg(long, value_enum, default_value = "constant")]
    pub lr_schedule: LrScheduleArg,
    /// Linear warm-up steps before the schedule.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    /// LoRA rank (default 4).
    #[arg(long)]
    pub rank: Option<u32>,
    /// Also train the text encoder (LoRA, DreamBooth, SVDiff).
    #[arg(long)]
    pub train_text_encoder: bool,
    /// Recompute the UNet's blocks in the backward pass instead of keeping their activations
    /// (less memory, about a third more compute): on or off (default: on for dreambooth, off
    /// for the others).
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    pub gradient_checkpointing: Option<bool>,
    /// Square training resolution in pixels (default: the model's, UNet sample_size x VAE factor).
    #[arg(long, value_name = "PX")]
    pub resolution: Option<u32>,
    /// Random horizontal flips.
    #[arg(long)]
    pub flip: bool,
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: u32,
    /// Seed of everything random (default: the method's, 0).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Write a checkpoint every N steps (0: never); needs --checkpoint-dir.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub checkpoint_every: u64,
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Keep only the newest N checkpoints (0: all).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_checkpoints: usize,
    /// Continue from a checkpoint: `latest` (the newest in --checkpoint-dir; from scratch if
    /// there is none) or a checkpoint directory.
    #[arg(long, value_name = "latest|PATH", value_parser = parse_resume)]
    pub resume: Option<ResumeArg>,
    /// Class-prior preservation with class images (sampled from the base model when missing).
    #[arg(long)]
    pub prior_preservation: bool,
    /// Prompt of the class images (default: "a photo of CLASS").
    #[arg(long, value_name = "TEXT")]
    pub class_prompt: Option<String>,
    /// Folder of class images; missing ones are generated into it (needed by every run with
    /// class-prior preservation: --prior-preservation, or DreamBooth and Custom Diffusion,
    /// which use it by default).
    #[arg(long, value_name = "DIR")]
    pub class_dir: Option<PathBuf>,
    /// Class images (default: the method's).
    #[arg(long, value_name = "N")]
    pub num_class_images: Option<u32>,
    #[arg(long, value_name = "W")]
    pub prior_loss_weight: Option<f64>,
    /// DDIM steps of each generated class image.
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub class_sample_steps: usize,
    /// Subject masks for masked-loss training: `<stem>.png` per photo (white = subject); the
    /// loss is restricted to them.
    #[arg(long, value_name = "DIR")]
    pub masks: Option<PathBuf>,
    /// How the masked loss is averaged.
    #[arg(long, value_enum, default_value = "kohya", requires = "masks")]
    pub mask_normalization: NormalizationArg,
    /// Weight of the loss outside the masks.
    #[arg(long, default_value_t = 0.0, requires = "masks")]
    pub unmasked_weight: f64,
    /// The directory the method's files are written into.
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
    /// Extra layouts: kohya (LoRA). The other methods' extra layouts are settings
    /// (`--settings '{"single_file": true}'`, `"a1111"`, `"merged_pipeline"`).
    #[arg(long, value_enum, default_value = "diffusers")]
    pub format: FormatArg,
    /// SVDiff: keep the base weights' singular value decompositions here (keyed by the weights'
    /// contents), so the next run on the same model does not compute them again.
    #[arg(long, value_name = "DIR", env = "SIDBOOTH_SVD_CACHE_DIR")]
    pub svd_cache: Option<PathBuf>,
}

impl TrainArgs {
    /// The method's settings: its defaults, `--settings`, then the flags.
    pub fn settings(&self) -> Result<TrainSettings> {
        let mut v: serde_json::Value = match &self.settings {
            Some(json) => serde_json::from_str(json).context("--settings is not JSON")?,
            None => serde_json::json!({}),
        };
        let map = v
            .as_object_mut()
            .context("--settings must be a JSON object")?;
        map.insert("method".into(), self.method.as_str().into());
        let mut set = |k: &str, value: serde_json::Value| {
            map.insert(k.to_owned(), value);
        };
        if let Some(n) = self.steps {
            set("steps", n.into());
        }
        if let Some(lr) = self.learning_rate {
            set("learning_rate", lr.into());
        }
        if let Some(seed) = self.seed {
            set("seed", seed.into());
        }
        if let Some(r) = self.rank {
            set("rank", r.into());
        }
        if self.train_text_encoder {
            set("train_text_encoder", true.into());
        }
        if self.prior_preservation {
            set("prior_preservation", true.into());
        }
        if let Some(on) = self.gradient_checkpointing {
            set("gradient_checkpointing", on.into());
        }
        if let Some(n) = self.num_class_images {
            set("num_class_images", n.into());
        }
        if let Some(w) = self.prior_loss_weight {
            set("prior_loss_weight", w.into());
        }
        if self.masks.is_some() {
            let normalization = match self.mask_normalization {
                NormalizationArg::Kohya => "kohya",
                NormalizationArg::MaskedArea => "masked_area",
            };
            set(
                "masked_loss",
                serde_json::json!({"normalization": normalization, "unmasked_weight": self.unmasked_weight}),
            );
        }
        let settings: TrainSettings = serde_json::from_value(v)
            .map_err(|e| anyhow::anyhow!("the {} settings: {e}", self.method.as_str()))?;
        settings
            .validate()
            .map_err(|e| anyhow::anyhow!("the {} settings: {e}", self.method.as_str()))?;
        Ok(settings)
    }
}

/// Captions of the photos and, when the file says so, their description case.
#[derive(Debug, PartialEq)]
pub struct Captions {
    pub captions: Vec<String>,
    pub case: Option<String>,
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn stem(name: &str) -> &str {
    match name.rsplit_once('.') {
        Some((s, _)) if !s.is_empty() => s,
        _ => name,
    }
}

struct NamedCaption {
    names: Vec<String>,
    text: String,
    case: Option<String>,
}

/// Reads `path` (text lines or JSON) into one caption per photo of `photos` (sorted paths);
/// photos without a caption get `default` (an error when there is none).
pub fn read_captions(path: &Path, photos: &[PathBuf], default: Option<&str>) -> Result<Captions> {
    let raw = std::fs::read_to_string(path)
        .with_context(|| format!("reading --captions {}", path.display()))?;
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
        || raw.trim_start().starts_with(['[', '{']);
    if !is_json {
        let lines: Vec<String> = raw
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        if lines.len() != photos.len() {
            bail!(
                "{}: {} captions (non-empty lines) for {} photos; give one caption per line in sorted photo order",
                path.display(),
                lines.len(),
                photos.len()
            );
        }
        return Ok(Captions {
            captions: lines,
            case: None,
        });
    }
    let v: serde_json::Value = serde_json::from_str(&raw)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let list = match &v {
        serde_json::Value::Array(a) => a,
        serde_json::Value::Object(o) => match o.get("descriptions") {
            Some(serde_json::Value::Array(a)) => a,
            _ => bail!(
                "{}: expected a list or an object with a \"descriptions\" list",
                path.display()
            ),
        },
        _ => bail!(
            "{}: expected a list or an object with a \"descriptions\" list",
            path.display()
        ),
    };
    if list.iter().all(|e| e.is_string()) {
        let texts: Vec<String> = list
            .iter()
            .filter_map(|e| e.as_str().map(String::from))
            .collect();
        if texts.len() != photos.len() {
            bail!("{}: {} captions for {} photos (a list of strings is matched in sorted photo order)", path.display(), texts.len(), photos.len());
        }
        return Ok(Captions {
            captions: texts,
            case: None,
        });
    }
    let mut named = Vec::with_capacity(list.len());
    for (i, e) in list.iter().enumerate() {
        let o = e.as_object().with_context(|| {
            format!(
                "{}: entry {i} is neither a string nor an object",
                path.display()
            )
        })?;
        let text = o
            .get("text")
            .and_then(|t| t.as_str())
            .with_context(|| format!("{}: entry {i} has no \"text\"", path.display()))?;
        let names: Vec<String> = ["file_name", "original_file_name"]
            .iter()
            .filter_map(|k| o.get(*k).and_then(|n| n.as_str()).map(String::from))
            .collect();
        if names.is_empty() {
            bail!("{}: entry {i} has no \"file_name\"", path.display());
        }
        let case = o.get("case").and_then(|c| c.as_str()).map(String::from);
        named.push(NamedCaption {
            names,
            text: text.to_string(),
            case,
        });
    }
    let mut captions = Vec::with_capacity(photos.len());
    let mut cases = Vec::new();
    let mut missing = Vec::new();
    for p in photos {
        let name = file_name(p);
        let found = named.iter().find(|e| e.names.contains(&name)).or_else(|| {
            named
                .iter()
                .find(|e| e.names.iter().any(|n| stem(n) == stem(&name)))
        });
        match (found, default) {
            (Some(e), _) => {
                captions.push(e.text.clone());
                cases.push(e.case.clone());
            }
            (None, Some(d)) => {
                captions.push(d.to_string());
                cases.push(None);
            }
            (None, None) => missing.push(name),
        }
    }
    if !missing.is_empty() {
        bail!(
            "{}: no caption for {} (entries are matched by file_name; give --caption TEXT for the rest)",
            path.display(),
            missing.join(", ")
        );
    }
    let case = match cases.first() {
        Some(Some(c)) if cases.iter().all(|x| x.as_deref() == Some(c.as_str())) => Some(c.clone()),
        _ => None,
    };
    Ok(Captions { captions, case })
}

/// Class images sampled from the base model with the engine's pipeline (DDIM, guidance 7.5,
/// image `i` seeded with `seed + i`), with a progress bar.
struct ClassSampler<'a> {
    sd: &'a StableDiffusion,
    steps: usize,
}

impl ClassImageGenerator for ClassSampler<'_> {
    fn generate(
        &self,
        prompt: &str,
        seed: u64,
        first: usize,
        n: usize,
        resolution: u32,
        cancel: Option<&AtomicBool>,
    ) -> Result<Option<Vec<RgbImage>>, TrainError> {
        let pb = progress_bar(
            (n * self.steps) as u64,
            "class images {msg} [{elapsed_precise}] {bar:30} {pos}/{len} steps",
        );
        let mut out = Vec::with_capacity(n);
        for (k, i) in (first..first + n).enumerate() {
            pb.set_message(format!("{}/{n}", k + 1));
            let req = GenerateRequest {
                prompt: prompt.to_string(),
                seed: seed.wrapping_add(i as u64),
                steps: self.steps,
                height: Some(resolution as usize),
                width: Some(resolution as usize),
                num_images: 1,
                ..Default::default()
            };
            let base = (k * self.steps) as u64;
            let mut progress = |s: usize, _n: usize| pb.set_position(base + s as u64);
            match self.sd.generate(&req, Some(&mut progress), cancel) {
                Ok(o) => out.extend(o.images),
                Err(sidbooth_engine::Error::Canceled) => {
                    pb.abandon();
                    return Ok(None);
                }
                Err(e) => return Err(TrainError::Config(format!("class image generation: {e}"))),
            }
        }
        pb.finish_and_clear();
        Ok(Some(out))
    }
}

/// Photos with captions (and masks), resolved before the model is loaded so that mistakes fail
/// fast. Methods that learn a new token get `<token>` in their captions.
fn photos(
    args: &TrainArgs,
    settings: &TrainSettings,
) -> Result<(Vec<CaptionedPhoto>, Option<String>)> {
    if !args.images.is_dir() {
        bail!("--images {}: not a directory", args.images.display());
    }
    let paths =
        list_images(&args.images).with_context(|| format!("listing {}", args.images.display()))?;
    if paths.is_empty() {
        bail!(
            "--images {}: no jpg, jpeg, png or webp files",
            args.images.display()
        );
    }
    let default_caption = format!("a photo of {} {}", args.token, args.class);
    let (captions, file_case) = match &args.captions {
        Some(f) => {
            let c = read_captions(f, &paths, args.caption.as_deref())?;
            (c.captions, c.case)
        }
        None => {
            let c = args
                .caption
                .clone()
                .unwrap_or_else(|| default_caption.clone());
            let case = (args.caption.is_none()).then(|| "class_only".to_string());
            (vec![c; paths.len()], case)
        }
    };
    if !captions.iter().any(|c| {
        c.split(|ch: char| !ch.is_alphanumeric())
            .any(|w| w == args.token)
    }) {
        eprintln!("warning: no caption contains the token {:?}", args.token);
    }
    let case = args
        .description_case
        .map(|c| c.as_str().to_string())
        .or(file_case);
    let photos = paths
        .into_iter()
        .zip(captions)
        .map(|(p, c)| {
            let mask = match &args.masks {
                Some(dir) => Some(read_mask(dir, &p)?),
                None => None,
            };
            Ok(CaptionedPhoto {
                mask,
                ..CaptionedPhoto::from_path(p, settings.rewrite_token(&c, &args.token))
            })
        })
        .collect::<Result<_>>()?;
    Ok((photos, case))
}

/// `--masks DIR/<stem>.png` of a photo, checked as the API checks uploaded masks.
fn read_mask(dir: &Path, photo: &Path) -> Result<image::GrayImage> {
    let stem = photo.file_stem().unwrap_or_default().to_string_lossy();
    let path = dir.join(format!("{stem}.png"));
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "--masks: no mask {} for {}",
            path.display(),
            photo.display()
        )
    })?;
    let mask = sidbooth_imaging::Mask::from_png(&bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(mask.as_gray().clone())
}

fn check_args(args: &TrainArgs) -> Result<()> {
    if args.batch_size == 0 || args.grad_accum == 0 {
        bail!("--batch-size and --grad-accum must be at least 1");
    }
    if args.checkpoint_every > 0 && args.checkpoint_dir.is_none() {
        bail!("--checkpoint-every needs --checkpoint-dir");
    }
    if args.resume == Some(ResumeArg::Latest) && args.checkpoint_dir.is_none() {
        bail!("--resume latest needs --checkpoint-dir");
    }
    if let Some(ResumeArg::Path(p)) = &args.resume {
        if !p.is_dir() {
            bail!("--resume {}: no such checkpoint directory", p.display());
        }
    }
    if args.format == FormatArg::Kohya && args.method != TrainMethod::Lora {
        bail!("--format kohya exists for LoRA only");
    }
    if args.output.is_file() {
        bail!(
            "--output {}: a file; --output is the directory the method's files go into",
            args.output.display()
        );
    }
    Ok(())
}

fn train_blocking(args: TrainArgs, cancel: Arc<AtomicBool>) -> Result<()> {
    if let Some(dir) = &args.svd_cache {
        SvdCache::shared().set_dir(Some(dir.clone()));
    }
    check_args(&args)?;
    let settings = args.settings()?;
    let prior = settings.prior();
    if prior.is_none() && (args.class_dir.is_some() || args.class_prompt.is_some()) {
        bail!(
            "--class-dir and --class-prompt are for class-prior preservation, which this run does \
             not use (--prior-preservation turns it on)"
        );
    }
    if prior.is_some() && args.class_dir.is_none() {
        bail!(
            "{} trains with class-prior preservation: give --class-dir (class images are \
             generated into it when missing)",
            args.method.as_str()
        );
    }
    let (photos, case) = photos(&args, &settings)?;
    let started = Instant::now();
    let loaded = args.model.load()?;
    let load_secs = started.elapsed().as_secs_f64();
    let sd = &loaded.sd;
    let resolution = match args.resolution {
        Some(r) => r,
        None => default_resolution(sd) as u32,
    };
    let f = sd.vae_scale() as u32;
    if resolution == 0 || resolution % f != 0 {
        bail!("--resolution {resolution}: must be a positive multiple of {f} (the VAE factor)");
    }

    let method = MethodConfig::from_settings(
        &settings,
        &SettingsContext {
            token: args.token.clone(),
            class: args.class.clone(),
        },
    )?;
    let info = ExportInfo {
        base_model: loaded.name.clone(),
        token: args.token.clone(),
        class: args.class.clone(),
        description_case: case.unwrap_or_default(),
        steps: 0,
    };
    let n_photos = photos.len();
    let mut cfg = TrainConfig::new(method, photos, info, &args.output);
    cfg.resolution = resolution;
    cfg.flip = args.flip;
    cfg.export_options = ExportOptions {
        kohya: args.format == FormatArg::Kohya,
        ..export_options(&settings)
    };
    let seed = settings.seed();
    let steps = u64::from(settings.steps());
    cfg.prior = prior.map(|(_, n)| PriorConfig {
        class_prompt: args
            .class_prompt
            .clone()
            .unwrap_or_else(|| format!("a photo of {}", args.class)),
        class_dir: args.class_dir.clone().expect("checked"),
        num_class_images: n as usize,
        seed,
    });
    cfg.loop_cfg = LoopConfig {
        seed,
        max_steps: steps,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        lr: LrSchedule {
            base_lr: settings.learning_rate(),
            warmup_steps: args.warmup_steps,
            decay: match args.lr_schedule {
                LrScheduleArg::Constant => LrDecay::Constant,
                LrScheduleArg::Cosine => LrDecay::Cosine,
            },
            total_steps: steps,
        },
        prior_loss_weight: prior.map_or(1.0, |(w, _)| w),
        masked_loss: settings.masked_loss().map(|m| MaskedLossConfig {
            normalization: match m.normalization {
                MaskNormalization::Kohya => EngineNormalization::Kohya,
                MaskNormalization::MaskedArea => EngineNormalization::MaskedArea,
            },
            unmasked_weight: m.unmasked_weight,
        }),
        adamw: AdamWConfig {
            moments: settings.optimizer_state(),
            ..AdamWConfig::default()
        },
        gradient_checkpointing: settings.gradient_checkpointing(),
        checkpoint_every: args.checkpoint_every,
        checkpoint_dir: args.checkpoint_dir.clone(),
        keep_checkpoints: args.keep_checkpoints,
        resume: match &args.resume {
            None => Resume::No,
            Some(ResumeArg::Latest) => Resume::Latest,
            Some(ResumeArg::Path(p)) => Resume::From(p.clone()),
        },
        ..LoopConfig::default()
    };

    let models = TrainModels::from_pipeline(sd)?.with_source(loaded.source.clone());
    eprintln!(
        "training {} on {n_photos} photos at {resolution}x{resolution}, {steps} steps at lr {:.1e}, model {} (loaded in {load_secs:.1} s), device {}",
        args.method.as_str(),
        settings.learning_rate(),
        loaded.name,
        args.model.device,
    );
    let sampler = ClassSampler {
        sd,
        steps: args.class_sample_steps,
    };
    let pb = progress_bar(
        steps,
        "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg} (eta {eta})",
    );
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    let mut last: Option<StepReport> = None;
    let training = Instant::now();
    let mut timing = StepTiming::default();
    let outcome = {
        let mut callbacks = Callbacks::default()
            .on_step(|r: &StepReport| {
                timing.step_done(training.elapsed().as_secs_f64());
                pb.set_position(r.step);
                pb.set_message(format!("loss {:.4} lr {:.2e}", r.loss, r.lr));
                last = Some(r.clone());
            })
            .on_checkpoint(|step, dir: &Path| {
                pb.println(format!("checkpoint at step {step}: {}", dir.display()))
            })
            .cancel_flag(cancel.clone());
        train::run(
            &cfg,
            &models,
            prior
                .is_some()
                .then_some(&sampler as &dyn ClassImageGenerator),
            &mut callbacks,
        )
    };
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            pb.abandon();
            return Err(e).context("training failed");
        }
    };
    match outcome {
        TrainOutcome::Completed {
            steps,
            last_loss,
            files,
        } => {
            pb.finish_and_clear();
            let loss = last_loss
                .map(|l| format!(", final loss {l:.4}"))
                .unwrap_or_default();
            if let Some(r) = &last {
                eprintln!(
                    "step {}/{}: loss {:.4}, lr {:.2e}",
                    r.step, r.max_steps, r.loss, r.lr
                );
            }
            eprintln!(
                "{steps} steps{loss}; {}",
                timing.summary(training.elapsed().as_secs_f64())
            );
            for f in files {
                println!("{}", args.output.join(f).display());
            }
            Ok(())
        }
        TrainOutcome::Canceled {
            steps,
            last_checkpoint,
        } => {
            pb.abandon();
            match last_checkpoint {
                Some(dir) => eprintln!(
                    "canceled after {steps} steps; nothing written but the last checkpoint {} (continue with --resume latest)",
                    dir.display()
                ),
                None => eprintln!("canceled after {steps} steps; nothing written"),
            }
            std::process::exit(130);
        }
    }
}

/// Runs training on a blocking thread; the first ctrl-c sets the cancel flag (the run stops
/// after the current step), a second one exits at once.
pub async fn run(args: TrainArgs) -> Result<()> {
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            flag.store(true, Ordering::SeqCst);
            eprintln!("\nctrl-c: stopping after the current step (press again to quit at once)");
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
    });
    tokio::task::spawn_blocking(move || train_blocking(args, cancel))
        .await
        .context("training thread")?
}

/// When each optimizer step of a run ended (seconds since training began), for the summary
/// line. The first step also encodes the photo it draws (latents are encoded on first use),
/// so the time per step is taken from the end of the first to the end of the last.
#[derive(Debug, Default)]
struct StepTiming {
    ends: Vec<f64>,
}

impl StepTiming {
    fn step_done(&mut self, at: f64) {
        self.ends.push(at);
    }

    /// `total`: seconds from the start of training to the weights written.
    fn summary(&self, total: f64) -> String {
        match self.ends.as_slice() {
            [] => format!("{total:.1} s"),
            [first] => format!(
                "{total:.1} s: the step {first:.1} s, writing {:.1} s",
                total - first
            ),
            [first, .., last] => format!(
                "{total:.1} s: first step {first:.1} s, then {:.2} s per step, writing {:.1} s",
                (last - first) / (self.ends.len() - 1) as f64,
                total - last
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_timing_takes_the_steps_after_the_first() {
        let mut t = StepTiming::default();
        assert_eq!(t.summary(0.5), "0.5 s");
        t.step_done(4.0);
        assert_eq!(t.summary(4.5), "4.5 s: the step 4.0 s, writing 0.5 s");
        t.step_done(6.0);
        t.step_done(9.0);
        assert_eq!(
            t.summary(9.3),
            "9.3 s: first step 4.0 s, then 2.50 s per step, writing 0.3 s"
        );
    }

    fn photos(names: &[&str]) -> Vec<PathBuf> {
        names
            .iter()
            .map(|n| PathBuf::from("/photos").join(n))
            .collect()
    }

    fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn text_lines_in_photo_order() {
        let d = tempfile::tempdir().unwrap();
        let f = write(d.path(), "c.txt", "a photo of sks dog\n\n  on grass \n");
        let c = read_captions(&f, &photos(&["a.png", "b.png"]), None).unwrap();
        assert_eq!(c.captions, vec!["a photo of sks dog", "on grass"]);
        let err = read_captions(&f, &photos(&["a.png"]), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("2 captions") && err.contains("1 photos"),
            "{err}"
        );
    }

    #[test]
    fn service_descriptions_json_matched_by_name() {
        let d = tempfile::tempdir().unwrap();
        let body = r#"[
          {"idx": 1, "file_name": "01-b.jpg", "original_file_name": "b.jpg", "text": "B", "case": "sid"},
          {"idx": 0, "file_name": "00-a.jpg", "original_file_name": "a.jpg", "text": "A", "case": "sid"}
        ]"#;
        let f = write(d.path(), "descriptions.json", body);
        // by export name, by original name, and by stem (photo converted to png)
        let c = read_captions(&f, &photos(&["00-a.jpg", "b.jpg"]), None).unwrap();
        assert_eq!(
            c,
            Captions {
                captions: vec!["A".into(), "B".into()],
                case: Some("sid".into())
            }
        );
        let c = read_captions(&f, &photos(&["00-a.png", "01-b.png"]), None).unwrap();
        assert_eq!(c.captions, vec!["A", "B"]);
        let err = read_captions(&f, &photos(&["a.jpg", "zzz.jpg"]), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("zzz.jpg"), "{err}");
        let c = read_captions(&f, &photos(&["a.jpg", "zzz.jpg"]), Some("default")).unwrap();
        assert_eq!(c.captions, vec!["A", "default"]);
        assert_eq!(c.case, None);
    }

    #[test]
    fn descriptions_object_forms() {
        let d = tempfile::tempdir().unwrap();
        let f = write(
            d.path(),
            "d.json",
            r#"{"descriptions": [{"file_name": "x.png", "text": "X"}]}"#,
        );
        assert_eq!(
            read_captions(&f, &photos(&["x.png"]), None)
                .unwrap()
                .captions,
            vec!["X"]
        );
        let f = write(
            d.path(),
            "m.json",
            r#"{"subject_class": "dog", "descriptions": ["one", "two"]}"#,
        );
        assert_eq!(
            read_captions(&f, &photos(&["1.png", "2.png"]), None)
                .unwrap()
                .captions,
            vec!["one", "two"]
        );
        assert!(read_captions(&f, &photos(&["1.png"]), None).is_err());
        let f = write(d.path(), "bad.json", r#"{"captions": []}"#);
        assert!(read_captions(&f, &photos(&["1.png"]), None).is_err());
    }

    #[test]
    fn resume_values() {
        assert_eq!(parse_resume("latest"), Ok(ResumeArg::Latest));
        assert_eq!(
            parse_resume("ck/step-10"),
            Ok(ResumeArg::Path("ck/step-10".into()))
        );
        assert!(parse_resume("").is_err());
    }
}
