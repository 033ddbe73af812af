//! DreamBooth, full fine-tuning, on the tiny models: one training step against diffusers'
//! `train_dreambooth.py` (fixture by `scripts/parity/make_dreambooth_fixtures.py`), gradient
//! coverage, and the exported pipeline against diffusers' `from_pretrained` / `from_single_file`
//! (fixtures by `scripts/parity/check_dreambooth_export.py`, which reads the export the test
//! `exported_pipeline_samples_as_in_diffusers` writes).
//!
//! Tolerance: `max |ours - ref| <= 1e-4 * max |ref|` per compared tensor.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::{Rgb, RgbImage};
use rand::SeedableRng;
use sidbooth_domain::train::TrainSettings;
use sidbooth_engine::pipeline::{GenerateRequest, LoadOptions, StableDiffusion};
use sidbooth_engine::tiny::TinyModel;
use sidbooth_engine::train::adapters::BaseSource;
use sidbooth_engine::train::data::{CaptionedPhoto, LatentSet, PhotoSource};
use sidbooth_engine::train::host::{Denoiser, PromptEncoder};
use sidbooth_engine::train::method::dreambooth::{
    DreamboothConfig, DreamboothMethod, MODEL_INDEX, SINGLE_FILE,
};
use sidbooth_engine::train::method::{ExportContext, ExportInfo, ExportOptions, TrainingMethod};
use sidbooth_engine::train::optim::{self, AdamW, AdamWConfig};
use sidbooth_engine::train::registry::{self, SettingsContext};
use sidbooth_engine::train::schedule::LrSchedule;
use sidbooth_engine::train::trainer::{Batch, LoopConfig, TrainInputs, Trainer};
use sidbooth_engine::train::{
    self, MethodConfig, PriorConfig, TrainConfig, TrainModels, TrainOutcome,
};
use sidbooth_engine::weights;

mod support;
use support::fixtures;

const RTOL: f64 = 1e-4;

fn tiny_sd() -> PathBuf {
    fixtures().join("tiny-sd")
}

fn fixture(name: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join("dreambooth").join(name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e} (see the module doc)", path.display()))
}

/// A fresh directory under cargo's temporary directory for integration tests.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    dir
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    f64s(t)[0]
}

/// `max |ours - want| / max |want|` (absolute when `want` is all zeros).
fn rel_err(ours: &[f64], want: &[f64]) -> f64 {
    assert_eq!(ours.len(), want.len());
    let err = ours
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let mag = want.iter().map(|v| v.abs()).fold(0.0, f64::max);
    if mag > 0.0 {
        err / mag
    } else {
        err
    }
}

fn photo(i: u32) -> RgbImage {
    RgbImage::from_fn(20, 18, |x, y| {
        if (x as i32 - 9 - i as i32).pow(2) + (y as i32 - 9).pow(2) < 30 {
            Rgb([210, 110, 40])
        } else if (x / 3 + i) & 1 == 0 {
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
                "a photo of sks dog on a {} wall",
                ["blue", "white"][i as usize % 2]
            ),
            mask: None,
        })
        .collect()
}

fn attached(base: &TrainModels, train_text_encoder: bool) -> (TrainModels, DreamboothMethod) {
    support::attach(
        base,
        DreamboothMethod::new(DreamboothConfig { train_text_encoder }),
        0,
    )
}

fn tiny_sd_models() -> TrainModels {
    let sd = StableDiffusion::load(tiny_sd(), &LoadOptions::default()).unwrap();
    TrainModels::from_pipeline(&sd)
        .unwrap()
        .with_source(BaseSource::Dir(tiny_sd()))
}

/// The fixture's flat sample positions of a tensor with `n` elements.
fn sample_positions(n: usize, samples: usize) -> Vec<u32> {
    let k = n.min(samples);
    (0..k).map(|i| (i * n / k) as u32).collect()
}

