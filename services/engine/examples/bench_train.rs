//! Times LoRA training steps (UNet attention q/k/v/out, rank 4, batch 1, AdamW, grad clipping)
//! through the engine's training loop.
//!
//! cargo run --release -p sidbooth-engine --example bench_train -- [--model tiny|sd21] [--cpu]
//!     [--steps 20] [--rank 4] [--resolution 32|512] [--dtype f32|f16|bf16] [--threads N]
//!
//! `tiny`: the built-in tiny model at 32x32 on the CPU (compare with
//! scripts/parity/bench_train_diffusers.py at the same thread count). `sd21`: SD 2.1-base-sized
//! random weights (fixtures/configs/sd21-base) at 512x512, meant for a GPU (`--features cuda`);
//! scripts/gpu/bench_train_sd21.sh also records the peak GPU memory.

use std::time::Instant;

use candle_core::{DType, Device};
use image::{Rgb, RgbImage};
use sidbooth_engine::config::ModelDir;
use sidbooth_engine::tiny::{seeded_pipeline, TinyModel};
use sidbooth_engine::train::data::{CaptionedPhoto, LatentSet, PhotoSource};
use sidbooth_engine::train::method::{LoraConfig, LoraMethod, ModelsMut, TrainingMethod};
use sidbooth_engine::train::schedule::LrSchedule;
use sidbooth_engine::train::trainer::{LoopConfig, TrainInputs, Trainer};
use sidbooth_engine::train::TrainModels;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

// As the sidbooth binaries allocate (weights mapped from their files).
#[global_allocator]
static ALLOC: sidbooth_engine::mapped::MappedAware = sidbooth_engine::mapped::MappedAware;

fn main() -> Result<(), BoxError> {
    // As the sidbooth binaries set up their allocator.
    sidbooth_engine::kernels::keep_freed_memory();
    // `train::run` moves its work onto the CPU kernels' threads; this drives the trainer
    // directly, so it goes there itself.
    sidbooth_engine::kernels::on_compute_threads(&Device::Cpu, bench)
}

fn bench() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().collect();
    let get = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let model = get("--model").unwrap_or_else(|| "tiny".into());
    let steps: usize = get("--steps").map(|s| s.parse()).transpose()?.unwrap_or(20);
    let rank: usize = get("--rank").map(|s| s.parse()).transpose()?.unwrap_or(4);
    if let Some(t) = get("--threads") {
        std::env::set_var("RAYON_NUM_THREADS", &t);
    }
    let device = if model == "tiny" || args.iter().any(|a| a == "--cpu") {
        Device::Cpu
    } else {
        Device::cuda_if_available(0)?
    };
    let dtype = match get("--dtype").as_deref() {
        Some("f16") => DType::F16,
        Some("bf16") => DType::BF16,
        Some("f32") => DType::F32,
        _ if device.is_cpu() => DType::F32,
        _ => DType::F16,
    };
    let t0 = Instant::now();
    let (sd, resolution) = if model == "tiny" {
        (TinyModel::build_on(7, &device, dtype)?.sd, 32u32)
    } else {
        let dir =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/configs/sd21-base");
        let md = ModelDir::open(&dir)?;
        (seeded_pipeline(&(&md).into(), 1, &device, dtype)?.0, 512)
    };
    let resolution: u32 = get("--resolution")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(resolution);
    println!(
        "model {model} built in {:.1} s on {device:?} ({dtype:?}), {} CPU threads",
        t0.elapsed().as_secs_f64(),
        candle_core::utils::get_num_threads()
    );

    let base = TrainModels::from_pipeline(&sd)?;
    let mut m = base.clone();
    let mut method = LoraMethod::new(LoraConfig::with_rank(rank))?;
    method.attach(
        ModelsMut {
            unet: &mut m.unet,
            text_encoder: &mut m.text_encoder,
        },
        0,
    )?;
    let n_params: usize = method.trainable().iter().map(|(_, v)| v.elem_count()).sum();
    let img = RgbImage::from_fn(resolution, resolution, |x, y| {
        Rgb([(x % 256) as u8, (y % 256) as u8, 128])
    });
    let photos = vec![CaptionedPhoto {
        source: PhotoSource::Image(img),
        caption: "a photo of sks dog".into(),
        mask: None,
    }];
    let instance = LatentSet::prepare(&photos, &m.vae, resolution, false, &device)?;
    let inputs = TrainInputs {
        unet: &mut m.unet,
        text_encoder: &mut m.text_encoder,
        schedule: &m.schedule,
        method: &method,
        instance: &instance,
        class: None,
    };
    let cfg = LoopConfig {
        seed: 0,
        max_steps: steps as u64 + 2,
        lr: LrSchedule::constant(1e-4),
        ..LoopConfig::default()
    };
    let mut trainer = Trainer::new(inputs, cfg)?;
    trainer.train_step()?;
    trainer.train_step()?;
    device.synchronize()?;
    let t0 = Instant::now();
    let mut last = 0.0;
    for _ in 0..steps {
        last = trainer.train_step()?.loss;
    }
    device.synchronize()?;
    let ms = t0.elapsed().as_secs_f64() * 1000.0 / steps as f64;
    // Split of one step: forward (loss) and backward.
    let (mut fwd, mut bwd) = (0f64, 0f64);
    for i in 0..steps as u64 {
        let t = Instant::now();
        let ml = trainer.micro_loss(1000 + i)?;
        device.synchronize()?;
        fwd += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let _ = trainer.gradients(&ml.loss)?;
        device.synchronize()?;
        bwd += t.elapsed().as_secs_f64();
    }
    let (fwd, bwd) = (fwd * 1000.0 / steps as f64, bwd * 1000.0 / steps as f64);
    println!(
        "ours: forward {fwd:.2} ms, backward {bwd:.2} ms (backward/forward {:.2})",
        bwd / fwd
    );
    println!(
        "ours: {ms:.2} ms per LoRA training step ({model}, {resolution}x{resolution}, rank {rank}, {n_params} trainable, {} adapters, last loss {last:.4})",
        method.modules().len()
    );
    Ok(())
}
