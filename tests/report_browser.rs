//! `report.html` in a real browser: a report built by hand around real DreamBooth photos,
//! rendered, opened from `file://` in headless Chromium and checked as a reader would see it,
//! on a phone and on a laptop. Also checks that the browser harness itself notices a broken
//! page and leaves nothing behind.
//!
//! Set `SIDBOOTH_SCREENSHOT_DIR` to keep full-page screenshots of the report at both widths.

use std::{collections::BTreeMap, io::Cursor, path::Path};

use image::{DynamicImage, GrayImage, ImageFormat, Luma, Rgb, RgbImage};
use serde_json::json;
use sidbooth_domain::report::{
    ImageEntry, LeftOut, MaskSource, MeasureValues, ModelEntry, Pairs, PromptEntry, ReferenceEntry,
    Report, TrainingEntry, REPORT_VERSION,
};
use sidbooth_e2e::{
    browser::{assert_report_page_ok, Browser, ReportExpectations},
    dataset_photos,
};
use sidbooth_evaluate::report_html::{self, ReportAssets};

const SCRIPT_PROMPT: &str = "a sks dog <script>window.injected = 1</script> in the snow";

fn png(image: DynamicImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
        .unwrap();
    bytes
}

/// A smooth "generated" image, different for each seed.
fn generated(seed: u8) -> Vec<u8> {
    png(DynamicImage::ImageRgb8(RgbImage::from_fn(
        512,
        512,
        |x, y| Rgb([(x / 2) as u8, (y / 2) as u8, seed.wrapping_mul(80)]),
    )))
}

/// A subject mask the size of `photo`: an ellipse, or a box.
fn mask(photo: &[u8], ellipse: bool) -> (Vec<u8>, f64) {
    let photo = image::load_from_memory(photo).unwrap();
    let (w, h) = (photo.width() as f64, photo.height() as f64);
    let inside = |x: u32, y: u32| {
        let (dx, dy) = (
            (x as f64 - w / 2.0) / (w / 3.0),
            (y as f64 - h * 0.55) / (h / 3.0),
        );
        if ellipse {
            dx * dx + dy * dy <= 1.0
        } else {
            dx.abs() <= 1.0 && dy.abs() <= 1.0
        }
    };
    let mask = GrayImage::from_fn(photo.width(), photo.height(), |x, y| {
        Luma([if inside(x, y) { 255 } else { 0 }])
    });
    let coverage = mask.pixels().filter(|p| p.0[0] == 255).count() as f64 / (w * h);
    (png(DynamicImage::ImageLuma8(mask)), coverage)
}

fn values(base: f64) -> MeasureValues {
    MeasureValues {
        clip_i: Some(base + 0.1),
        dino: None,
        subject_alignment: Some(base),
        non_subject_disentanglement: Some(0.9 - base),
        text_alignment: Some(base / 2.5),
        attention_on_subject: Some(base - 0.2),
    }
}

