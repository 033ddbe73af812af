//! Training tests on the built-in tiny model: gradient coverage, loss decrease, exact resume,
//! cancellation, export/reload, prior preservation.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Tensor};
use image::{Rgb, RgbImage};
use sidbooth_engine::tiny::TinyModel;
use sidbooth_engine::train::data::{CaptionedPhoto, LatentSet, PhotoSource};
use sidbooth_engine::train::host::Denoiser;
use sidbooth_engine::train::host::PromptEncoder;
use sidbooth_engine::train::method::lora::{KOHYA_FILE, LORA_FILE};
use sidbooth_engine::train::method::{
    ExportInfo, ExportOptions, ExportedWeights, LoraConfig, LoraMethod, TrainingMethod,
};
use sidbooth_engine::train::schedule::LrSchedule;
use sidbooth_engine::train::trainer::{
    eval_loss, Callbacks, LoopConfig, LoopOutcome, Resume, TrainInputs, Trainer,
};
use sidbooth_engine::train::{
    self, MethodConfig, PriorConfig, TrainConfig, TrainModels, TrainOutcome,
};

mod support;

const RES: u32 = 32;

/// A synthetic "subject" photo: a coloured disc at a position on a striped background.
fn photo(i: u32) -> RgbImage {
    let (cx, cy) = (14.0 + 3.0 * (i % 3) as f32, 16.0 + 2.0 * (i % 2) as f32);
    RgbImage::from_fn(40, 36, |x, y| {
        let d = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
        if d < 9.0 {
            Rgb([200, 120, 40])
        } else if (x / 4 + i) % 2 == 0 {
            Rgb([30, 60, 180])
        } else {
            Rgb([230, 230, 220])
        }
    })
}

fn photos(n: u32) -> Vec<CaptionedPhoto> {
    (0..n)
        .map(|i| CaptionedPhoto {
            source: PhotoSource::Image(photo(i)),
            caption: format!(
                "a photo of sks dog on a {} striped wall",
                if i % 2 == 0 { "blue" } else { "white" }
            ),
            mask: None,
        })
        .collect()
}

fn tiny(seed: u64) -> TinyModel {
    TinyModel::build(seed).expect("tiny model")
}

/// The repository's three dog6 photos (DreamBooth dataset) with their SID descriptions.
fn dog6_photos() -> Vec<CaptionedPhoto> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/dog6");
    let desc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manual-descriptions.json")).unwrap())
            .unwrap();
    let captions: Vec<String> = desc["descriptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect();
    let photos = train::run::photos_from_dir(&dir, Some(&captions), "").unwrap();
    assert_eq!(photos.len(), 3);
    photos
}

fn models() -> TrainModels {
    TrainModels::from_pipeline(&tiny(7).sd).expect("train models")
}

fn loop_cfg(max_steps: u64, lr: f64) -> LoopConfig {
    LoopConfig {
        seed: 11,
        max_steps,
        lr: LrSchedule::constant(lr),
        max_grad_norm: Some(1.0),
        ..LoopConfig::default()
    }
}

/// Fresh copies of the models with a LoRA attached.
fn attached(base: &TrainModels, cfg: LoraConfig) -> (TrainModels, LoraMethod) {
    support::attach(base, LoraMethod::new(cfg).unwrap(), 5)
}

fn abs_sum(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn all_finite(t: &Tensor) -> bool {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite())
}