fn sampled(t: &Tensor, samples: usize) -> Vec<f64> {
    let flat = t.flatten_all().unwrap();
    let idx = sample_positions(flat.elem_count(), samples);
    let idx = Tensor::new(idx.as_slice(), flat.device()).unwrap();
    f64s(&flat.index_select(&idx, 0).unwrap())
}

#[test]
fn training_step_matches_train_dreambooth() {
    let r = fixture("train_step.safetensors");
    let meta = {
        let bytes = std::fs::read(fixtures().join("dreambooth/train_step.safetensors")).unwrap();
        let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        m.metadata().clone().unwrap()
    };
    let captions: Vec<String> = serde_json::from_str(&meta["captions"]).unwrap();
    let lr: f64 = meta["lr"].parse().unwrap();
    let samples: usize = meta["samples"].parse().unwrap();

    let base = tiny_sd_models();
    let (mut m, method) = attached(&base, true);
    let instance = LatentSet::prepare(&photos(1), &m.vae, 16, false, &m.device).unwrap();
    let inputs = TrainInputs {
        unet: &mut m.unet,
        text_encoder: &mut m.text_encoder,
        schedule: &m.schedule,
        method: &method,
        instance: &instance,
        class: None,
    };
    let mut trainer = Trainer::new(inputs, LoopConfig::default()).unwrap();
    let timesteps: Vec<i64> = r["timesteps"].to_vec1().unwrap();
    let batch = Batch {
        x0: r["x0"].clone(),
        noise: r["noise"].clone(),
        timesteps: timesteps.iter().map(|&t| t as u32).collect(),
        captions,
        masks: vec![None, None],
        class_count: 1,
    };
    let ml = trainer.loss_on(&batch).unwrap();
    let loss = ml.loss.to_scalar::<f32>().unwrap() as f64;
    let mut worst = Vec::new();
    for (name, ours, want) in [
        ("loss", loss, scalar(&r["loss"])),
        (
            "instance loss",
            ml.instance_loss,
            scalar(&r["instance_loss"]),
        ),
        (
            "prior loss",
            ml.prior_loss.unwrap(),
            scalar(&r["prior_loss"]),
        ),
    ] {
        let e = rel_err(&[ours], &[want]);
        eprintln!("{name}: ours {ours:.7} diffusers {want:.7} rel err {e:.2e}");
        assert!(e <= RTOL, "{name}");
    }

    let mut grads = trainer.gradients(&ml.loss).unwrap();
    drop(trainer);
    let params = method.trainable();
    let reference_names: Vec<&str> = r
        .keys()
        .filter_map(|k| k.strip_prefix("grad_norm."))
        .collect();
    assert_eq!(
        params.len(),
        reference_names.len(),
        "trained tensors: ours vs diffusers' unet.parameters() + text_encoder.parameters()"
    );
    let global = optim::global_norm(grads.values()).unwrap();
    let e = rel_err(&[global], &[scalar(&r["grad_norm"])]);
    eprintln!(
        "global gradient norm: ours {global:.6} diffusers {:.6} rel err {e:.2e}",
        scalar(&r["grad_norm"])
    );
    assert!(e <= RTOL, "global gradient norm {global}");
    // The attention key biases of the text encoder have no gradient in exact arithmetic (the
    // softmax over keys does not change when every key moves by the same q.b): both sides get
    // rounding noise there, which only has to stay noise.
    let noise = 1e-7 * global;
    let mut null = Vec::new();
    let (mut grad_err, mut norm_err): (f64, f64) = (0.0, 0.0);
    for (name, _) in &params {
        let g = &grads[name];
        let want_norm = scalar(&r[&format!("grad_norm.{name}")]);
        let norm = optim::global_norm([g]).unwrap();
        if want_norm < noise {
            assert!(
                norm < noise,
                "{name}: gradient norm {norm}, diffusers {want_norm}"
            );
            null.push(name.as_str());
            continue;
        }
        let e = rel_err(&[norm], &[want_norm]);
        assert!(e <= RTOL, "{name}: gradient norm {norm} vs {want_norm}");
        norm_err = norm_err.max(e);
        let e = rel_err(&sampled(g, samples), &f64s(&r[&format!("grad.{name}")]));
        assert!(e <= RTOL, "{name}: gradient rel err {e:e}");
        grad_err = grad_err.max(e);
    }
    assert_eq!(null.len(), 2, "{null:?}");
    assert!(
        null.iter().all(|n| n.ends_with("self_attn.k_proj.bias")),
        "{null:?}"
    );
    optim::clip_grad_norm(&mut grads, 1.0).unwrap();
    worst.push(("per-tensor gradient norms", norm_err));
    worst.push(("sampled gradients", grad_err));

    let mut opt = AdamW::new(params.iter().cloned(), AdamWConfig::default()).unwrap();
    opt.step(&grads, lr).unwrap();
    let mut after_err: f64 = 0.0;
    for (name, var) in params.iter().filter(|(n, _)| !null.contains(&n.as_str())) {
        let e = rel_err(
            &sampled(var.as_tensor(), samples),
            &f64s(&r[&format!("after.{name}")]),
        );
        assert!(e <= RTOL, "{name}: after the step, rel err {e:e}");
        after_err = after_err.max(e);
    }
    worst.push(("sampled weights after one AdamW step", after_err));
    for (what, e) in worst {
        eprintln!(
            "{what}: max rel err {e:.2e} over {} tensors",
            params.len() - null.len()
        );
    }
}

