//! Custom Diffusion on the tiny model: parity of two training steps with diffusers'
//! `train_custom_diffusion.py` (both weight choices, with prior preservation), the start
//! token's detached key and value, gradient coverage, the rescaling augmentation against the
//! reference's `preprocess` and its loss mask, resume, and the export loaded in diffusers
//! sampling as `registry::load_weights` does. Reference tensors:
//! `scripts/parity/make_custom_diffusion_fixtures.py`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::{Rgb, RgbImage};
use sidbooth_domain::train::{CrossAttentionWeights, TrainSettings};
use sidbooth_engine::pipeline::{GenerateRequest, StableDiffusion};
use sidbooth_engine::train::augment::{AugmentPhotos, Augmenter, View};
use sidbooth_engine::train::data::{CaptionedPhoto, LatentSet, PhotoSource};
use sidbooth_engine::train::host::{Denoiser, PromptEncoder};
use sidbooth_engine::train::method::custom_diffusion::{
    CustomDiffusionConfig, CustomDiffusionMethod, Placement, Rescale, WEIGHTS_FILE,
};
use sidbooth_engine::train::method::{ExportInfo, TrainingMethod, TOKEN_EMBEDDING};
use sidbooth_engine::train::optim::{self, AdamW, AdamWConfig};
use sidbooth_engine::train::registry::{self, MethodConfig, SettingsContext};
use sidbooth_engine::train::schedule::LrSchedule;
use sidbooth_engine::train::trainer::{Batch, LoopConfig, Resume, TrainInputs, Trainer};
use sidbooth_engine::train::{
    self, Callbacks, PriorConfig, TrainConfig, TrainModels, TrainOutcome,
};

mod support;
use support::{fixtures, flat, max_abs};

/// The learning rate of the reference steps.
const LR: f64 = 1e-3;
/// Relative tolerance of every comparison with the reference (fp32, CPU).
const RTOL: f32 = 1e-4;
const CAPTION: &str = "a photo of <sks> dog";
const CLASS_CAPTION: &str = "a photo of dog";

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join("custom_diffusion/reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn pipeline() -> StableDiffusion {
    StableDiffusion::load(fixtures().join("tiny-sd"), &Default::default()).unwrap()
}

fn config(weights: CrossAttentionWeights, augment: bool) -> CustomDiffusionConfig {
    CustomDiffusionConfig {
        initializer: "dog".into(),
        weights,
        augment,
        ..CustomDiffusionConfig::new("<sks>")
    }
}

/// `max |ours - want| / max |want|`, asserted below `RTOL`.
fn assert_rel(name: &str, ours: &Tensor, want: &Tensor) -> f32 {
    support::assert_rel(name, ours, want, RTOL)
}

fn photo(i: u32) -> RgbImage {
    RgbImage::from_fn(40, 32, |x, y| {
        if (x as i32 - 18 - i as i32).pow(2) + (y as i32 - 16).pow(2) < 80 {
            Rgb([220, 120, 30])
        } else if (x / 4 + y / 4) % 2 == 0 {
            Rgb([20, 40, 200])
        } else {
            Rgb([230, 230, 210])
        }
    })
}

fn photos(n: u32) -> Vec<CaptionedPhoto> {
    (0..n)
        .map(|i| CaptionedPhoto {
            source: PhotoSource::Image(photo(i)),
            caption: CAPTION.into(),
            mask: None,
        })
        .collect()
}

fn attached(
    base: &TrainModels,
    cfg: CustomDiffusionConfig,
) -> (TrainModels, CustomDiffusionMethod) {
    support::attach(base, CustomDiffusionMethod::new(cfg).unwrap(), 0)
}

fn reference_batch(r: &HashMap<String, Tensor>) -> Batch {
    Batch {
        x0: r["x0"].clone(),
        noise: r["noise"].clone(),
        timesteps: flat(&r["timesteps"]).iter().map(|&t| t as u32).collect(),
        captions: vec![CAPTION.into(), CLASS_CAPTION.into()],
        masks: vec![None, None],
        class_count: 1,
    }
}

