//! Mask proposals for a whole photo: `SamAutomaticMaskGenerator` without crop layers and
//! without small-region cleanup (`crop_n_layers=0`, `min_mask_region_area=0`, its defaults).
//!
//! A regular grid of foreground points is prompted in batches with multimask outputs; masks
//! whose predicted IoU or stability score is too low are dropped, boxes are taken around the
//! rest, and non-maximum suppression on those boxes (scored by predicted IoU) removes
//! duplicates. Proposals come out in the order NMS keeps them: by predicted IoU, best first.

use image::RgbImage;

use super::predict::{mask_from_logits, Prediction};
use super::transforms::Postprocess;
use super::{Sam, MASK_THRESHOLD};
use crate::error::{EvalError, Result};
use crate::mask::{Mask, PixelBox};

/// The generator's knobs; defaults are segment-anything's except the grid.
#[derive(Debug, Clone, PartialEq)]
pub struct ProposalSettings {
    /// Points along each side of the grid. The reference default is 32 (1024 prompts); 16
    /// (256 prompts) quarters the decoder's work, which dominates on a CPU: a ViT-B run then
    /// takes one to two minutes per photo on two cores.
    pub points_per_side: usize,
    /// Prompts decoded at once. The reference uses 64 on a GPU; results do not depend on it,
    /// memory does (each prompt carries its own copy of the image tokens).
    pub points_per_batch: usize,
    /// Keep masks whose predicted IoU is above this (no filter when not positive).
    pub pred_iou_thresh: f32,
    /// Keep masks whose stability score is at least this (no filter when not positive).
    pub stability_score_thresh: f32,
    /// Logit offset of the two thresholds the stability score compares.
    pub stability_score_offset: f32,
    /// Box IoU above which the lower-scored of two masks is dropped.
    pub box_nms_thresh: f32,
}

impl Default for ProposalSettings {
    fn default() -> Self {
        Self {
            points_per_side: 16,
            points_per_batch: 16,
            pred_iou_thresh: 0.88,
            stability_score_thresh: 0.95,
            stability_score_offset: 1.0,
            box_nms_thresh: 0.7,
        }
    }
}

/// One proposed segment of a photo.
#[derive(Debug, Clone)]
pub struct Proposal {
    /// The segment, at the photo's size.
    pub mask: Mask,
    /// Its box (inclusive last column and row, as `batched_mask_to_box`).
    pub bbox: PixelBox,
    pub predicted_iou: f32,
    pub stability: f32,
}

/// `build_point_grid(n)`: `n`² points spread evenly over [0, 1]², cell centres, x varying
/// fastest (numpy's `linspace(1/2n, 1 - 1/2n, n)` on both axes).
pub fn point_grid(n: usize) -> Vec<[f64; 2]> {
    let offset = 1.0 / (2 * n) as f64;
    let side: Vec<f64> = match n {
        0 => Vec::new(),
        1 => vec![offset],
        _ => {
            let step = (1.0 - 2.0 * offset) / (n - 1) as f64;
            (0..n)
                .map(|i| {
                    if i == n - 1 {
                        1.0 - offset
                    } else {
                        i as f64 * step + offset
                    }
                })
                .collect()
        }
    };
    side.iter()
        .flat_map(|&y| side.iter().map(move |&x| [x, y]))
        .collect()
}

/// `calculate_stability_score`: the IoU of the masks thresholded at `threshold + offset` and at
/// `threshold - offset` (the first lies inside the second). NaN when both are empty.
pub fn stability_score(logits: &[f32], threshold: f32, offset: f32) -> f32 {
    let (hi, lo) = (threshold + offset, threshold - offset);
    let (mut inter, mut union) = (0u32, 0u32);
    for &v in logits {
        inter += u32::from(v > hi);
        union += u32::from(v > lo);
    }
    inter as f32 / union as f32
}

