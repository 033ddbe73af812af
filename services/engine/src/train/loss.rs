//! The masked instance loss (the paper's alternative to SID, and Custom Diffusion's loss mask
//! for its rescaled views), shared by the trainer and the augmentations.

use candle_core::{DType, Tensor};

/// Restricting the instance loss to the subject (the job's masked-loss setting).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MaskedLossConfig {
    pub normalization: MaskNormalization,
    /// Weight of the loss outside the mask.
    pub unmasked_weight: f64,
}

/// How a masked loss is averaged (the choices of kohya sd-scripts and OneTrainer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskNormalization {
    /// `mean(w * (pred - target)^2)` over the whole latent (kohya's `apply_masked_loss`).
    Kohya,
    /// The same divided by `mean(w)` (OneTrainer's `normalize_masked_area_loss`).
    MaskedArea,
}

impl MaskedLossConfig {
    /// The loss of one example whose mask `m` is `[1, 1, h, w]` in [0, 1].
    pub fn loss(&self, pred: &Tensor, target: &Tensor, m: &Tensor) -> candle_core::Result<Tensor> {
        let w = m.clamp(self.unmasked_weight, 1.0)?.to_dtype(DType::F32)?;
        let sq = (pred.to_dtype(DType::F32)? - target.to_dtype(DType::F32)?)?.sqr()?;
        let weighted = sq.broadcast_mul(&w)?.mean_all()?;
        match self.normalization {
            MaskNormalization::Kohya => Ok(weighted),
            MaskNormalization::MaskedArea => {
                let area = w.mean_all()?.clamp(1e-8, 1.0)?;
                weighted / area
            }
        }
    }
}