/// Three dog6 photos (two masked, one cut description), two prompts of two images each (one
/// with its attention overlay), DINO left out, random weights everywhere.
fn sample() -> (Report, ReportAssets) {
    let mut assets = ReportAssets::new();
    let photos = dataset_photos("dog6", 3);
    let mut references = Vec::new();
    for (index, (name, bytes)) in photos.iter().enumerate() {
        let masked = index < 2;
        let mask_name = format!("masks/{index:02}.png");
        let coverage = masked.then(|| {
            let (mask, coverage) = mask(bytes, index == 0);
            assets.insert(&mask_name, "image/png", mask);
            coverage
        });
        assets.insert(name, "image/jpeg", bytes.clone());
        let long = index == 1;
        references.push(ReferenceEntry {
            name: name.clone(),
            description: Some(if long {
                "a sks dog sitting in front of a bright orange wall with a rough plaster \
                 texture, on a grey concrete floor with a faded white line painted across it, \
                 beside a green plastic bucket with a chipped rim and a coiled red garden hose, \
                 under a wooden shelf holding three clay pots with dry soil"
                    .into()
            } else {
                format!("a sks dog lying on a grey floor in front of an orange wall ({index})")
            }),
            description_tokens: Some(if long { 84 } else { 18 }),
            description_cut: long,
            mask: masked.then(|| mask_name.clone()),
            mask_source: masked.then_some(if index == 0 {
                MaskSource::SamVlmBox
            } else {
                MaskSource::Uploaded
            }),
            mask_coverage: coverage,
        });
    }
    let reference_names: Vec<String> = references.iter().map(|r| r.name.clone()).collect();

    let prompt_texts = ["a sks dog on the beach", SCRIPT_PROMPT];
    let mut prompts = Vec::new();
    for (p, prompt) in prompt_texts.iter().enumerate() {
        let mut images = Vec::new();
        for k in 0..2u8 {
            let name = format!("images/{p:02}-{k:02}.png");
            assets.insert(&name, "image/png", generated(p as u8 * 2 + k));
            let attention = (p == 0 && k == 0).then(|| {
                let overlay = "attention/00-00.png".to_owned();
                assets.insert(&overlay, "image/png", generated(9));
                overlay
            });
            images.push(ImageEntry {
                name,
                seed: Some(k as u64),
                attention,
                measures: values(0.6 + 0.05 * k as f64),
            });
        }
        let image_names: Vec<String> = images.iter().map(|i| i.name.clone()).collect();
        let matrix = |v: f64| Some(vec![vec![v, v + 0.02]; reference_names.len()]);
        prompts.push(PromptEntry {
            prompt: prompt.to_string(),
            text: prompt.replace("sks ", ""),
            measures: values(0.62),
            images,
            pairs: Pairs {
                references: reference_names.clone(),
                images: image_names,
                clip_i: matrix(0.7),
                dino: None,
                subject_alignment: matrix(0.6),
                non_subject_disentanglement: matrix(0.3),
                text_alignment: Some(vec![0.25, 0.26]),
                attention_on_subject: Some(vec![Some(0.4), Some(0.45)]),
            },
        });
    }

    let report = Report {
        version: REPORT_VERSION,
        job_id: Some("0195f3c2-7d1e-7c39-a2a4-5f0e6c1d2b3a".into()),
        created_at: "2026-12-01T12:00:00Z".into(),
        subject_class: "dog".into(),
        token: "sks".into(),
        meaningful: false,
        notices: vec![
            "Every model has random weights: the numbers test the pipeline only.".into(),
            "01.jpg: the description is longer than the text encoder reads.".into(),
            "02.jpg has no subject mask: it is left out of the segment measures.".into(),
        ],
        models: ["clip", "sam", "base_model"]
            .into_iter()
            .map(|role| ModelEntry {
                role: role.into(),
                name: format!("tiny-{role} (seed 7)"),
                random_weights: true,
            })
            .collect(),
        settings: json!({
            "subject_class": "dog",
            "stages": ["describe", "train", "generate", "evaluate"],
            "generate": {"prompts": prompt_texts, "images_per_prompt": 2, "steps": 50,
                         "guidance_scale": 7.5, "seed": 0},
        }),
        measures: values(0.61),
        left_out: vec![LeftOut {
            measure: "dino".into(),
            reason: "no DINO model is configured (SIDBOOTH_DINO_DIR)".into(),
        }],
        references,
        prompts,
        training: Some(TrainingEntry {
            method: "lora".into(),
            steps: 200,
            last_loss: Some(0.081),
            losses: (0..200)
                .map(|s| {
                    (
                        s,
                        0.08 + 0.3 / (1.0 + s as f64 / 10.0) + 0.01 * (s as f64).sin(),
                    )
                })
                .collect(),
        }),
        timings: BTreeMap::from([
            ("embedding".into(), 3.25),
            ("segmenting".into(), 1.5),
            ("attention".into(), 0.4),
        ]),
    };
    (report, assets)
}

