//! The whole pipeline through the service with the built-in tiny model, for every training
//! method: manual descriptions -> training -> sampling -> succeeded, with the method's files
//! under `weights/`, the training log, the images and the attention maps downloadable through
//! presigned URLs.

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
                "train": {"method": "lora", "steps": 4, "rank": 2, "seed": 3},
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
        "weights/pytorch_lora_weights.safetensors",
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
    let lora = download("weights/pytorch_lora_weights.safetensors").await;
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

/// PNG text chunks of an image.
fn png_text(bytes: &[u8]) -> Vec<(String, String)> {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes.to_vec()));
    let reader = decoder.read_info().unwrap();
    reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect()
}

/// Trains `train` through the API and samples one prompt with the identifier: the job
/// succeeds, `files` are among the `weights/` artifacts, and the images say which method made
/// them and carry the prompt as the method reads it (`<sks>` for the methods that learn a new
/// token).
async fn trains_and_samples(train: serde_json::Value, files: &[&str], method: &str, prompt: &str) {
    let mut stack = Stack::start().await;
    let mut config = stack.worker_config();
    config.engine.tiny_model = Some(7);
    config.engine.checkpoint_every = 2;
    stack.start_worker(config);
    let photos = dataset_photos("dog6", 2);
    let texts: Vec<String> = (0..2)
        .map(|i| format!("a photo of sks dog on a wooden floor beside a red ball, photo {i}"))
        .collect();
    let job = stack
        .submit(
            serde_json::json!({
                "subject_class": "dog",
                "descriptions": {"source": "manual", "texts": texts},
                "stages": ["describe", "train", "generate"],
                "train": train,
                "generate": {"prompts": ["a sks dog on the beach"], "images_per_prompt": 1,
                             "steps": 3, "seed": 11}
            }),
            &photos,
        )
        .await;
    let id = job["id"].as_str().unwrap().to_owned();
    let done = stack
        .wait_for(&id, "succeeded", Duration::from_secs(300))
        .await;
    assert_eq!(done["spec"]["train"]["method"], method, "{done}");

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
    for file in files {
        let name = format!("weights/{file}");
        assert!(
            names.contains(&name.as_str()),
            "{name} missing from {names:?}"
        );
    }
    let url = |name: &str| {
        artifacts
            .iter()
            .find(|a| a["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing from {names:?}"))["url"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let http = reqwest::Client::new();
    let get = |u: String| {
        let http = http.clone();
        async move {
            let response = http
                .get(u)
                .send()
                .await
                .unwrap()
                .error_for_status()
                .unwrap();
            response.bytes().await.unwrap()
        }
    };
    let training: serde_json::Value =
        serde_json::from_slice(&get(url("training.json")).await).unwrap();
    assert_eq!(training["method"], method, "{training}");
    let image = get(url("images/00-00.png")).await;
    let text = png_text(&image);
    assert!(text.contains(&("method".into(), method.into())), "{text:?}");
    assert!(text.contains(&("prompt".into(), prompt.into())), "{text:?}");
    image::load_from_memory(&image).unwrap();
    // The identifier's attention map was recorded for the rewritten token too.
    assert!(names.contains(&"attention/00-00.npy"), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dreambooth_through_the_service() {
    trains_and_samples(
        serde_json::json!({"method": "dreambooth", "steps": 3, "num_class_images": 1,
                           "single_file": true}),
        &[
            "model_index.json",
            "unet/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors",
            "sd_checkpoint.safetensors",
        ],
        "dreambooth",
        "a sks dog on the beach",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn textual_inversion_through_the_service() {
    trains_and_samples(
        serde_json::json!({"method": "textual_inversion", "steps": 3, "num_vectors": 2,
                           "a1111": true}),
        &["learned_embeds.safetensors", "<sks>.safetensors"],
        "textual_inversion",
        "a <sks> dog on the beach",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn custom_diffusion_through_the_service() {
    trains_and_samples(
        serde_json::json!({"method": "custom_diffusion", "steps": 3, "num_class_images": 1}),
        &[
            "pytorch_custom_diffusion_weights.safetensors",
            "<sks>.safetensors",
        ],
        "custom_diffusion",
        "a <sks> dog on the beach",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn svdiff_through_the_service() {
    trains_and_samples(
        serde_json::json!({"method": "svdiff", "steps": 3, "train_text_encoder": true,
                           "merged_pipeline": true}),
        &[
            "spectral_shifts.safetensors",
            "spectral_shifts_te.safetensors",
            "merged_pipeline/model_index.json",
        ],
        "svdiff",
        "a sks dog on the beach",
    )
    .await;
}
