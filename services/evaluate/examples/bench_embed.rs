//! CPU benchmark of the embedding work of one evaluation: 25 prompts x 4 generated images
//! against 5 reference photos of dog6 with their masks. CLIP image embeddings of the 5
//! references, their 5 subject and 5 non-subject segments and the 100 generated images; CLIP
//! text embeddings of the 25 prompts; DINO embeddings of the 105 photos and images; the cosine
//! matrices. Preprocessing is timed, decoding the inputs is not. The same work in transformers:
//! `scripts/parity/bench_eval_transformers.py`.
//!
//! `--size tiny` uses the tiny configs, `--size base` random weights at the sizes of
//! openai/clip-vit-base-patch32 and facebook/dino-vits16 (written to a temporary directory and
//! loaded from there, like a real model):
//!
//! ```sh
//! cargo run -p sidbooth-evaluate --example bench_embed --release -- --threads 2 --size base
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use image::RgbImage;
use serde_json::{json, Value};
use sidbooth_evaluate::clip::{self, ClipModel};
use sidbooth_evaluate::dino::{self, DinoModel};
use sidbooth_evaluate::mask::Mask;
use sidbooth_evaluate::measures::cosine;
use sidbooth_evaluate::resample::{resize_rgb, Filter};
use sidbooth_evaluate::segments::{non_subject_segment, subject_segment};

/// DreamBooth's object prompts, `a sks dog ...`.
const CONTEXTS: [&str; 25] = [
    "in the jungle",
    "in the snow",
    "on the beach",
    "on a cobblestone street",
    "on top of pink fabric",
    "on top of a wooden floor",
    "with a city in the background",
    "with a mountain in the background",
    "with a blue house in the background",
    "on top of a purple rug in a forest",
    "with a wheat field in the background",
    "with a tree and autumn leaves in the background",
    "with the Eiffel Tower in the background",
    "floating on top of water",
    "floating in an ocean of milk",
    "on top of green grass with sunflowers around it",
    "on top of a mirror",
    "on top of the sidewalk in a crowded street",
    "on top of a dirt road",
    "on top of a white rug",
    "red",
    "purple",
    "shiny",
    "wet",
    "cube shaped",
];
const PER_PROMPT: usize = 4;
const REFERENCES: usize = 5;
const GENERATED_SIZE: u32 = 512;

fn base_clip_config() -> (Value, Value) {
    let config = json!({
        "projection_dim": 512,
        "text_config": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
                        "num_hidden_layers": 12, "num_attention_heads": 8,
                        "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
        "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "image_size": 224, "patch_size": 32,
                          "hidden_act": "quick_gelu"}
    });
    let pre = json!({
        "feature_extractor_type": "CLIPFeatureExtractor", "size": 224, "crop_size": 224,
        "do_center_crop": true, "do_normalize": true, "do_resize": true, "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711]
    });
    (config, pre)
}

fn base_dino_config() -> (Value, Value) {
    let config = json!({
        "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
        "intermediate_size": 1536, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
        "image_size": 224, "patch_size": 16, "qkv_bias": true
    });
    let pre = json!({
        "feature_extractor_type": "ViTFeatureExtractor", "size": 224, "resample": 2,
        "do_normalize": true, "do_resize": true,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]
    });
    (config, pre)
}

struct Args {
    size: String,
    threads: Option<usize>,
    data: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        size: "tiny".into(),
        threads: None,
        data: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/datasets/dreambooth"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--size" => a.size = value(),
            "--threads" => a.threads = Some(value().parse().expect("--threads N")),
            "--data" => a.data = PathBuf::from(value()),
            other => panic!("unknown argument {other} (--size tiny|base, --threads N, --data DIR)"),
        }
    }
    a
}

fn photo(path: &Path) -> RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

/// An ellipse over the middle of the photo, standing in for a subject mask.
fn ellipse(w: u32, h: u32) -> Mask {
    Mask::from_bools(w, h, |x, y| {
        let dx = (x as f32 + 0.5 - 0.5 * w as f32) / (0.3 * w as f32);
        let dy = (y as f32 + 0.5 - 0.55 * h as f32) / (0.35 * h as f32);
        dx * dx + dy * dy <= 1.0
    })
}

/// Inputs: dog6's photos as references, other subjects' photos resized to 512 as the
/// "generated" images (the same files and sizes as the Python script).
fn inputs(data: &Path) -> (Vec<RgbImage>, Vec<RgbImage>) {
    let refs = (0..REFERENCES)
        .map(|k| photo(&data.join(format!("dog6/{k:02}.jpg"))))
        .collect();
    let mut pool: Vec<PathBuf> = ["dog3", "cat", "backpack", "vase"]
        .iter()
        .flat_map(|s| (0..4).map(move |k| data.join(format!("{s}/{k:02}.jpg"))))
        .collect();
    pool.sort();
    let pool: Vec<RgbImage> = pool
        .iter()
        .map(|p| resize_rgb(&photo(p), GENERATED_SIZE, GENERATED_SIZE, Filter::Lanczos))
        .collect();
    let generated = (0..CONTEXTS.len() * PER_PROMPT)
        .map(|i| pool[i % pool.len()].clone())
        .collect();
    (refs, generated)
}

