//! `sidbooth evaluate` and `sidbooth segment`, run as the real binary on images `sidbooth
//! generate` made with the tiny model, measured with the tiny CLIP, DINO and SAM of the
//! evaluator's parity fixtures (random weights: the numbers mean nothing, the plumbing does).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_sidbooth");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> String {
    root()
        .join("services/evaluate/fixtures")
        .join(name)
        .display()
        .to_string()
}

fn dog6() -> String {
    root().join("examples/dog6").display().to_string()
}

fn sidbooth(args: &[&str], cwd: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("runs the sidbooth binary")
}

#[track_caller]
fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "status {:?}\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

#[track_caller]
fn fails_with(o: Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected a failure: {err}");
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Two prompts, two images each, with attention maps for the one with the identifier.
fn generated(dir: &Path) -> PathBuf {
    let out = dir.join("generated");
    for prompt in ["a sks dog on the beach", "a sks dog in the snow"] {
        ok(sidbooth(
            &[
                "generate",
                "--tiny",
                "3",
                "--prompt",
                prompt,
                "--num-images",
                "2",
                "--steps",
                "3",
                "--attention-token",
                "sks",
                "--out",
                out.to_str().unwrap(),
            ],
            dir,
        ));
    }
    out
}

fn report(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap()
}

#[test]
fn evaluate_writes_both_reports_from_folders() {
    let dir = tempfile::tempdir().unwrap();
    let images = generated(dir.path());
    let out = dir.path().join("report");
    let o = ok(sidbooth(
        &[
            "evaluate",
            "--clip",
            &fixture("tiny-clip"),
            "--dino",
            &fixture("tiny-dino"),
            "--references",
            &dog6(),
            "--masks",
            &format!("{}/masks", dog6()),
            "--images",
            images.to_str().unwrap(),
            "--class",
            "dog",
            "--out",
            out.to_str().unwrap(),
        ],
        dir.path(),
    ));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("report.json") && stdout.contains("report.html"),
        "{stdout}"
    );
    let r = report(&out);
    assert_eq!(
        r["meaningful"], true,
        "directories are not flagged as random weights"
    );
    let prompts = r["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 2, "prompts come from the PNG text chunks");
    // In the order of the image files: generate names them by prompt.
    assert_eq!(prompts[0]["text"], "a dog in the snow");
    assert_eq!(prompts[1]["prompt"], "a sks dog on the beach");
    for p in prompts {
        assert_eq!(p["images"].as_array().unwrap().len(), 2);
        assert_eq!(
            p["pairs"]["references"],
            serde_json::json!(["00.jpg", "01.jpg", "02.jpg"])
        );
        assert!(p["images"][0]["attention"]
            .as_str()
            .unwrap()
            .contains("-attention-sks"));
    }
    for m in [
        "clip_i",
        "dino",
        "subject_alignment",
        "non_subject_disentanglement",
        "text_alignment",
    ] {
        assert!(r["measures"][m].is_f64(), "{m}: {}", r["measures"]);
    }
    assert_eq!(r["references"][0]["mask_source"], "uploaded");
    // No --sam: the attention of the generated images cannot be placed, and the report says why.
    let left: Vec<&str> = r["left_out"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["measure"].as_str().unwrap())
        .collect();
    assert_eq!(left, ["attention_on_subject"]);
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("a sks dog in the snow") && html.contains("data:image/"));
}

#[test]
fn evaluate_without_masks_or_sam_leaves_the_mask_measures_out() {
    let dir = tempfile::tempdir().unwrap();
    let images = generated(dir.path());
    let out = dir.path().join("report");
    ok(sidbooth(
        &[
            "evaluate",
            "--clip",
            &fixture("tiny-clip"),
            "--references",
            &dog6(),
            "--images",
            images.to_str().unwrap(),
            "--prompt",
            "a sks dog",
            "--class",
            "dog",
            "--token",
            "sks",
            "--out",
            out.to_str().unwrap(),
        ],
        dir.path(),
    ));
    let r = report(&out);
    assert_eq!(
        r["prompts"].as_array().unwrap().len(),
        1,
        "--prompt names every image's prompt"
    );
    assert_eq!(r["prompts"][0]["images"].as_array().unwrap().len(), 4);
    let reasons: Vec<(String, String)> = r["left_out"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["measure"].as_str().unwrap().into(),
                l["reason"].as_str().unwrap().into(),
            )
        })
        .collect();
    for m in [
        "dino",
        "subject_alignment",
        "non_subject_disentanglement",
        "attention_on_subject",
    ] {
        assert!(
            reasons.iter().any(|(name, _)| name == m),
            "{m} not left out: {reasons:?}"
        );
    }
    assert!(
        reasons
            .iter()
            .any(|(_, why)| why.contains("neither --masks nor --sam")),
        "{reasons:?}"
    );
    assert!(r["measures"]["subject_alignment"].is_null());
}

#[test]
fn evaluate_and_segment_refuse_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let d = dir.path();
    fails_with(
        sidbooth(
            &[
                "evaluate",
                "--clip",
                &fixture("tiny-clip"),
                "--references",
                &dog6(),
                "--images",
                empty.to_str().unwrap(),
                "--class",
                "dog",
                "--out",
                "o",
            ],
            d,
        ),
        "no PNG images",
    );
    fails_with(
        sidbooth(
            &[
                "evaluate",
                "--clip",
                empty.to_str().unwrap(),
                "--references",
                &dog6(),
                "--images",
                empty.to_str().unwrap(),
                "--class",
                "dog",
                "--out",
                "o",
            ],
            d,
        ),
        "config.json",
    );
    fails_with(
        sidbooth(
            &[
                "evaluate",
                "--clip",
                &fixture("tiny-clip"),
                "--references",
                &dog6(),
                "--masks",
                empty.to_str().unwrap(),
                "--images",
                &dog6(),
                "--class",
                "dog",
                "--out",
                "o",
            ],
            d,
        ),
        "--masks: no mask",
    );
    let photo = format!("{}/00.jpg", dog6());
    fails_with(
        sidbooth(
            &[
                "segment",
                "--sam",
                &fixture("tiny-sam"),
                "--image",
                &photo,
                "--box",
                "5,5,2,9",
                "--out",
                "m.png",
            ],
            d,
        ),
        "x0 < x1",
    );
    fails_with(
        sidbooth(
            &[
                "segment",
                "--sam",
                &fixture("tiny-sam"),
                "--image",
                &photo,
                "--out",
                "m.png",
            ],
            d,
        ),
        "give --clip DIR and --class NAME",
    );
}

#[test]
fn segment_writes_a_mask_of_the_photo_size() {
    let dir = tempfile::tempdir().unwrap();
    let photo = format!("{}/01.jpg", dog6());
    let out = dir.path().join("mask.png");
    ok(sidbooth(
        &[
            "segment",
            "--sam",
            &fixture("tiny-sam"),
            "--image",
            &photo,
            "--box",
            "150,60,620,760",
            "--out",
            out.to_str().unwrap(),
        ],
        dir.path(),
    ));
    let mask = image::open(&out).unwrap().to_luma8();
    let (w, h) = image::image_dimensions(&photo).unwrap();
    assert_eq!(mask.dimensions(), (w, h));
    assert!(
        mask.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255),
        "binary"
    );
}