/// The batch of micro-step 0 through a fresh trainer, and its gradients.
fn gradients_of(m: &mut TrainModels, method: &DreamboothMethod) -> HashMap<String, Tensor> {
    let instance = LatentSet::prepare(&photos(2), &m.vae, 16, false, &m.device).unwrap();
    let class = LatentSet::prepare(
        &[CaptionedPhoto {
            source: PhotoSource::Image(photo(5)),
            caption: "a photo of dog".into(),
            mask: None,
        }],
        &m.vae,
        16,
        false,
        &m.device,
    )
    .unwrap();
    let inputs = TrainInputs {
        unet: &mut m.unet,
        text_encoder: &mut m.text_encoder,
        schedule: &m.schedule,
        method,
        instance: &instance,
        class: Some(&class),
    };
    let mut trainer = Trainer::new(inputs, LoopConfig::default()).unwrap();
    let ml = trainer.micro_loss(0).unwrap();
    assert!(ml.prior_loss.is_some());
    trainer.gradients(&ml.loss).unwrap()
}

fn values(weights: Vec<(String, Tensor)>) -> BTreeMap<String, Vec<f64>> {
    weights.into_iter().map(|(n, t)| (n, f64s(&t))).collect()
}

#[test]
fn every_unet_and_text_encoder_weight_gets_a_gradient() {
    let base = TrainModels::tiny(3).unwrap();
    let unet_before = values(Denoiser::named_weights(&base.unet));
    let text_before = values(PromptEncoder::named_weights(&base.text_encoder));
    let (mut m, method) = attached(&base, true);
    assert!(method.trains_text_encoder());
    let params = method.trainable();
    let unet_n = params
        .iter()
        .filter(|(n, _)| n.starts_with("unet."))
        .count();
    let text_n = params
        .iter()
        .filter(|(n, _)| n.starts_with("text_encoder.text_model."))
        .count();
    assert_eq!(unet_n, unet_before.len());
    assert_eq!(text_n, text_before.len());
    assert_eq!(unet_n + text_n, params.len());
    let grads = gradients_of(&mut m, &method);
    for (name, _) in &params {
        let g = f64s(&grads[name]);
        assert!(
            g.iter().all(|v| v.is_finite()),
            "{name}: non-finite gradient"
        );
        assert!(g.iter().any(|v| *v != 0.0), "{name}: zero gradient");
    }
    // The models read the variables, and the base models are not touched by a step.
    let mut opt = AdamW::new(params.iter().cloned(), AdamWConfig::default()).unwrap();
    opt.step(&grads, 1e-3).unwrap();
    let trained = method.export(&ExportInfo::default()).unwrap();
    let moved = trained.tensors.iter().filter(|(n, t)| {
        let base_name = n.strip_prefix("unet.").unwrap_or(n);
        unet_before.get(base_name).is_some_and(|b| *b != f64s(t))
    });
    assert_eq!(moved.count(), unet_n);
    assert_eq!(values(Denoiser::named_weights(&base.unet)), unet_before);
    assert_eq!(
        values(PromptEncoder::named_weights(&base.text_encoder)),
        text_before
    );
}

