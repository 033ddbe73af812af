//! Textual Inversion on the tiny model: the new token `<sks>` and its rows, parity of two
//! training steps with diffusers' `textual_inversion.py`, gradient coverage, and the export
//! loaded by diffusers' `load_textual_inversion` sampling as `registry::load_weights` does.
//! Reference tensors: `scripts/parity/make_ti_fixtures.py`.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use image::{Rgb, RgbImage};
use sidbooth_domain::train::TrainSettings;
use sidbooth_engine::pipeline::{GenerateRequest, StableDiffusion};
use sidbooth_engine::train::data::{CaptionedPhoto, LatentSet, PhotoSource};
use sidbooth_engine::train::host::{Denoiser, PromptEncoder};
use sidbooth_engine::train::method::textual_inversion::{a1111_file, A1111_KEY, EMBEDS_FILE};
use sidbooth_engine::train::method::{
    ExportContext, ExportInfo, ExportOptions, ModelsMut, TextualInversionConfig,
    TextualInversionMethod, TrainingMethod, TOKEN_EMBEDDING,
};
use sidbooth_engine::train::optim::{self, AdamW, AdamWConfig};
use sidbooth_engine::train::registry::{self, MethodConfig, SettingsContext};
use sidbooth_engine::train::trainer::{Batch, LoopConfig, TrainInputs, Trainer};
use sidbooth_engine::train::TrainModels;

mod support;
use support::{fixtures, flat};

/// The learning rate of the reference steps.
const LR: f64 = 1e-2;
/// Relative tolerance of every comparison with the reference (fp32, CPU).
const RTOL: f32 = 1e-4;

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join("textual_inversion/reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn pipeline() -> StableDiffusion {
    StableDiffusion::load(fixtures().join("tiny-sd"), &Default::default()).unwrap()
}

fn config() -> TextualInversionConfig {
    TextualInversionConfig {
        token: "<sks>".into(),
        num_vectors: 2,
        initializer: "dog".into(),
    }
}

/// `max |ours - want| / max |want|`, asserted below `RTOL`.
fn assert_rel(name: &str, ours: &Tensor, want: &Tensor) -> f32 {
    support::assert_rel(name, ours, want, RTOL)
}

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
            caption: "a photo of <sks> dog".into(),
            mask: None,
        })
        .collect()
}

fn attached(base: &TrainModels) -> (TrainModels, TextualInversionMethod) {
    support::attach(base, TextualInversionMethod::new(config()).unwrap(), 0)
}

#[test]
fn two_training_steps_match_diffusers() {
    let r = reference();
    let sd = pipeline();
    let base = TrainModels::from_pipeline(&sd).unwrap();
    let (mut m, method) = attached(&base);

    // the token and its ids as transformers' tokenizer gives them after `add_tokens`
    let ids: Vec<u32> = flat(&r["placeholder_ids"])
        .iter()
        .map(|&i| i as u32)
        .collect();
    assert_eq!(method.token_ids(), &ids[..]);
    let want_ids: Vec<u32> = flat(&r["input_ids"]).iter().map(|&i| i as u32).collect();
    assert_eq!(
        m.text_encoder.tokenize("a photo of <sks> dog").unwrap(),
        want_ids
    );
    assert_rel("initial rows", &method.learned().unwrap(), &r["rows_init"]);

    let instance = LatentSet::prepare(&photos()[..1], &m.vae, 32, false, &m.device).unwrap();
    let inputs = TrainInputs {
        unet: &mut m.unet,
        text_encoder: &mut m.text_encoder,
        schedule: &m.schedule,
        method: &method,
        instance: &instance,
        class: None,
    };
    let mut trainer = Trainer::new(inputs, LoopConfig::default()).unwrap();
    let timesteps: Vec<u32> = flat(&r["timesteps"]).iter().map(|&t| t as u32).collect();
    let batch = Batch {
        x0: r["x0"].clone(),
        noise: r["noise"].clone(),
        timesteps,
        captions: vec!["a photo of <sks> dog".into()],
        masks: vec![None],
        class_count: 0,
    };
    let mut opt = AdamW::new(method.trainable(), AdamWConfig::default()).unwrap();
    for step in 1..=2 {
        let ml = trainer.loss_on(&batch).unwrap();
        assert_rel(
            &format!("loss {step}"),
            &ml.loss.reshape(1).unwrap(),
            &r[&format!("loss_{step}")],
        );
        let mut grads = trainer.gradients(&ml.loss).unwrap();
        assert_rel(
            &format!("gradient {step}"),
            &grads[TOKEN_EMBEDDING],
            &r[&format!("grad_{step}")],
        );
        optim::clip_grad_norm(&mut grads, 1.0).unwrap();
        opt.step_with(&grads, |_| LR).unwrap();
        method.after_step().unwrap();
        assert_rel(
            &format!("rows after step {step}"),
            &method.learned().unwrap(),
            &r[&format!("rows_{step}")],
        );
    }
}

