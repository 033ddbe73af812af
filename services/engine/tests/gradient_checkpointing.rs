//! Gradient checkpointing changes what is kept for the backward pass, not the result: for every
//! method the loss, every trainable tensor's gradient and the weights after one optimizer step
//! are those of the plain graph.

use std::collections::{HashMap, HashSet};

use candle_core::Tensor;
use image::{Rgb, RgbImage};
use sidbooth_domain::train::TrainSettings;
use sidbooth_engine::train::data::{CaptionedPhoto, LatentSet, PhotoSource};
use sidbooth_engine::train::method::ModelsMut;
use sidbooth_engine::train::schedule::LrSchedule;
use sidbooth_engine::train::trainer::{LoopConfig, TrainInputs, Trainer};
use sidbooth_engine::train::{MethodConfig, SettingsContext, TrainModels};

mod support;

const RES: u32 = 32;

fn photo(i: u32) -> RgbImage {
    RgbImage::from_fn(40, 36, |x, y| {
        if ((x as i32 - 18 - i as i32).pow(2) + (y as i32 - 17).pow(2)) < 80 {
            Rgb([200, 120, 40])
        } else if (x / 4 + i) % 2 == 0 {
            Rgb([30, 60, 180])
        } else {
            Rgb([230, 230, 220])
        }
    })
}

fn max_abs(t: &Tensor) -> f64 {
    support::max_abs(t) as f64
}

struct Step {
    loss: f64,
    grads: HashMap<String, Tensor>,
    after: HashMap<String, Tensor>,
}

/// The loss and gradients of the first batch and the trainable tensors after one step.
fn one_step(base: &TrainModels, train: serde_json::Value, checkpointing: bool) -> Step {
    let settings: TrainSettings = serde_json::from_value(train).unwrap();
    let cx = SettingsContext {
        token: "sks".into(),
        class: "dog".into(),
    };
    let mut m = base.clone();
    let mut method = MethodConfig::from_settings(&settings, &cx)
        .unwrap()
        .build()
        .unwrap();
    method
        .attach(
            ModelsMut {
                unet: &mut m.unet,
                text_encoder: &mut m.text_encoder,
            },
            5,
        )
        .unwrap();
    let photos: Vec<CaptionedPhoto> = (0..2)
        .map(|i| CaptionedPhoto {
            source: PhotoSource::Image(photo(i)),
            caption: settings.rewrite_token("a photo of sks dog by a striped wall", "sks"),
            mask: None,
        })
        .collect();
    let instance = LatentSet::prepare(&photos, &m.vae, RES, false, &m.device).unwrap();
    let inputs = TrainInputs {
        unet: &mut m.unet,
        text_encoder: &mut m.text_encoder,
        schedule: &m.schedule,
        method: &*method,
        instance: &instance,
        class: None,
    };
    let cfg = LoopConfig {
        seed: 3,
        max_steps: 1,
        batch_size: 2,
        lr: LrSchedule::constant(1e-3),
        gradient_checkpointing: checkpointing,
        ..LoopConfig::default()
    };
    let mut trainer = Trainer::new(inputs, cfg).unwrap();
    let batch = trainer.batch(0).unwrap();
    let loss = trainer.loss_on(&batch).unwrap();
    let grads = trainer.gradients(&loss.loss).unwrap();
    trainer.train_step().unwrap();
    let after = trainer
        .params()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    Step {
        loss: loss.loss.to_scalar::<f32>().unwrap() as f64,
        grads,
        after,
    }
}

fn same(
    label: &str,
    plain: &HashMap<String, Tensor>,
    recomputed: &HashMap<String, Tensor>,
    tolerance: f64,
    skip: &HashSet<String>,
) {
    assert_eq!(plain.len(), recomputed.len(), "{label}: tensor count");
    // Some tensors are zero up to rounding (a key bias cannot change a softmax): their error is
    // measured against the largest tensor's scale.
    let floor = 1e-3 * plain.values().map(max_abs).fold(0.0, f64::max);
    let mut nonzero = 0;
    for (name, p) in plain.iter().filter(|(n, _)| !skip.contains(*n)) {
        let r = &recomputed[name];
        let scale = max_abs(p);
        let err = max_abs(&(p - r).unwrap());
        assert!(
            err <= tolerance * scale.max(floor),
            "{label} {name}: max error {err:e} of {scale:e}"
        );
        nonzero += usize::from(scale > 0.0);
    }
    assert!(nonzero > 0, "{label}: every tensor is zero");
}

#[test]
fn every_method_trains_the_same_with_checkpointing() {
    let base = TrainModels::tiny(9).unwrap();
    for train in [
        serde_json::json!({"method": "lora", "train_text_encoder": true}),
        serde_json::json!({"method": "dreambooth"}),
        serde_json::json!({"method": "textual_inversion"}),
        serde_json::json!({"method": "custom_diffusion", "weights": "all"}),
        serde_json::json!({"method": "svdiff", "train_text_encoder": true}),
    ] {
        let label = train["method"].as_str().unwrap().to_owned();
        let plain = one_step(&base, train.clone(), false);
        let recomputed = one_step(&base, train, true);
        assert!(
            (plain.loss - recomputed.loss).abs() <= 1e-6 * plain.loss,
            "{label}: loss {} vs {}",
            plain.loss,
            recomputed.loss
        );
        let none = HashSet::new();
        same(
            &format!("{label} gradient"),
            &plain.grads,
            &recomputed.grads,
            1e-5,
            &none,
        );
        // AdamW's first step is about lr * g / (|g| + eps): a gradient that is zero up to
        // rounding moves its tensor by rounding noise, checkpointing or not.
        let largest = plain.grads.values().map(max_abs).fold(0.0, f64::max);
        let noise: HashSet<String> = plain
            .grads
            .iter()
            .filter(|(_, g)| max_abs(g) < 1e-6 * largest)
            .map(|(n, _)| n.clone())
            .collect();
        let after = format!("{label} after a step");
        same(&after, &plain.after, &recomputed.after, 1e-4, &noise);
    }
}
