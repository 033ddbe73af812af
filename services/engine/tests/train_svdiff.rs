//! SVDiff on the tiny diffusers model (`fixtures/tiny-sd`): the decompositions against
//! `torch.linalg.svd`, their caches, one training step against svdiff-pytorch, gradient coverage,
//! and an exported output loaded by svdiff-pytorch's loaders and by ours.
//!
//! `fixtures/svdiff/reference.safetensors` comes from `scripts/parity/make_svdiff_fixtures.py`,
//! which reads `fixtures/svdiff/export`: the output of [`trained_output_is_the_committed_export`]
//! (run it with `SIDBOOTH_WRITE_FIXTURES=1` to rewrite the export, then rerun the script).
//!
//! Tolerance: `max |ours - ref| <= REL * max |ref|` per tensor.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use image::{Rgb, RgbImage};
use sidbooth_domain::train::TrainSettings;
use sidbooth_engine::pipeline::{GenerateRequest, LoadOptions, StableDiffusion};
use sidbooth_engine::train::adapters::BaseSource;
use sidbooth_engine::train::data::{CaptionedPhoto, LatentSet, PhotoSource};
use sidbooth_engine::train::host::{Denoiser, PromptEncoder};
use sidbooth_engine::train::method::svdiff::svd::{self, Origin, SvdCache};
use sidbooth_engine::train::method::svdiff::{
    self as svdiff, SvdiffConfig, SvdiffMethod, SHIFTS_FILE, SHIFTS_TE_FILE,
};
use sidbooth_engine::train::method::{ExportInfo, TrainingMethod};
use sidbooth_engine::train::optim::{self, AdamW, AdamWConfig};
use sidbooth_engine::train::registry::{self, MethodConfig, SettingsContext};
use sidbooth_engine::train::schedule::LrSchedule;
use sidbooth_engine::train::trainer::{Batch, Callbacks, LoopConfig, Resume, TrainInputs, Trainer};
use sidbooth_engine::train::{self, TrainConfig, TrainModels, TrainOutcome};

mod support;
use support::{assert_rel, fixtures, flat, max_abs, rel_err};

const REL: f32 = 1e-4;
/// For gradients against the reference's float32 SVD (see
/// [`one_training_step_matches_unmodified_svdiff_pytorch`]).
const REL_F32_SVD: f32 = 3e-4;

fn export_dir() -> PathBuf {
    fixtures().join("svdiff/export")
}

struct Reference {
    t: BTreeMap<String, Tensor>,
    meta: BTreeMap<String, String>,
}