#[test]
fn without_the_text_encoder_only_the_unet_trains() {
    let base = TrainModels::tiny(4).unwrap();
    let (mut m, method) = attached(&base, false);
    assert!(!method.trains_text_encoder());
    let params = method.trainable();
    assert!(params.iter().all(|(n, _)| n.starts_with("unet.")));
    assert_eq!(params.len(), Denoiser::named_weights(&base.unet).len());
    let text_weights = PromptEncoder::named_weights(&m.text_encoder);
    assert!(text_weights.iter().all(|(_, w)| !w.is_variable()));
    let grads = gradients_of(&mut m, &method);
    assert_eq!(grads.len(), params.len());
    assert!(grads.values().all(|g| f64s(g).iter().any(|v| *v != 0.0)));
}

/// With a half-precision model the forward pass reads casts of the f32 variables, rebuilt before
/// every pass: after an update the loss of the same batch changes.
#[test]
fn a_half_precision_model_trains_f32_variables() {
    // f16: candle's CPU matmul has no bf16 kernel.
    let tiny = TinyModel::build_on(5, &Device::Cpu, DType::F16).unwrap();
    let base = TrainModels::from_pipeline(&tiny.sd).unwrap();
    let (mut m, method) = attached(&base, true);
    assert!(method
        .trainable()
        .iter()
        .all(|(_, v)| v.dtype() == DType::F32));
    let instance = LatentSet::prepare(&photos(1), &m.vae, 16, false, &m.device).unwrap();
    let inputs = TrainInputs {
        unet: &mut m.unet,
        text_encoder: &mut m.text_encoder,
        schedule: &m.schedule,
        method: &method,
        instance: &instance,
        class: None,
    };
    let cfg = LoopConfig {
        lr: LrSchedule::constant(1e-2),
        ..LoopConfig::default()
    };
    let mut trainer = Trainer::new(inputs, cfg).unwrap();
    let batch = trainer.batch(0).unwrap();
    let before = trainer.loss_on(&batch).unwrap().instance_loss;
    trainer.train_step().unwrap();
    let after = trainer.loss_on(&batch).unwrap().instance_loss;
    assert!(
        (after - before).abs() > 1e-3 * before,
        "{before} -> {after}"
    );
}

/// The exported state: the base weights, each moved by a seeded relative perturbation of 5%
/// (set as a checkpoint sets them), the same on every machine.
fn perturbed(method: &DreamboothMethod) -> BTreeMap<String, Tensor> {
    method
        .trainable()
        .into_iter()
        .enumerate()
        .map(|(i, (name, var))| {
            let t = var.as_tensor();
            let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
            let z = weights::randn_vec(&mut rng, t.elem_count());
            let z = Tensor::from_vec(z, t.shape(), t.device()).unwrap();
            let scale = z.affine(0.05, 1.0).unwrap();
            let moved = (t.mul(&scale).unwrap() + z.affine(0.005, 0.0).unwrap()).unwrap();
            (name, moved)
        })
        .collect()
}

