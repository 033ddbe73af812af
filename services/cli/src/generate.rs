//! `sidbooth generate`: sample images from a base model, optionally with a trained LoRA, with
//! the settings written into each PNG.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use image::RgbImage;
use sidbooth_engine::attention::{map_to_npy, save_heatmap_png};
use sidbooth_engine::pipeline::{image_seed, load_latents, save_latents, GenerateRequest};
use sidbooth_engine::png_text::ImageSettings;
use sidbooth_engine::train::registry;

use crate::model::{progress_bar, ModelArgs};

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt; repeat for several (each is sampled with the same seed).
    #[arg(long, value_name = "TEXT", required = true)]
    pub prompt: Vec<String>,
    #[arg(long, value_name = "TEXT")]
    pub negative_prompt: Option<String>,
    /// DDIM steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Classifier-free guidance scale (1 or less: no guidance).
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// Seed of the initial noise (ignored with --init-latents).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images per prompt.
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,
    /// Image height in pixels (default: the model's).
    #[arg(long, value_name = "PX")]
    pub height: Option<usize>,
    /// Image width in pixels (default: the model's).
    #[arg(long, value_name = "PX")]
    pub width: Option<usize>,
    /// Trained weights of any method: the `--output` directory of `sidbooth train` (or one of
    /// its files); the method is read from what is there. A single `.safetensors` file of
    /// another name is read as a diffusers-layout LoRA.
    #[arg(long, alias = "lora", value_name = "PATH")]
    pub weights: Option<PathBuf>,
    /// Multiplier of the weights' strength (LoRA's scale).
    #[arg(
        long,
        alias = "lora-scale",
        default_value_t = 1.0,
        requires = "weights"
    )]
    pub weight_scale: f64,
    /// Initial latents [num_images, C, h, w] (.npy or safetensors, e.g. from --save-latents)
    /// instead of seeded noise.
    #[arg(long, value_name = "FILE")]
    pub init_latents: Option<PathBuf>,
    /// Write the initial latents (the same for every prompt) to FILE (.npy or safetensors).
    #[arg(long, value_name = "FILE")]
    pub save_latents: Option<PathBuf>,
    /// Record the cross-attention of this prompt word (e.g. sks) and write beside each image its
    /// heatmap overlay (`NAME-attention-WORD.png`) and the averaged map itself
    /// (`NAME-attention-WORD.npy`, float32 at latent resolution, which `sidbooth evaluate`
    /// measures).
    #[arg(long, value_name = "WORD")]
    pub attention_token: Option<String>,
    /// Opacity of the heatmap overlay.
    #[arg(long, default_value_t = 0.5)]
    pub attention_alpha: f32,
    /// Output folder.
    #[arg(long, value_name = "DIR", default_value = "generated")]
    pub out: PathBuf,
}

/// A file-name-safe short form of a prompt.
fn slug(prompt: &str) -> String {
    let mut s = String::new();
    for c in prompt.chars() {
        if c.is_ascii_alphanumeric() {
            s.push(c.to_ascii_lowercase());
        } else if !s.ends_with('-') && !s.is_empty() {
            s.push('-');
        }
        if s.len() >= 40 {
            break;
        }
    }
    let s = s.trim_end_matches('-').to_string();
    if s.is_empty() {
        "prompt".into()
    } else {
        s
    }
}

