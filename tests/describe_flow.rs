//! The first thing a user does with sidbooth, end to end: five photos of dog6 are described
//! (SID) by the VLM, reviewed, one description edited, approved, and the artifacts downloaded
//! through their presigned URLs.

use std::{collections::HashSet, io::Read, time::Duration};

use sidbooth_e2e::{dataset_photos, Stack};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn describe_review_edit_approve_download() {
    let mut stack = Stack::start().await;
    let config = stack.worker_config();
    stack.start_worker(config);
    let photos = dataset_photos("dog6", 5);

    let job = stack
        .submit(
            serde_json::json!({
                "subject_class": "dog",
                "descriptions": {"case": "sid", "source": "vlm"},
                "review": true,
            }),
            &photos,
        )
        .await;
    let id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(job["status"], "queued");

    stack
        .wait_for(&id, "awaiting_review", Duration::from_secs(60))
        .await;

    // The VLM saw every photo once, downsized, with the SID instruction and our key.
    let requests = stack.vlm.requests();
    assert_eq!(requests.len(), 5, "one request per photo");
    let mut seen = HashSet::new();
    for request in &requests {
        assert_eq!(request.model, "fake-gpt");
        assert_eq!(request.authorization(), Some("Bearer vlm-test-key"));
        assert!(
            request.instruction.contains("a photo of sks dog"),
            "{}",
            request.instruction
        );
        assert_eq!(request.images.len(), 1);
        let (w, h) = request.images[0].dimensions.expect("a decodable image");
        assert!(w.max(h) <= 512, "sent downsized, got {w}x{h}");
        seen.insert(request.images[0].sha256.clone());
    }
    assert_eq!(seen.len(), 5, "five different photos were sent");

    // Review: read, edit one, approve.
    let descriptions: serde_json::Value = stack
        .get(&format!("/v1/jobs/{id}/descriptions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let list = descriptions["descriptions"].as_array().unwrap();
    assert_eq!(list.len(), 5);
    for (i, d) in list.iter().enumerate() {
        assert_eq!(d["index"], i);
        assert_eq!(d["case"], "sid");
        assert!(
            d["text"]
                .as_str()
                .unwrap()
                .starts_with("a photo of sks dog"),
            "{d}"
        );
        assert!(d["problem"].is_null(), "{d}");
    }
    let edited = "a photo of sks dog sitting in front of a bright orange wall with a green leaf at the right edge";
    let response = stack
        .put(&format!("/v1/jobs/{id}/descriptions"))
        .json(&serde_json::json!({"descriptions": [{"index": 2, "text": edited}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());

    let response = stack
        .post(&format!("/v1/jobs/{id}/approve"))
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{}",
        response.text().await.unwrap()
    );
    let done = stack
        .wait_for(&id, "succeeded", Duration::from_secs(60))
        .await;
    assert_eq!(done["stages_done"], serde_json::json!(["describe"]));
    assert_eq!(
        stack.vlm.requests().len(),
        5,
        "approval does not describe again"
    );

    // Artifacts, downloaded without credentials through their presigned URLs.
    let artifacts: serde_json::Value = stack
        .get(&format!("/v1/jobs/{id}/artifacts"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let artifacts = artifacts["artifacts"].as_array().unwrap();
    let find = |name: &str| {
        artifacts
            .iter()
            .find(|a| a["name"] == name)
            .unwrap_or_else(|| panic!("artifact {name} missing: {artifacts:?}"))
            .clone()
    };
    let download = |a: serde_json::Value| {
        let http = reqwest::Client::new();
        async move {
            let bytes = http
                .get(a["url"].as_str().unwrap())
                .send()
                .await
                .unwrap()
                .error_for_status()
                .unwrap()
                .bytes()
                .await
                .unwrap();
            assert_eq!(bytes.len() as i64, a["size"].as_i64().unwrap());
            bytes
        }
    };

    let json_artifact = find("descriptions.json");
    assert_eq!(json_artifact["content_type"], "application/json");
    let descriptions_json: serde_json::Value =
        serde_json::from_slice(&download(json_artifact).await).unwrap();
    let entries = descriptions_json
        .as_array()
        .or_else(|| descriptions_json["descriptions"].as_array())
        .expect("a list of descriptions");
    assert_eq!(entries.len(), 5);
    assert_eq!(entries[2]["text"], edited);
    for entry in entries {
        assert_eq!(entry["case"], "sid");
        assert_eq!(entry["model"], "fake-gpt");
        assert!(
            !entry["instruction"].as_str().unwrap_or_default().is_empty(),
            "{entry}"
        );
        assert!(entry["file_name"].as_str().is_some(), "{entry}");
    }

    let zip_artifact = find("captions.zip");
    assert_eq!(zip_artifact["content_type"], "application/zip");
    let bytes = download(zip_artifact).await;
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes.to_vec())).unwrap();
    let names: Vec<String> = archive.file_names().map(str::to_owned).collect();
    let images: Vec<&String> = names.iter().filter(|n| n.ends_with(".jpg")).collect();
    let texts: Vec<&String> = names.iter().filter(|n| n.ends_with(".txt")).collect();
    assert_eq!(images.len(), 5, "{names:?}");
    assert_eq!(texts.len(), 5, "{names:?}");
    for image in &images {
        let stem = image.trim_end_matches(".jpg");
        assert!(
            texts.contains(&&format!("{stem}.txt")),
            "{image} has no caption in {names:?}"
        );
    }
    let mut captions = Vec::new();
    for name in texts {
        let mut text = String::new();
        archive
            .by_name(name)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert!(text.starts_with("a photo of sks dog"), "{name}: {text}");
        captions.push(text.trim().to_owned());
    }
    assert!(
        captions.iter().any(|c| c == edited),
        "the edit is in the captions"
    );
}