/// Attaches to the tiny-sd fixture, sets the perturbed state and writes the output into `dir`.
fn export_tiny_sd(dir: &Path) -> Vec<PathBuf> {
    let base = tiny_sd_models();
    let (m, method) = attached(&base, true);
    method.load_trainable(&perturbed(&method)).unwrap();
    let ctx = ExportContext {
        info: &ExportInfo {
            base_model: "tiny-sd".into(),
            token: "sks".into(),
            class: "dog".into(),
            ..ExportInfo::default()
        },
        options: &ExportOptions {
            single_file: true,
            ..ExportOptions::default()
        },
        unet: &m.unet,
        text_encoder: &m.text_encoder,
        base: &base,
    };
    method.write_output(&ctx, dir).unwrap()
}

fn sample(sd: &StableDiffusion, init: &Tensor) -> Tensor {
    let req = GenerateRequest {
        prompt: "a photo of sks dog".into(),
        guidance_scale: 7.5,
        steps: 4,
        height: Some(32),
        width: Some(32),
        init_latents: Some(init.clone()),
        ..Default::default()
    };
    sd.generate(&req, None, None).unwrap().latents
}

#[test]
fn exported_pipeline_samples_as_in_diffusers() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dreambooth-export");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let files = export_tiny_sd(&dir);
    eprintln!("exported {} files into {}", files.len(), dir.display());
    for f in [
        MODEL_INDEX,
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "tokenizer/tokenizer_config.json",
        SINGLE_FILE,
    ] {
        assert!(files.contains(&PathBuf::from(f)), "{f} not written");
        assert!(dir.join(f).is_file(), "{f} missing");
    }

    let r = fixture("export_reference.safetensors");
    let init = &r["init_latents"];
    let mut sd = StableDiffusion::load(tiny_sd(), &LoadOptions::default()).unwrap();
    let base = sample(&sd, init);
    let e_base = rel_err(&f64s(&base), &f64s(&r["base_latents"]));
    assert_eq!(registry::detect(&dir).map(|m| m.kind), Some("dreambooth"));
    assert_eq!(
        registry::load_weights(&mut sd, &dir, 1.0).unwrap(),
        "dreambooth"
    );
    let trained = sample(&sd, init);
    let e = rel_err(&f64s(&trained), &f64s(&r["trained_latents"]));
    let effect = rel_err(&f64s(&base), &f64s(&trained));
    eprintln!(
        "4-step DDIM latents, rel err vs diffusers: base {e_base:.2e}, from_pretrained of the \
         export {e:.2e}; the trained weights change them by {effect:.2e}"
    );
    assert!(e_base <= RTOL && e <= RTOL);
    assert!(
        effect > 100.0 * RTOL,
        "the exported weights do not change the samples"
    );
    assert!(registry::load_weights(&mut sd, &dir, 0.5).is_err());
}

/// `single_file_keys.json`: every key of the single file with its shape and the pipeline tensors
/// (`component/name`) diffusers' `from_single_file` converters read it into, in order.
fn single_file_keys() -> BTreeMap<String, (Vec<usize>, Vec<String>)> {
    let text =
        std::fs::read_to_string(fixtures().join("dreambooth/single_file_keys.json")).unwrap();
    let v: BTreeMap<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
    v.into_iter()
        .map(|(k, e)| {
            let shape = serde_json::from_value(e["shape"].clone()).unwrap();
            let parts = serde_json::from_value(e["parts"].clone()).unwrap();
            (k, (shape, parts))
        })
        .collect()
}