/// Writes `img` as a PNG with `text` in its text chunks.
pub fn save_png_with_text<K: AsRef<str>>(
    img: &RgbImage,
    text: &[(K, String)],
    path: &Path,
) -> Result<()> {
    let bytes = sidbooth_engine::png_text::encode(img, text)?;
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Whether a safetensors file holds kohya-layout LoRA keys (`lora_unet_…`, `lora_te_…`).
fn is_kohya_lora(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    let Some(len) = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
    else {
        return false;
    };
    let Some(header) = bytes.get(8..8usize.saturating_add(len)) else {
        return false;
    };
    let Ok(serde_json::Value::Object(m)) = serde_json::from_slice::<serde_json::Value>(header)
    else {
        return false;
    };
    m.keys()
        .any(|k| k.starts_with("lora_unet_") || k.starts_with("lora_te_"))
}

fn check_args(args: &GenerateArgs) -> Result<()> {
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if args.num_images == 0 {
        bail!("--num-images must be at least 1");
    }
    if let Some(p) = args.prompt.iter().find(|p| p.trim().is_empty()) {
        bail!("empty --prompt {p:?}");
    }
    if !args.guidance.is_finite() {
        bail!("--guidance must be a number");
    }
    if let Some(p) = &args.weights {
        if !p.exists() {
            bail!("--weights {}: no such file or directory", p.display());
        }
    }
    if let Some(p) = &args.init_latents {
        if !p.is_file() {
            bail!("--init-latents {}: no such file", p.display());
        }
    }
    if let Some(w) = &args.attention_token {
        let plain_word = w.chars().all(char::is_alphanumeric);
        let occurs = |p: &str| {
            p.split(|c: char| !c.is_alphanumeric())
                .any(|x| x.eq_ignore_ascii_case(w))
        };
        if let Some(p) = args.prompt.iter().find(|p| plain_word && !occurs(p)) {
            bail!("--attention-token {w:?} does not occur in the prompt {p:?}");
        }
    }
    Ok(())
}

pub fn run(args: GenerateArgs) -> Result<()> {
    check_args(&args)?;
    let loaded = args.model.load()?;
    let model_name = loaded.name;
    let mut sd = loaded.sd;
    let mut method = None;
    if let Some(weights) = &args.weights {
        let loaded_method = registry::load_weights(&mut sd, weights, args.weight_scale).with_context(|| {
            let hint = if weights.is_file() && is_kohya_lora(weights) {
                " (kohya layout: sidbooth generate reads the diffusers layout in the same directory)"
            } else {
                ""
            };
            format!("loading the weights {}{hint}", weights.display())
        })?;
        eprintln!(
            "{loaded_method} weights {} (scale x{})",
            weights.display(),
            args.weight_scale
        );
        method = Some(loaded_method);
    }
    let init_latents = match &args.init_latents {
        Some(p) => Some(
            load_latents(p).with_context(|| format!("reading --init-latents {}", p.display()))?,
        ),
        None => None,
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;

    let total = (args.prompt.len() * args.steps) as u64;
    let pb = progress_bar(
        total,
        "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps {msg}",
    );
    let mut written = Vec::new();
    let mut saved_latents = false;
    for (pi, prompt) in args.prompt.iter().enumerate() {
        pb.set_message(format!("prompt {}/{}", pi + 1, args.prompt.len()));
        let req = GenerateRequest {
            prompt: prompt.clone(),
            negative_prompt: args.negative_prompt.clone(),
            guidance_scale: args.guidance,
            steps: args.steps,
            seed: args.seed,
            height: args.height,
            width: args.width,
            num_images: args.num_images,
            init_latents: init_latents.clone(),
            attention_word: args.attention_token.clone(),
        };
        let base = pi as u64 * args.steps as u64;
        let mut progress = |i: usize, _n: usize| pb.set_position(base + i as u64);
        let out = match sd.generate(&req, Some(&mut progress), None) {
            Ok(o) => o,
            Err(e) => {
                pb.abandon();
                return Err(e).with_context(|| format!("generating {prompt:?}"));
            }
        };
        if let (Some(p), false) = (&args.save_latents, saved_latents) {
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            save_latents(&out.init_latents, p)
                .with_context(|| format!("writing --save-latents {}", p.display()))?;
            saved_latents = true;
        }
        let n = out.images.len();
        for (ii, img) in out.images.iter().enumerate() {
            let seed = image_seed(args.seed, ii);
            let name = format!("{pi:02}-{}-seed{seed}-{ii:02}", slug(prompt));
            let path = args.out.join(format!("{name}.png"));
            let weights = args.weights.as_ref().map(|p| p.display().to_string());
            let mut text = ImageSettings {
                prompt,
                negative_prompt: args.negative_prompt.as_deref(),
                seed,
                steps: args.steps,
                guidance_scale: args.guidance,
                width: img.width(),
                height: img.height(),
                base_model: &model_name,
                method,
                weights: weights.as_deref(),
                weight_scale: args.weights.is_some().then_some(args.weight_scale),
            }
            .text();
            // Given latents replace the seeded noise: the seed alone does not make this image.
            if let Some(p) = &args.init_latents {
                text.push(("init_latents", p.display().to_string()));
            }
            text.push(("image_index", format!("{ii} of {n}")));
            save_png_with_text(img, &text, &path)?;
            if let (Some(word), Some(maps)) = (&args.attention_token, &out.attention_maps) {
                let hp = args
                    .out
                    .join(format!("{name}-attention-{}.png", slug(word)));
                let map = maps.get(ii)?;
                save_heatmap_png(img, &map, args.attention_alpha, &hp)
                    .with_context(|| format!("writing {}", hp.display()))?;
                let np = hp.with_extension("npy");
                std::fs::write(&np, map_to_npy(&map)?)
                    .with_context(|| format!("writing {}", np.display()))?;
                written.push(hp);
                written.push(np);
            }
            written.push(path);
        }
    }
    pb.finish_and_clear();
    for p in &written {
        println!("{}", p.display());
    }
    if let (Some(p), true) = (&args.save_latents, saved_latents) {
        eprintln!("initial latents written to {}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs() {
        assert_eq!(slug("a photo of sks dog"), "a-photo-of-sks-dog");
        assert_eq!(slug("  !!"), "prompt");
        assert!(slug(&"x y ".repeat(50)).len() <= 40);
    }

    #[test]
    fn png_text_roundtrip() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.png");
        let img = RgbImage::from_fn(3, 2, |x, y| image::Rgb([x as u8, y as u8, 7]));
        save_png_with_text(
            &img,
            &[("prompt", "café".into()), ("note", "日本".into())],
            &p,
        )
        .unwrap();
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&p).unwrap()));
        let reader = dec.read_info().unwrap();
        let info = reader.info();
        assert_eq!(info.uncompressed_latin1_text[0].keyword, "prompt");
        assert_eq!(info.uncompressed_latin1_text[0].text, "café");
        assert_eq!(info.utf8_text[0].keyword, "note");
        assert_eq!(image::open(&p).unwrap().to_rgb8(), img);
    }
}
