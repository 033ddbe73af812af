//! The demo a newcomer runs first: submit the example photos as a describe job through the real
//! HTTP API, follow it to the end, and show the descriptions and artifacts.

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

    let spec = if vlm_configured {
        serde_json::json!({
            "subject_class": manual.subject_class,
            "token": manual.token,
            "descriptions": {"case": "sid", "source": "vlm"},
        })
    } else {
        serde_json::json!({
            "subject_class": manual.subject_class,
            "token": manual.token,
            "descriptions": {"case": "sid", "source": "manual", "texts": manual.descriptions},
        })
    };
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
        "demo: submitted describe job {id} for {} photos from {} ({} descriptions)",
        files.len(),
        photos.display(),
        if vlm_configured { "VLM" } else { "manual" }
    );

    let started = Instant::now();
    let job = loop {
        let job: serde_json::Value = http
            .get(format!("{api_url}/v1/jobs/{id}"))
            .header("Authorization", &auth)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let status = job["status"].as_str().unwrap_or_default().to_owned();
        if matches!(
            status.as_str(),
            "succeeded" | "failed" | "canceled" | "awaiting_review"
        ) {
            break job;
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("demo: job {id} still {status} after 5 minutes");
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

    let descriptions: serde_json::Value = http
        .get(format!("{api_url}/v1/jobs/{id}/descriptions"))
        .header("Authorization", &auth)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    println!("{}", serde_json::to_string_pretty(&descriptions)?);

    let artifacts: serde_json::Value = http
        .get(format!("{api_url}/v1/jobs/{id}/artifacts"))
        .header("Authorization", &auth)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let out_dir = data_dir.join("demo");
    std::fs::create_dir_all(&out_dir)?;
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
        std::fs::write(&path, &bytes)?;
        eprintln!(
            "demo: {name} ({} bytes) downloaded through its presigned URL to {}",
            bytes.len(),
            path.display()
        );
    }
    Ok(())
}
