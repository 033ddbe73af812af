//! What the decoder predicts for a batch of prompts on one image, and its masks in the photo's
//! own frame.

use candle_core::Tensor;

use super::transforms::Postprocess;
use super::MASK_THRESHOLD;
use crate::error::Result;
use crate::mask::Mask;

/// Mask logits and quality predictions for `n` prompts, `k` masks each (3 with multimask
/// outputs, else 1).
#[derive(Debug, Clone)]
pub struct Prediction {
    /// `[n, k, 4G, 4G]` logits over the padded model input (`G` the embedding grid side).
    pub low_res_logits: Tensor,
    /// `[n, k]`: the model's estimate of each mask's IoU with the object meant.
    pub iou_predictions: Tensor,
    pub(crate) post: Postprocess,
    /// `(height, width)` of the photo.
    pub(crate) original_size: (usize, usize),
}

impl Prediction {
    /// Number of prompts.
    pub fn len(&self) -> usize {
        self.low_res_logits.dims()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Masks per prompt.
    pub fn masks_per_prompt(&self) -> usize {
        self.low_res_logits.dims()[1]
    }

    /// `iou_predictions` as rows of `k` values, one row per prompt.
    pub fn iou(&self) -> Result<Vec<Vec<f32>>> {
        Ok(self.iou_predictions.to_vec2::<f32>()?)
    }

    /// Logits of mask `k` of prompt `prompt` in the photo's frame, row-major
    /// `[height, width]`, as `Sam.postprocess_masks` computes them.
    pub fn logits(&self, prompt: usize, k: usize) -> Result<Vec<f32>> {
        let low = self
            .low_res_logits
            .get(prompt)?
            .get(k)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(self.post.apply(&low))
    }

    /// Mask `k` of prompt `prompt` in the photo's frame: logits above SAM's threshold (0.0).
    pub fn mask(&self, prompt: usize, k: usize) -> Result<Mask> {
        Ok(mask_from_logits(
            &self.logits(prompt, k)?,
            self.original_size,
        ))
    }
}

/// Row-major logits of a photo of `(height, width)` to its mask.
pub(crate) fn mask_from_logits(logits: &[f32], (h, w): (usize, usize)) -> Mask {
    debug_assert_eq!(logits.len(), h * w);
    Mask::from_bools(w as u32, h as u32, |x, y| {
        logits[y as usize * w + x as usize] > MASK_THRESHOLD
    })
}
