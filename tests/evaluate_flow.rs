//! The whole pipeline with the evaluate stage, through the service, with the built-in tiny model
//! and tiny random evaluators: describe (with subject masks) -> train -> generate -> evaluate ->
//! succeeded, a report.json that is valid against its schema in openapi.yaml, a report.html
//! that a real browser shows without errors, a worker killed during evaluate taken over without
//! measuring finished images again, and evaluate refused on a worker without models.

use std::time::{Duration, Instant};

use sidbooth_e2e::{browser, dataset_photos, process::WorkerProcess, Stack};
use sidbooth_worker::WorkerConfig;

const WAIT: Duration = Duration::from_secs(240);

/// A worker with the tiny model and the tiny evaluators.
fn tiny_worker(stack: &Stack) -> WorkerConfig {
    let mut config = stack.worker_config();
    config.engine.tiny_model = Some(7);
    config.engine.checkpoint_every = 2;
    config.evaluate.tiny_evaluators = Some(7);
    config
}

fn manual_texts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("a photo of sks dog sitting in front of an orange wall, photo {i}"))
        .collect()
}

fn spec(prompts: &[&str], images_per_prompt: u32) -> serde_json::Value {
    serde_json::json!({
        "subject_class": "dog",
        "descriptions": {"source": "manual", "texts": manual_texts(3)},
        "stages": ["describe", "train", "generate", "evaluate"],
        "train": {"steps": 4, "rank": 2, "seed": 3},
        "generate": {"prompts": prompts, "images_per_prompt": images_per_prompt, "steps": 3, "seed": 11}
    })
}

