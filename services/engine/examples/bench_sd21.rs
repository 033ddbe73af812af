//! SD 2.1-base-sized UNet / text encoder / VAE with seeded random weights, one 50-step CFG image
//! at 512x512, timed. Meant for a GPU:
//!
//! cargo run --release -p sidbooth-engine --features cuda --example bench_sd21 -- [--cpu] [--steps 50] [--size 512] [--dtype f16|bf16|f32]
//!
//! Configs: services/engine/fixtures/configs/sd21-base (the public diffusers configs). The prompt is
//! tokenized with the tiny tokenizer (ids are valid in the full 49408-token vocabulary).

use std::time::Instant;

use candle_core::{DType, Device};
use sidbooth_engine::config::ModelDir;
use sidbooth_engine::pipeline::GenerateRequest;
use sidbooth_engine::tiny::seeded_pipeline;

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
    let steps: usize = get("--steps").map(|s| s.parse()).transpose()?.unwrap_or(50);
    let size: usize = get("--size").map(|s| s.parse()).transpose()?.unwrap_or(512);
    let device = if args.iter().any(|a| a == "--cpu") {
        Device::Cpu
    } else {
        Device::cuda_if_available(0)?
    };
    let dtype = match get("--dtype").as_deref() {
        Some("f32") => DType::F32,
        Some("bf16") => DType::BF16,
        _ if device.is_cpu() => DType::F32,
        _ => DType::F16,
    };
    let dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/configs/sd21-base");
    let md = ModelDir::open(&dir)?;
    let t0 = Instant::now();
    let (sd, _) = seeded_pipeline(&(&md).into(), 1, &device, dtype)?;
    println!(
        "built random SD 2.1-base weights in {:.1} s on {device:?} ({dtype:?})",
        t0.elapsed().as_secs_f64()
    );
    let req = GenerateRequest {
        prompt: "a photo of a dog".into(),
        steps,
        height: Some(size),
        width: Some(size),
        ..Default::default()
    };
    sd.generate(
        &GenerateRequest {
            steps: 1,
            ..req.clone()
        },
        None,
        None,
    )?;
    device.synchronize()?;
    let t0 = Instant::now();
    sd.generate(&req, None, None)?;
    device.synchronize()?;
    println!(
        "ours: {:.3} s per {steps}-step CFG {size}x{size} image",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