#[test]
fn only_the_new_rows_train() {
    let base = TrainModels::from_pipeline(&pipeline()).unwrap();
    let vocab = base.text_encoder.model.token_embedding.dim(0).unwrap();
    let before = flat(&base.text_encoder.model.token_embedding);
    let (mut m, method) = attached(&base);
    assert_eq!(method.token_ids(), &[vocab as u32, vocab as u32 + 1]);
    // the base model's tokenizer does not know the token
    assert!(base.text_encoder.token_ids("<sks>").unwrap().len() > 1);

    let instance = LatentSet::prepare(&photos(), &m.vae, 32, false, &m.device).unwrap();
    let inputs = TrainInputs {
        unet: &mut m.unet,
        text_encoder: &mut m.text_encoder,
        schedule: &m.schedule,
        method: &method,
        instance: &instance,
        class: None,
    };
    let cfg = LoopConfig {
        seed: 3,
        max_steps: 3,
        ..LoopConfig::default()
    };
    let mut trainer = Trainer::new(inputs, cfg).unwrap();
    let params = trainer.params().to_vec();
    assert_eq!(params.len(), 1);
    assert_eq!(params[0].0, TOKEN_EMBEDDING);
    assert_eq!(params[0].1.dims(), &[2, 32]);

    // every vector gets a finite, non-zero gradient
    let store = trainer.micro_loss(0).unwrap().loss.backward().unwrap();
    let g = store
        .get(params[0].1.as_tensor())
        .expect("gradient of the rows");
    for row in g.to_vec2::<f32>().unwrap() {
        assert!(row.iter().all(|v| v.is_finite()) && row.iter().any(|v| *v != 0.0));
    }
    let learned0 = flat(&method.learned().unwrap());
    for _ in 0..3 {
        trainer.train_step().unwrap();
    }
    drop(trainer);
    // the rows moved, the vocabulary's rows did not, and nothing else is a variable; the
    // encoder reads the rows as the last `prepare` (before every forward pass) put them
    assert_ne!(flat(&method.learned().unwrap()), learned0);
    method
        .prepare(ModelsMut {
            unet: &mut m.unet,
            text_encoder: &mut m.text_encoder,
        })
        .unwrap();
    let emb = &m.text_encoder.model.token_embedding;
    assert_eq!(flat(&emb.narrow(0, 0, vocab).unwrap()), before);
    assert_eq!(
        flat(&emb.narrow(0, vocab, 2).unwrap()),
        flat(&method.learned().unwrap()),
        "the encoder reads the trained rows"
    );
    for (name, w) in Denoiser::named_weights(&m.unet)
        .into_iter()
        .chain(PromptEncoder::named_weights(&m.text_encoder))
    {
        assert!(!w.is_variable(), "{name} is a variable");
    }
    assert_eq!(flat(&base.text_encoder.model.token_embedding), before);
    assert_eq!(base.text_encoder.tokenizer.vocab_size(), vocab);
}

