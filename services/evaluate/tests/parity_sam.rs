//! Parity with segment-anything on the tiny random-weight SAM in `fixtures/tiny-sam`, and the
//! automatic mask generator's invariants. References come from
//! `scripts/parity/make_sam_fixtures.py` (torch, fp32, CPU) on `fixtures/sam-photo.png`, a crop
//! of DreamBooth's dog6/00.jpg.
//!
//! Tolerance for tensors: `max |ours - ref| <= 1e-4 * max |ref|` or `<= 1e-3` absolute.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use sidbooth_evaluate::mask::PixelBox;
use sidbooth_evaluate::sam::automatic::{nms, point_grid, stability_score};
use sidbooth_evaluate::sam::rel_pos::get_rel_pos;
use sidbooth_evaluate::sam::transforms::Postprocess;
use sidbooth_evaluate::sam::{Proposal, ProposalSettings, Sam};
use sidbooth_evaluate::EvalError;

const RTOL: f32 = 1e-4;
const ATOL: f32 = 1e-3;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("sam-reference.safetensors"), &Device::Cpu)
        .unwrap()
}

fn model() -> Sam {
    Sam::load(&fixtures().join("tiny-sam"), &Device::Cpu).unwrap()
}

fn photo() -> RgbImage {
    image::open(fixtures().join("sam-photo.png"))
        .unwrap()
        .to_rgb8()
}

