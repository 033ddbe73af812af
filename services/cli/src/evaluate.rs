//! `sidbooth evaluate`: the evaluate stage on local folders, no service needed.
//!
//! ```text
//! sidbooth evaluate --clip DIR [--dino DIR] [--sam DIR] --references DIR [--masks DIR]
//!     --images DIR [--prompt TEXT] --class NAME [--token sks] --out DIR
//! ```
//!
//! writes `DIR/report.json` and `DIR/report.html`. References are the photos of `--references`
//! in file-name order; their masks are `--masks/<stem>.png`, or made with `--sam` (SAM's
//! proposals ranked by CLIP against "a photo of a {class}", written to `DIR/masks/`), or absent
//! (the mask-based measures are then left out and the report says why). Generated images are
//! the PNGs of `--images` (without `*-attention-*` files); each image's prompt is `--prompt` or
//! its PNG text chunk `prompt` (as `sidbooth generate` writes it), and its attention map the
//! `NAME-attention-WORD.npy` beside it.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{bail, Context, Result};
use image::RgbImage;
use sidbooth_domain::report::MaskSource;
use sidbooth_engine::attention::map_from_npy;
use sidbooth_evaluate::{
    evaluator::Evaluators,
    mask::Mask,
    measures::without_identifier,
    report::{assemble, ImageInput, PromptInput, Reasons, ReferenceInput, ReportInput},
    report_html::{render, ReportAssets},
    sam::ProposalSettings,
    subject::segment_automatically,
};

use crate::model::{parse_device, progress_bar, DeviceSpec};

#[derive(clap::Args, Debug)]
pub struct EvaluateArgs {
    /// CLIP directory (layout of openai/clip-vit-base-patch32).
    #[arg(long, value_name = "DIR")]
    pub clip: PathBuf,
    /// DINO directory (layout of facebook/dino-vits16), for DreamBooth's DINO measure.
    #[arg(long, value_name = "DIR")]
    pub dino: Option<PathBuf>,
    /// SAM directory (facebookresearch checkpoint as model.safetensors), to make the masks that
    /// --masks does not give and to place the attention of the generated images.
    #[arg(long, value_name = "DIR")]
    pub sam: Option<PathBuf>,
    /// The reference photos.
    #[arg(long, value_name = "DIR")]
    pub references: PathBuf,
    /// Subject masks of the references: `<stem>.png` per photo, white = subject.
    #[arg(long, value_name = "DIR")]
    pub masks: Option<PathBuf>,
    /// The generated images (PNG).
    #[arg(long, value_name = "DIR")]
    pub images: PathBuf,
    /// The prompt of every image (default: each PNG's `prompt` text chunk).
    #[arg(long, value_name = "TEXT")]
    pub prompt: Option<String>,
    /// The subject's class, e.g. dog.
    #[arg(long = "class", value_name = "NAME")]
    pub class: String,
    /// The identifier token, removed from the prompts for text-alignment.
    #[arg(long, default_value = "sks")]
    pub token: String,
    /// Where report.json and report.html go.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceSpec,
}

fn is_image(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        matches!(
            e.to_ascii_lowercase().as_str(),
            "jpg" | "jpeg" | "png" | "webp"
        )
    })
}

/// Files of a folder that `keep` accepts, sorted by name.
fn files(dir: &Path, keep: impl Fn(&Path) -> bool) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && keep(p))
        .collect();
    out.sort();
    Ok(out)
}

