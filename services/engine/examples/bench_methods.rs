//! Times one training step of each method on the tiny fixture model (32x32, batch 1, one
//! instance photo, no prior preservation, AdamW, gradient clipping 1.0) through the engine's
//! whole run (`train::run`: the method's parameterization, augmentation, loss, optimizer).
//!
//! cargo run --release -p sidbooth-engine --example bench_methods -- [--method NAME|all]
//!     [--steps 20] [--threads N] [--resolution 32] [--gradient-checkpointing]
//!
//! Prints `method <name> ours_ms_per_step <x>`. `scripts/bench/train_methods.sh` runs it beside
//! `scripts/bench/train_methods_torch.py` (the same steps in diffusers / transformers / peft /
//! svdiff-pytorch) and prints the ratios.

use std::path::PathBuf;
use std::time::Instant;

use image::{Rgb, RgbImage};
use sidbooth_domain::train::TrainSettings;
use sidbooth_engine::pipeline::{LoadOptions, StableDiffusion};
use sidbooth_engine::train::adapters::BaseSource;
use sidbooth_engine::train::data::{CaptionedPhoto, PhotoSource};
use sidbooth_engine::train::method::ExportInfo;
use sidbooth_engine::train::schedule::LrSchedule;
use sidbooth_engine::train::{
    self, Callbacks, LoopConfig, MethodConfig, SettingsContext, TrainConfig, TrainModels,
};

const METHODS: [&str; 5] = [
    "lora",
    "dreambooth",
    "textual_inversion",
    "custom_diffusion",
    "svdiff",
];

// As the sidbooth binaries allocate (weights mapped from their files).
#[global_allocator]
static ALLOC: sidbooth_engine::mapped::MappedAware = sidbooth_engine::mapped::MappedAware;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // As the sidbooth binaries set up their allocator.
    sidbooth_engine::kernels::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let get = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let steps: u64 = get("--steps").map(|s| s.parse()).transpose()?.unwrap_or(20);
    if let Some(t) = get("--threads") {
        std::env::set_var("RAYON_NUM_THREADS", &t);
    }
    let resolution: u32 = get("--resolution")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(32);
    let checkpointing = args.iter().any(|a| a == "--gradient-checkpointing");
    let which = get("--method").unwrap_or_else(|| "all".into());
    let methods: Vec<&str> = if which == "all" {
        METHODS.to_vec()
    } else {
        vec![METHODS
            .iter()
            .copied()
            .find(|m| *m == which)
            .ok_or_else(|| format!("unknown method {which}"))?]
    };
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-sd");
    let sd = StableDiffusion::load(&dir, &LoadOptions::default())?;
    let base = TrainModels::from_pipeline(&sd)?.with_source(BaseSource::Dir(dir.clone()));
    let photo = RgbImage::from_fn(resolution, resolution, |x, y| {
        Rgb([(x * 8 % 256) as u8, (y * 8 % 256) as u8, 128])
    });
    let cx = SettingsContext {
        token: "sks".into(),
        class: "dog".into(),
    };
    let out = std::env::temp_dir().join(format!("sidbooth-bench-methods-{}", std::process::id()));
    for name in methods {
        let settings: TrainSettings = serde_json::from_value(serde_json::json!({"method": name}))?;
        let caption = settings.rewrite_token("a photo of sks dog", &cx.token);
        let photos = vec![CaptionedPhoto {
            source: PhotoSource::Image(photo.clone()),
            caption,
            mask: None,
        }];
        let mut cfg = TrainConfig::new(
            MethodConfig::from_settings(&settings, &cx)?,
            photos,
            ExportInfo::default(),
            out.join(name),
        );
        cfg.resolution = resolution;
        // Two warm-up steps, then the timed ones.
        cfg.loop_cfg = LoopConfig {
            seed: 0,
            max_steps: steps + 2,
            lr: LrSchedule::constant(1e-4),
            gradient_checkpointing: checkpointing,
            ..LoopConfig::default()
        };
        let (mut started, mut last) = (None, None);
        {
            let mut cb = Callbacks::default().on_step(|r| {
                if r.step == 2 {
                    started = Some(Instant::now());
                } else if r.step == steps + 2 {
                    last = Some(Instant::now());
                }
            });
            train::run(&cfg, &base, Some(&sd), &mut cb)?;
        }
        let (Some(started), Some(last)) = (started, last) else {
            return Err("the run ended early".into());
        };
        let (elapsed, timed) = (last - started, steps);
        println!(
            "method {name} ours_ms_per_step {:.2}",
            elapsed.as_secs_f64() * 1000.0 / timed as f64
        );
    }
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}