fn boxes(r: &HashMap<String, Tensor>) -> Vec<PixelBox> {
    let rows: Vec<Vec<f32>> = r["boxes"].to_vec2().unwrap();
    rows.iter()
        .map(|b| PixelBox {
            x0: b[0],
            y0: b[1],
            x1: b[2],
            y1: b[3],
        })
        .collect()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Panics when `ours` is off by more than the tolerance; returns the error.
fn assert_close(name: &str, ours: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(ours.dims(), want.dims(), "{name}: shape");
    let err = max_abs(
        &(ours.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap()).unwrap(),
    );
    let mag = max_abs(&want.to_dtype(DType::F32).unwrap());
    eprintln!(
        "{name}: max abs err {err:.3e}, relative {:.3e} (max |ref| {mag:.3})",
        err / mag
    );
    assert!(
        err.is_finite() && (err <= RTOL * mag || err <= ATOL),
        "{name}: max abs err {err:e} (max |ref| {mag})"
    );
    err
}

#[test]
fn preprocessing_matches_sam_predictor() {
    let r = reference();
    let (input, input_size) = model().preprocess(&photo()).unwrap();
    let want: Vec<i64> = r["input_size"].to_vec1().unwrap();
    assert_eq!(input_size, (want[0] as usize, want[1] as usize));
    // same Pillow resize, same arithmetic: exact up to float rounding
    let err = assert_close("input", &input, &r["input"]);
    assert!(err < 1e-5, "input differs by {err}");
}

#[test]
fn embedding_and_box_prompts_match_sam_predictor() {
    let r = reference();
    let sam = model();
    let emb = sam.embed(&photo()).unwrap();
    assert_close("embedding", &emb.features, &r["embedding"]);
    for (multimask, tag) in [(true, "multi"), (false, "single")] {
        let pred = sam.predict_boxes(&emb, &boxes(&r), multimask).unwrap();
        assert_eq!(
            (pred.len(), pred.masks_per_prompt()),
            (2, if multimask { 3 } else { 1 })
        );
        assert_close(
            &format!("low_res_{tag}"),
            &pred.low_res_logits,
            &r[&format!("low_res_{tag}")],
        );
        assert_close(
            &format!("iou_{tag}"),
            &pred.iou_predictions,
            &r[&format!("iou_{tag}")],
        );
    }
}

#[test]
fn point_prompts_match_the_automatic_generators() {
    let r = reference();
    let sam = model();
    let emb = sam.embed(&photo()).unwrap();
    let points: Vec<[f64; 2]> = r["points"]
        .to_vec2::<f64>()
        .unwrap()
        .iter()
        .map(|p| [p[0], p[1]])
        .collect();
    let pred = sam.predict_points(&emb, &points, true).unwrap();
    assert_close("low_res_points", &pred.low_res_logits, &r["low_res_points"]);
    assert_close("iou_points", &pred.iou_predictions, &r["iou_points"]);
}

#[test]
fn box_mask_matches_sam_predictor() {
    let r = reference();
    let sam = model();
    let photo = photo();
    let want = image::open(fixtures().join("sam-reference-mask.png"))
        .unwrap()
        .to_luma8();
    let b = boxes(&r)[0];
    let mask = sam.mask_for_box(&photo, b).unwrap();
    assert_eq!(mask.dimensions(), photo.dimensions());
    let emb = sam.embed(&photo).unwrap();
    let logits = sam
        .predict_boxes(&emb, &[b], false)
        .unwrap()
        .logits(0, 0)
        .unwrap();
    let w = photo.width();
    let (mut equal, mut counted, mut total_equal) = (0usize, 0usize, 0usize);
    for (x, y, p) in want.enumerate_pixels() {
        let same = mask.get(x, y) == (p.0[0] == 255);
        total_equal += usize::from(same);
        // a logit this close to the threshold may fall either side of it
        if logits[(y * w + x) as usize].abs() >= 1e-3 {
            counted += 1;
            equal += usize::from(same);
        }
    }
    let n = want.len();
    let agreement = equal as f64 / counted as f64;
    eprintln!(
        "mask: {agreement:.6} of {counted} decided pixels agree ({total_equal} of {n} overall); \
         subject {} px",
        mask.area()
    );
    assert!(counted as f64 > 0.99 * n as f64);
    assert!(agreement >= 0.999, "mask agreement {agreement}");
}

/// Runs the generator with the reference's settings and the given box NMS threshold.
fn generate(sam: &Sam, photo: &RgbImage, box_nms_thresh: f32) -> Vec<Proposal> {
    let settings = ProposalSettings {
        points_per_side: 4,
        points_per_batch: 5,
        pred_iou_thresh: 0.3,
        stability_score_thresh: 0.46,
        stability_score_offset: 0.1,
        box_nms_thresh,
    };
    sam.proposals(photo, &settings).unwrap()
}

#[test]
fn proposals_match_the_automatic_mask_generator() {
    let r = reference();
    let sam = model();
    let photo = photo();
    for (nms_thresh, tag) in [(1.0, "amg"), (0.7, "amg_nms")] {
        let got = generate(&sam, &photo, nms_thresh);
        let want_boxes: Vec<Vec<f32>> = r[&format!("{tag}_boxes")].to_vec2().unwrap();
        let want_iou: Vec<f32> = r[&format!("{tag}_iou")].to_vec1().unwrap();
        let want_stability: Vec<f32> = r[&format!("{tag}_stability")].to_vec1().unwrap();
        let want_area: Vec<i64> = r[&format!("{tag}_area")].to_vec1().unwrap();
        assert_eq!(got.len(), want_iou.len(), "{tag}: number of proposals");
        for (i, p) in got.iter().enumerate() {
            let b = &want_boxes[i];
            let ours = [p.bbox.x0, p.bbox.y0, p.bbox.x1, p.bbox.y1];
            assert!(
                ours.iter().zip(b).all(|(a, b)| (a - b).abs() <= 1.0),
                "{tag} {i}: box {ours:?} vs {b:?}"
            );
            assert!(
                (p.predicted_iou - want_iou[i]).abs() < 1e-4,
                "{tag} {i}: iou"
            );
            assert!(
                (p.stability - want_stability[i]).abs() < 1e-3,
                "{tag} {i}: stability"
            );
            let area = p.mask.area() as f64;
            assert!(
                (area - want_area[i] as f64).abs() <= 1e-3 * want_area[i] as f64,
                "{tag} {i}: area"
            );
        }
        eprintln!("{tag}: {} proposals agree", got.len());
    }
}

#[test]
fn helpers_match_segment_anything_and_torchvision() {
    let r = reference();
    let grid: Vec<Vec<f64>> = r["grid_16"].to_vec2().unwrap();
    let ours: Vec<Vec<f64>> = point_grid(16).iter().map(|p| p.to_vec()).collect();
    assert_eq!(ours, grid);

    let table = &r["rel_pos_table"];
    assert_close(
        "rel_pos_3_3",
        &get_rel_pos(3, 3, table).unwrap(),
        &r["rel_pos_3_3"],
    );
    assert_close(
        "rel_pos_2_4",
        &get_rel_pos(2, 4, table).unwrap(),
        &r["rel_pos_2_4"],
    );

    let low = r["post_low"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let post = Postprocess::new(32, 64, (64, 54), (150, 127)).apply(&low);
    let post = Tensor::from_vec(post, (1, 1, 150, 127), &Device::Cpu).unwrap();
    assert_close("postprocess_masks", &post, &r["post_out"]);

    let logits = &r["stability_logits"];
    let want: Vec<f32> = r["stability"].to_vec1().unwrap();
    for (i, w) in want.iter().enumerate() {
        let map = logits
            .get(i)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(stability_score(&map, 0.0, 1.0), *w, "stability {i}");
    }

    let rows: Vec<Vec<f32>> = r["nms_boxes"].to_vec2().unwrap();
    let boxes: Vec<PixelBox> = rows
        .iter()
        .map(|b| PixelBox {
            x0: b[0],
            y0: b[1],
            x1: b[2],
            y1: b[3],
        })
        .collect();
    let scores: Vec<f32> = r["nms_scores"].to_vec1().unwrap();
    let keep: Vec<usize> = nms(&boxes, &scores, 0.3);
    let want: Vec<i64> = r["nms_keep"].to_vec1().unwrap();
    assert_eq!(keep, want.iter().map(|&i| i as usize).collect::<Vec<_>>());
}

/// Copies a SAM directory without one tensor.
fn without_tensor(src: &Path, dst: &Path, name: &str) {
    let mut ts =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(ts.remove(name).is_some(), "{name} is in the fixture");
    candle_core::safetensors::save(&ts, dst.join("model.safetensors")).unwrap();
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
}

#[test]
fn a_missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "image_encoder.blocks.1.attn.rel_pos_w",
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "mask_decoder.transformer.layers.1.norm4.bias",
    ] {
        without_tensor(&fixtures().join("tiny-sam"), dir.path(), name);
        match Sam::load(dir.path(), &Device::Cpu) {
            Err(EvalError::MissingTensor { name: missing, .. }) => assert_eq!(missing, name),
            Err(other) => panic!("{name}: expected MissingTensor, got {other}"),
            Ok(_) => panic!("{name}: loaded without it"),
        }
    }
}