/// Two reference steps; returns the relative errors by name.
fn steps_match(mode: &str, weights: CrossAttentionWeights) -> Vec<(String, f32)> {
    let r = reference();
    let base = TrainModels::from_pipeline(&pipeline()).unwrap();
    let (mut m, method) = attached(&base, config(weights, false));
    assert_eq!(method.token_id(), Some(flat(&r["modifier_id"])[0] as u32));
    let ids = r["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap();
    assert_eq!(m.text_encoder.tokenize(CAPTION).unwrap(), ids[0]);
    assert_eq!(m.text_encoder.tokenize(CLASS_CAPTION).unwrap(), ids[1]);

    let instance = LatentSet::prepare(&photos(1), &m.vae, 32, false, &m.device).unwrap();
    let inputs = TrainInputs {
        unet: &mut m.unet,
        text_encoder: &mut m.text_encoder,
        schedule: &m.schedule,
        method: &method,
        instance: &instance,
        class: None,
    };
    let mut trainer = Trainer::new(inputs, LoopConfig::default()).unwrap();
    let batch = reference_batch(&r);
    let mut opt = AdamW::new(method.trainable(), AdamWConfig::default()).unwrap();
    let mut errors = Vec::new();
    let want = |kind: &str, name: &str| {
        let key = if name == TOKEN_EMBEDDING {
            "token"
        } else {
            name
        };
        let t = &r[&format!("{mode}.{kind}.{key}")];
        if name == TOKEN_EMBEDDING {
            t.unsqueeze(0).unwrap()
        } else {
            t.clone()
        }
    };
    for step in 1..=2 {
        let ml = trainer.loss_on(&batch).unwrap();
        let loss = ml.loss.reshape(1).unwrap();
        errors.push((
            format!("loss {step}"),
            assert_rel("loss", &loss, &r[&format!("{mode}.loss_{step}")]),
        ));
        let mut grads = trainer.gradients(&ml.loss).unwrap();
        if step == 1 && r.contains_key(&format!("{mode}.grad_1.token")) {
            for (name, g) in &grads {
                errors.push((
                    format!("gradient {name}"),
                    assert_rel(name, g, &want("grad_1", name)),
                ));
            }
        }
        optim::clip_grad_norm(&mut grads, 1.0).unwrap();
        opt.step_with(&grads, |_| LR).unwrap();
        method.after_step().unwrap();
    }
    for (name, var) in method.trainable() {
        errors.push((
            format!("after 2 steps {name}"),
            assert_rel(&name, var.as_tensor(), &want("after_2", &name)),
        ));
    }
    errors
}

fn report(mode: &str, errors: &[(String, f32)]) {
    let worst = |prefix: &str| {
        errors
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, e)| *e)
            .fold(0f32, f32::max)
    };
    eprintln!(
        "{mode}: relative max error loss {:.2e}, gradients {:.2e}, weights after 2 steps {:.2e} ({} tensors)",
        worst("loss"),
        worst("gradient"),
        worst("after"),
        errors.iter().filter(|(n, _)| n.starts_with("after")).count()
    );
}

#[test]
fn key_value_steps_match_diffusers() {
    let errors = steps_match("key_value", CrossAttentionWeights::KeyValue);
    // 7 cross-attentions x (to_k, to_v) and the token: every gradient and weight compared
    assert_eq!(
        errors
            .iter()
            .filter(|(n, _)| n.starts_with("after"))
            .count(),
        15
    );
    assert_eq!(
        errors
            .iter()
            .filter(|(n, _)| n.starts_with("gradient"))
            .count(),
        15
    );
    report("key_value", &errors);
}

#[test]
fn all_weights_steps_match_diffusers() {
    let errors = steps_match("all", CrossAttentionWeights::All);
    // and to_q, to_out.0 weight and bias
    assert_eq!(
        errors
            .iter()
            .filter(|(n, _)| n.starts_with("after"))
            .count(),
        36
    );
    report("all", &errors);
}

/// The loss of `batch` (instance and prior MSE) built by hand, without `prepare`.
fn loss_by_hand(m: &TrainModels, batch: &Batch) -> Tensor {
    let noisy = m
        .schedule
        .add_noise(&batch.x0, &batch.noise, &batch.timesteps)
        .unwrap();
    let ids: Vec<u32> = batch
        .captions
        .iter()
        .flat_map(|c| m.text_encoder.tokenize(c).unwrap())
        .collect();
    let ctx = m
        .text_encoder
        .encode_ids(&Tensor::from_vec(ids, (2, 77), &m.device).unwrap())
        .unwrap();
    let pred = m.unet.predict(&noisy, &batch.timesteps, &ctx).unwrap();
    let mse = |i: usize| {
        (pred.narrow(0, i, 1).unwrap() - batch.noise.narrow(0, i, 1).unwrap())
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };
    (mse(0) + mse(1)).unwrap()
}