#[test]
fn export_samples_as_diffusers_load_textual_inversion() {
    let r = reference();
    let export = fixtures().join("textual_inversion/export");
    let req = |prompt: &str| GenerateRequest {
        prompt: prompt.into(),
        steps: 4,
        guidance_scale: 7.5,
        height: Some(32),
        width: Some(32),
        init_latents: Some(r["sample_init_latents"].clone()),
        ..Default::default()
    };
    let mut sd = pipeline();
    let base_sks = sd
        .generate(&req("a photo of <sks> dog"), None, None)
        .unwrap();
    let base_plain = sd.generate(&req("a photo of a dog"), None, None).unwrap();
    assert_eq!(
        registry::load_weights(&mut sd, &export, 1.0).unwrap(),
        "textual_inversion"
    );
    let tuned = sd
        .generate(&req("a photo of <sks> dog"), None, None)
        .unwrap();
    assert_rel(
        "samples with the embedding",
        &tuned.latents,
        &r["sample_latents"],
    );
    let effect = (&tuned.latents - &base_sks.latents)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        effect > 1e-2,
        "the embedding does not change the samples ({effect})"
    );
    // a prompt without the token samples as the base model does
    let plain = sd.generate(&req("a photo of a dog"), None, None).unwrap();
    assert_eq!(flat(&plain.latents), flat(&base_plain.latents));
    // the marker file alone names the output too
    let mut again = pipeline();
    registry::load_weights(&mut again, &export.join(EMBEDS_FILE), 1.0).unwrap();
    assert_eq!(
        flat(
            &again
                .generate(&req("a photo of <sks> dog"), None, None)
                .unwrap()
                .latents
        ),
        flat(&tuned.latents)
    );
}

#[test]
fn writes_diffusers_and_a1111_layouts() {
    let sd = pipeline();
    let base = TrainModels::from_pipeline(&sd).unwrap();
    let (m, method) = attached(&base);
    let dir = std::env::temp_dir().join(format!("sidbooth-ti-export-{}", std::process::id()));
    let info = ExportInfo {
        token: "sks".into(),
        ..ExportInfo::default()
    };
    let options = ExportOptions {
        a1111: true,
        ..ExportOptions::default()
    };
    let ctx = ExportContext {
        info: &info,
        options: &options,
        unet: &m.unet,
        text_encoder: &m.text_encoder,
        base: &base,
    };
    let files = method.write_output(&ctx, &dir).unwrap();
    assert_eq!(
        files,
        vec![
            PathBuf::from(EMBEDS_FILE),
            PathBuf::from("<sks>.safetensors")
        ]
    );
    assert_eq!(a1111_file("<sks>"), "<sks>.safetensors");
    let learned = flat(&method.learned().unwrap());
    let diffusers = candle_core::safetensors::load(dir.join(EMBEDS_FILE), &Device::Cpu).unwrap();
    assert_eq!(diffusers.keys().collect::<Vec<_>>(), vec!["<sks>"]);
    assert_eq!(diffusers["<sks>"].dims(), &[2, 32]);
    assert_eq!(flat(&diffusers["<sks>"]), learned);
    let a1111 =
        candle_core::safetensors::load(dir.join("<sks>.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(a1111.keys().collect::<Vec<_>>(), vec![A1111_KEY]);
    assert_eq!(flat(&a1111[A1111_KEY]), learned);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn job_settings_map_to_the_new_token() {
    let s: TrainSettings = serde_json::from_value(serde_json::json!({
        "method": "textual_inversion", "num_vectors": 3
    }))
    .unwrap();
    let cx = SettingsContext {
        token: "sks".into(),
        class: "dog".into(),
    };
    assert_eq!(
        MethodConfig::from_settings(&s, &cx).unwrap(),
        MethodConfig::TextualInversion(TextualInversionConfig {
            token: "<sks>".into(),
            num_vectors: 3,
            initializer: "dog".into(),
        })
    );
    // the job's descriptions, rewritten for the method, tokenize to the new token's vectors
    let base = TrainModels::from_pipeline(&pipeline()).unwrap();
    let mut m = base.clone();
    let MethodConfig::TextualInversion(cfg) = MethodConfig::from_settings(&s, &cx).unwrap() else {
        unreachable!()
    };
    let mut method = TextualInversionMethod::new(cfg).unwrap();
    method
        .attach(
            ModelsMut {
                unet: &mut m.unet,
                text_encoder: &mut m.text_encoder,
            },
            0,
        )
        .unwrap();
    let caption = s.rewrite_token("a photo of sks dog", "sks");
    let ids = m.text_encoder.token_ids(&caption).unwrap();
    assert_eq!(&ids[3..6], method.token_ids());
}