#[test]
fn a_config_that_does_not_fit_the_weights_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-sam");
    std::fs::copy(
        src.join("model.safetensors"),
        dir.path().join("sam_vit_tiny.safetensors"),
    )
    .unwrap();
    // no config.json: ViT-B sizes, which these weights do not have
    match Sam::load(dir.path(), &Device::Cpu) {
        Err(EvalError::Config { reason, .. }) => {
            assert!(
                reason.contains("image_encoder.patch_embed.proj.weight"),
                "{reason}"
            )
        }
        Err(other) => panic!("expected a shape error, got {other}"),
        Ok(_) => panic!("ViT-B sizes loaded the tiny weights"),
    }
}

#[test]
fn the_tiny_dir_loads_as_the_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    Sam::write_tiny_dir(7, dir.path()).unwrap();
    let loaded = Sam::load(dir.path(), &Device::Cpu).unwrap();
    let built = Sam::tiny(7, &Device::Cpu).unwrap();
    assert_eq!(loaded.config(), built.config());
    let photo = RgbImage::from_fn(40, 30, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 8) as u8, 90])
    });
    let a = loaded.embed(&photo).unwrap();
    let b = built.embed(&photo).unwrap();
    assert_eq!(max_abs(&(a.features - b.features).unwrap()), 0.0);
    let other = Sam::tiny(8, &Device::Cpu).unwrap().embed(&photo).unwrap();
    assert!(max_abs(&(other.features - loaded.embed(&photo).unwrap().features).unwrap()) > 1e-3);
}

