//! One 50-step classifier-free-guided sample on the tiny model, timed.
//!
//! cargo run --release -p sidbooth-engine --example bench -- [--model services/engine/fixtures/tiny-sd] [--steps 50] [--images 1]
//! Threads: RAYON_NUM_THREADS (candle's CPU kernels); compare with
//! scripts/parity/bench_diffusers.py at the same thread count.

use std::time::Instant;

use sidbooth_engine::pipeline::{GenerateRequest, LoadOptions, StableDiffusion};
use sidbooth_engine::tiny::TinyModel;

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
    let images: usize = get("--images").map(|s| s.parse()).transpose()?.unwrap_or(1);
    let sd = match get("--model") {
        Some(dir) => StableDiffusion::load(dir, &LoadOptions::default())?,
        None => TinyModel::build(0)?.sd,
    };
    let req = GenerateRequest {
        prompt: "a photo of sks dog".into(),
        steps,
        num_images: images,
        seed: 0,
        ..Default::default()
    };
    // warm-up (allocations, thread pool)
    sd.generate(
        &GenerateRequest {
            steps: 2,
            ..req.clone()
        },
        None,
        None,
    )?;
    let t0 = Instant::now();
    let out = sd.generate(&req, None, None)?;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "ours: {secs:.3} s for {steps} steps, cfg 7.5, {images} image(s) of {:?} (threads: {})",
        out.images[0].dimensions(),
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into())
    );
    Ok(())
}
