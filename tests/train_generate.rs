//! The whole pipeline through the service with the built-in tiny model: manual descriptions ->
//! LoRA training -> sampling -> succeeded, with the weights, the training log, the images and
//! the attention maps downloadable through presigned URLs.

use std::time::Duration;

use sidbooth_e2e::{dataset_photos, Stack};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn describe_train_generate_with_the_tiny_model() {
    let mut stack = Stack::start().await;
    let mut config = stack.worker_config();
    config.engine.tiny_model = Some(7);
    config.engine.checkpoint_every = 2;
    stack.start_worker(config);
    let photos = dataset_photos("dog6", 3);
    let texts: Vec<String> = (0..3)
        .map(|i| format!("a photo of sks dog sitting in front of an orange wall, photo {i}"))
        .collect();

    let job = stack
        .submit(
            serde_json::json!({
                "subject_class": "dog",
                "descriptions": {"source": "manual", "texts": texts},
                "stages": ["describe", "train", "generate"],
                "train": {"steps": 4, "rank": 2, "seed": 3},
                "generate": {
                    "prompts": ["a sks dog on the beach", "a red car"],
                    "images_per_prompt": 2,
                    "steps": 3,
                    "seed": 11
                }
            }),
            &photos,
        )
        .await;
    let id = job["id"].as_str().unwrap().to_owned();
    let done = stack
        .wait_for(&id, "succeeded", Duration::from_secs(120))
        .await;
    assert_eq!(
        done["stages_done"],
        serde_json::json!(["describe", "train", "generate"])
    );

    // Progress events carried the training steps and losses.
    let events: Vec<(String, serde_json::Value)> =
        sqlx::query_as("SELECT kind, data FROM job_events WHERE job_id = $1::uuid ORDER BY id")
            .bind(&id)
            .fetch_all(&stack.db.pool)
            .await
            .unwrap();
    let train_steps: Vec<i64> = events
        .iter()
        .filter(|(kind, data)| kind == "progress" && data["stage"] == "train")
        .map(|(_, data)| {
            assert!(data["loss"].as_f64().unwrap().is_finite(), "{data}");
            data["step"].as_i64().unwrap()
        })
        .collect();
    assert_eq!(train_steps.last(), Some(&4), "{events:?}");

    let artifacts: serde_json::Value = stack
        .get(&format!("/v1/jobs/{id}/artifacts"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let artifacts = artifacts["artifacts"].as_array().unwrap().clone();
    let names: Vec<&str> = artifacts
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    for expected in [
        "captions.zip",
        "descriptions.json",
        "lora.safetensors",
        "training.json",
        "images/00-00.png",
        "images/00-01.png",
        "images/01-00.png",
        "images/01-01.png",
        "attention/00-00.png",
        "attention/00-01.png",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    assert!(
        !names.contains(&"attention/01-00.png"),
        "no [v] in the second prompt: {names:?}"
    );

    let http = reqwest::Client::new();
    let download = |name: &str| {
        let artifact = artifacts
            .iter()
            .find(|a| a["name"] == name)
            .unwrap()
            .clone();
        let http = http.clone();
        async move {
            http.get(artifact["url"].as_str().unwrap())
                .send()
                .await
                .unwrap()
                .error_for_status()
                .unwrap()
                .bytes()
                .await
                .unwrap()
        }
    };

    // The LoRA is a diffusers-layout safetensors file with our metadata.
    let lora = download("lora.safetensors").await;
    let header_len = u64::from_le_bytes(lora[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&lora[8..8 + header_len]).unwrap();
    let metadata = &header["__metadata__"];
    assert!(metadata.to_string().contains("sks"), "{metadata}");
    assert!(
        header
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.starts_with("unet.") && k.ends_with("lora_A.weight")),
        "{header}"
    );

    let training: serde_json::Value =
        serde_json::from_slice(&download("training.json").await).unwrap();
    assert_eq!(training["steps"], 4);
    assert_eq!(training["losses"].as_array().unwrap().len(), 4);

    // Images decode, carry their prompt and seed, and seeds repeat across prompts.
    for (name, prompt, seed) in [
        ("images/00-00.png", "a sks dog on the beach", "11"),
        ("images/00-01.png", "a sks dog on the beach", "12"),
        ("images/01-01.png", "a red car", "12"),
    ] {
        let bytes = download(name).await;
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes.to_vec()));
        let reader = decoder.read_info().unwrap();
        let text: Vec<(String, String)> = reader
            .info()
            .uncompressed_latin1_text
            .iter()
            .map(|t| (t.keyword.clone(), t.text.clone()))
            .collect();
        assert!(
            text.contains(&("prompt".into(), prompt.into())),
            "{name}: {text:?}"
        );
        assert!(
            text.contains(&("seed".into(), seed.into())),
            "{name}: {text:?}"
        );
        image::load_from_memory(&bytes).unwrap();
    }
}