/// A dark photo with a white rectangle and a red disc.
fn shapes() -> RgbImage {
    RgbImage::from_fn(160, 120, |x, y| {
        let (dx, dy) = (x as i32 - 120, y as i32 - 50);
        if (20..70).contains(&x) && (30..100).contains(&y) {
            image::Rgb([250, 250, 250])
        } else if dx * dx + dy * dy < 400 {
            image::Rgb([220, 30, 30])
        } else {
            image::Rgb([10, 20, 40])
        }
    })
}

/// The value below which a share `q` of `values` lies.
fn quantile(mut values: Vec<f32>, q: f32) -> f32 {
    values.sort_by(f32::total_cmp);
    values[(values.len() as f32 * q) as usize]
}

/// Checks `kept = proposals(settings)` against `all`, the proposals of the same grid with no
/// threshold and no suppression; returns how many passed the thresholds.
fn check_invariants(
    all: &[Proposal],
    kept: &[Proposal],
    settings: &ProposalSettings,
    size: (u32, u32),
) -> usize {
    let passes = |p: &Proposal| {
        p.predicted_iou > settings.pred_iou_thresh
            && (settings.stability_score_thresh <= 0.0
                || p.stability >= settings.stability_score_thresh)
    };
    for (i, p) in kept.iter().enumerate() {
        assert!(passes(p), "proposal {i} fails the thresholds");
        assert_eq!(p.mask.dimensions(), size);
        assert_eq!(p.mask.bbox(), Some(p.bbox));
        if i > 0 {
            assert!(
                kept[i - 1].predicted_iou >= p.predicted_iou,
                "sorted by predicted IoU"
            );
        }
        for q in &kept[..i] {
            assert!(
                q.bbox.iou(&p.bbox) <= settings.box_nms_thresh,
                "proposal {i} overlaps"
            );
        }
    }
    // every passing mask NMS dropped overlaps a kept one that scored at least as high
    let passing: Vec<&Proposal> = all.iter().filter(|p| passes(p)).collect();
    for p in &passing {
        let is_kept = kept
            .iter()
            .any(|k| k.bbox == p.bbox && k.predicted_iou == p.predicted_iou);
        let covered = kept.iter().any(|k| {
            k.predicted_iou >= p.predicted_iou && k.bbox.iou(&p.bbox) > settings.box_nms_thresh
        });
        assert!(
            is_kept || covered,
            "a passing mask was dropped without a reason"
        );
    }
    passing.len()
}

#[test]
fn proposals_pass_the_thresholds_and_do_not_overlap() {
    let sam = Sam::tiny(9, &Device::Cpu).unwrap();
    let photo = shapes();
    let open = ProposalSettings {
        points_per_side: 6,
        points_per_batch: 12,
        pred_iou_thresh: 0.0,
        stability_score_thresh: 0.0,
        stability_score_offset: 0.1,
        box_nms_thresh: 1.0,
    };
    // with no threshold and nothing suppressed, every mask of every prompt comes back
    let all = sam.proposals(&photo, &open).unwrap();
    assert_eq!(all.len(), 36 * 3);
    let ious = || all.iter().map(|p| p.predicted_iou).collect::<Vec<_>>();
    // thresholds at the medians; then an IoU threshold alone, which keeps several boxes apart
    let strict = ProposalSettings {
        pred_iou_thresh: quantile(ious(), 0.5),
        stability_score_thresh: quantile(
            all.iter()
                .map(|p| p.stability)
                .filter(|s| *s > 0.0)
                .collect(),
            0.5,
        ),
        box_nms_thresh: 0.8,
        ..open.clone()
    };
    let loose = ProposalSettings {
        pred_iou_thresh: quantile(ious(), 0.3),
        box_nms_thresh: 0.8,
        ..open.clone()
    };
    for (settings, min_kept) in [(strict, 1), (loose, 2)] {
        let kept = sam.proposals(&photo, &settings).unwrap();
        let passing = check_invariants(&all, &kept, &settings, photo.dimensions());
        eprintln!(
            "{} masks, {passing} pass the thresholds, {} kept by NMS",
            all.len(),
            kept.len()
        );
        assert!(kept.len() >= min_kept && passing < all.len() && kept.len() < passing);
    }
}
