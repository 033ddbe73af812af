//! Masked-loss training (the paper's alternative to SID): the instance loss sees the subject
//! only. A denoiser wrapper adds a variable offset to the UNet's prediction, so the tests can
//! change what the loss sees outside the mask and read the loss's gradient there.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use image::{GrayImage, Luma, Rgb, RgbImage};
use sidbooth_engine::nn::Linear;
use sidbooth_engine::train::data::{CaptionedPhoto, LatentSet, PhotoSource};
use sidbooth_engine::train::host::Denoiser;
use sidbooth_engine::train::method::{LoraConfig, LoraMethod, ModelsMut, TrainingMethod};
use sidbooth_engine::train::schedule::LrSchedule;
use sidbooth_engine::train::trainer::{
    Batch, LoopConfig, MaskNormalization, MaskedLossConfig, TrainInputs, Trainer,
};
use sidbooth_engine::train::TrainModels;

const RES: u32 = 32;

/// The UNet's prediction plus `offset` (zero unless a test sets it).
struct Offset<'a> {
    inner: &'a mut dyn Denoiser,
    offset: Var,
}

impl Denoiser for Offset<'_> {
    fn predict(
        &self,
        latents: &Tensor,
        timesteps: &[u32],
        context: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.inner.predict(latents, timesteps, context)? + self.offset.as_tensor()
    }
    fn linears(&mut self) -> Vec<&mut Linear> {
        self.inner.linears()
    }
    fn named_weights(&self) -> Vec<(String, Tensor)> {
        self.inner.named_weights()
    }
    fn replace_weights(&mut self, weights: &HashMap<String, Tensor>) -> candle_core::Result<()> {
        self.inner.replace_weights(weights)
    }
}

/// A photo whose left 60% is the subject, with its mask.
fn masked_photo() -> CaptionedPhoto {
    let (w, h) = (40, 36);
    let photo = RgbImage::from_fn(w, h, |x, y| {
        if x < 24 {
            Rgb([200, 120, 40])
        } else if (x / 4 + y / 5) % 2 == 0 {
            Rgb([30, 60, 180])
        } else {
            Rgb([230, 230, 220])
        }
    });
    let mask = GrayImage::from_fn(w, h, |x, _| Luma([if x < 24 { 255 } else { 0 }]));
    CaptionedPhoto {
        source: PhotoSource::Image(photo),
        caption: "a photo of sks dog by a striped wall".into(),
        mask: Some(mask),
    }
}

/// `[1, C, h, w]` of the latent cells the mask leaves out entirely (1) and the rest (0).
fn outside(mask: &Tensor, channels: usize) -> Tensor {
    let (_, _, h, w) = mask.dims4().unwrap();
    mask.eq(0f32)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .broadcast_as((1, channels, h, w))
        .unwrap()
        .contiguous()
        .unwrap()
}