#[test]
fn lora_gradient_coverage_unet_and_text_encoder() {
    let base = models();
    let cfg = LoraConfig {
        train_text_encoder: true,
        ..LoraConfig::with_rank(4)
    };
    let (mut m, method) = attached(&base, cfg);
    let modules = method.modules();
    // 4 projections x (attn1, attn2) x transformer blocks of the tiny UNet, 4 x 2 layers in CLIP.
    let unet_mods = modules.iter().filter(|m| m.starts_with("unet.")).count();
    let te_mods = modules
        .iter()
        .filter(|m| m.starts_with("text_encoder."))
        .count();
    assert!(
        unet_mods > 0 && unet_mods % 8 == 0,
        "{unet_mods} UNet adapters"
    );
    assert_eq!(te_mods, 8);
    assert!(modules.iter().any(|m| m.ends_with("attn2.to_out.0")));
    assert!(modules.iter().any(|m| m.ends_with("self_attn.out_proj")));
    assert!(!modules
        .iter()
        .any(|m| m.ends_with("proj_in") || m.contains(".ff.")));

    let instance = LatentSet::prepare(&photos(2), &m.vae, RES, false, &m.device).unwrap();
    // Frozen weights are plain tensors, not variables: backpropagation never accumulates into
    // them and the optimizer never sees them. (candle's backward may still compute a
    // by-product gradient for a constant operand of an op, e.g. a conv kernel; it is discarded.)
    let frozen: Vec<(String, Tensor)> = Denoiser::named_weights(&m.unet)
        .into_iter()
        .chain(m.text_encoder.named_weights())
        .collect();
    let inputs = TrainInputs {
        unet: &mut m.unet,
        text_encoder: &mut m.text_encoder,
        schedule: &m.schedule,
        method: &method,
        instance: &instance,
        class: None,
    };
    let mut trainer = Trainer::new(inputs, loop_cfg(10, 1e-2)).unwrap();
    let params = trainer.params().to_vec();
    assert_eq!(params.len(), 2 * modules.len());
    assert!(frozen.len() > 50);
    for (name, w) in &frozen {
        assert!(!w.is_variable(), "{name} is a variable");
    }

    // Step 0: lora_B starts at zero, so lora_B gets a gradient and lora_A exactly zero.
    let ml = trainer.micro_loss(0).unwrap();
    let store = ml.loss.backward().unwrap();
    for (name, var) in &params {
        let g = store
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        assert!(all_finite(g), "{name}: non-finite gradient");
        if name.ends_with("lora_B.weight") {
            assert!(abs_sum(g) > 0.0, "{name}: zero gradient");
        } else {
            assert_eq!(
                abs_sum(g),
                0.0,
                "{name}: lora_A gradient must vanish while lora_B = 0"
            );
        }
    }
    let frozen_before: Vec<Vec<f32>> = frozen
        .iter()
        .map(|(_, w)| {
            w.flatten_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();

    // After one update every trainable parameter gets a non-zero finite gradient.
    trainer.train_step().unwrap();
    let ml = trainer.micro_loss(1).unwrap();
    let store = ml.loss.backward().unwrap();
    for (name, var) in &params {
        let g = store
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        assert!(
            all_finite(g) && abs_sum(g) > 0.0,
            "{name}: gradient {}",
            abs_sum(g)
        );
    }
    // The optimizer sees exactly the declared parameters, and the frozen weights did not move.
    let loss = trainer.micro_loss(2).unwrap().loss;
    let grads = trainer.gradients(&loss).unwrap();
    let mut names: Vec<&String> = grads.keys().collect();
    names.sort();
    assert_eq!(names, params.iter().map(|(n, _)| n).collect::<Vec<_>>());
    trainer.train_step().unwrap();
    for ((name, w), before) in frozen.iter().zip(&frozen_before) {
        let now: Vec<f32> = w
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(&now == before, "frozen {name} changed");
    }
    // The base models given to training are untouched.
    let mut base2 = base.clone();
    assert!(Denoiser::linears(&mut base2.unet)
        .iter()
        .all(|l| l.lora.is_none()));
    assert!(PromptEncoder::linears(&mut base2.text_encoder)
        .iter()
        .all(|l| l.lora.is_none()));
}

#[test]
fn lora_unet_only_leaves_text_encoder_frozen() {
    let base = models();
    let (mut m, method) = attached(&base, LoraConfig::with_rank(2));
    assert!(method.modules().iter().all(|m| m.starts_with("unet.")));
    assert!(!method.trains_text_encoder());
    let instance = LatentSet::prepare(&photos(1), &m.vae, RES, false, &m.device).unwrap();
    let text_weights = m.text_encoder.named_weights();
    let inputs = TrainInputs {
        unet: &mut m.unet,
        text_encoder: &mut m.text_encoder,
        schedule: &m.schedule,
        method: &method,
        instance: &instance,
        class: None,
    };
    let mut trainer = Trainer::new(inputs, loop_cfg(1, 1e-3)).unwrap();
    let store = trainer.micro_loss(0).unwrap().loss.backward().unwrap();
    for (name, w) in text_weights {
        assert!(store.get(&w).is_none(), "{name} got a gradient");
    }
}

#[test]
fn lora_training_lowers_loss_on_real_training_photos() {
    let base = models();
    let (mut m, method) = attached(&base, LoraConfig::with_rank(4));
    let instance = LatentSet::prepare(&dog6_photos(), &m.vae, RES, true, &m.device).unwrap();
    let before = eval_loss(&m.unet, &m.text_encoder, &m.schedule, &instance, 99, 8).unwrap();
    let inputs = TrainInputs {
        unet: &mut m.unet,
        text_encoder: &mut m.text_encoder,
        schedule: &m.schedule,
        method: &method,
        instance: &instance,
        class: None,
    };
    let mut losses = Vec::new();
    let mut cb = Callbacks::default().on_step(|r| losses.push(r.loss));
    let mut trainer = Trainer::new(inputs, loop_cfg(60, 5e-3)).unwrap();
    let out = trainer.run(&mut cb).unwrap();
    drop(cb);
    assert!(matches!(out, LoopOutcome::Completed { steps: 60, .. }));
    assert_eq!(losses.len(), 60);
    let after = eval_loss(&m.unet, &m.text_encoder, &m.schedule, &instance, 99, 8).unwrap();
    println!("eval loss before {before:.5} after {after:.5}");
    assert!(
        after < 0.9 * before,
        "eval loss before {before} after {after}"
    );
}

fn trainable_values(method: &dyn TrainingMethod) -> BTreeMap<String, Vec<f32>> {
    method
        .trainable()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
        })
        .collect()
}