#[test]
fn gradients_reach_exactly_the_trained_weights() {
    let r = reference();
    let batch = reference_batch(&r);
    let base = TrainModels::from_pipeline(&pipeline()).unwrap();
    let base_unet: Vec<(String, Vec<f32>)> = Denoiser::named_weights(&base.unet)
        .iter()
        .map(|(n, t)| (n.clone(), flat(t)))
        .collect();
    let (mut m, method) = attached(&base, config(CrossAttentionWeights::KeyValue, false));
    let trained: Vec<String> = Denoiser::named_weights(&m.unet)
        .into_iter()
        .filter(|(_, w)| w.is_variable())
        .map(|(n, _)| n)
        .collect();
    assert_eq!(trained.len(), 14);
    assert!(trained
        .iter()
        .all(|n| n.ends_with("attn2.to_k.weight") || n.ends_with("attn2.to_v.weight")));
    for (name, w) in PromptEncoder::named_weights(&m.text_encoder) {
        assert!(!w.is_variable(), "{name} is a variable");
    }

    // The start token's key and value are detached: the same outputs, other gradients.
    let (_, first) = method.trainable()[0].clone();
    let grad = |m: &TrainModels| {
        loss_by_hand(m, &batch)
            .backward()
            .unwrap()
            .get(first.as_tensor())
            .expect("gradient")
            .clone()
    };
    let ctx = m
        .text_encoder
        .encode_ids(&r["input_ids"].to_dtype(DType::U32).unwrap())
        .unwrap();
    let with = m.unet.predict(&batch.x0, &batch.timesteps, &ctx).unwrap();
    let g_detached = grad(&m);
    m.unet.detach_cross_attention_bos(false).unwrap();
    let without = m.unet.predict(&batch.x0, &batch.timesteps, &ctx).unwrap();
    let g_attached = grad(&m);
    assert_eq!(flat(&with), flat(&without));
    let diff = max_abs(&(&g_attached - &g_detached).unwrap()) / max_abs(&g_detached);
    assert!(
        diff > 1e-3,
        "detaching the start token changes nothing ({diff})"
    );

    let instance = LatentSet::prepare(&photos(2), &m.vae, 32, false, &m.device).unwrap();
    let inputs = TrainInputs {
        unet: &mut m.unet,
        text_encoder: &mut m.text_encoder,
        schedule: &m.schedule,
        method: &method,
        instance: &instance,
        class: None,
    };
    let cfg = LoopConfig {
        max_steps: 2,
        lr: LrSchedule::constant(LR),
        ..LoopConfig::default()
    };
    let mut trainer = Trainer::new(inputs, cfg).unwrap();
    let params = trainer.params().to_vec();
    assert_eq!(params.len(), 15);
    // `loss_on` prepares the models (the detach back on) before its forward pass
    let store = trainer.loss_on(&batch).unwrap().loss.backward().unwrap();
    for (name, var) in &params {
        let g = store
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        assert!(flat(g).iter().all(|v| v.is_finite()), "{name}");
        assert!(max_abs(g) > 0.0, "{name}: zero gradient");
        if name == &params[0].0 {
            assert_eq!(
                flat(g),
                flat(&g_detached),
                "the trainer's step detaches the start token"
            );
        }
    }
    trainer.train_step().unwrap();
    trainer.train_step().unwrap();
    drop(trainer);

    // the base model the run started from is bit-identical, and so are the frozen UNet weights
    for ((name, before), (_, now)) in base_unet.iter().zip(Denoiser::named_weights(&base.unet)) {
        assert_eq!(before, &flat(&now), "base {name} changed");
    }
    for ((name, before), (n2, now)) in base_unet.iter().zip(Denoiser::named_weights(&m.unet)) {
        assert_eq!(name, &n2);
        if !trained.contains(name) {
            assert_eq!(before, &flat(&now), "frozen {name} changed");
        }
    }
}