fn sum(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// The loss of `batch` with the prediction offset by `shift`, and its gradient there.
fn loss_at(
    trainer: &mut Trainer<'_>,
    batch: &Batch,
    offset: &Var,
    shift: &Tensor,
) -> (f64, Tensor) {
    offset.set(shift).unwrap();
    let loss = trainer.loss_on(batch).unwrap();
    let grads = loss.loss.backward().unwrap();
    let g = grads
        .get(offset.as_tensor())
        .expect("the offset gets a gradient")
        .clone();
    (loss.loss.to_scalar::<f32>().unwrap() as f64, g)
}

/// For each normalisation: offsets outside the mask leave the loss as it is and get no
/// gradient; offsets inside change it. With `unmasked_weight > 0` the outside counts again.
#[test]
fn the_loss_ignores_everything_outside_the_mask() {
    let base = TrainModels::tiny(3).unwrap();
    for (normalization, unmasked_weight) in [
        (MaskNormalization::Kohya, 0.0),
        (MaskNormalization::MaskedArea, 0.0),
        (MaskNormalization::MaskedArea, 0.25),
    ] {
        let mut m = base.clone();
        let mut method = LoraMethod::new(LoraConfig::with_rank(2)).unwrap();
        method
            .attach(
                ModelsMut {
                    unet: &mut m.unet,
                    text_encoder: &mut m.text_encoder,
                },
                5,
            )
            .unwrap();
        let instance =
            LatentSet::prepare(&[masked_photo()], &m.vae, RES, false, &m.device).unwrap();
        let latent_shape = instance.dist(0, false).unwrap().mean.dims().to_vec();
        let offset = Var::zeros(latent_shape.as_slice(), DType::F32, &Device::Cpu).unwrap();
        let mut unet = Offset {
            inner: &mut m.unet,
            offset: offset.clone(),
        };
        let inputs = TrainInputs {
            unet: &mut unet,
            text_encoder: &mut m.text_encoder,
            schedule: &m.schedule,
            method: &method,
            instance: &instance,
            class: None,
        };
        let cfg = LoopConfig {
            seed: 4,
            max_steps: 1,
            lr: LrSchedule::constant(1e-3),
            masked_loss: Some(MaskedLossConfig {
                normalization,
                unmasked_weight,
            }),
            ..LoopConfig::default()
        };
        let mut trainer = Trainer::new(inputs, cfg).unwrap();
        let batch = trainer.batch(0).unwrap();
        let mask = batch.masks[0]
            .clone()
            .expect("the photo's mask reaches the batch");
        let out = outside(&mask, latent_shape[1]);
        let cells_out = sum(&out);
        let cells_all = out.elem_count() as f64;
        assert!(
            cells_out > 0.2 * cells_all && cells_out < 0.6 * cells_all,
            "the mask leaves out {cells_out} of {cells_all} cells"
        );
        let inside = (1.0 - &out).unwrap();

        let noise = Tensor::randn(0f32, 1f32, latent_shape.as_slice(), &Device::Cpu).unwrap();
        let zero = noise.zeros_like().unwrap();
        let (base_loss, grad) = loss_at(&mut trainer, &batch, &offset, &zero);
        let (shifted_out, _) = loss_at(&mut trainer, &batch, &offset, &(&noise * &out).unwrap());
        let (shifted_in, _) = loss_at(&mut trainer, &batch, &offset, &(&noise * &inside).unwrap());
        let grad_out = sum(&(grad.abs().unwrap() * &out).unwrap());
        let grad_in = sum(&(grad.abs().unwrap() * &inside).unwrap());
        let label = format!("{normalization:?}, unmasked_weight {unmasked_weight}");
        assert!(
            base_loss.is_finite() && base_loss > 0.0,
            "{label}: {base_loss}"
        );
        assert!(grad_in > 0.0, "{label}: no gradient inside the mask");
        assert!(
            (shifted_in - base_loss).abs() > 1e-3 * base_loss,
            "{label}: the subject does not count ({shifted_in} vs {base_loss})"
        );
        if unmasked_weight == 0.0 {
            assert_eq!(grad_out, 0.0, "{label}: gradient outside the mask");
            assert!(
                (shifted_out - base_loss).abs() <= 1e-6 * base_loss,
                "{label}: the background counts ({shifted_out} vs {base_loss})"
            );
        } else {
            assert!(grad_out > 0.0, "{label}: the outside weight is ignored");
            assert!(
                (shifted_out - base_loss).abs() > 1e-4 * base_loss,
                "{label}"
            );
        }
    }
}

/// OneTrainer's normalisation divides by the mask's mean, so a binary mask gives the mean
/// squared error over the subject alone; kohya's stays the mean over the whole latent.
#[test]
fn the_normalisations_are_kohyas_and_onetrainers() {
    let dev = Device::Cpu;
    let pred = Tensor::randn(0f32, 1f32, (1, 4, 4, 4), &dev).unwrap();
    let target = Tensor::randn(0f32, 1f32, (1, 4, 4, 4), &dev).unwrap();
    let mut m = vec![0f32; 16];
    m[..6].iter_mut().for_each(|v| *v = 1.0);
    let mask = Tensor::from_vec(m, (1, 1, 4, 4), &dev).unwrap();
    let sq = (&pred - &target).unwrap().sqr().unwrap();
    let inside = sum(&sq.broadcast_mul(&mask).unwrap());
    let loss = |normalization| {
        MaskedLossConfig {
            normalization,
            unmasked_weight: 0.0,
        }
        .loss(&pred, &target, &mask)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64
    };
    let kohya = loss(MaskNormalization::Kohya);
    let area = loss(MaskNormalization::MaskedArea);
    assert!((kohya - inside / 64.0).abs() < 1e-6 * kohya, "{kohya}");
    assert!((area - inside / 24.0).abs() < 1e-6 * area, "{area}");
}
