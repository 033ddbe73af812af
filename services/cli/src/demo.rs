//! The demo a newcomer runs first: submit the example photos as a job through the real HTTP API
//! (describe, train, generate on the DreamBooth prompts, evaluate), follow it to the end, show the
//! descriptions and the measures, and download the artifacts, `report.html` among them.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

#[derive(Deserialize)]
struct ManualDescriptions {
    subject_class: String,
    token: String,
    descriptions: Vec<String>,
}

/// `GET url` with the API key, as JSON.
async fn get_json(http: &reqwest::Client, auth: &str, url: &str) -> Result<serde_json::Value> {
    Ok(http
        .get(url)
        .header("Authorization", auth)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

pub async fn run(
    api_url: &str,
    key: &str,
    photos: &Path,
    vlm_configured: bool,
    data_dir: &Path,
) -> Result<()> {
    let manual: ManualDescriptions = serde_json::from_slice(
        &std::fs::read(photos.join("manual-descriptions.json")).with_context(|| {
            format!(
                "reading {}",
                photos.join("manual-descriptions.json").display()
            )
        })?,
    )?;
    let mut files: Vec<_> = std::fs::read_dir(photos)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "jpg" || e == "png" || e == "webp")
        })
        .collect();
    files.sort();
    if files.len() != manual.descriptions.len() {
        bail!(
            "{} photos but {} manual descriptions",
            files.len(),
            manual.descriptions.len()
        );
    }

    let descriptions = if vlm_configured {
        serde_json::json!({"case": "sid", "source": "vlm"})
    } else {
        serde_json::json!({"case": "sid", "source": "manual", "texts": manual.descriptions})
    };
    // Short training and sampling: the demo shows every stage in a minute on a laptop; the
    // paper's settings (1000 steps, 50 DDIM steps, 4 images per prompt) are the spec defaults.
    let spec = serde_json::json!({
        "subject_class": manual.subject_class,
        "token": manual.token,
        "descriptions": descriptions,
        "stages": ["describe", "train", "generate", "evaluate"],
        "train": {"steps": 30, "rank": 4, "seed": 0},
        "generate": {"images_per_prompt": 1, "steps": 20, "seed": 0},
    });
    let mut form = reqwest::multipart::Form::new().part(
        "spec",
        reqwest::multipart::Part::text(spec.to_string()).mime_str("application/json")?,
    );
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        form = form.part(
            "images",
            reqwest::multipart::Part::bytes(std::fs::read(file)?)
                .file_name(name)
                .mime_str("image/jpeg")?,
        );
    }
    // Subject masks beside the photos (masks/<stem>.png) go with them; without, the worker
    // makes them with SAM.
    let mask_of = |file: &Path| {
        let stem = file
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        photos.join("masks").join(format!("{stem}.png"))
    };
    let with_masks = files.iter().all(|f| mask_of(f).is_file());
    if with_masks {
        for file in &files {
            let mask = mask_of(file);
            let name = mask.file_name().unwrap().to_string_lossy().into_owned();
            form = form.part(
                "masks",
                reqwest::multipart::Part::bytes(std::fs::read(&mask)?)
                    .file_name(name)
                    .mime_str("image/png")?,
            );
        }
    }

    let http = reqwest::Client::new();
    let auth = format!("Bearer {key}");
    let created: serde_json::Value = http
        .post(format!("{api_url}/v1/jobs"))
        .header("Authorization", &auth)
        .multipart(form)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = created["id"]
        .as_str()
        .context("job id in the response")?
        .to_owned();
    eprintln!(
        "demo: submitted job {id} (describe, train, generate, evaluate) for {} photos from {} \
         ({} descriptions, {})",
        files.len(),
        photos.display(),
        if vlm_configured { "VLM" } else { "manual" },
        if with_masks {
            "with their masks"
        } else {
            "masks made by SAM"
        }
    );

    let started = Instant::now();
    let job = loop {
        let job = get_json(&http, &auth, &format!("{api_url}/v1/jobs/{id}")).await?;
        let status = job["status"].as_str().unwrap_or_default().to_owned();
        if matches!(
            status.as_str(),
            "succeeded" | "failed" | "canceled" | "awaiting_review"
        ) {
            break job;
        }
        if started.elapsed() > Duration::from_secs(900) {
            bail!("demo: job {id} still {status} after 15 minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let status = job["status"].as_str().unwrap_or_default();
    eprintln!(
        "demo: job {id} {status} in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    if status != "succeeded" {
        bail!("demo: job {id} ended {status}: {}", job["error"]);
    }

    let descriptions = get_json(
        &http,
        &auth,
        &format!("{api_url}/v1/jobs/{id}/descriptions"),
    )
    .await?;
    println!("{}", serde_json::to_string_pretty(&descriptions)?);

    let report = get_json(&http, &auth, &format!("{api_url}/v1/jobs/{id}/report")).await?;
    eprintln!(
        "demo: measures over {} prompts:",
        report["prompts"].as_array().map_or(0, Vec::len)
    );
    for (name, value) in report["measures"].as_object().into_iter().flatten() {
        match value.as_f64() {
            Some(v) => eprintln!("  {name:>28}: {v:.4}"),
            None => eprintln!("  {name:>28}: left out"),
        }
    }
    if report["meaningful"] == false {
        eprintln!(
            "  (tiny random-weight models: the numbers show the pipeline works, not quality)"
        );
    }

    let artifacts = get_json(&http, &auth, &format!("{api_url}/v1/jobs/{id}/artifacts")).await?;
    let out_dir = data_dir.join("demo");
    std::fs::create_dir_all(&out_dir)?;
    let (mut count, mut total) = (0usize, 0usize);
    for artifact in artifacts["artifacts"].as_array().into_iter().flatten() {
        let name = artifact["name"].as_str().unwrap_or("artifact");
        let url = artifact["url"].as_str().context("artifact url")?;
        let bytes = http
            .get(url)
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        let path = out_dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, &bytes)?;
        count += 1;
        total += bytes.len();
        // The per-image artifacts are many; name the ones a newcomer opens.
        if !name.contains('/') {
            eprintln!(
                "demo: {name} ({} bytes) downloaded through its presigned URL to {}",
                bytes.len(),
                path.display()
            );
        }
    }
    eprintln!(
        "demo: {count} artifacts ({:.1} MB) in {}",
        total as f64 / 1e6,
        out_dir.display()
    );
    eprintln!(
        "demo: open {} in a browser to read the report",
        out_dir.join("report.html").display()
    );
    Ok(())
}
