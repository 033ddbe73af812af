//! Helpers the engine's training tests share: where the fixtures are, tensor comparisons, and a
//! method attached to fresh copies of the models.
#![allow(dead_code)] // each test binary uses its own share

use std::path::PathBuf;

use candle_core::{DType, Tensor};
use sidbooth_engine::train::method::{ModelsMut, TrainingMethod};
use sidbooth_engine::train::TrainModels;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The values of `t` as f32, flattened.
pub fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `max |t|`.
pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// `max |ours - want| / max |want|`, for tensors of the same shape.
pub fn rel_err(ours: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(ours.dims(), want.dims(), "shape");
    let d = (ours.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap()).unwrap();
    max_abs(&d) / max_abs(want)
}

/// Asserts [`rel_err`] `<= tol` and returns it.
pub fn assert_rel(name: &str, ours: &Tensor, want: &Tensor, tol: f32) -> f32 {
    assert_eq!(ours.dims(), want.dims(), "{name}: shape");
    let e = rel_err(ours, want);
    eprintln!("{name}: relative max error {e:.2e}");
    assert!(
        e.is_finite() && e <= tol,
        "{name}: relative error {e:e} > {tol:e}"
    );
    e
}

/// `method` attached (with `seed`) to fresh copies of `base`.
pub fn attach<M: TrainingMethod>(base: &TrainModels, mut method: M, seed: u64) -> (TrainModels, M) {
    let mut m = base.clone();
    method
        .attach(
            ModelsMut {
                unet: &mut m.unet,
                text_encoder: &mut m.text_encoder,
            },
            seed,
        )
        .unwrap();
    (m, method)
}