fn file_url(path: &Path) -> String {
    format!("file://{}", path.canonicalize().unwrap().display())
}

#[test]
fn the_report_reads_well_in_a_browser() {
    let (report, assets) = sample();
    let html = report_html::render(&report, &assets);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.html");
    std::fs::write(&path, &html).unwrap();
    println!("report.html: {} bytes", html.len());

    let browser = Browser::launch().unwrap();
    let page = browser.open(&file_url(&path)).unwrap();
    assert_report_page_ok(&page, &ReportExpectations::of(&report));

    // The prompt with a script in it is shown as text, and nothing ran.
    let script = page
        .eval_json(
            "({scripts: document.scripts.length, injected: 'injected' in window,\
              heading: document.querySelector('#prompt-1 h3').textContent})",
        )
        .unwrap();
    assert_eq!(script["scripts"], 0, "{script}");
    assert_eq!(script["injected"], false, "{script}");
    assert!(
        script["heading"].as_str().unwrap().contains(SCRIPT_PROMPT),
        "{script}"
    );

    // What only this report has: a left-out measure with its reason, a cut description, a
    // reference without a mask, and the attention overlay.
    let text = page
        .eval_json("document.body.innerText")
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();
    for shown in [
        "Left out: no DINO model is configured (SIDBOOTH_DINO_DIR).",
        "Cut: longer than the text encoder reads",
        "No subject mask.",
        "paper (SID, DreamBooth)",
    ] {
        assert!(text.contains(shown), "{shown:?} is not on the page");
    }
    let attention = page
        .eval_json("document.querySelectorAll('img[data-asset=\"attention/00-00.png\"]').length")
        .unwrap();
    assert_eq!(attention, 1);

    for (width, height, mobile) in [(390, 844, true), (1280, 800, false)] {
        page.set_viewport(width, height, mobile).unwrap();
        // The page as laid out: the viewport less a laptop's scrollbar, and all of its height.
        let laid_out = page
            .eval_json(
                "[document.documentElement.clientWidth, document.documentElement.scrollHeight]",
            )
            .unwrap();
        let shot = page.screenshot_full_page().unwrap();
        let decoded = image::load_from_memory(&shot).unwrap();
        assert_eq!(
            json!([decoded.width(), decoded.height()]),
            laid_out,
            "screenshot at {width}px"
        );
        if let Some(keep) = std::env::var_os("SIDBOOTH_SCREENSHOT_DIR") {
            let file = Path::new(&keep).join(format!("report-{width}.png"));
            std::fs::write(&file, &shot).unwrap();
            println!("screenshot: {}", file.display());
        }
    }
}

#[test]
fn the_harness_reports_a_broken_page_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.html");
    std::fs::write(
        &path,
        "<!DOCTYPE html><title>broken</title><img src=\"absent.png\" alt=\"absent\">\
         <script>console.error('boom'); setTimeout(() => { throw new Error('bang'); });\
         </script>",
    )
    .unwrap();

    let browser = Browser::launch().unwrap();
    let profile = browser.profile().to_owned();
    let page = browser.open(&file_url(&path)).unwrap();
    let answer = page
        .eval_json("new Promise(done => setTimeout(() => done(6 * 7), 10))")
        .unwrap();
    assert_eq!(answer, 42);
    let errors = page.console_errors().unwrap();
    for expected in ["console.error: boom", "Error: bang", "absent.png"] {
        assert!(
            errors.iter().any(|e| e.contains(expected)),
            "{expected:?} missing from {errors:#?}"
        );
    }
    assert!(page.eval_json("undefined.x").is_err());

    drop(page);
    drop(browser);
    assert!(
        !profile.exists(),
        "the profile {} is left",
        profile.display()
    );
    let profile = profile.to_string_lossy().into_owned();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(&profile),
            "process {} outlived the browser",
            entry.file_name().to_string_lossy()
        );
    }
}
