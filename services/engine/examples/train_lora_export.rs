//! Trains a LoRA (UNet + text encoder, rank 4, alpha 8) for a few steps on a diffusers model
//! directory, exports it, and writes reference outputs of the engine with that file loaded, for
//! scripts/parity/check_lora_export.py to compare with diffusers' `load_lora_weights`.
//!
//! cargo run --release -p sidbooth-engine --example train_lora_export -- \
//!     [--model services/engine/fixtures/tiny-sd] [--out target/lora-export] [--steps 5]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::Tensor;
use sidbooth_engine::pipeline::{initial_latents, StableDiffusion};
use sidbooth_engine::train::method::{ExportInfo, LoraConfig};
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
    let out = get("--out")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../../target/lora-export"));
    let steps: u64 = get("--steps").map(|s| s.parse()).transpose()?.unwrap_or(5);
    std::fs::create_dir_all(&out)?;

    let sd = StableDiffusion::load(&model, &Default::default())?;
    let base = TrainModels::from_pipeline(&sd)?;
    let photos = photos_from_dir(
        &root.join("../../examples/dog6"),
        None,
        "a photo of sks dog",
    )?;
    let lora_path = out.join(sidbooth_engine::train::method::lora::LORA_FILE);
    let cfg = TrainConfig {
        method: MethodConfig::Lora(LoraConfig {
            rank: 4,
            alpha: 8.0,
            train_text_encoder: true,
            ..LoraConfig::default()
        }),
        photos,
        prior: None,
        resolution: 32,
        flip: false,
        loop_cfg: LoopConfig {
            seed: 1,
            max_steps: steps,
            lr: LrSchedule::constant(2e-2),
            ..LoopConfig::default()
        },
        output_dir: out.clone(),
        export_options: Default::default(),
        export_info: ExportInfo {
            base_model: model.display().to_string(),
            token: "sks".into(),
            class: "dog".into(),
            description_case: "class_only".into(),
            steps: 0,
        },
    };
    let mut cb = Callbacks::default().on_step(|r| println!("step {} loss {:.5}", r.step, r.loss));
    train::run(&cfg, &base, None, &mut cb)?;

    let mut tuned = StableDiffusion::load(&model, &Default::default())?;
    let n = tuned.load_lora(&lora_path, 1.0)?;
    let prompt = "a photo of sks dog";
    let ids = tuned.tokenize(&[prompt])?;
    let ctx = tuned.encode_prompt(&[prompt])?;
    let latents = initial_latents(3, &[1, 4, 16, 16])?;
    let t = Tensor::new(&[500f32], &sd.device)?;
    let y = tuned.unet.forward(&latents, &t, &ctx)?;
    let y_base = sd
        .unet
        .forward(&latents, &t, &sd.encode_prompt(&[prompt])?)?;
    let reference: HashMap<String, Tensor> = [
        (
            "input_ids".to_string(),
            ids.to_dtype(candle_core::DType::I64)?,
        ),
        ("context".to_string(), ctx),
        ("latents".to_string(), latents),
        ("unet_out".to_string(), y.clone()),
    ]
    .into_iter()
    .collect();
    candle_core::safetensors::save(&reference, out.join("reference.safetensors"))?;
    let delta = (y - y_base)?.abs()?.max_all()?.to_scalar::<f32>()?;
    println!("{n} adapters; wrote {} and reference.safetensors; max |lora - base| UNet output {delta:.4}", lora_path.display());
    Ok(())
}
