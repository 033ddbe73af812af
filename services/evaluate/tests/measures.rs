//! The measures end to end: every pair matrix against transformers on tiny random-weight CLIP
//! and DINO (fixtures from scripts/parity/make_eval_fixtures.py: dog6 references with given
//! masks, dog3 photos as the generated images), and orderings that hold whatever the weights
//! because they come from structure the models see (an image against itself, against its own
//! segments).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::RgbImage;
use sidbooth_evaluate::{
    evaluator::Evaluators,
    mask::Mask,
    measures::{score_prompt, without_identifier, ImageFeatures},
    segments::{non_subject_segment, subject_segment},
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn rgb(path: &Path) -> RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

fn evaluators() -> Evaluators {
    Evaluators::load(
        Some(&fixtures().join("tiny-clip")),
        Some(&fixtures().join("tiny-dino")),
        None,
        &Device::Cpu,
    )
    .unwrap()
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}.png")).collect()
}

fn reference_matrix(
    reference: &candle_core::safetensors::MmapedSafetensors,
    name: &str,
) -> Vec<Vec<f64>> {
    let t: Tensor = reference.load(name, &Device::Cpu).unwrap();
    t.to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn max_error(ours: &[Vec<f64>], theirs: &[Vec<f64>]) -> f64 {
    assert_eq!(ours.len(), theirs.len());
    ours.iter()
        .zip(theirs)
        .flat_map(|(a, b)| {
            assert_eq!(a.len(), b.len());
            a.iter().zip(b).map(|(x, y)| (x - y).abs())
        })
        .fold(0.0, f64::max)
}

#[test]
fn every_pair_matrix_matches_transformers() {
    let dir = fixtures().join("measures");
    let reference = unsafe {
        candle_core::safetensors::MmapedSafetensors::new(
            fixtures().join("measures-reference.safetensors"),
        )
    }
    .unwrap();
    let models = evaluators();
    let photos: Vec<RgbImage> = names("ref", 3).iter().map(|n| rgb(&dir.join(n))).collect();
    let masks: Vec<Mask> = (0..3)
        .map(|i| {
            Mask::from_png(&std::fs::read(dir.join(format!("ref-{i}-mask.png"))).unwrap()).unwrap()
        })
        .collect();
    let generated: Vec<RgbImage> = names("gen", 4).iter().map(|n| rgb(&dir.join(n))).collect();

    let mask_refs: Vec<Option<&Mask>> = masks.iter().map(Some).collect();
    let refs = models.reference_features(&photos, &mask_refs).unwrap();
    let images = models
        .image_features(&generated, &[None; 4], &[None; 4])
        .unwrap();
    let text = models
        .text_features(&[without_identifier("a sks dog on the beach", "sks")])
        .unwrap()
        .remove(0);
    let scores = score_prompt(&names("ref", 3), &refs, &names("gen", 4), &images, &text);

    let pairs = &scores.pairs;
    let checks = [
        ("clip_i", pairs.clip_i.as_ref().unwrap()),
        ("dino", pairs.dino.as_ref().unwrap()),
        (
            "subject_alignment",
            pairs.subject_alignment.as_ref().unwrap(),
        ),
        (
            "non_subject_disentanglement",
            pairs.non_subject_disentanglement.as_ref().unwrap(),
        ),
    ];
    for (name, ours) in checks {
        let err = max_error(ours, &reference_matrix(&reference, name));
        println!("{name}: max error {err:.2e}");
        assert!(err <= 1e-3, "{name}: max error {err:.2e}");
    }
    let theirs: Tensor = reference.load("text_alignment", &Device::Cpu).unwrap();
    let theirs: Vec<f64> = theirs
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    let err = max_error(&[pairs.text_alignment.clone().unwrap()], &[theirs]);
    println!("text_alignment: max error {err:.2e}");
    assert!(err <= 1e-3, "text_alignment: max error {err:.2e}");

    // The segments are the same images: their sizes match what the script made.
    let sizes: Vec<[u32; 2]> = photos
        .iter()
        .zip(&masks)
        .map(|(p, m)| {
            let s = subject_segment(p, m).unwrap();
            [s.width(), s.height()]
        })
        .collect();
    assert_eq!(sizes, [[84, 84], [84, 84], [88, 88]]);
}

#[test]
fn orderings_that_hold_for_any_weights() {
    let dir = fixtures().join("measures");
    let models = evaluators();
    let photo = rgb(&dir.join("ref-0.png"));
    let mask = Mask::from_png(&std::fs::read(dir.join("ref-0-mask.png")).unwrap()).unwrap();
    let other = rgb(&dir.join("gen-0.png"));
    let subject = subject_segment(&photo, &mask).unwrap();
    let background = non_subject_segment(&photo, &mask);

    let refs = models
        .reference_features(std::slice::from_ref(&photo), &[Some(&mask)])
        .unwrap();
    // Generated: the reference itself, its subject alone, its background alone, another photo.
    let candidates = [photo.clone(), subject, background, other];
    let images: Vec<ImageFeatures> = models
        .image_features(&candidates, &[None; 4], &[None; 4])
        .unwrap();
    let text = models.text_features(&["a dog".into()]).unwrap().remove(0);
    let s = score_prompt(&["ref".into()], &refs, &names("y", 4), &images, &text);
    let row = |m: &Option<Vec<Vec<f64>>>| m.as_ref().unwrap()[0].clone();
    let (clip_i, dino) = (row(&s.pairs.clip_i), row(&s.pairs.dino));
    let (subject_alignment, nsd) = (
        row(&s.pairs.subject_alignment),
        row(&s.pairs.non_subject_disentanglement),
    );

    // An image is most similar to itself, in both embeddings.
    assert!((clip_i[0] - 1.0).abs() < 1e-5, "{clip_i:?}");
    assert!((dino[0] - 1.0).abs() < 1e-5, "{dino:?}");
    assert!(clip_i[0] > clip_i[3] && dino[0] > dino[3]);
    // The subject segment aligns perfectly with an image of exactly that subject segment.
    assert!(
        (subject_alignment[1] - 1.0).abs() < 1e-5,
        "{subject_alignment:?}"
    );
    assert!(subject_alignment
        .iter()
        .all(|&v| v <= subject_alignment[1] + 1e-9));
    // An image that is the reference's background has copied it completely: no
    // disentanglement at all, less than for any other image.
    assert!(nsd[2].abs() < 1e-5, "{nsd:?}");
    assert!(nsd.iter().all(|&v| v >= nsd[2] - 1e-9));
}