/// Ellipse masks, one per photo, at half the photo's resolution (masks may have any size of
/// the photo's shape).
fn ellipse_masks(photos: &[(String, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    photos
        .iter()
        .map(|(name, bytes)| {
            let photo = image::load_from_memory(bytes).unwrap();
            let (w, h) = (photo.width() / 2, photo.height() / 2);
            let mask = image::GrayImage::from_fn(w, h, |x, y| {
                let dx = (x as f64 - w as f64 / 2.0) / (w as f64 * 0.3);
                let dy = (y as f64 - h as f64 * 0.6) / (h as f64 * 0.35);
                image::Luma([if dx * dx + dy * dy <= 1.0 { 255 } else { 0 }])
            });
            let mut png = Vec::new();
            mask.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .unwrap();
            let stem = name.rsplit_once('.').unwrap().0;
            (format!("{stem}.png"), png)
        })
        .collect()
}

async fn json(stack: &Stack, path: &str) -> serde_json::Value {
    let response = stack.get(path).send().await.unwrap();
    assert_eq!(response.status(), 200, "{path}");
    response.json().await.unwrap()
}

/// report.json against the `Report` schema of the served OpenAPI document.
fn assert_valid_report(report: &serde_json::Value) {
    let doc = serde_json::to_value(sidbooth_api::openapi::document()).unwrap();
    let schema = serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": "#/components/schemas/Report",
        "components": doc["components"],
    });
    let validator = jsonschema::validator_for(&schema).expect("the Report schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(report)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(errors.is_empty(), "report.json is not valid: {errors:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn describe_train_generate_evaluate_ends_with_a_report() {
    let mut stack = Stack::start().await;
    stack.start_worker(tiny_worker(&stack));
    let photos = dataset_photos("dog6", 3);
    let masks = ellipse_masks(&photos);
    let job = stack
        .submit_with_masks(
            spec(&["a sks dog on the beach", "a red car"], 2),
            &photos,
            &masks,
        )
        .await;
    let id = job["id"].as_str().unwrap().to_owned();
    let done = stack.wait_for(&id, "succeeded", WAIT).await;
    assert_eq!(
        done["stages_done"],
        serde_json::json!(["describe", "train", "generate", "evaluate"])
    );

    let artifacts = json(&stack, &format!("/v1/jobs/{id}/artifacts")).await;
    let names: Vec<&str> = artifacts["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    for expected in [
        "report.json",
        "report.html",
        "masks/00.png",
        "masks/01.png",
        "masks/02.png",
        "attention/00-00.npy",
        "attention/00-01.png",
    ] {
        assert!(names.contains(&expected), "{expected} missing: {names:?}");
    }

    // JSON by default, valid against its schema, with what the job measured.
    let report = json(&stack, &format!("/v1/jobs/{id}/report")).await;
    assert_valid_report(&report);
    assert_eq!(report["job_id"], id);
    assert_eq!(
        report["meaningful"], false,
        "tiny models make no meaningful numbers"
    );
    let prompts = report["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 2);
    assert_eq!(prompts[0]["text"], "a dog on the beach");
    let pairs = &prompts[0]["pairs"];
    assert_eq!(
        pairs["references"],
        serde_json::json!(["00-00.jpg", "01-01.jpg", "02-02.jpg"])
    );
    assert_eq!(
        pairs["images"],
        serde_json::json!(["images/00-00.png", "images/00-01.png"])
    );
    for measure in [
        "clip_i",
        "dino",
        "subject_alignment",
        "non_subject_disentanglement",
    ] {
        let m = pairs[measure]
            .as_array()
            .unwrap_or_else(|| panic!("{measure}: {pairs}"));
        assert_eq!(m.len(), 3, "{measure}: one row per reference");
        assert!(m.iter().all(|row| row.as_array().unwrap().len() == 2));
        assert!(report["measures"][measure].is_f64(), "{measure}");
    }
    assert!(report["measures"]["text_alignment"].is_f64());
    // The uploaded masks were used, and the references say so.
    for r in report["references"].as_array().unwrap() {
        assert_eq!(r["mask_source"], "uploaded", "{r}");
        assert!(r["description_tokens"].as_u64().unwrap() > 5);
    }
    // Attention was measured only where the prompt has the identifier.
    assert!(prompts[1]["pairs"]["attention_on_subject"].is_null());
    assert_eq!(report["training"]["steps"], 4);

    // Progress events of the evaluate stage counted the images.
    let events: Vec<serde_json::Value> = sqlx::query_scalar(
        "SELECT data FROM job_events WHERE job_id = $1::uuid AND kind = 'progress' ORDER BY id",
    )
    .bind(&id)
    .fetch_all(&stack.db.pool)
    .await
    .unwrap();
    let evaluated: Vec<i64> = events
        .iter()
        .filter(|e| e["stage"] == "evaluate")
        .map(|e| e["evaluated"].as_i64().unwrap())
        .collect();
    assert_eq!(evaluated, [1, 2, 3, 4]);

    // The page, as a browser asks for it, shows without errors.
    let response = stack
        .get(&format!("/v1/jobs/{id}/report"))
        .header("accept", "text/html,application/xhtml+xml,*/*;q=0.8")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = response.text().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("report.html");
    std::fs::write(&page, &html).unwrap();
    let browser = browser::Browser::launch().unwrap();
    let tab = browser.open(&format!("file://{}", page.display())).unwrap();
    let parsed: sidbooth_domain::report::Report = serde_json::from_value(report).unwrap();
    browser::assert_report_page_ok(&tab, &browser::ReportExpectations::of(&parsed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn masks_come_from_sam_with_the_vlm_box_and_are_replaceable_in_review() {
    let mut stack = Stack::start().await;
    stack.start_worker(tiny_worker(&stack));
    let photos = dataset_photos("dog6", 2);
    let mut spec = spec(&["a sks dog on the beach"], 1);
    spec["descriptions"]["texts"] = serde_json::json!(manual_texts(2));
    spec["review"] = serde_json::json!(true);
    let job = stack.submit(spec, &photos).await;
    let id = job["id"].as_str().unwrap().to_owned();
    stack.wait_for(&id, "awaiting_review", WAIT).await;

    // SAM made a mask per photo from the (fake) VLM's box; review shows them.
    let review = json(&stack, &format!("/v1/jobs/{id}/descriptions")).await;
    let descriptions = review["descriptions"].as_array().unwrap();
    for d in descriptions {
        let mask = &d["mask"];
        assert_eq!(mask["source"], "sam_vlm_box", "{d}");
        assert_eq!(mask["prompt_box"].as_array().unwrap().len(), 4);
        assert!(d["tokens"].as_u64().unwrap() <= d["token_limit"].as_u64().unwrap());
        let png = reqwest::get(mask["url"].as_str().unwrap())
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(sidbooth_imaging::Mask::from_png(&png).is_ok());
    }
    let box_requests = stack
        .vlm
        .requests()
        .iter()
        .filter(|r| {
            r.instruction
                .starts_with(sidbooth_describe::subject_box::BOX_INSTRUCTION_START)
        })
        .count();
    assert_eq!(box_requests, 2, "one box request per photo");

    // A bad replacement is refused and changes nothing; a good one replaces the mask.
    let bad = stack
        .put(&format!("/v1/jobs/{id}/masks/1"))
        .header("content-type", "image/png")
        .body(photos[0].1.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
    let problem: serde_json::Value = bad.json().await.unwrap();
    assert_eq!(
        problem["type"],
        "https://sidbooth.dev/problems/invalid-mask"
    );
    assert_eq!(problem["errors"][0]["code"], "mask_not_png");
    let good = ellipse_masks(&photos[1..2]).remove(0).1;
    let replaced = stack
        .put(&format!("/v1/jobs/{id}/masks/1"))
        .header("content-type", "image/png")
        .body(good)
        .send()
        .await
        .unwrap();
    assert_eq!(replaced.status(), 200);
    let after: serde_json::Value = replaced.json().await.unwrap();
    assert_eq!(after["descriptions"][1]["mask"]["source"], "uploaded");
    assert_eq!(after["descriptions"][0]["mask"]["source"], "sam_vlm_box");
    let out_of_range = stack
        .put(&format!("/v1/jobs/{id}/masks/2"))
        .body(ellipse_masks(&photos[..1]).remove(0).1)
        .send()
        .await
        .unwrap();
    assert_eq!(out_of_range.status(), 404);

    let approved = stack
        .post(&format!("/v1/jobs/{id}/approve"))
        .send()
        .await
        .unwrap();
    assert_eq!(approved.status(), 200);
    stack.wait_for(&id, "succeeded", WAIT).await;
    let report = json(&stack, &format!("/v1/jobs/{id}/report")).await;
    let sources: Vec<&str> = report["references"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["mask_source"].as_str().unwrap())
        .collect();
    assert_eq!(sources, ["sam_vlm_box", "uploaded"]);
    // Masks cannot change once the job has moved on.
    let late = stack
        .put(&format!("/v1/jobs/{id}/masks/0"))
        .body(ellipse_masks(&photos[..1]).remove(0).1)
        .send()
        .await
        .unwrap();
    assert_eq!(late.status(), 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn evaluate_without_models_fails_clearly_and_no_masks_is_a_warning() {
    let mut stack = Stack::start().await;
    let mut config = stack.worker_config();
    config.engine.tiny_model = Some(7);
    stack.start_worker(config);
    let photos = dataset_photos("dog6", 2);
    let mut spec = spec(&["a sks dog on the beach"], 1);
    spec["descriptions"]["texts"] = serde_json::json!(manual_texts(2));
    let job = stack.submit(spec, &photos).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let failed = stack.wait_for(&id, "failed", WAIT).await;
    assert_eq!(
        failed["error"]["code"], "evaluate_not_configured",
        "{failed}"
    );
    assert_eq!(failed["error"]["stage"], "evaluate");
    assert!(failed["error"]["message"]
        .as_str()
        .unwrap()
        .contains("SIDBOOTH_CLIP_DIR"));
    // Describe could not make masks without SAM, and said so instead of guessing.
    let warnings = failed["warnings"].as_array().unwrap();
    assert!(
        warnings.iter().any(|w| w["code"] == "masks_unavailable"),
        "{warnings:?}"
    );
    let problem = stack
        .get(&format!("/v1/jobs/{id}/report"))
        .send()
        .await
        .unwrap();
    assert_eq!(problem.status(), 404);
    let problem: serde_json::Value = problem.json().await.unwrap();
    assert_eq!(problem["type"], "https://sidbooth.dev/problems/no-report");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_during_evaluate_is_taken_over_without_measuring_images_again() {
    let stack = Stack::start().await;
    let photos = dataset_photos("dog6", 2);
    let mut spec = spec(
        &[
            "a sks dog on the beach",
            "a sks dog in the snow",
            "a sks dog in the jungle",
        ],
        2,
    );
    spec["descriptions"]["texts"] = serde_json::json!(manual_texts(2));
    let job = stack.submit(spec, &photos).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let tiny = [
        ("SIDBOOTH_TINY_MODEL", "7"),
        ("SIDBOOTH_TINY_EVALUATORS", "7"),
        ("SIDBOOTH_CHECKPOINT_EVERY", "2"),
    ];
    let mut first = WorkerProcess::spawn(&stack, &tiny);

    // Each generated image costs one box request to the (slowed) VLM during evaluate; kill the
    // worker once two of the six images are measured.
    let measured = |epoch_events: &[serde_json::Value]| {
        epoch_events
            .iter()
            .filter(|e| e["stage"] == "evaluate")
            .filter_map(|e| e["evaluated"].as_i64())
            .max()
            .unwrap_or(0)
    };
    let events = || async {
        sqlx::query_scalar::<_, serde_json::Value>(
            "SELECT data FROM job_events WHERE job_id = $1::uuid AND kind = 'progress' ORDER BY id",
        )
        .bind(&id)
        .fetch_all(&stack.db.pool)
        .await
        .unwrap()
    };
    let started = Instant::now();
    let mut slowed = false;
    loop {
        let all = events().await;
        if !slowed && all.iter().any(|e| e["stage"] == "generate") {
            stack.vlm.set_base_delay(Duration::from_millis(400));
            slowed = true;
        }
        if measured(&all) >= 2 {
            break;
        }
        if let Some(status) = first.exited() {
            panic!("the worker exited early with {status}");
        }
        assert!(started.elapsed() < WAIT, "the worker measured nothing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill();
    let before = events().await.len();
    let job = stack.job(&id).await;
    assert_eq!(job["status"], "running", "{job}");
    assert_eq!(job["stage"], "evaluate");
    let boxes_before = stack.vlm.requests().len();

    let _second = WorkerProcess::spawn(&stack, &tiny);
    stack.wait_for(&id, "succeeded", WAIT).await;
    let after = events().await;
    let resumed: Vec<i64> = after[before..]
        .iter()
        .filter(|e| e["stage"] == "evaluate")
        .map(|e| e["resumed"].as_i64().unwrap())
        .collect();
    assert!(
        !resumed.is_empty(),
        "the second worker reported no evaluate progress"
    );
    assert!(
        resumed.iter().all(|&r| r >= 2),
        "the second worker measured finished images again: {resumed:?}"
    );
    // Six images in all: the second worker asked for at most the boxes not measured yet (plus
    // the one request in flight at the kill).
    let new_box_requests = stack.vlm.requests().len() - boxes_before;
    assert!(
        new_box_requests <= 4,
        "{new_box_requests} box requests after the take-over"
    );
    let report = json(&stack, &format!("/v1/jobs/{id}/report")).await;
    assert_valid_report(&report);
    let images: usize = report["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["images"].as_array().unwrap().len())
        .sum();
    assert_eq!(images, 6);
}