#[test]
fn rescaling_matches_the_reference_preprocess() {
    let r = reference();
    let px = flat(&r["aug_photo"]);
    let photo = RgbImage::from_raw(32, 32, px.iter().map(|&v| v as u8).collect()).unwrap();
    let mut n = 0;
    while let Some(p) = r.get(&format!("aug_{n}.placement")) {
        let p = flat(p);
        let placement = Placement {
            scale: p[0] as u32,
            top: p[1] as u32,
            left: p[2] as u32,
        };
        let view = View {
            image: &photo,
            subject: None,
            caption: CAPTION,
            latent_factor: 2,
        };
        let (pixels, weights) = Rescale::place(view, placement).unwrap();
        let want_px = flat(&r[&format!("aug_{n}.pixels")]);
        let err = pixels
            .iter()
            .zip(&want_px)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert_eq!(pixels.len(), want_px.len());
        assert!(err <= 1e-6, "{placement:?}: pixels differ by {err}");
        assert_eq!(
            weights,
            flat(&r[&format!("aug_{n}.mask")]),
            "{placement:?}: mask"
        );
        n += 1;
    }
    assert_eq!(n, 6);
}

#[test]
fn subject_mask_follows_the_rescaling() {
    let photo = photo(0);
    let photo = image::imageops::crop_imm(&photo, 4, 0, 32, 32).to_image();
    // the subject is the left half
    let subject =
        image::GrayImage::from_fn(32, 32, |x, _| image::Luma([if x < 16 { 255 } else { 0 }]));
    let view = |subject| View {
        image: &photo,
        subject,
        caption: CAPTION,
        latent_factor: 2,
    };
    let at = |scale, top, left| Placement { scale, top, left };
    // unscaled: the valid cells (all but the border ring) weighted by the subject's share
    let (_, valid) = Rescale::place(view(None), at(32, 0, 0)).unwrap();
    let (_, weights) = Rescale::place(view(Some(&subject)), at(32, 0, 0)).unwrap();
    for (i, (w, v)) in weights.iter().zip(&valid).enumerate() {
        let want = if i % 16 < 8 { *v } else { 0.0 };
        assert_eq!(*w, want, "cell {i}");
    }
    // enlarged 1.25 times, cropped 8 pixels in from the left: the subject's edge moves from
    // column 16 to 20 - 8 = 12 (latent column 6), blurred over a pixel or two by the resize
    let (_, weights) = Rescale::place(view(Some(&subject)), at(40, 0, 8)).unwrap();
    for (i, w) in weights.iter().enumerate() {
        match i % 16 {
            0..=4 => assert_eq!(*w, 1.0, "cell {i}"),
            5 | 6 => assert!(*w > 0.0 && *w < 1.0, "cell {i}: {w}"),
            _ => assert_eq!(*w, 0.0, "cell {i}"),
        }
    }
    // shrunk and placed: nothing outside the photo, and no more than the photo's cells
    let (_, valid) = Rescale::place(view(None), at(16, 8, 8)).unwrap();
    let (_, weights) = Rescale::place(view(Some(&subject)), at(16, 8, 8)).unwrap();
    assert!(weights.iter().zip(&valid).all(|(w, v)| w <= v));
    assert!(weights.iter().sum::<f32>() > 0.0);
    assert_eq!(
        valid.iter().sum::<f32>(),
        36.0,
        "cells 5..11 of the 4..12 the photo covers"
    );
}

/// A training setup with the augmentation on: the models, method and photos.
struct Augmented {
    m: TrainModels,
    method: CustomDiffusionMethod,
    instance: LatentSet,
    photos: AugmentPhotos,
}

fn augmented() -> Augmented {
    let base = TrainModels::from_pipeline(&pipeline()).unwrap();
    let (m, method) = attached(&base, config(CrossAttentionWeights::KeyValue, true));
    let instance = LatentSet::prepare(&photos(2), &m.vae, 32, false, &m.device).unwrap();
    let photos = AugmentPhotos::prepare(&photos(2), 32, false).unwrap();
    Augmented {
        m,
        method,
        instance,
        photos,
    }
}