fn timed<T>(phases: &mut Vec<(&'static str, f64)>, name: &'static str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let out = f();
    phases.push((name, t.elapsed().as_secs_f64()));
    out
}

fn matrix(a: &[Vec<f32>], b: &[Vec<f32>]) -> Vec<Vec<f64>> {
    a.iter()
        .map(|x| b.iter().map(|y| cosine(x, y)).collect())
        .collect()
}

fn main() -> sidbooth_evaluate::Result<()> {
    let args = args();
    if let Some(n) = args.threads {
        // candle and its matrix products size their thread pool from this variable, read
        // before the first parallel operation.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let device = Device::Cpu;
    let ((clip_cfg, clip_pre), (dino_cfg, dino_pre)) = match args.size.as_str() {
        "tiny" => (
            (clip::tiny_config_json(), clip::tiny_preprocessor_json()),
            (dino::tiny_config_json(), dino::tiny_preprocessor_json()),
        ),
        "base" => (base_clip_config(), base_dino_config()),
        other => panic!("--size tiny|base, not {other}"),
    };
    let (refs, generated) = inputs(&args.data);
    let masks: Vec<Mask> = refs
        .iter()
        .map(|r| ellipse(r.width(), r.height()))
        .collect();
    let prompts: Vec<String> = CONTEXTS.iter().map(|c| format!("a sks dog {c}")).collect();

    let tmp =
        tempfile::tempdir().map_err(|e| sidbooth_evaluate::EvalError::io(Path::new("tmp"), e))?;
    ClipModel::write_seeded_dir(&clip_cfg, &clip_pre, 0, &tmp.path().join("clip"))?;
    DinoModel::write_seeded_dir(&dino_cfg, &dino_pre, 0, &tmp.path().join("dino"))?;

    let mut phases = Vec::new();
    let (clip, dino) = timed(&mut phases, "load", || {
        (
            ClipModel::load(&tmp.path().join("clip"), &device),
            DinoModel::load(&tmp.path().join("dino"), &device),
        )
    });
    let (clip, dino) = (clip?, dino?);
    let work = Instant::now();
    let (subjects, others) = timed(&mut phases, "segments", || {
        let s: Vec<RgbImage> = refs
            .iter()
            .zip(&masks)
            .map(|(r, m)| subject_segment(r, m).expect("the ellipse has pixels"))
            .collect();
        let o: Vec<RgbImage> = refs
            .iter()
            .zip(&masks)
            .map(|(r, m)| non_subject_segment(r, m))
            .collect();
        (s, o)
    });
    let clip_images = timed(&mut phases, "clip images (115)", || {
        let all: Vec<RgbImage> = [&refs, &subjects, &others, &generated]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        clip.image_embeddings(&all)
    })?;
    let texts = timed(&mut phases, "clip texts (25)", || {
        let plain: Vec<String> = prompts.iter().map(|p| p.replace("sks ", "")).collect();
        let refs: Vec<&str> = plain.iter().map(String::as_str).collect();
        clip.text_embeddings(&refs)
    })?;
    let dino_images = timed(&mut phases, "dino images (105)", || {
        let all: Vec<RgbImage> = refs.iter().chain(&generated).cloned().collect();
        dino.image_embeddings(&all)
    })?;
    let checksum = timed(&mut phases, "cosines", || {
        let r = REFERENCES;
        let (ref_e, rest) = clip_images.split_at(r);
        let (subj, rest) = rest.split_at(r);
        let (other, gen) = rest.split_at(r);
        let clip_i = matrix(ref_e, gen);
        let subject = matrix(subj, gen);
        let non_subject: Vec<Vec<f64>> = matrix(other, gen)
            .into_iter()
            .map(|row| row.into_iter().map(|c| 1.0 - c).collect())
            .collect();
        let dino_m = matrix(&dino_images[..r], &dino_images[r..]);
        let text: Vec<f64> = gen
            .iter()
            .enumerate()
            .map(|(j, g)| cosine(g, &texts[j / PER_PROMPT]))
            .collect();
        [clip_i, subject, non_subject, dino_m]
            .iter()
            .flatten()
            .flatten()
            .sum::<f64>()
            + text.iter().sum::<f64>()
    });
    let total = work.elapsed().as_secs_f64();

    println!(
        "sidbooth ({} config, {} threads, checksum {checksum:.4})",
        args.size,
        candle_core::utils::get_num_threads()
    );
    for (name, s) in &phases {
        println!("  {name:<20} {s:8.3} s");
    }
    println!("  {:<20} {total:8.3} s (without load)", "total");
    Ok(())
}
