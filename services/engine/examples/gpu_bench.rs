//! GPU benchmark of issue 3: SD 2.1-base-sized random weights (fixtures/configs/sd21-base) at
//! 512x512 on one CUDA device, in one process:
//! - seconds per 50-step DDIM CFG 7.5 image (median of `--repeats` after a 2-step warm-up);
//! - milliseconds per training step of each of `--train-methods` (default `lora`: UNet attention
//!   to_q/to_k/to_v/to_out.0, rank 4; `dreambooth`: every UNet and text-encoder weight, with
//!   gradient checkpointing as the service defaults it), batch 1, AdamW, grad clipping 1.0;
//!   median of `--train-steps` after `--train-warmup`;
//! - peak device memory while training each (cuMemGetInfo sampled every millisecond on a second
//!   thread during extra steps run after the timed ones, so the sampler does not touch the times).
//!
//! cargo build --release -p sidbooth-engine --features cuda --example gpu_bench
//! gpu_bench [--config DIR] [--dtype f16|bf16|f32] [--steps 50] [--repeats 3] [--train-steps 10]
//!     [--train-warmup 3] [--mem-steps 2] [--rank 4] [--resolution 512] [--skip-sample]
//!     [--train-methods lora,dreambooth]
//!     [--skip-train] [--budget 60] [--cpu] [--json FILE]
//!
//! Each phase stops repeating once it has run `--budget` seconds; a phase that fails is reported
//! (and written to the JSON) and the other one still runs.
//!
//! Without the `cuda` feature (or with `--cpu`) it runs on the CPU in f32, which is only useful as
//! a smoke test at a small `--resolution` and `--steps`.

use std::time::Instant;

use candle_core::{DType, Device};
use image::{Rgb, RgbImage};
use sidbooth_engine::config::ModelDir;
use sidbooth_engine::pipeline::GenerateRequest;
use sidbooth_engine::tiny::seeded_pipeline;
use sidbooth_engine::train::data::{CaptionedPhoto, LatentSet, PhotoSource};
use sidbooth_engine::train::method::dreambooth::{DreamboothConfig, DreamboothMethod};
use sidbooth_engine::train::method::{LoraConfig, LoraMethod, ModelsMut, TrainingMethod};
use sidbooth_engine::train::schedule::LrSchedule;
use sidbooth_engine::train::trainer::{LoopConfig, TrainInputs, Trainer};
use sidbooth_engine::train::TrainModels;

type BoxErr = Box<dyn std::error::Error>;

const GIB: f64 = (1u64 << 30) as f64;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Device memory in use (total - free) as the driver reports it, in bytes.
#[cfg(feature = "cuda")]
mod mem {
    use candle_core::cuda_backend::cudarc::driver::CudaContext;
    use candle_core::Device;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    fn ctx(device: &Device) -> Option<Arc<CudaContext>> {
        match device {
            Device::Cuda(d) => Some(d.cuda_stream().context().clone()),
            _ => None,
        }
    }

    pub fn used(device: &Device) -> Option<usize> {
        let (free, total) = ctx(device)?.mem_get_info().ok()?;
        Some(total - free)
    }

    pub fn total(device: &Device) -> Option<usize> {
        let (_, total) = ctx(device)?.mem_get_info().ok()?;
        Some(total)
    }

    /// Samples `used` every millisecond on its own thread until stopped; returns the maximum.
    pub struct Sampler {
        stop: Arc<AtomicBool>,
        peak: Arc<AtomicUsize>,
        handle: Option<std::thread::JoinHandle<()>>,
    }

    impl Sampler {
        pub fn start(device: &Device) -> Option<Self> {
            let ctx = ctx(device)?;
            let stop = Arc::new(AtomicBool::new(false));
            let peak = Arc::new(AtomicUsize::new(0));
            let (s, p) = (stop.clone(), peak.clone());
            let handle = std::thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    if let Ok((free, total)) = ctx.mem_get_info() {
                        p.fetch_max(total - free, Ordering::Relaxed);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            });
            Some(Self {
                stop,
                peak,
                handle: Some(handle),
            })
        }

        pub fn finish(mut self) -> usize {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(h) = self.handle.take() {
                let _ = h.join();
            }
            self.peak.load(Ordering::Relaxed)
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod mem {
    use candle_core::Device;

    pub fn used(_: &Device) -> Option<usize> {
        None
    }

    pub fn total(_: &Device) -> Option<usize> {
        None
    }

    pub struct Sampler;

    impl Sampler {
        pub fn start(_: &Device) -> Option<Self> {
            None
        }

        pub fn finish(self) -> usize {
            0
        }
    }
}

/// Writes what is known so far, so that a run stopped in the next phase still leaves it.
fn write_json(path: Option<&String>, results: &[(String, String)]) -> Result<(), BoxErr> {
    if let Some(path) = path {
        let map: serde_json::Map<String, serde_json::Value> = results
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&map)?)?;
    }
    Ok(())
}

