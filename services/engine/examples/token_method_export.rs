//! Trains Textual Inversion or Custom Diffusion for a few steps on a diffusers model directory
//! (the three dog6 photos, "a photo of <sks> dog") and writes the method's output, which the
//! fixture scripts load with diffusers' loaders (`scripts/parity/make_ti_fixtures.py`,
//! `make_custom_diffusion_fixtures.py`).
//!
//! cargo run --release -p sidbooth-engine --example token_method_export -- \
//!     --method textual_inversion|custom_diffusion [--weights key_value|all] \
//!     [--model services/engine/fixtures/tiny-sd] --out DIR [--steps 8] [--lr X]

use std::path::PathBuf;

use sidbooth_domain::train::CrossAttentionWeights;
use sidbooth_engine::pipeline::StableDiffusion;
use sidbooth_engine::train::method::custom_diffusion::CustomDiffusionConfig;
use sidbooth_engine::train::method::{ExportInfo, ExportOptions, TextualInversionConfig};
use sidbooth_engine::train::run::photos_from_dir;
use sidbooth_engine::train::schedule::LrSchedule;
use sidbooth_engine::train::{self, Callbacks, LoopConfig, MethodConfig, TrainConfig, TrainModels};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let get = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = get("--model")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("fixtures/tiny-sd"));
    let out = PathBuf::from(get("--out").ok_or("--out DIR is required")?);
    let steps: u64 = get("--steps").map(|s| s.parse()).transpose()?.unwrap_or(8);
    let token = "<sks>";
    let (method, lr, options) = match get("--method").as_deref() {
        Some("textual_inversion") => (
            MethodConfig::TextualInversion(TextualInversionConfig {
                token: token.into(),
                num_vectors: 2,
                initializer: "dog".into(),
            }),
            5e-2,
            ExportOptions {
                a1111: true,
                ..ExportOptions::default()
            },
        ),
        Some("custom_diffusion") => {
            let weights = match get("--weights").as_deref() {
                Some("all") => CrossAttentionWeights::All,
                None | Some("key_value") => CrossAttentionWeights::KeyValue,
                Some(w) => return Err(format!("unknown --weights {w}").into()),
            };
            (
                MethodConfig::CustomDiffusion(CustomDiffusionConfig {
                    initializer: "dog".into(),
                    weights,
                    ..CustomDiffusionConfig::new(token)
                }),
                1e-2,
                ExportOptions::default(),
            )
        }
        _ => return Err("--method textual_inversion|custom_diffusion".into()),
    };
    let lr = get("--lr").map(|s| s.parse()).transpose()?.unwrap_or(lr);

    let sd = StableDiffusion::load(&model, &Default::default())?;
    let base = TrainModels::from_pipeline(&sd)?;
    let photos = photos_from_dir(
        &root.join("../../examples/dog6"),
        None,
        "a photo of <sks> dog",
    )?;
    let cfg = TrainConfig {
        method,
        photos,
        prior: None,
        resolution: 32,
        flip: false,
        loop_cfg: LoopConfig {
            seed: 1,
            max_steps: steps,
            lr: LrSchedule::constant(lr),
            ..LoopConfig::default()
        },
        output_dir: out.clone(),
        export_options: options,
        export_info: ExportInfo {
            base_model: "services/engine/fixtures/tiny-sd".into(),
            token: "sks".into(),
            class: "dog".into(),
            description_case: "class_only".into(),
            steps: 0,
        },
    };
    let mut cb = Callbacks::default().on_step(|r| println!("step {} loss {:.5}", r.step, r.loss));
    match train::run(&cfg, &base, None, &mut cb)? {
        train::TrainOutcome::Completed { files, .. } => {
            for f in files {
                println!("wrote {}", out.join(f).display());
            }
            Ok(())
        }
        other => Err(format!("training did not complete: {other:?}").into()),
    }
}