#[test]
fn augmented_loss_ignores_the_padding() {
    let Augmented {
        mut m,
        method,
        instance,
        photos,
    } = augmented();
    let schedule = m.schedule.clone();
    let vae = m.vae.clone();
    let inputs = TrainInputs {
        unet: &mut m.unet,
        text_encoder: &mut m.text_encoder,
        schedule: &schedule,
        method: &method,
        instance: &instance,
        class: None,
    };
    let augmenter = Augmenter {
        augmentation: method.augmentation().expect("augmentation on"),
        photos: &photos,
        vae: &vae,
    };
    let mut trainer = Trainer::new(inputs, LoopConfig::default())
        .unwrap()
        .with_augmentation(augmenter)
        .unwrap();

    let (mut small, mut large, mut padded) = (0, 0, None);
    for index in 0..40 {
        let b = trainer.batch(index).unwrap();
        let mask = b.masks[0]
            .clone()
            .expect("every augmented example has a mask");
        let valid = flat(&mask);
        let share = valid.iter().sum::<f32>() / valid.len() as f32;
        let caption = &b.captions[0];
        if caption.starts_with("a far away ") || caption.starts_with("very small ") {
            small += 1;
            assert!(share < 0.36, "{caption}: {share}");
        } else if caption.starts_with("zoomed in ") || caption.starts_with("close up ") {
            large += 1;
            assert_eq!(share, 1.0, "{caption}");
        } else {
            assert_eq!(caption, CAPTION);
            assert!(
                share < 1.0,
                "a photo at 0.6 to 1 times the size leaves padding"
            );
            padded.get_or_insert(b);
        }
    }
    assert!(small > 0 && large > 0, "{small} small, {large} large views");
    let batch = padded.expect("a view with padding");

    // Moving the target inside the padding while keeping the noisy input the same (noise + d,
    // x0 - d sqrt(1 - a) / sqrt(a)) leaves the loss alone; the same move on the photo does not.
    let a = schedule.alphas_cumprod[batch.timesteps[0] as usize];
    let k = ((1.0 - a).sqrt() / a.sqrt()) as f32;
    let mask = batch.masks[0].clone().unwrap();
    let moved = |region: &Tensor| -> Batch {
        let d = (region.broadcast_as(batch.noise.dims()).unwrap() * 0.7).unwrap();
        Batch {
            noise: (&batch.noise + &d).unwrap(),
            x0: (&batch.x0 - (&d * k as f64).unwrap()).unwrap(),
            ..batch.clone()
        }
    };
    let mut loss = |b: &Batch| trainer.loss_on(b).unwrap().instance_loss;
    let l0 = loss(&batch);
    let in_padding = loss(&moved(&mask.affine(-1.0, 1.0).unwrap()));
    let in_photo = loss(&moved(&mask));
    eprintln!(
        "loss {l0:.6}; target moved in the padding {in_padding:.6}, on the photo {in_photo:.6}"
    );
    assert!(
        ((in_padding - l0) / l0).abs() < 1e-5,
        "{l0} -> {in_padding}"
    );
    assert!(((in_photo - l0) / l0).abs() > 1e-2, "{l0} -> {in_photo}");
    // and the loss is the mean over the valid cells
    drop(trainer);
    let noisy = schedule
        .add_noise(&batch.x0, &batch.noise, &batch.timesteps)
        .unwrap();
    let ids = m.text_encoder.tokenize(&batch.captions[0]).unwrap();
    let ctx = m
        .text_encoder
        .encode_ids(&Tensor::from_vec(ids, (1, 77), &m.device).unwrap())
        .unwrap();
    let pred = m.unet.predict(&noisy, &batch.timesteps, &ctx).unwrap();
    let sq = (pred - &batch.noise).unwrap().sqr().unwrap();
    let masked = sq
        .broadcast_mul(&mask)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let area = mask.sum_all().unwrap().to_scalar::<f32>().unwrap() * 4.0;
    assert!(
        ((masked / area) as f64 - l0).abs() / l0 < 1e-5,
        "{} vs {l0}",
        masked / area
    );
}

#[test]
fn job_settings_map_to_the_new_token() {
    let s: TrainSettings = serde_json::from_value(serde_json::json!({
        "method": "custom_diffusion", "weights": "all", "augment": false
    }))
    .unwrap();
    let cx = SettingsContext {
        token: "sks".into(),
        class: "dog".into(),
    };
    assert_eq!(
        MethodConfig::from_settings(&s, &cx).unwrap(),
        MethodConfig::CustomDiffusion(CustomDiffusionConfig {
            token: "<sks>".into(),
            initializer: "ktn".into(),
            weights: CrossAttentionWeights::All,
            augment: false,
        })
    );
}