/// Checks the single file in `dir` against the key list and the pipeline files beside it.
fn check_single_file(dir: &Path) {
    let want = single_file_keys();
    let file = candle_core::safetensors::load(dir.join(SINGLE_FILE), &Device::Cpu).unwrap();
    let got: Vec<&String> = file
        .keys()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(got, want.keys().collect::<Vec<_>>(), "key set");
    let mut pipeline = HashMap::new();
    for (c, f) in [
        ("unet", "unet/diffusion_pytorch_model.safetensors"),
        ("vae", "vae/diffusion_pytorch_model.safetensors"),
        ("text_encoder", "text_encoder/model.safetensors"),
    ] {
        for (n, t) in candle_core::safetensors::load(dir.join(f), &Device::Cpu).unwrap() {
            let n = match c {
                "text_encoder" if !n.starts_with("text_model.") => format!("text_model.{n}"),
                _ => n,
            };
            pipeline.insert(format!("{c}/{n}"), t);
        }
    }
    let mut used = 0;
    for (key, (shape, parts)) in &want {
        let t = &file[key];
        assert_eq!(t.dims(), shape.as_slice(), "{key}: shape");
        let pieces: Vec<Tensor> = parts
            .iter()
            .map(|p| pipeline[p].flatten_all().unwrap())
            .collect();
        used += pieces.len();
        let joined = Tensor::cat(&pieces, 0).unwrap();
        assert_eq!(f64s(t), f64s(&joined), "{key}: values");
    }
    assert_eq!(
        used,
        pipeline.len(),
        "every pipeline tensor is in the single file once"
    );
}

#[test]
fn single_file_has_the_original_layout() {
    let dir = scratch("dreambooth-single-file");
    export_tiny_sd(&dir);
    check_single_file(&dir);
}

/// The whole run with the built-in tiny model: class images sampled from it, two steps, the
/// pipeline and the single file written from the seeded base, and loaded back.
#[test]
fn run_with_prior_preservation_writes_a_loadable_pipeline() {
    let root = scratch("dreambooth-run");
    let tiny = TinyModel::build(9).unwrap();
    let models = TrainModels::tiny(9).unwrap();
    let out = root.join("out");
    let mut cfg = TrainConfig::new(
        MethodConfig::Dreambooth(DreamboothConfig::default()),
        photos(2),
        ExportInfo::default(),
        &out,
    );
    cfg.resolution = 16;
    cfg.prior = Some(PriorConfig {
        class_prompt: "a photo of dog".into(),
        class_dir: root.join("class"),
        num_class_images: 1,
        seed: 0,
    });
    cfg.export_options.single_file = true;
    cfg.loop_cfg = LoopConfig {
        max_steps: 2,
        lr: LrSchedule::constant(1e-3),
        ..LoopConfig::default()
    };
    let outcome = train::run(&cfg, &models, Some(&tiny.sd), &mut Default::default()).unwrap();
    let TrainOutcome::Completed { steps, files, .. } = outcome else {
        panic!("not completed")
    };
    assert_eq!(steps, 2);
    assert!(files.contains(&PathBuf::from(MODEL_INDEX)));
    check_single_file(&out);

    let mut sd = TinyModel::build(9).unwrap().sd;
    let before = sd.unet.named_weights().clone();
    registry::load_weights(&mut sd, &out, 1.0).unwrap();
    let written = candle_core::safetensors::load(
        out.join("unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut changed = 0;
    for (name, t) in sd.unet.named_weights() {
        assert_eq!(f64s(t), f64s(&written[name]), "{name}: loaded");
        let (_, b) = before.iter().find(|(n, _)| n == name).unwrap();
        changed += usize::from(f64s(t) != f64s(b));
    }
    assert_eq!(changed, before.len(), "every UNet weight trained");
}

#[test]
fn the_spec_settings_map_to_the_engine() {
    let cx = SettingsContext {
        token: "sks".into(),
        class: "dog".into(),
    };
    let spec: TrainSettings =
        serde_json::from_value(serde_json::json!({"method": "dreambooth"})).unwrap();
    let m = MethodConfig::from_settings(&spec, &cx).unwrap();
    assert_eq!(
        m,
        MethodConfig::Dreambooth(DreamboothConfig {
            train_text_encoder: true
        })
    );
    assert_eq!(m.kind(), "dreambooth");
    assert!(m.build().unwrap().trains_text_encoder());
    let spec: TrainSettings = serde_json::from_value(
        serde_json::json!({"method": "dreambooth", "train_text_encoder": false}),
    )
    .unwrap();
    let m = MethodConfig::from_settings(&spec, &cx).unwrap();
    assert!(!m.build().unwrap().trains_text_encoder());
}
