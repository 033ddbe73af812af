//! `sidbooth train`: DreamBooth-LoRA fine-tuning on a folder of photos, no service needed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use image::RgbImage;
use sidbooth_engine::pipeline::{GenerateRequest, StableDiffusion};
use sidbooth_engine::train::data::{list_images, CaptionedPhoto};
use sidbooth_engine::train::method::{ExportInfo, LoraConfig};
use sidbooth_engine::train::schedule::{LrDecay, LrSchedule};
use sidbooth_engine::train::TrainError;
use sidbooth_engine::train::{
    self, Callbacks, ClassImageGenerator, ExportFormat, LoopConfig, MethodConfig, PriorConfig,
    Resume, StepReport, TrainConfig, TrainModels, TrainOutcome,
};

use crate::model::{default_resolution, progress_bar, ModelArgs};

/// Personalization method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MethodArg {
    /// DreamBooth with LoRA adapters on the UNet attention projections (q, k, v, out).
    Lora,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LrScheduleArg {
    Constant,
    Cosine,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    /// diffusers / peft keys, read by diffusers' `load_lora_weights` and `sidbooth generate`.
    Diffusers,
    /// kohya / A1111 keys (`lora_unet_*.lora_down.weight`, `.alpha`), for tools of that
    /// family (not read by `sidbooth generate`).
    Kohya,
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
    #[arg(long, value_enum, default_value = "lora")]
    pub method: MethodArg,
    /// Optimizer steps.
    #[arg(long, default_value_t = 1000)]
    pub steps: u64,
    /// Learning rate (AdamW).
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    #[arg(long, value_enum, default_value = "constant")]
    pub lr_schedule: LrScheduleArg,
    /// Linear warm-up steps before the schedule.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    /// LoRA rank.
    #[arg(long, default_value_t = 4)]
    pub rank: usize,
    /// LoRA alpha (scale alpha/rank); default: the rank.
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Also put LoRA adapters on the text encoder's attention projections.
    #[arg(long)]
    pub train_text_encoder: bool,
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
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
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
    #[arg(long, value_name = "TEXT", requires = "prior_preservation")]
    pub class_prompt: Option<String>,
    /// Folder of class images; missing ones are generated into it.
    #[arg(long, value_name = "DIR", requires = "prior_preservation")]
    pub class_dir: Option<PathBuf>,
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub num_class_images: usize,
    #[arg(long, default_value_t = 1.0)]
    pub prior_loss_weight: f64,
    /// DDIM steps of each generated class image.
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub class_sample_steps: usize,
    /// Where the trained LoRA is written (safetensors).
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
    /// Key layout of the LoRA file.
    #[arg(long, value_enum, default_value = "diffusers")]
    pub format: FormatArg,
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

/// Photos with captions, resolved before the model is loaded so that mistakes fail fast.
fn photos(args: &TrainArgs) -> Result<(Vec<CaptionedPhoto>, Option<String>)> {
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
        .map(|(p, c)| CaptionedPhoto::from_path(p, c))
        .collect();
    Ok((photos, case))
}

fn check_args(args: &TrainArgs) -> Result<()> {
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if !(args.lr.is_finite() && args.lr > 0.0) {
        bail!("--lr must be a positive number");
    }
    if args.rank == 0 {
        bail!("--rank must be at least 1");
    }
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
    if args.prior_preservation {
        if args.class_dir.is_none() {
            bail!("--prior-preservation needs --class-dir (class images are generated into it when missing)");
        }
        if args.num_class_images == 0 {
            bail!("--num-class-images must be at least 1");
        }
    }
    if args.format == FormatArg::Kohya && args.method != MethodArg::Lora {
        bail!("--format kohya exists for LoRA only");
    }
    Ok(())
}

fn train_blocking(args: TrainArgs, cancel: Arc<AtomicBool>) -> Result<()> {
    check_args(&args)?;
    let (photos, case) = photos(&args)?;
    let loaded = args.model.load()?;
    let sd = &loaded.sd;
    let resolution = match args.resolution {
        Some(r) => r,
        None => default_resolution(sd) as u32,
    };
    let f = sd.vae_scale() as u32;
    if resolution == 0 || resolution % f != 0 {
        bail!("--resolution {resolution}: must be a positive multiple of {f} (the VAE factor)");
    }

    let method = match args.method {
        MethodArg::Lora => MethodConfig::Lora(LoraConfig {
            rank: args.rank,
            alpha: args.alpha.unwrap_or(args.rank as f64),
            train_text_encoder: args.train_text_encoder,
            ..LoraConfig::default()
        }),
    };
    let info = ExportInfo {
        base_model: loaded.name.clone(),
        token: args.token.clone(),
        class: args.class.clone(),
        description_case: case.unwrap_or_default(),
        steps: 0,
    };
    let n_photos = photos.len();
    let mut cfg = TrainConfig::new(method, photos, info);
    cfg.resolution = resolution;
    cfg.flip = args.flip;
    cfg.output = Some(args.output.clone());
    cfg.export_format = match args.format {
        FormatArg::Diffusers => ExportFormat::Diffusers,
        FormatArg::Kohya => ExportFormat::Kohya,
    };
    cfg.prior = if args.prior_preservation {
        Some(PriorConfig {
            class_prompt: args
                .class_prompt
                .clone()
                .unwrap_or_else(|| format!("a photo of {}", args.class)),
            class_dir: args.class_dir.clone().expect("checked"),
            num_class_images: args.num_class_images,
            seed: args.seed,
        })
    } else {
        None
    };
    cfg.loop_cfg = LoopConfig {
        seed: args.seed,
        max_steps: args.steps,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        lr: LrSchedule {
            base_lr: args.lr,
            warmup_steps: args.warmup_steps,
            decay: match args.lr_schedule {
                LrScheduleArg::Constant => LrDecay::Constant,
                LrScheduleArg::Cosine => LrDecay::Cosine,
            },
            total_steps: args.steps,
        },
        prior_loss_weight: args.prior_loss_weight,
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

    let models = TrainModels::from_pipeline(sd)?;
    eprintln!(
        "training LoRA (rank {}{}) on {n_photos} photos at {resolution}x{resolution}, {} steps, model {}, device {}",
        args.rank,
        if args.train_text_encoder { ", text encoder too" } else { "" },
        args.steps,
        loaded.name,
        args.model.device,
    );
    let sampler = ClassSampler {
        sd,
        steps: args.class_sample_steps,
    };
    let pb = progress_bar(
        args.steps,
        "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg} (eta {eta})",
    );
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    let mut last: Option<StepReport> = None;
    let outcome = {
        let mut callbacks = Callbacks::default()
            .on_step(|r: &StepReport| {
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
            args.prior_preservation
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
            weights_path,
            ..
        } => {
            pb.finish_and_clear();
            let path = weights_path.unwrap_or_else(|| args.output.clone());
            let loss = last_loss
                .map(|l| format!(", final loss {l:.4}"))
                .unwrap_or_default();
            if let Some(r) = &last {
                eprintln!(
                    "step {}/{}: loss {:.4}, lr {:.2e}",
                    r.step, r.max_steps, r.loss, r.lr
                );
            }
            println!("wrote {} ({steps} steps{loss})", path.display());
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

#[cfg(test)]
mod tests {
    use super::*;

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