fn run_config(dir: &Path, max_steps: u64, resume: Resume) -> TrainConfig {
    let class_dir = dir.join("class");
    std::fs::create_dir_all(&class_dir).unwrap();
    for i in 0..2 {
        photo(5 + i)
            .save(class_dir.join(format!("class-{i}.png")))
            .unwrap();
    }
    TrainConfig {
        method: MethodConfig::CustomDiffusion(config(CrossAttentionWeights::KeyValue, true)),
        photos: photos(2),
        prior: Some(PriorConfig {
            class_prompt: CLASS_CAPTION.into(),
            class_dir,
            num_class_images: 2,
            seed: 0,
        }),
        resolution: 32,
        flip: true,
        loop_cfg: LoopConfig {
            seed: 4,
            max_steps,
            lr: LrSchedule::constant(LR),
            checkpoint_every: 2,
            checkpoint_dir: Some(dir.join("checkpoints")),
            resume,
            ..LoopConfig::default()
        },
        output_dir: dir.join("out"),
        export_options: Default::default(),
        export_info: ExportInfo {
            token: "sks".into(),
            class: "dog".into(),
            ..ExportInfo::default()
        },
    }
}

fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let mut t: Vec<(String, Vec<f32>)> = candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, flat(&v)))
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

#[test]
fn run_with_augmentation_and_prior_resumes_exactly() {
    let base = TrainModels::from_pipeline(&pipeline()).unwrap();
    let tmp = std::env::temp_dir().join(format!("sidbooth-cd-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let run = |dir: &Path, steps: u64, resume: Resume| {
        let mut priors = Vec::new();
        let outcome = {
            let mut cb = Callbacks::default().on_step(|r| priors.push(r.prior_loss));
            train::run(&run_config(dir, steps, resume), &base, None, &mut cb).unwrap()
        };
        assert!(priors.iter().all(|p| p.is_some()), "prior preservation on");
        outcome
    };
    let TrainOutcome::Completed { files, .. } = run(&tmp.join("a"), 4, Resume::No) else {
        panic!("not completed")
    };
    assert_eq!(
        files,
        vec![
            PathBuf::from(WEIGHTS_FILE),
            PathBuf::from("<sks>.safetensors")
        ]
    );
    run(&tmp.join("b"), 2, Resume::No);
    run(&tmp.join("b"), 4, Resume::Latest);
    for f in &files {
        assert_eq!(
            tensors(&tmp.join("a/out").join(f)),
            tensors(&tmp.join("b/out").join(f)),
            "{}",
            f.display()
        );
    }
    let token =
        candle_core::safetensors::load(tmp.join("a/out/<sks>.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(token["<sks>"].dims(), &[32]);
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn exports_sample_as_diffusers_loads_them() {
    let r = reference();
    let req = |prompt: &str| GenerateRequest {
        prompt: prompt.into(),
        steps: 4,
        guidance_scale: 7.5,
        height: Some(32),
        width: Some(32),
        init_latents: Some(r["sample_init_latents"].clone()),
        ..Default::default()
    };
    let base = pipeline().generate(&req(CAPTION), None, None).unwrap();
    for mode in ["key_value", "all"] {
        let export = fixtures().join(format!("custom_diffusion/export-{mode}"));
        let mut sd = pipeline();
        assert_eq!(
            registry::load_weights(&mut sd, &export, 1.0).unwrap(),
            "custom_diffusion"
        );
        let tuned = sd.generate(&req(CAPTION), None, None).unwrap();
        let err = assert_rel(mode, &tuned.latents, &r[&format!("sample_latents.{mode}")]);
        eprintln!("{mode}: samples relative max error {err:.2e}");
        let effect = max_abs(&(&tuned.latents - &base.latents).unwrap());
        assert!(
            effect > 1e-2,
            "{mode}: the weights do not change the samples ({effect})"
        );

        // the token matters: the attention weights without it sample otherwise
        let tmp =
            std::env::temp_dir().join(format!("sidbooth-cd-kv-only-{mode}-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::copy(export.join(WEIGHTS_FILE), tmp.join(WEIGHTS_FILE)).unwrap();
        let mut kv_only = pipeline();
        registry::load_weights(&mut kv_only, &tmp, 1.0).unwrap();
        let without_token = kv_only.generate(&req(CAPTION), None, None).unwrap();
        let effect = max_abs(&(&tuned.latents - &without_token.latents).unwrap());
        assert!(
            effect > 1e-2,
            "{mode}: the token does not change the samples ({effect})"
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