#[test]
fn resumed_run_matches_uninterrupted_run() {
    let base = models();
    let tmp = std::env::temp_dir().join(format!("sidbooth-train-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let photos = photos(3);
    let mk_cfg = |max_steps: u64, dir: &Path, resume: Resume| LoopConfig {
        grad_accum: 2,
        checkpoint_every: 3,
        checkpoint_dir: Some(dir.to_path_buf()),
        resume,
        lr: LrSchedule {
            base_lr: 1e-2,
            warmup_steps: 2,
            decay: train::schedule::LrDecay::Cosine,
            total_steps: 6,
        },
        ..loop_cfg(max_steps, 1e-2)
    };

    // Uninterrupted: 6 steps.
    let (mut m, method) = attached(&base, LoraConfig::with_rank(2));
    let instance = LatentSet::prepare(&photos, &m.vae, RES, true, &m.device).unwrap();
    let mut straight_losses = Vec::new();
    {
        let inputs = TrainInputs {
            unet: &mut m.unet,
            text_encoder: &mut m.text_encoder,
            schedule: &m.schedule,
            method: &method,
            instance: &instance,
            class: None,
        };
        let mut cb = Callbacks::default().on_step(|r| straight_losses.push((r.step, r.loss)));
        Trainer::new(inputs, mk_cfg(6, &tmp.join("a"), Resume::No))
            .unwrap()
            .run(&mut cb)
            .unwrap();
    }
    let straight = trainable_values(&method);

    // Interrupted: 3 steps (checkpoint at 3), then a fresh process state resumes to 6.
    {
        let (mut m, method) = attached(&base, LoraConfig::with_rank(2));
        let inputs = TrainInputs {
            unet: &mut m.unet,
            text_encoder: &mut m.text_encoder,
            schedule: &m.schedule,
            method: &method,
            instance: &instance,
            class: None,
        };
        let out = Trainer::new(inputs, mk_cfg(3, &tmp.join("b"), Resume::No))
            .unwrap()
            .run(&mut Callbacks::default())
            .unwrap();
        assert!(matches!(
            out,
            LoopOutcome::Completed {
                steps: 3,
                last_checkpoint: Some(_),
                ..
            }
        ));
    }
    let (mut m, method) = attached(&base, LoraConfig::with_rank(2));
    assert_ne!(trainable_values(&method), straight);
    let mut resumed_losses = Vec::new();
    {
        let inputs = TrainInputs {
            unet: &mut m.unet,
            text_encoder: &mut m.text_encoder,
            schedule: &m.schedule,
            method: &method,
            instance: &instance,
            class: None,
        };
        let mut trainer = Trainer::new(inputs, mk_cfg(6, &tmp.join("b"), Resume::Latest)).unwrap();
        assert_eq!(trainer.step(), 3);
        let mut cb = Callbacks::default().on_step(|r| resumed_losses.push((r.step, r.loss)));
        trainer.run(&mut cb).unwrap();
    }
    let resumed = trainable_values(&method);
    assert_eq!(resumed_losses, straight_losses[3..].to_vec());
    for (name, a) in &straight {
        let b = &resumed[name];
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d <= 1e-6, "{name}: max diff {d}");
    }

    // A checkpoint of a different configuration is refused.
    let (mut m, method) = attached(&base, LoraConfig::with_rank(4));
    let inputs = TrainInputs {
        unet: &mut m.unet,
        text_encoder: &mut m.text_encoder,
        schedule: &m.schedule,
        method: &method,
        instance: &instance,
        class: None,
    };
    assert!(Trainer::new(inputs, mk_cfg(6, &tmp.join("b"), Resume::Latest)).is_err());
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn cancel_flag_stops_the_run() {
    let base = models();
    let (mut m, method) = attached(&base, LoraConfig::with_rank(2));
    let instance = LatentSet::prepare(&photos(1), &m.vae, RES, false, &m.device).unwrap();
    let inputs = TrainInputs {
        unet: &mut m.unet,
        text_encoder: &mut m.text_encoder,
        schedule: &m.schedule,
        method: &method,
        instance: &instance,
        class: None,
    };
    let flag = Arc::new(AtomicBool::new(false));
    let f2 = flag.clone();
    let mut cb = Callbacks::default().cancel_flag(flag).on_step(move |r| {
        if r.step == 2 {
            f2.store(true, Ordering::SeqCst);
        }
    });
    let out = Trainer::new(inputs, loop_cfg(100, 1e-3))
        .unwrap()
        .run(&mut cb)
        .unwrap();
    assert!(
        matches!(out, LoopOutcome::Canceled { steps: 2, .. }),
        "{out:?}"
    );
}

#[test]
fn run_exports_lora_that_the_engine_loader_reproduces() {
    let tiny = tiny(7);
    let base = TrainModels::from_pipeline(&tiny.sd).unwrap();
    let tmp = std::env::temp_dir().join(format!("sidbooth-train-export-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let out_path = tmp.join(LORA_FILE);
    let lora = LoraConfig {
        rank: 2,
        alpha: 1.0,
        train_text_encoder: true,
        ..LoraConfig::default()
    };
    let cfg = TrainConfig {
        method: MethodConfig::Lora(lora.clone()),
        photos: photos(2),
        prior: None,
        resolution: RES,
        flip: false,
        loop_cfg: loop_cfg(3, 1e-2),
        output_dir: tmp.clone(),
        export_options: ExportOptions::default(),
        export_info: ExportInfo {
            base_model: "tiny".into(),
            token: "sks".into(),
            class: "dog".into(),
            description_case: "sid".into(),
            steps: 0,
        },
    };
    let mut steps = Vec::new();
    let outcome = {
        let mut cb = Callbacks::default().on_step(|r| steps.push(r.step));
        train::run(&cfg, &base, None, &mut cb).unwrap()
    };
    assert_eq!(steps, vec![1, 2, 3]);
    let TrainOutcome::Completed { files, .. } = outcome else {
        panic!("not completed")
    };
    assert_eq!(files, [std::path::PathBuf::from(LORA_FILE)]);
    let weights = ExportedWeights::load(&out_path).unwrap();
    assert_eq!(weights.metadata["sidbooth.token"], "sks");
    assert_eq!(weights.metadata["sidbooth.class"], "dog");
    assert_eq!(weights.metadata["sidbooth.description_case"], "sid");
    assert_eq!(weights.metadata["sidbooth.steps"], "3");
    assert!(weights
        .tensors
        .keys()
        .any(|k| k.starts_with("unet.") && k.ends_with("attn1.to_q.lora_A.weight")));
    assert!(weights.tensors.keys().any(|k| k
        .starts_with("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight")));
    for (k, t) in &weights.tensors {
        let d = t.dims();
        if k.ends_with("lora_A.weight") {
            assert_eq!(d[0], 2, "{k}");
        } else {
            assert_eq!(d[1], 2, "{k}");
        }
    }

    // Reference: the trained adapters attached in memory (scale alpha/rank = 0.5).
    let (ref_models, method) = attached(&base, lora);
    method
        .load_trainable(&{
            // the exported lora_B has the scale folded in; undo it for the in-memory copy
            weights
                .tensors
                .iter()
                .map(|(k, t)| {
                    (
                        k.clone(),
                        if k.ends_with("lora_B.weight") {
                            (t / 0.5).unwrap()
                        } else {
                            t.clone()
                        },
                    )
                })
                .collect()
        })
        .unwrap();
    // The file loaded by the engine's own loader (as diffusers would: alpha defaults to rank).
    let mut sd = tiny.sd;
    let n = sd.load_lora(&out_path, 1.0).unwrap();
    assert_eq!(n, method.modules().len());

    let ids = ref_models.text_encoder.tokenize("a sks dog").unwrap();
    let n_ids = ids.len();
    let ctx_ref = ref_models
        .text_encoder
        .encode_ids(&Tensor::from_vec(ids, (1, n_ids), &base.device).unwrap())
        .unwrap();
    let ctx_sd = sd.encode_prompt(&["a sks dog"]).unwrap();
    let d_ctx = abs_sum(&(&ctx_ref - &ctx_sd).unwrap());
    assert!(d_ctx < 1e-3, "text encoder outputs differ by {d_ctx}");
    let x = Tensor::randn(0f32, 1.0, (1, 4, 16, 16), &base.device).unwrap();
    let y_ref = ref_models.unet.predict(&x, &[500], &ctx_ref).unwrap();
    let y_sd = sd
        .unet
        .forward(&x, &Tensor::new(&[500f32], &base.device).unwrap(), &ctx_sd)
        .unwrap();
    let d = (&y_ref - &y_sd)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-4, "UNet outputs differ by {d}");
    // and the adapters matter: the base model gives something else
    let y_base = base.unet.predict(&x, &[500], &ctx_ref).unwrap();
    assert!(abs_sum(&(&y_base - &y_ref).unwrap()) > 1e-3);

    // kohya layout
    let k = train::method::to_kohya(&weights).unwrap();
    assert!(k.tensors.keys().any(|k| k.starts_with(
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    )));
    assert!(k
        .tensors
        .keys()
        .any(|k| k.starts_with("lora_te_encoder_layers_0_self_attn_q_proj.alpha")));
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn prior_preservation_with_class_images_from_the_base_model() {
    let tiny = tiny(3);
    let base = TrainModels::from_pipeline(&tiny.sd).unwrap();
    let tmp = std::env::temp_dir().join(format!("sidbooth-train-prior-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let class_dir = tmp.join("class");
    let cfg = TrainConfig {
        method: MethodConfig::Lora(LoraConfig::with_rank(2)),
        photos: photos(2),
        prior: Some(PriorConfig {
            class_prompt: "a photo of dog".into(),
            class_dir: class_dir.clone(),
            num_class_images: 2,
            seed: 1,
        }),
        resolution: RES,
        flip: false,
        loop_cfg: loop_cfg(2, 1e-3),
        output_dir: tmp.join("out"),
        export_options: ExportOptions {
            kohya: true,
            ..ExportOptions::default()
        },
        export_info: ExportInfo::default(),
    };
    let mut reports = Vec::new();
    let outcome = {
        let mut cb = Callbacks::default().on_step(|r| reports.push(r.clone()));
        train::run(&cfg, &base, Some(&tiny.sd), &mut cb).unwrap()
    };
    assert_eq!(train::data::list_images(&class_dir).unwrap().len(), 2);
    assert_eq!(reports.len(), 2);
    for r in &reports {
        let p = r.prior_loss.expect("prior loss reported");
        assert!(p.is_finite() && p > 0.0);
        assert!((r.loss - (r.instance_loss + p)).abs() < 1e-5 * r.loss.max(1.0));
    }
    let TrainOutcome::Completed { files, .. } = outcome else {
        panic!()
    };
    assert_eq!(files.len(), 2, "{files:?}");
    let weights = ExportedWeights::load(&tmp.join("out").join(KOHYA_FILE)).unwrap();
    assert!(weights
        .tensors
        .keys()
        .all(|k| k.starts_with("lora_unet_") || k.starts_with("lora_te_")));
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn batches_accumulation_and_prior_share_one_forward() {
    let base = TrainModels::tiny(5).unwrap();
    let (mut m, method) = attached(&base, LoraConfig::with_rank(2));
    let instance = LatentSet::prepare(&photos(3), &m.vae, RES, true, &m.device).unwrap();
    let class_photos: Vec<CaptionedPhoto> = (10..12)
        .map(|i| CaptionedPhoto {
            source: PhotoSource::Image(photo(i)),
            caption: "a photo of dog".into(),
            mask: None,
        })
        .collect();
    let class = LatentSet::prepare(&class_photos, &m.vae, RES, false, &m.device).unwrap();
    let inputs = TrainInputs {
        unet: &mut m.unet,
        text_encoder: &mut m.text_encoder,
        schedule: &m.schedule,
        method: &method,
        instance: &instance,
        class: Some(&class),
    };
    let cfg = LoopConfig {
        batch_size: 2,
        grad_accum: 2,
        prior_loss_weight: 0.5,
        ..loop_cfg(2, 1e-3)
    };
    let mut trainer = Trainer::new(inputs, cfg).unwrap();
    let ml = trainer.micro_loss(0).unwrap();
    let p = ml.prior_loss.unwrap();
    let total = ml.loss.to_scalar::<f32>().unwrap() as f64;
    assert!((total - (ml.instance_loss + 0.5 * p)).abs() < 1e-5 * total.max(1.0));
    let r1 = trainer.train_step().unwrap();
    let r2 = trainer.train_step().unwrap();
    assert_eq!((r1.step, r2.step), (1, 2));
    assert!(r1.loss.is_finite() && r2.loss.is_finite() && r1.grad_norm > 0.0);
    assert_eq!(trainer.optimizer().step_count(), 2);
}

#[test]
fn run_canceled_while_sampling_class_images() {
    let tiny = tiny(3);
    let base = TrainModels::from_pipeline(&tiny.sd).unwrap();
    let tmp = std::env::temp_dir().join(format!("sidbooth-train-cancel-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let mut cfg = TrainConfig::new(
        MethodConfig::Lora(LoraConfig::with_rank(2)),
        photos(1),
        ExportInfo::default(),
        tmp.join("out"),
    );
    cfg.resolution = RES;
    cfg.loop_cfg = loop_cfg(5, 1e-3);
    cfg.prior = Some(PriorConfig {
        class_prompt: "a photo of dog".into(),
        class_dir: tmp.join("class"),
        num_class_images: 3,
        seed: 0,
    });
    let mut steps = 0;
    let outcome = {
        let mut cb = Callbacks::default()
            .cancel_flag(Arc::new(AtomicBool::new(true)))
            .on_step(|_| steps += 1);
        train::run(&cfg, &base, Some(&tiny.sd), &mut cb).unwrap()
    };
    assert!(
        matches!(outcome, TrainOutcome::Canceled { steps: 0, .. }),
        "{outcome:?}"
    );
    assert_eq!(steps, 0);
    assert!(train::data::list_images(&tmp.join("class"))
        .unwrap()
        .is_empty());
    let _ = std::fs::remove_dir_all(&tmp);
}