fn name_of(p: &Path) -> String {
    p.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

fn stem_of(p: &Path) -> String {
    p.file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

fn open_rgb(p: &Path) -> Result<RgbImage> {
    Ok(image::open(p)
        .with_context(|| format!("reading {}", p.display()))?
        .to_rgb8())
}

/// The text chunks of a PNG (`tEXt` and `iTXt`).
fn png_text(p: &Path) -> Result<BTreeMap<String, String>> {
    let file = std::fs::File::open(p).with_context(|| format!("reading {}", p.display()))?;
    let reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .with_context(|| format!("{} is not a PNG", p.display()))?;
    let info = reader.info();
    let mut out = BTreeMap::new();
    for t in &info.uncompressed_latin1_text {
        out.insert(t.keyword.clone(), t.text.clone());
    }
    for t in &info.utf8_text {
        if let Ok(text) = t.get_text() {
            out.insert(t.keyword.clone(), text);
        }
    }
    Ok(out)
}

/// A generated image with what lies beside it.
struct Generated {
    path: PathBuf,
    prompt: String,
    seed: Option<u64>,
    overlay: Option<PathBuf>,
    map: Option<PathBuf>,
}

fn generated_images(args: &EvaluateArgs) -> Result<Vec<Generated>> {
    let all = files(&args.images, |p| {
        p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"))
    })?;
    let (attention, images): (Vec<PathBuf>, Vec<PathBuf>) = all
        .into_iter()
        .partition(|p| name_of(p).contains("-attention-"));
    if images.is_empty() {
        bail!("--images {}: no PNG images", args.images.display());
    }
    let maps = files(&args.images, |p| {
        name_of(p).contains("-attention-") && p.extension().is_some_and(|e| e == "npy")
    })?;
    images
        .into_iter()
        .map(|path| {
            let text = png_text(&path)?;
            let prompt = match (&args.prompt, text.get("prompt")) {
                (Some(p), _) => p.clone(),
                (None, Some(p)) => p.clone(),
                (None, None) => bail!(
                    "{} has no `prompt` text chunk; give --prompt",
                    path.display()
                ),
            };
            let beside = |list: &[PathBuf]| {
                let prefix = format!("{}-attention-", stem_of(&path));
                list.iter()
                    .find(|p| name_of(p).starts_with(&prefix))
                    .cloned()
            };
            Ok(Generated {
                seed: text.get("seed").and_then(|s| s.parse().ok()),
                overlay: beside(&attention),
                map: beside(&maps),
                prompt,
                path,
            })
        })
        .collect()
}

pub fn run(args: EvaluateArgs) -> Result<()> {
    let device = args.device.open()?;
    let started = Instant::now();
    let models = Evaluators::load(
        Some(&args.clip),
        args.dino.as_deref(),
        args.sam.as_deref(),
        &device,
    )
    .context("loading the evaluation models")?;
    let mut timings = BTreeMap::new();
    timings.insert("load".to_owned(), started.elapsed().as_secs_f64());
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;

    // References and their masks.
    let reference_paths = files(&args.references, is_image)?;
    if reference_paths.is_empty() {
        bail!("--references {}: no images", args.references.display());
    }
    let photos: Vec<RgbImage> = reference_paths
        .iter()
        .map(|p| open_rgb(p))
        .collect::<Result<_>>()?;
    let started = Instant::now();
    let mut masks: Vec<Option<(Mask, MaskSource, String)>> = Vec::new();
    let mut mask_reason = None;
    for (path, photo) in reference_paths.iter().zip(&photos) {
        let stem = stem_of(path);
        masks.push(match (&args.masks, &models.sam) {
            (Some(dir), _) => {
                let file = dir.join(format!("{stem}.png"));
                let bytes = std::fs::read(&file).with_context(|| {
                    format!("--masks: no mask {} for {}", file.display(), path.display())
                })?;
                let mask = Mask::from_png(&bytes)
                    .with_context(|| format!("reading {}", file.display()))?;
                Some((mask, MaskSource::Uploaded, file.display().to_string()))
            }
            (None, Some(sam)) => {
                match segment_automatically(
                    sam,
                    models.clip()?,
                    photo,
                    &args.class,
                    &ProposalSettings::default(),
                )? {
                    Some(found) if found.mask.area() > 0 => {
                        let file = args.out.join("masks").join(format!("{stem}.png"));
                        std::fs::create_dir_all(file.parent().expect("a parent"))?;
                        std::fs::write(&file, found.mask.to_png())?;
                        eprintln!("mask of {} written to {}", path.display(), file.display());
                        Some((found.mask, found.source, file.display().to_string()))
                    }
                    _ => {
                        mask_reason = Some(format!("SAM found no subject in {}", path.display()));
                        None
                    }
                }
            }
            (None, None) => {
                mask_reason =
                    Some("no subject masks: neither --masks nor --sam was given".to_owned());
                None
            }
        });
    }
    let mask_refs: Vec<Option<&Mask>> = masks.iter().map(|m| m.as_ref().map(|m| &m.0)).collect();
    let reference_features = models.reference_features(&photos, &mask_refs)?;
    timings.insert("references".to_owned(), started.elapsed().as_secs_f64());

    // Generated images, grouped by prompt in first-seen order.
    let generated = generated_images(&args)?;
    let started = Instant::now();
    let bar = progress_bar(
        generated.len() as u64,
        "{msg} [{bar:30}] {pos}/{len} images ({elapsed})",
    );
    bar.set_message("measuring");
    let mut prompts: Vec<PromptInput> = Vec::new();
    let mut assets = ReportAssets::new();
    for g in generated {
        let image = open_rgb(&g.path)?;
        let map = match &g.map {
            Some(p) => Some(
                map_from_npy(&std::fs::read(p)?)
                    .with_context(|| format!("reading {}", p.display()))?,
            ),
            None => None,
        };
        let mask = match (&map, &models.sam) {
            (Some(_), Some(sam)) => segment_automatically(
                sam,
                models.clip()?,
                &image,
                &args.class,
                &ProposalSettings::default(),
            )?
            .map(|s| s.mask),
            _ => None,
        };
        let attention = [map.as_ref().map(|(h, w, v)| (v.as_slice(), (*h, *w)))];
        let features = models
            .image_features(
                std::slice::from_ref(&image),
                &attention,
                &[mask.as_ref().filter(|m| m.area() > 0)],
            )?
            .remove(0);
        let name = name_of(&g.path);
        assets.insert(name.clone(), "image/png", std::fs::read(&g.path)?);
        let overlay = match &g.overlay {
            Some(p) => {
                let n = name_of(p);
                assets.insert(n.clone(), "image/png", std::fs::read(p)?);
                Some(n)
            }
            None => None,
        };
        let entry = ImageInput {
            name,
            seed: g.seed,
            attention: overlay,
            features,
        };
        match prompts.iter_mut().find(|p| p.prompt == g.prompt) {
            Some(p) => p.images.push(entry),
            None => prompts.push(PromptInput {
                prompt: g.prompt.clone(),
                images: vec![entry],
                text_features: Vec::new(),
            }),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let texts: Vec<String> = prompts
        .iter()
        .map(|p| without_identifier(&p.prompt, &args.token))
        .collect();
    for (p, text) in prompts.iter_mut().zip(models.text_features(&texts)?) {
        p.text_features = text;
    }
    timings.insert("images".to_owned(), started.elapsed().as_secs_f64());

    let references = reference_paths
        .iter()
        .zip(reference_features)
        .zip(&masks)
        .map(|((path, features), mask)| ReferenceInput {
            name: name_of(path),
            description: None,
            mask: mask.as_ref().map(|m| m.2.clone()),
            mask_source: mask.as_ref().map(|m| m.1),
            mask_coverage: mask.as_ref().map(|m| m.0.coverage()),
            features,
        })
        .collect();
    for (path, mask) in reference_paths.iter().zip(&masks) {
        assets.insert(name_of(path), mime_of(path), std::fs::read(path)?);
        if let Some((mask, _, name)) = mask {
            assets.insert(name.clone(), "image/png", mask.to_png());
        }
    }
    let report = assemble(ReportInput {
        job_id: None,
        created_at: chrono::Utc::now().to_rfc3339(),
        subject_class: args.class.clone(),
        token: args.token.clone(),
        settings: serde_json::json!({
            "command": "sidbooth evaluate",
            "references": args.references,
            "masks": args.masks,
            "images": args.images,
            "prompt": args.prompt,
            "class": args.class,
            "token": args.token,
        }),
        models: models.models.clone(),
        references,
        prompts,
        training: None,
        notices: Vec::new(),
        timings,
        reasons: Reasons {
            dino: models
                .dino
                .is_none()
                .then(|| "no --dino model was given".to_owned()),
            masks: mask_reason,
            attention: Some(if models.sam.is_none() {
                "no --sam model to find the subject in the generated images".to_owned()
            } else {
                "no image has an attention map (NAME-attention-WORD.npy from sidbooth generate \
                 --attention-token) with a subject SAM could find"
                    .to_owned()
            }),
        },
    });
    let json_path = args.out.join("report.json");
    let html_path = args.out.join("report.html");
    std::fs::write(&json_path, serde_json::to_vec_pretty(&report)?)?;
    std::fs::write(&html_path, render(&report, &assets))?;
    for (name, value) in report.measures.named() {
        match value {
            Some(v) => eprintln!("{name:>28}: {v:.4}"),
            None => eprintln!("{name:>28}: left out"),
        }
    }
    if !report.meaningful {
        eprintln!("(random-weight models: these numbers are not meaningful)");
    }
    println!("{}", json_path.display());
    println!("{}", html_path.display());
    Ok(())
}

fn mime_of(p: &Path) -> &'static str {
    match p
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("png") => "image/png",
        Some("webp") => "image/webp",
        _ => "image/jpeg",
    }
}