impl Reference {
    fn load() -> Self {
        let (t, meta) = train::io::load(
            &fixtures().join("svdiff/reference.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        Self { t, meta }
    }
    fn get(&self, k: &str) -> &Tensor {
        self.t
            .get(k)
            .unwrap_or_else(|| panic!("reference lacks {k}"))
    }
    fn list(&self, k: &str) -> Vec<String> {
        serde_json::from_str(&self.meta[k]).unwrap()
    }
}

fn pipeline() -> StableDiffusion {
    StableDiffusion::load(fixtures().join("tiny-sd"), &LoadOptions::default()).unwrap()
}

fn tiny() -> TrainModels {
    TrainModels::from_pipeline(&pipeline()).unwrap()
}

/// A coloured disc on a striped background, 32x32.
fn photo(i: u32) -> CaptionedPhoto {
    CaptionedPhoto {
        source: PhotoSource::Image(RgbImage::from_fn(32, 32, |x, y| {
            let d = (x as f32 - 14.0 - 2.0 * i as f32).hypot(y as f32 - 16.0);
            if d < 8.0 {
                Rgb([210, 120, 40])
            } else if (x / 4 + i).is_multiple_of(2) {
                Rgb([30, 60, 180])
            } else {
                Rgb([230, 230, 220])
            }
        })),
        caption: "a photo of sks dog".into(),
        mask: None,
    }
}

fn attached(base: &TrainModels, cfg: SvdiffConfig) -> (TrainModels, SvdiffMethod) {
    support::attach(base, SvdiffMethod::new(cfg).unwrap(), 0)
}

/// The name torch gives a weight of the component (the text encoder's under `text_model.`).
fn torch_name(component: &str, name: &str) -> String {
    if component == "text_encoder" && !name.starts_with("text_model.") {
        format!("text_model.{name}")
    } else {
        name.to_string()
    }
}

#[test]
fn decomposition_matches_torch_linalg_svd() {
    let r = Reference::load();
    let sd = pipeline();
    let components = [
        ("unet", svdiff::shiftable(sd.unet.named_weights())),
        (
            "text_encoder",
            svdiff::shiftable(sd.text_encoder.named_weights()),
        ),
    ];
    let (mut worst_s, mut worst_w, mut worst_orth) = (0f32, 0f32, 0f32);
    for (component, weights) in &components {
        for (name, w) in weights {
            let f = svd::factorize(w).unwrap();
            let want = r.get(&format!(
                "svd.{component}.{}.S",
                torch_name(component, name)
            ));
            worst_s = worst_s.max(assert_rel(name, &f.s, want, 1e-5));
            let back =
                f.u.broadcast_mul(&f.s.unsqueeze(0).unwrap())
                    .unwrap()
                    .matmul(&f.vt)
                    .unwrap()
                    .reshape(w.dims())
                    .unwrap();
            worst_w = worst_w.max(assert_rel(name, &back, w, 1e-5));
            let k = f.s.dims1().unwrap();
            let eye = Tensor::eye(k, DType::F32, &Device::Cpu).unwrap();
            for (which, gram) in [
                ("U", f.u.t().unwrap().matmul(&f.u).unwrap()),
                ("Vt", f.vt.matmul(&f.vt.t().unwrap()).unwrap()),
            ] {
                let e = max_abs(&(gram - &eye).unwrap());
                assert!(e < 1e-5, "{name}: {which} is not orthonormal ({e:e})");
                worst_orth = worst_orth.max(e);
            }
        }
    }
    println!(
        "worst relative error: singular values {worst_s:.2e}, U diag(S) Vt vs W {worst_w:.2e}; \
         orthonormality {worst_orth:.2e}"
    );
    for (component, weights) in &components {
        let t = Instant::now();
        let (f, origin) = SvdCache::new(None).factors(weights).unwrap();
        assert_eq!(origin, Origin::Computed);
        println!(
            "SVD of the tiny {component}: {} weights in {:.3} s",
            f.by_name.len(),
            t.elapsed().as_secs_f64()
        );
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sidbooth-svdiff-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn decompositions_are_cached_in_memory_and_on_disk() {
    let sd = pipeline();
    let weights = svdiff::shiftable(sd.unet.named_weights());
    let dir = tmp("cache");
    let cache = SvdCache::new(Some(dir.clone()));
    let (first, origin) = cache.factors(&weights).unwrap();
    assert_eq!(origin, Origin::Computed);
    let file = dir.join(format!("svd-{}.safetensors", first.key));
    assert!(file.is_file(), "no cache file {}", file.display());
    let (again, origin) = cache.factors(&weights).unwrap();
    assert_eq!(origin, Origin::Memory);
    assert!(std::sync::Arc::ptr_eq(&first, &again));

    // A second process (a fresh cache on the same directory) reads the file.
    let (read, origin) = SvdCache::new(Some(dir.clone())).factors(&weights).unwrap();
    assert_eq!(origin, Origin::Disk);
    assert_eq!(read.by_name.len(), first.by_name.len());
    for (name, f) in &first.by_name {
        let g = &read.by_name[name];
        assert_eq!(flat(&f.u), flat(&g.u), "{name}");
        assert_eq!(flat(&f.s), flat(&g.s), "{name}");
        assert_eq!(flat(&f.vt), flat(&g.vt), "{name}");
    }

    // Other weights are another key; a damaged file is recomputed and rewritten.
    let mut changed = weights.clone();
    changed[0].1 = (&changed[0].1 * 1.5).unwrap();
    let (other, origin) = SvdCache::new(Some(dir.clone())).factors(&changed).unwrap();
    assert_eq!(origin, Origin::Computed);
    assert_ne!(other.key, first.key);
    std::fs::write(&file, b"not a safetensors file").unwrap();
    let (_, origin) = SvdCache::new(Some(dir.clone())).factors(&weights).unwrap();
    assert_eq!(origin, Origin::Computed);
    let (_, origin) = SvdCache::new(Some(dir.clone())).factors(&weights).unwrap();
    assert_eq!(origin, Origin::Disk);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A trainer on the tiny model with `method` attached; its own data are never used (the tests
/// feed their batches).
fn trainer<'a>(
    m: &'a mut TrainModels,
    method: &'a SvdiffMethod,
    set: &'a LatentSet,
) -> Trainer<'a> {
    let inputs = TrainInputs {
        unet: &mut m.unet,
        text_encoder: &mut m.text_encoder,
        schedule: &m.schedule,
        method,
        instance: set,
        class: None,
    };
    let cfg = LoopConfig {
        seed: 5,
        max_steps: 10,
        lr: LrSchedule::constant(1e-3),
        max_grad_norm: Some(1.0),
        prior_loss_weight: 1.0,
        ..LoopConfig::default()
    };
    Trainer::new(inputs, cfg).unwrap()
}

fn reference_batch(r: &Reference) -> Batch {
    let timesteps: Vec<i64> = r.get("batch.timesteps").to_vec1().unwrap();
    Batch {
        x0: r.get("batch.x0").clone(),
        noise: r.get("batch.noise").clone(),
        timesteps: timesteps.into_iter().map(|t| t as u32).collect(),
        captions: r.list("batch.captions"),
        masks: vec![None, None],
        class_count: 1,
    }
}

/// The largest error of the shifts after AdamW's first step that a gradient error of `tol_g`
/// explains: the step is `-lr g / (|g| + eps)`, whose slope `lr eps / (|g| + eps)^2` is huge
/// where `|g|` is near `eps`, so there an f32 rounding difference in the gradient moves the
/// shift by up to `lr`.
fn first_step_tolerance(lr: f64, g: f32, tol_g: f32) -> f32 {
    let eps = AdamWConfig::default().eps;
    (lr * eps * tol_g as f64 / (g.abs() as f64 + eps).powi(2)) as f32
}

/// Loss, gradients and shifts after one AdamW step on the reference batch, against
/// svdiff-pytorch's `train_svdiff.py` step `case` of the fixture. The loss and the gradient norm
/// must agree to `REL`, the gradients to `rel_g` of each tensor's largest, the shifts to `REL`
/// of their largest plus what the gradient tolerance explains ([`first_step_tolerance`]; it
/// matters only for entries whose gradient is below about 1e-6).
fn step_matches_reference(case: &str, train_text_encoder: bool, rel_g: f32) {
    let r = Reference::load();
    let base = tiny();
    let cfg = SvdiffConfig {
        train_text_encoder,
        ..SvdiffConfig::default()
    };
    let (mut m, method) = attached(&base, cfg);
    let set = LatentSet::prepare(&[photo(0)], &m.vae, 32, false, &m.device).unwrap();
    let mut tr = trainer(&mut m, &method, &set);

    let ml = tr.loss_on(&reference_batch(&r)).unwrap();
    let want_loss = r.get(&format!("{case}.loss"));
    let loss_err = assert_rel("loss", &ml.loss.reshape(1).unwrap(), want_loss, REL);
    let mut grads = tr.gradients(&ml.loss).unwrap();
    let norm = optim::clip_grad_norm(&mut grads, 1.0).unwrap();
    let want_norm = r
        .get(&format!("{case}.grad_norm"))
        .to_vec1::<f32>()
        .unwrap()[0] as f64;
    let norm_err = ((norm - want_norm) / want_norm).abs();
    assert!(norm_err < REL as f64, "grad norm {norm} vs {want_norm}");
    // The update of `Trainer::train_step`: the clipped gradients, each shift at its group's rate.
    let mut opt = AdamW::new(method.trainable(), AdamWConfig::default()).unwrap();
    opt.step_with(&grads, |n| method.learning_rate(n, 1e-3))
        .unwrap();

    let prefix = format!("{case}.delta.");
    let mut want: Vec<String> =
        r.t.keys()
            .filter_map(|k| k.strip_prefix(&prefix).map(String::from))
            .collect();
    want.sort();
    let ours: Vec<String> = method.trainable().into_iter().map(|(n, _)| n).collect();
    assert_eq!(ours, want, "the shifts are not svdiff-pytorch's");
    let one_d = r.list(&format!("{case}.one_d"));
    assert!(!one_d.is_empty());
    let (mut worst_g, mut worst_d, mut conditioned) = (0f32, 0f32, 0usize);
    for (name, var) in method.trainable() {
        let lr = if one_d.contains(&name) { 1e-6 } else { 1e-3 };
        let ours_lr = method.learning_rate(&name, 1e-3);
        assert!(
            (ours_lr - lr).abs() < 1e-15,
            "{name}: learning rate {ours_lr}"
        );
        let want_g = r.get(&format!("{case}.grad.{name}"));
        worst_g = worst_g.max(assert_rel(&name, &grads[&name], want_g, rel_g));
        let tol_g = rel_g * max_abs(want_g);
        let want_d = r.get(&format!("{prefix}{name}"));
        let scale = max_abs(want_d);
        let (d, wd, g) = (flat(var.as_tensor()), flat(want_d), flat(want_g));
        for i in 0..d.len() {
            let err = (d[i] - wd[i]).abs();
            let explained = first_step_tolerance(lr, g[i], tol_g);
            assert!(
                err <= REL * scale + explained,
                "{name}[{i}]: {} vs {} (gradient {})",
                d[i],
                wd[i],
                g[i]
            );
            if explained > REL * scale {
                conditioned += 1;
            } else {
                worst_d = worst_d.max(err / scale);
            }
        }
    }
    println!(
        "{case}: {} shifts ({} 1-D); relative error: loss {loss_err:.2e}, gradient norm \
         {norm_err:.2e}, gradients {worst_g:.2e}, shifts {worst_d:.2e} (besides {conditioned} \
         entries with gradients near eps)",
        want.len(),
        one_d.len(),
    );
}

/// Against svdiff-pytorch's step with its SVD evaluated in float64 (as the engine's).
#[test]
fn one_training_step_matches_svdiff_pytorch() {
    step_matches_reference("unet_svd64", false, REL);
}

#[test]
fn one_training_step_with_the_text_encoder_matches_svdiff_pytorch() {
    step_matches_reference("unet_te_svd64", true, REL);
}

/// Against svdiff-pytorch's step as it is: its float32 SVD alone moves some gradients by up to
/// 1.5e-4 of their tensor's largest (`make_svdiff_fixtures.py` prints it).
#[test]
fn one_training_step_matches_unmodified_svdiff_pytorch() {
    step_matches_reference("unet", false, REL_F32_SVD);
    step_matches_reference("unet_te", true, REL_F32_SVD);
}

fn is_finite(v: &[f32]) -> bool {
    v.iter().all(|x| x.is_finite())
}

/// Every shift gets a finite gradient, zero exactly where the ReLU is closed (`S + δ <= 0`)
/// and non-zero elsewhere; the base weights get none and never change.
#[test]
fn every_open_spectral_shift_gets_a_gradient_and_the_base_stays_frozen() {
    let base = tiny();
    let cfg = SvdiffConfig {
        train_text_encoder: true,
        ..SvdiffConfig::default()
    };
    let (mut m, method) = attached(&base, cfg);
    let frozen: Vec<(String, Tensor)> = Denoiser::named_weights(&base.unet)
        .into_iter()
        .chain(PromptEncoder::named_weights(&base.text_encoder))
        .collect();
    let frozen_before: Vec<Vec<f32>> = frozen.iter().map(|(_, w)| flat(w)).collect();
    assert!(frozen.iter().all(|(_, w)| !w.is_variable()));

    // Close some of the ReLUs: the smallest singular value of every matrix exactly at the
    // boundary (S + δ = 0), and two norm scales far below it (a zero norm scale cuts the
    // gradient to everything before it but through residual connections, so only norms at the
    // start of a residual branch).
    let shut_1d = [
        "unet.down_blocks.0.resnets.0.norm1.delta",
        "text_encoder.text_model.encoder.layers.0.layer_norm1.delta",
    ];
    let singular: HashMap<String, Vec<f32>> = [
        (
            "unet",
            svdiff::shiftable(&Denoiser::named_weights(&base.unet)),
        ),
        (
            "text_encoder",
            svdiff::shiftable(&PromptEncoder::named_weights(&base.text_encoder)),
        ),
    ]
    .into_iter()
    .flat_map(|(c, ws)| {
        ws.into_iter().map(move |(n, w)| {
            let key = format!("{c}.{}", svdiff::delta_key(c, &n));
            (key, flat(&svd::factorize(&w).unwrap().s))
        })
    })
    .collect();
    let params = method.trainable();
    assert_eq!(params.len(), singular.len());
    let mut closed: HashMap<String, Vec<bool>> = HashMap::new();
    for (name, var) in &params {
        let s = &singular[name];
        let mut d = vec![0f32; s.len()];
        let mut shut = vec![false; s.len()];
        if s.len() > 1 {
            d[s.len() - 1] = -s[s.len() - 1];
            shut[s.len() - 1] = true;
        } else if shut_1d.contains(&name.as_str()) {
            d[0] = -1e4;
            shut[0] = true;
        }
        var.set(&Tensor::new(d.as_slice(), &Device::Cpu).unwrap())
            .unwrap();
        closed.insert(name.clone(), shut);
    }

    let set = LatentSet::prepare(&[photo(0), photo(1)], &m.vae, 32, false, &m.device).unwrap();
    let mut tr = trainer(&mut m, &method, &set);
    let loss = tr.micro_loss(0).unwrap().loss;
    let store = loss.backward().unwrap();
    let (mut open_entries, mut closed_entries) = (0, 0);
    for (name, var) in &params {
        let g = flat(
            store
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient")),
        );
        assert!(is_finite(&g), "{name}: non-finite gradient");
        for (j, (&gj, &shut)) in g.iter().zip(&closed[name]).enumerate() {
            if shut {
                assert_eq!(
                    gj, 0.0,
                    "{name}[{j}]: the ReLU is closed but the gradient is {gj}"
                );
                closed_entries += 1;
            } else {
                assert!(gj != 0.0, "{name}[{j}]: zero gradient");
                open_entries += 1;
            }
        }
    }
    assert_eq!(
        closed_entries,
        params.len() - singular.values().filter(|s| s.len() == 1).count() + 2
    );
    println!("{open_entries} open and {closed_entries} closed shift entries");
    for (name, w) in &frozen {
        assert!(store.get(w).is_none(), "frozen {name} got a gradient");
    }
    drop(store);

    // Training moves the shifts with an open entry and nothing else; the model runs on derived
    // weights, never on variables of its own.
    let before: Vec<Vec<f32>> = params.iter().map(|(_, v)| flat(v.as_tensor())).collect();
    for _ in 0..2 {
        let report = tr.train_step().unwrap();
        assert!(report.loss.is_finite());
    }
    drop(tr);
    for ((name, v), b) in params.iter().zip(&before) {
        if closed[name].iter().any(|shut| !shut) {
            assert!(flat(v.as_tensor()) != *b, "{name} did not move");
        }
    }
    for (name, w) in Denoiser::named_weights(&m.unet)
        .into_iter()
        .chain(PromptEncoder::named_weights(&m.text_encoder))
    {
        assert!(!w.is_variable(), "{name} is a variable");
    }
    for ((name, w), b) in frozen.iter().zip(&frozen_before) {
        assert!(&flat(w) == b, "frozen {name} changed");
    }
}

/// A run interrupted after a checkpoint and resumed ends where the uninterrupted run ends: the
/// restored shifts, not stale weights, make the next passes' weights.
#[test]
fn resumed_run_matches_uninterrupted_run() {
    let base = tiny();
    let cfg = SvdiffConfig {
        train_text_encoder: true,
        learning_rate: 1e-2,
        learning_rate_1d: 1e-5,
    };
    let set =
        LatentSet::prepare(&[photo(0), photo(1)], &base.vae, 32, false, &base.device).unwrap();
    let dir = tmp("resume");
    let run = |steps: u64, checkpoints: &Path, resume: Resume| {
        let (mut m, method) = attached(&base, cfg.clone());
        let inputs = TrainInputs {
            unet: &mut m.unet,
            text_encoder: &mut m.text_encoder,
            schedule: &m.schedule,
            method: &method,
            instance: &set,
            class: None,
        };
        let loop_cfg = LoopConfig {
            seed: 4,
            max_steps: steps,
            lr: LrSchedule::constant(1e-2),
            checkpoint_every: 2,
            checkpoint_dir: Some(checkpoints.to_path_buf()),
            resume,
            ..LoopConfig::default()
        };
        let mut trainer = Trainer::new(inputs, loop_cfg).unwrap();
        trainer.run(&mut Callbacks::default()).unwrap();
        drop(trainer);
        method
            .trainable()
            .into_iter()
            .map(|(n, v)| (n, flat(v.as_tensor())))
            .collect::<BTreeMap<_, _>>()
    };
    let straight = run(4, &dir.join("a"), Resume::No);
    let halfway = run(2, &dir.join("b"), Resume::No);
    assert_ne!(halfway, straight);
    let resumed = run(4, &dir.join("b"), Resume::Latest);
    for (name, a) in &straight {
        let d = a
            .iter()
            .zip(&resumed[name])
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d <= 1e-6, "{name}: resumed differs by {d}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Trains four steps from the job spec's settings and compares the output with the committed
/// export (which the fixture script loads with svdiff-pytorch's loaders). With
/// `SIDBOOTH_WRITE_FIXTURES=1` the output first replaces the committed export.
#[test]
fn trained_output_is_the_committed_export() {
    let settings: TrainSettings = serde_json::from_value(serde_json::json!({
        "method": "svdiff",
        "learning_rate": 1e-2,
        "learning_rate_1d": 1e-4,
        "train_text_encoder": true,
    }))
    .unwrap();
    let cx = SettingsContext {
        token: "sks".into(),
        class: "dog".into(),
    };
    let method = MethodConfig::from_settings(&settings, &cx).unwrap();
    assert_eq!(
        method,
        MethodConfig::Svdiff(SvdiffConfig {
            train_text_encoder: true,
            learning_rate: 1e-2,
            learning_rate_1d: 1e-4,
        })
    );
    let out = tmp("export");
    let info = ExportInfo {
        base_model: "tiny-sd".into(),
        token: "sks".into(),
        class: "dog".into(),
        description_case: "sid".into(),
        steps: 0,
    };
    let mut cfg = TrainConfig::new(method, vec![photo(0), photo(1)], info, &out);
    cfg.resolution = 32;
    cfg.loop_cfg = LoopConfig {
        seed: 3,
        max_steps: 4,
        lr: LrSchedule::constant(settings.learning_rate()),
        ..LoopConfig::default()
    };
    let outcome = train::run(&cfg, &tiny(), None, &mut Default::default()).unwrap();
    let TrainOutcome::Completed { steps, files, .. } = outcome else {
        panic!("not completed: {outcome:?}")
    };
    assert_eq!(steps, 4);
    assert_eq!(
        files,
        [PathBuf::from(SHIFTS_FILE), PathBuf::from(SHIFTS_TE_FILE)]
    );
    if std::env::var("SIDBOOTH_WRITE_FIXTURES").as_deref() == Ok("1") {
        copy_dir(&out, &export_dir());
    }
    for file in [SHIFTS_FILE, SHIFTS_TE_FILE] {
        let (ours, meta) = train::io::load(&out.join(file), &Device::Cpu).unwrap();
        let (committed, _) = train::io::load(&export_dir().join(file), &Device::Cpu).unwrap();
        assert_eq!(meta["sidbooth.method"], "svdiff");
        assert_eq!(meta["sidbooth.steps"], "4");
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            committed.keys().collect::<Vec<_>>(),
            "{file}"
        );
        for (k, t) in &ours {
            assert_eq!(t.dtype(), DType::F32, "{k}");
            assert_rel(k, t, &committed[k], REL);
        }
    }
    // The output is found and loaded by what `sidbooth generate --weights` calls.
    assert_eq!(registry::detect(&out).map(|e| e.kind), Some("svdiff"));
    std::fs::remove_dir_all(&out).unwrap();
}

fn sample(sd: &StableDiffusion, init: &Tensor) -> Tensor {
    let req = GenerateRequest {
        prompt: "a photo of sks dog".into(),
        negative_prompt: Some("blurry".into()),
        guidance_scale: 7.5,
        steps: 5,
        height: Some(32),
        width: Some(32),
        init_latents: Some(init.clone()),
        ..Default::default()
    };
    sd.generate(&req, None, None).unwrap().latents
}

/// The committed export, loaded by `registry::load_weights`, samples what svdiff-pytorch's
/// loaders sample with it, and the shifts make a difference.
#[test]
fn exported_shifts_sample_as_in_svdiff_pytorch() {
    let r = Reference::load();
    let init = r.get("sample.init_latents");
    let prompt = ["a photo of sks dog"];
    let base = pipeline();
    let base_latents = sample(&base, init);
    let e_base = assert_rel("base sampling", &base_latents, r.get("sample.base"), REL);

    let mut sd = pipeline();
    let kind = registry::load_weights(&mut sd, &export_dir(), 1.0).unwrap();
    assert_eq!(kind, "svdiff");
    let hidden = sd.encode_prompt(&prompt).unwrap();
    let e_te = assert_rel("text encoder", &hidden, r.get("sample.te_hidden"), REL);
    let shifted = sample(&sd, init);
    let e_sample = assert_rel("sampling", &shifted, r.get("sample.shifted"), REL);
    let effect = rel_err(&shifted, &base_latents);
    let te_effect = rel_err(&hidden, &base.encode_prompt(&prompt).unwrap());
    println!(
        "relative error: base {e_base:.2e}, text encoder {e_te:.2e}, sampling {e_sample:.2e}; \
         effect of the shifts: latents {effect:.2e}, text encoder {te_effect:.2e}"
    );
    assert!(
        effect > 100.0 * REL,
        "the shifts barely change the samples ({effect:e})"
    );
    assert!(
        te_effect > 100.0 * REL,
        "the text shifts barely matter ({te_effect:e})"
    );

    // The marker file names the output too, and the scale is svdiff-pytorch's `set_scale`.
    let mut half = pipeline();
    registry::load_weights(&mut half, &export_dir().join(SHIFTS_FILE), 0.5).unwrap();
    let h = half.encode_prompt(&prompt).unwrap();
    assert_rel(
        "text encoder at scale 0.5",
        &h,
        r.get("sample.te_hidden_half"),
        REL,
    );
}

/// With `merged_pipeline`, the output also holds a diffusers pipeline with the shifts applied,
/// which samples what the shifts loaded onto the base sample.
#[test]
fn merged_pipeline_samples_as_the_shifts() {
    let base_dir = fixtures().join("tiny-sd");
    let models = tiny().with_source(BaseSource::Dir(base_dir));
    let out = tmp("merged");
    let method = MethodConfig::Svdiff(SvdiffConfig {
        train_text_encoder: true,
        learning_rate: 1e-2,
        learning_rate_1d: 1e-4,
    });
    let mut cfg = TrainConfig::new(method, vec![photo(0)], ExportInfo::default(), &out);
    cfg.resolution = 32;
    cfg.export_options.merged_pipeline = true;
    cfg.loop_cfg = LoopConfig {
        seed: 8,
        max_steps: 2,
        lr: LrSchedule::constant(1e-2),
        ..LoopConfig::default()
    };
    let TrainOutcome::Completed { files, .. } =
        train::run(&cfg, &models, None, &mut Default::default()).unwrap()
    else {
        panic!("not completed")
    };
    let merged = out.join(svdiff::MERGED_DIR);
    for f in [
        "model_index.json",
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ] {
        let rel = Path::new(svdiff::MERGED_DIR).join(f);
        assert!(files.contains(&rel), "{} not listed", rel.display());
        assert!(out.join(&rel).is_file(), "{} not written", rel.display());
    }
    assert_eq!(registry::detect(&out).map(|e| e.kind), Some("svdiff"));

    let r = Reference::load();
    let init = r.get("sample.init_latents");
    let mut shifted = pipeline();
    registry::load_weights(&mut shifted, &out, 1.0).unwrap();
    let want = sample(&shifted, init);
    let from_dir = StableDiffusion::load(&merged, &LoadOptions::default()).unwrap();
    let e = assert_rel("merged pipeline", &sample(&from_dir, init), &want, 1e-6);
    let effect = rel_err(&want, &sample(&pipeline(), init));
    println!("merged pipeline vs shifts loaded: {e:.2e}; effect of the shifts {effect:.2e}");
    assert!(
        effect > 100.0 * REL,
        "the shifts barely change the samples ({effect:e})"
    );
    std::fs::remove_dir_all(&out).unwrap();
}
