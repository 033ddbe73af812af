//! Textual Inversion on the tiny model: only the placeholder's embedding rows learn.

use candle_core::{DType, Tensor};
use image::{Rgb, RgbImage};
use sidbooth_engine::train::data::{CaptionedPhoto, LatentSet, PhotoSource};
use sidbooth_engine::train::host::{Denoiser, PromptEncoder};
use sidbooth_engine::train::method::{
    ModelsMut, TextualInversionConfig, TextualInversionMethod, TrainingMethod, TOKEN_EMBEDDING,
};
use sidbooth_engine::train::schedule::LrSchedule;
use sidbooth_engine::train::trainer::{LoopConfig, TrainInputs, Trainer};
use sidbooth_engine::train::TrainModels;

fn photos() -> Vec<CaptionedPhoto> {
    (0..2u32)
        .map(|i| CaptionedPhoto {
            source: PhotoSource::Image(RgbImage::from_fn(32, 32, |x, y| {
                if (x as i32 - 16).pow(2) + (y as i32 - 16 - i as i32).pow(2) < 64 {
                    Rgb([220, 120, 30])
                } else {
                    Rgb([20, 40, 200])
                }
            })),
            caption: "a photo of sks dog".into(),
        })
        .collect()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap()
}

#[test]
fn textual_inversion_trains_only_placeholder_rows() {
    let base = TrainModels::tiny(7).unwrap();
    let mut m = base.clone();
    let mut method = TextualInversionMethod::new(TextualInversionConfig {
        token: "sks".into(),
        initializer: Some("dog".into()),
    })
    .unwrap();
    method
        .attach(
            ModelsMut {
                unet: &mut m.unet,
                text_encoder: &mut m.text_encoder,
            },
            0,
        )
        .unwrap();
    let ids = method.token_ids().to_vec();
    assert!(!ids.is_empty());
    let dog = m.text_encoder.token_ids("dog").unwrap();
    let original = rows(&base.text_encoder.model.token_embedding);
    // initialised from the class word
    let learned0 = rows(&method.learned().unwrap());
    assert_eq!(learned0[0], original[dog[0] as usize]);

    let instance = LatentSet::encode(&photos(), &m.vae, 32, false, &m.device).unwrap();
    let inputs = TrainInputs {
        unet: &m.unet,
        text_encoder: &m.text_encoder,
        schedule: &m.schedule,
        method: &method,
        instance: &instance,
        class: None,
    };
    let cfg = LoopConfig {
        seed: 3,
        max_steps: 3,
        lr: LrSchedule::constant(5e-3),
        ..LoopConfig::default()
    };
    let mut trainer = Trainer::new(inputs, cfg).unwrap();
    let params = trainer.params().to_vec();
    assert_eq!(params.len(), 1);
    assert_eq!(params[0].0, TOKEN_EMBEDDING);

    // Gradient: non-zero and finite on the placeholder rows; frozen UNet and text weights are
    // not variables.
    let store = trainer.micro_loss(0).unwrap().loss.backward().unwrap();
    let g = rows(
        store
            .get(params[0].1.as_tensor())
            .expect("embedding gradient"),
    );
    for &i in &ids {
        let r = &g[i as usize];
        assert!(
            r.iter().all(|v| v.is_finite()) && r.iter().any(|v| *v != 0.0),
            "row {i}"
        );
    }
    for (name, w) in Denoiser::named_weights(&m.unet)
        .into_iter()
        .chain(m.text_encoder.named_weights())
    {
        assert!(
            !w.is_variable() || name.ends_with("token_embedding.weight"),
            "{name} is a variable"
        );
    }

    for _ in 0..3 {
        trainer.train_step().unwrap();
    }
    let after = rows(&m.text_encoder.model.token_embedding);
    let mut moved = 0;
    for (i, (a, o)) in after.iter().zip(&original).enumerate() {
        if ids.contains(&(i as u32)) {
            assert_ne!(
                a,
                &learned0[ids.iter().position(|&j| j as usize == i).unwrap()],
                "placeholder row {i} did not learn"
            );
            moved += 1;
        } else {
            assert_eq!(a, o, "row {i} moved");
        }
    }
    assert_eq!(moved, ids.len());
    // the model reads the trained variable
    let exported = method.export(&Default::default()).unwrap();
    assert_eq!(
        rows(&exported.tensors["sks"]),
        ids.iter()
            .map(|&i| after[i as usize].clone())
            .collect::<Vec<_>>()
    );
    // the base model is untouched
    assert_eq!(rows(&base.text_encoder.model.token_embedding), original);
}
