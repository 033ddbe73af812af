//! The frames SAM works in and the moves between them, as `SamPredictor`, `ResizeLongestSide`
//! and `Sam.postprocess_masks` make them.
//!
//! * original: the photo as given, `(height, width)`;
//! * input: the photo resized so its longest side is `image_size` (Pillow bilinear, as
//!   torchvision's `resize` of a PIL image), then normalised and padded bottom/right with zeros
//!   to `image_size`²;
//! * low-res: the decoder's `4G`² mask logits over the padded input.
//!
//! Mask logits go back to the original frame by torch's bilinear interpolation
//! (`align_corners=False`) to `image_size`², a crop to the input size, and a second bilinear
//! interpolation to the original size. Both interpolations are computed here the way torch's CPU
//! kernel computes them (same weights, a horizontal then a vertical blend per output pixel), and
//! the first only where the crop keeps it.

use candle_core::{Device, Result, Tensor};
use image::RgbImage;

use super::config::SamConfig;
use crate::resample::{resize_rgb, Filter};

/// `ResizeLongestSide.get_preprocess_shape`: `(height, width)` with the longest side `long`.
pub fn preprocess_shape(height: usize, width: usize, long: usize) -> (usize, usize) {
    let scale = long as f64 / height.max(width) as f64;
    let round = |v: usize| (v as f64 * scale + 0.5) as usize;
    (round(height), round(width))
}

/// `SamPredictor.set_image` up to the encoder: the model input `[1, 3, S, S]` and the input
/// size `(height, width)` of the resized photo inside it.
pub fn model_input(
    photo: &RgbImage,
    cfg: &SamConfig,
    device: &Device,
) -> Result<(Tensor, (usize, usize))> {
    let (h, w) = preprocess_shape(
        photo.height() as usize,
        photo.width() as usize,
        cfg.image_size,
    );
    let resized = resize_rgb(photo, w as u32, h as u32, Filter::Bilinear);
    let s = cfg.image_size;
    let mut data = vec![0f32; 3 * s * s];
    for (x, y, p) in resized.enumerate_pixels() {
        for c in 0..3 {
            let v = (f32::from(p.0[c]) - cfg.pixel_mean[c]) / cfg.pixel_std[c];
            data[(c * s + y as usize) * s + x as usize] = v;
        }
    }
    Ok((Tensor::from_vec(data, (1, 3, s, s), device)?, (h, w)))
}

/// `ResizeLongestSide.apply_coords`: a point `(x, y)` of the original frame in the input
/// frame (float64, as numpy computes it).
pub fn to_input_frame(
    [x, y]: [f64; 2],
    (orig_h, orig_w): (usize, usize),
    (in_h, in_w): (usize, usize),
) -> [f64; 2] {
    [
        x * (in_w as f64 / orig_w as f64),
        y * (in_h as f64 / orig_h as f64),
    ]
}

/// One output position of a 1-D linear resample: two source indices and their weights.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Tap {
    i0: usize,
    i1: usize,
    l0: f32,
    l1: f32,
}

/// The first `count` taps of torch's linear resample from `input` to `output` samples
/// (`align_corners=False`, no antialiasing; `compute_indices_weights_linear`).
fn taps(input: usize, output: usize, count: usize) -> Vec<Tap> {
    let scale = input as f32 / output as f32;
    (0..count)
        .map(|i| {
            let src = (scale * (i as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(input - 1);
            let l1 = (src - i0 as f32).clamp(0.0, 1.0);
            let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
            Tap {
                i0,
                i1,
                l0: 1.0 - l1,
                l1,
            }
        })
        .collect()
}

/// A bilinear resample of a row-major `[rows, cols]` map: every source row blended
/// horizontally, then pairs of those rows vertically.
fn resample(src: &[f32], cols: usize, row_taps: &[Tap], col_taps: &[Tap]) -> Vec<f32> {
    let ow = col_taps.len();
    let blended: Vec<f32> = src
        .chunks_exact(cols)
        .flat_map(|row| col_taps.iter().map(|t| row[t.i0] * t.l0 + row[t.i1] * t.l1))
        .collect();
    let mut out = Vec::with_capacity(row_taps.len() * ow);
    for t in row_taps {
        let a = &blended[t.i0 * ow..(t.i0 + 1) * ow];
        let b = &blended[t.i1 * ow..(t.i1 + 1) * ow];
        out.extend(a.iter().zip(b).map(|(a, b)| a * t.l0 + b * t.l1));
    }
    out
}

/// `Sam.postprocess_masks` for maps of one image, with its interpolation weights computed once.
#[derive(Debug, Clone)]
pub struct Postprocess {
    low_res: usize,
    /// Low-res to `image_size`², only the rows and columns inside the input size.
    rows1: Vec<Tap>,
    cols1: Vec<Tap>,
    /// Input size to original size.
    rows2: Vec<Tap>,
    cols2: Vec<Tap>,
}

impl Postprocess {
    pub fn new(
        low_res: usize,
        image_size: usize,
        (in_h, in_w): (usize, usize),
        (orig_h, orig_w): (usize, usize),
    ) -> Self {
        Self {
            low_res,
            rows1: taps(low_res, image_size, in_h),
            cols1: taps(low_res, image_size, in_w),
            rows2: taps(in_h, orig_h, orig_h),
            cols2: taps(in_w, orig_w, orig_w),
        }
    }

    /// One low-res logit map (`low_res`², row-major) in the original frame,
    /// `[orig_h, orig_w]` row-major.
    pub fn apply(&self, low: &[f32]) -> Vec<f32> {
        debug_assert_eq!(low.len(), self.low_res * self.low_res);
        let cropped = resample(low, self.low_res, &self.rows1, &self.cols1);
        resample(&cropped, self.cols1.len(), &self.rows2, &self.cols2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_side_rounds_half_up() {
        assert_eq!(preprocess_shape(768, 768, 1024), (1024, 1024));
        assert_eq!(preprocess_shape(563, 721, 64), (50, 64));
        // 2 * 1024 / 3 = 682.67 rounds to 683
        assert_eq!(preprocess_shape(3, 2, 1024), (1024, 683));
    }

    #[test]
    fn taps_follow_torch_bilinear() {
        // 2 -> 4: sources -0.25 (clamped), 0.25, 0.75, 1.25 (last index repeats)
        let t = taps(2, 4, 4);
        let pairs: Vec<(usize, usize, f32)> = t.iter().map(|t| (t.i0, t.i1, t.l1)).collect();
        assert_eq!(
            pairs,
            vec![(0, 1, 0.0), (0, 1, 0.25), (0, 1, 0.75), (1, 1, 0.25)]
        );
        // 4 -> 2 (downscale without antialiasing): sources 0.5 and 2.5
        let t = taps(4, 2, 2);
        assert_eq!((t[0].i0, t[0].l1, t[1].i0, t[1].l1), (0, 0.5, 2, 0.5));
    }

    #[test]
    fn postprocess_upsamples_crops_and_resizes() {
        // [[0, 4], [8, 12]] upsampled to 4x4 has rows [0 1 3 4], [2 3 5 6], [6 7 9 10],
        // [8 9 11 12]; halving averages 2x2 blocks
        let low = [0.0, 4.0, 8.0, 12.0];
        let full = Postprocess::new(2, 4, (4, 4), (2, 2)).apply(&low);
        assert_eq!(full, vec![1.5, 4.5, 7.5, 10.5]);
        // an input of 2 rows keeps the top half of the padded frame
        let cropped = Postprocess::new(2, 4, (2, 4), (1, 2)).apply(&low);
        assert_eq!(cropped, vec![1.5, 4.5]);
    }
}