fn gib(b: Option<usize>) -> String {
    b.map(|b| format!("{:.2}", b as f64 / GIB))
        .unwrap_or_else(|| "n/a".into())
}

// As the sidbooth binaries allocate (weights mapped from their files).
#[global_allocator]
static ALLOC: sidbooth_engine::mapped::MappedAware = sidbooth_engine::mapped::MappedAware;

fn main() -> Result<(), BoxErr> {
    // As the sidbooth binaries set up their allocator.
    sidbooth_engine::kernels::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let get = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let flag = |k: &str| args.iter().any(|a| a == k);
    let num = |k: &str, d: usize| -> Result<usize, BoxErr> {
        Ok(get(k).map(|s| s.parse()).transpose()?.unwrap_or(d))
    };
    let steps = num("--steps", 50)?;
    let repeats = num("--repeats", 3)?.max(1);
    let train_steps = num("--train-steps", 10)?.max(1);
    let train_warmup = num("--train-warmup", 3)?;
    let mem_steps = num("--mem-steps", 2)?;
    let rank = num("--rank", 4)?;
    let resolution = num("--resolution", 512)?;

    let device = if flag("--cpu") {
        Device::Cpu
    } else {
        Device::cuda_if_available(0)?
    };
    if !device.is_cuda() && !flag("--cpu") {
        eprintln!("note: no CUDA device (built without the `cuda` feature or none found); running on the CPU");
    }
    let dtype = match get("--dtype").as_deref() {
        Some("f32") => DType::F32,
        Some("bf16") => DType::BF16,
        Some("f16") => DType::F16,
        Some(o) => return Err(format!("unknown --dtype {o}").into()),
        None if device.is_cpu() => DType::F32,
        None => DType::F16,
    };
    let config = match get("--config") {
        Some(c) => std::path::PathBuf::from(c),
        None => {
            let built = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("fixtures/configs/sd21-base");
            if built.is_dir() {
                built
            } else {
                std::path::PathBuf::from("services/engine/fixtures/configs/sd21-base")
            }
        }
    };
    let mem_context = mem::used(&device);
    println!(
        "device {device:?}, dtype {dtype:?}, config {}, device memory in use before the models: {} GiB of {} GiB",
        config.display(),
        gib(mem_context),
        gib(mem::total(&device))
    );

    let md = ModelDir::open(&config)?;
    let t0 = Instant::now();
    let (sd, _) = seeded_pipeline(&(&md).into(), 1, &device, dtype)?;
    device.synchronize()?;
    let mem_models = mem::used(&device);
    println!(
        "built random SD 2.1-base-sized weights in {:.1} s; device memory in use: {} GiB",
        t0.elapsed().as_secs_f64(),
        gib(mem_models)
    );

    let mut results: Vec<(String, String)> = vec![
        ("device".into(), format!("{device:?}")),
        ("dtype".into(), format!("{dtype:?}")),
        ("resolution".into(), resolution.to_string()),
    ];

    let budget = num("--budget", 60)? as f64;
    let json = get("--json");
    write_json(json.as_ref(), &results)?;
    let mut failed = false;
    if !flag("--skip-sample") {
        let phase = || -> Result<Vec<(String, String)>, BoxErr> {
            let mut results = Vec::new();
            let req = GenerateRequest {
                prompt: "a photo of a dog".into(),
                steps,
                height: Some(resolution),
                width: Some(resolution),
                guidance_scale: 7.5,
                ..Default::default()
            };
            let t = Instant::now();
            sd.generate(
                &GenerateRequest {
                    steps: 2,
                    ..req.clone()
                },
                None,
                None,
            )?;
            device.synchronize()?;
            println!(
                "sampling warm-up (2 steps) {:.2} s",
                t.elapsed().as_secs_f64()
            );
            let mut times = Vec::with_capacity(repeats);
            let t_phase = Instant::now();
            for i in 0..repeats {
                if i > 0 && t_phase.elapsed().as_secs_f64() > budget {
                    println!("  (stopping after {i} images: over the {budget} s budget)");
                    break;
                }
                let t = Instant::now();
                let out = sd.generate(
                    &GenerateRequest {
                        seed: i as u64,
                        ..req.clone()
                    },
                    None,
                    None,
                )?;
                device.synchronize()?;
                let s = t.elapsed().as_secs_f64();
                println!(
                    "  image {i}: {s:.3} s ({}x{})",
                    out.images[0].width(),
                    out.images[0].height()
                );
                times.push(s);
            }
            let n = times.len();
            let med = median(&mut times);
            println!("ours: {med:.3} s per {steps}-step CFG {resolution}x{resolution} image (median of {n})");
            results.push(("sample_s_per_image".into(), format!("{med:.4}")));
            results.push(("sample_steps".into(), steps.to_string()));
            Ok(results)
        };
        match phase() {
            Ok(r) => results.extend(r),
            Err(e) => {
                println!("ours: sampling FAILED: {e}");
                results.push(("sample_error".into(), e.to_string()));
                failed = true;
            }
        }
        write_json(json.as_ref(), &results)?;
    }

    if !flag("--skip-train") {
        let base = TrainModels::from_pipeline(&sd)?;
        drop(sd);
        // One method at a time: each trainer is gone before the next one's memory is sampled.
        let phase = |method_name: &str| -> Result<Vec<(String, String)>, BoxErr> {
            let mut results = Vec::new();
            let mut m = base.clone();
            // LoRA keeps the result names it always had; other methods prefix theirs.
            let key = |k: &str| match method_name {
                "lora" => k.to_string(),
                other => format!("{other}_{k}"),
            };
            let mut method: Box<dyn TrainingMethod> = match method_name {
                "lora" => Box::new(LoraMethod::new(LoraConfig::with_rank(rank))?),
                "dreambooth" => Box::new(DreamboothMethod::new(DreamboothConfig::default())),
                other => return Err(format!("--train-methods: unknown method {other}").into()),
            };
            method.attach(
                ModelsMut {
                    unet: &mut m.unet,
                    text_encoder: &mut m.text_encoder,
                },
                0,
            )?;
            let n_params: usize = method.trainable().iter().map(|(_, v)| v.elem_count()).sum();
            let img = RgbImage::from_fn(resolution as u32, resolution as u32, |x, y| {
                Rgb([(x % 256) as u8, (y % 256) as u8, 128])
            });
            let photos = vec![CaptionedPhoto {
                source: PhotoSource::Image(img),
                caption: "a photo of sks dog".into(),
                mask: None,
            }];
            let instance = LatentSet::prepare(&photos, &m.vae, resolution as u32, false, &device)?;
            let inputs = TrainInputs {
                unet: &mut m.unet,
                text_encoder: &mut m.text_encoder,
                schedule: &m.schedule,
                method: &*method,
                instance: &instance,
                class: None,
            };
            let total = (train_warmup + train_steps + mem_steps) as u64;
            let cfg = LoopConfig {
                seed: 0,
                max_steps: total,
                lr: LrSchedule::constant(1e-4),
                // As the service's defaults: on for full fine-tuning only.
                gradient_checkpointing: method_name == "dreambooth",
                ..LoopConfig::default()
            };
            let mut trainer = Trainer::new(inputs, cfg)?;
            let t = Instant::now();
            for _ in 0..train_warmup {
                trainer.train_step()?;
            }
            device.synchronize()?;
            println!(
                "{method_name} training warm-up ({train_warmup} steps) {:.2} s",
                t.elapsed().as_secs_f64()
            );
            let mut times = Vec::with_capacity(train_steps);
            let mut last = f64::NAN;
            let t_all = Instant::now();
            for i in 0..train_steps {
                if i > 0 && t_all.elapsed().as_secs_f64() > budget {
                    println!("  (stopping after {i} steps: over the {budget} s budget)");
                    break;
                }
                let t = Instant::now();
                last = trainer.train_step()?.loss;
                device.synchronize()?;
                times.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            let n = times.len();
            let mean = t_all.elapsed().as_secs_f64() * 1000.0 / n as f64;
            let med = median(&mut times);
            println!(
                "ours: {med:.1} ms per {method_name} training step (median of {n}, mean {mean:.1}; {resolution}x{resolution}, batch 1, {n_params} trainable, last loss {last:.4})"
            );
            results.push((key("train_ms_per_step"), format!("{med:.2}")));
            results.push((key("train_trainable_params"), n_params.to_string()));
            results.push((key("train_last_loss"), format!("{last:.5}")));
            if let Some(sampler) = (mem_steps > 0)
                .then(|| mem::Sampler::start(&device))
                .flatten()
            {
                for _ in 0..mem_steps {
                    trainer.train_step()?;
                }
                device.synchronize()?;
                let peak = sampler.finish();
                println!(
                    "ours: peak device memory in use while training {method_name} {:.2} GiB (cuMemGetInfo, all models + CUDA context; {:.2} GiB above the {} GiB in use before the models were built)",
                    peak as f64 / GIB,
                    (peak.saturating_sub(mem_context.unwrap_or(0))) as f64 / GIB,
                    gib(mem_context)
                );
                results.push((
                    key("train_peak_device_gib"),
                    format!("{:.3}", peak as f64 / GIB),
                ));
                results.push((
                    key("train_peak_above_context_gib"),
                    format!(
                        "{:.3}",
                        peak.saturating_sub(mem_context.unwrap_or(0)) as f64 / GIB
                    ),
                ));
            }
            Ok(results)
        };
        let methods = get("--train-methods").unwrap_or_else(|| "lora".into());
        for name in methods.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match phase(name) {
                Ok(r) => results.extend(r),
                Err(e) => {
                    println!("ours: {name} training FAILED: {e}");
                    let k = if name == "lora" {
                        "train_error".to_string()
                    } else {
                        format!("{name}_train_error")
                    };
                    results.push((k, e.to_string()));
                    failed = true;
                }
            }
            write_json(json.as_ref(), &results)?;
        }
    }

    if failed {
        std::process::exit(1);
    }
    Ok(())
}