/// Greedy non-maximum suppression as torchvision's `nms`: boxes in descending score order
/// (ties in input order), each dropped when its IoU with a kept box exceeds `threshold`.
/// Returns the kept indices, best first.
pub fn nms(boxes: &[PixelBox], scores: &[f32], threshold: f32) -> Vec<usize> {
    let mut order: Vec<usize> = (0..boxes.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut kept: Vec<usize> = Vec::new();
    for i in order {
        if kept.iter().all(|&k| boxes[k].iou(&boxes[i]) <= threshold) {
            kept.push(i);
        }
    }
    kept
}

/// A mask that passed the thresholds, kept at low resolution until NMS has decided on it (a
/// photo-sized map per candidate would hold gigabytes for a large photo).
struct Candidate {
    low_res: Vec<f32>,
    bbox: PixelBox,
    predicted_iou: f32,
    stability: f32,
}

impl Sam {
    /// Mask proposals for `photo`; see the module documentation.
    pub fn proposals(
        &self,
        photo: &RgbImage,
        settings: &ProposalSettings,
    ) -> Result<Vec<Proposal>> {
        if settings.points_per_side == 0 || settings.points_per_batch == 0 {
            return Err(EvalError::Invalid(
                "points_per_side and points_per_batch must be positive".into(),
            ));
        }
        let emb = self.embed(photo)?;
        let cfg = self.config();
        let post = Postprocess::new(
            cfg.low_res_size(),
            cfg.image_size,
            emb.input_size,
            emb.original_size,
        );
        let (h, w) = emb.original_size;
        let points: Vec<[f64; 2]> = point_grid(settings.points_per_side)
            .into_iter()
            .map(|[x, y]| [x * w as f64, y * h as f64])
            .collect();
        let mut candidates = Vec::new();
        for batch in points.chunks(settings.points_per_batch) {
            let pred = self.predict_points(&emb, batch, true)?;
            candidates.extend(passing_masks(&pred, &post, w, settings)?);
        }
        let boxes: Vec<PixelBox> = candidates.iter().map(|c| c.bbox).collect();
        let scores: Vec<f32> = candidates.iter().map(|c| c.predicted_iou).collect();
        let keep = nms(&boxes, &scores, settings.box_nms_thresh);
        Ok(keep
            .into_iter()
            .map(|i| {
                let c = &candidates[i];
                Proposal {
                    mask: mask_from_logits(&post.apply(&c.low_res), emb.original_size),
                    bbox: c.bbox,
                    predicted_iou: c.predicted_iou,
                    stability: c.stability,
                }
            })
            .collect())
    }
}

/// The masks of one batch whose predicted IoU and stability (on the photo-sized logits, `width`
/// wide) pass the thresholds, with their boxes.
fn passing_masks(
    pred: &Prediction,
    post: &Postprocess,
    width: usize,
    settings: &ProposalSettings,
) -> Result<Vec<Candidate>> {
    let ious: Vec<f32> = pred.iou()?.concat();
    let maps = pred.low_res_logits.flatten_all()?.to_vec1::<f32>()?;
    let mut out = Vec::new();
    for (&predicted_iou, low) in ious.iter().zip(maps.chunks_exact(maps.len() / ious.len())) {
        if settings.pred_iou_thresh > 0.0 && predicted_iou <= settings.pred_iou_thresh {
            continue;
        }
        let logits = post.apply(low);
        let stability = stability_score(&logits, MASK_THRESHOLD, settings.stability_score_offset);
        // a NaN score (no pixel above the lower threshold) fails any threshold
        if settings.stability_score_thresh > 0.0
            && (stability.is_nan() || stability < settings.stability_score_thresh)
        {
            continue;
        }
        out.push(Candidate {
            low_res: low.to_vec(),
            bbox: logits_box(&logits, width),
            predicted_iou,
            stability,
        });
    }
    Ok(out)
}

/// `batched_mask_to_box` of the mask `logits > 0` (row-major, `width` wide): its first and last
/// columns and rows, all zero for an empty mask.
fn logits_box(logits: &[f32], width: usize) -> PixelBox {
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for (i, _) in logits
        .iter()
        .enumerate()
        .filter(|(_, v)| **v > MASK_THRESHOLD)
    {
        let (x, y) = (i % width, i / width);
        (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
    }
    if x0 == usize::MAX {
        return PixelBox {
            x0: 0.0,
            y0: 0.0,
            x1: 0.0,
            y1: 0.0,
        };
    }
    PixelBox {
        x0: x0 as f32,
        y0: y0 as f32,
        x1: x1 as f32,
        y1: y1 as f32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(x0: f32, y0: f32, x1: f32, y1: f32) -> PixelBox {
        PixelBox { x0, y0, x1, y1 }
    }

    #[test]
    fn grid_matches_numpy_linspace() {
        // build_point_grid(2): linspace(0.25, 0.75, 2)
        assert_eq!(
            point_grid(2),
            vec![[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]
        );
        assert_eq!(point_grid(1), vec![[0.5, 0.5]]);
        // build_point_grid(4) along x: 0.125, 0.375, 0.625, 0.875
        let g = point_grid(4);
        assert_eq!(g.len(), 16);
        let xs: Vec<f64> = g[..4].iter().map(|p| p[0]).collect();
        assert_eq!(xs, vec![0.125, 0.375, 0.625, 0.875]);
        assert!(g[4..8].iter().all(|p| p[1] == 0.375));
    }

    #[test]
    fn stability_is_iou_of_the_offset_thresholds() {
        // above 1: 2 values; above -1: 4 values
        let logits = [3.0, 1.5, 0.5, -0.5, -1.0, -2.0];
        assert_eq!(stability_score(&logits, 0.0, 1.0), 0.5);
        // strict comparisons: a value equal to a threshold is not above it
        assert_eq!(stability_score(&[1.0, 0.0], 0.0, 1.0), 0.0);
        assert!(stability_score(&[-1.0, -3.0], 0.0, 1.0).is_nan());
    }

    #[test]
    fn boxes_are_inclusive_and_empty_masks_get_a_zero_box() {
        #[rustfmt::skip]
        let logits = [
            -1.0, -1.0, -1.0, -1.0,
            -1.0,  0.5, -1.0, -1.0,
            -1.0, -1.0,  2.0,  0.0,
        ];
        assert_eq!(logits_box(&logits, 4), b(1.0, 1.0, 2.0, 2.0));
        assert_eq!(logits_box(&[0.0; 6], 3), b(0.0, 0.0, 0.0, 0.0));
    }

    #[test]
    fn nms_keeps_the_best_of_overlapping_boxes() {
        let boxes = [
            b(0.0, 0.0, 10.0, 10.0),
            b(1.0, 1.0, 10.0, 10.0), // IoU 0.81 with box 0
            b(20.0, 20.0, 30.0, 30.0),
            b(0.0, 0.0, 10.0, 5.0), // IoU 0.5 with box 0
        ];
        assert_eq!(nms(&boxes, &[0.9, 0.95, 0.5, 0.99], 0.7), vec![3, 1, 2]);
        assert_eq!(nms(&boxes, &[0.9, 0.8, 0.5, 0.7], 0.7), vec![0, 3, 2]);
        // ties keep the input order; a degenerate (zero-area) box never suppresses
        let dots = [b(5.0, 5.0, 5.0, 5.0), b(5.0, 5.0, 5.0, 5.0)];
        assert_eq!(nms(&dots, &[0.5, 0.5], 0.7), vec![0, 1]);
    }
}
