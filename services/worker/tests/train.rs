//! The train stage with the built-in tiny model, for every method: a worker killed mid-training
//! is taken over, and the new owner continues from the last checkpoint in storage instead of
//! starting again.

mod support;

use std::time::Duration;

use bytes::Bytes;
use sidbooth_core::keys;
use sidbooth_domain::JobStatus;
use sidbooth_engine::train::checkpoint::{OPTIMIZER_FILE, STATE_FILE, TRAINABLE_FILE};
use sidbooth_worker::ShutdownMode;
use support::{spawn, Env};

const WAIT: Duration = Duration::from_secs(120);

fn manual_train_spec(train: serde_json::Value) -> serde_json::Value {
    let texts: Vec<String> = (0..3)
        .map(|i| format!("a photo of sks dog in front of an orange wall, view {i}"))
        .collect();
    serde_json::json!({
        "subject_class": "dog",
        "descriptions": {"source": "manual", "texts": texts},
        "stages": ["describe", "train"],
        "train": train,
    })
}

/// Trains `train` (24 steps, a checkpoint every 4), aborts the worker once a checkpoint at step
/// 8 or later is in storage, and lets a second worker finish: its first step is the one after
/// that checkpoint, and the method's output (`marker` among its files) is stored.
async fn killed_mid_training_resumes(train: serde_json::Value, marker: &str) {
    let env = Env::new().await;
    let id = env.create_job(manual_train_spec(train), 3).await;
    let mut config = env.config(ShutdownMode::FinishStage);
    config.engine.tiny_model = Some(5);
    config.engine.checkpoint_every = 4;
    let latest = keys::work(env.tenant, id, "train/latest");

    let first = spawn(env.worker_with(config.clone(), env.vlm_config()));
    env.wait_until("a checkpoint at step 8 or later", WAIT, || async {
        match env.storage.store.get(&latest).await {
            Ok(name) => String::from_utf8_lossy(&name).as_ref() >= "checkpoint-00000008",
            Err(_) => false,
        }
    })
    .await;
    first.task.abort();
    let _ = first.task.await;
    let checkpoint =
        String::from_utf8(env.storage.store.get(&latest).await.unwrap().to_vec()).unwrap();
    let killed_at: u64 = checkpoint
        .trim_start_matches("checkpoint-")
        .parse()
        .unwrap();
    assert!(killed_at < 24, "killed before the end: {checkpoint}");

    let second = spawn(env.worker_with(config, env.vlm_config()));
    env.wait_status(id, JobStatus::Succeeded, WAIT).await;
    second.stop().await;

    // The run that finished resumed from the checkpoint the killed worker left, or a later
    // one (on a loaded machine a worker may lose its lease and the job be claimed again), never
    // from scratch; and the first training step after that last claim is the one after its
    // checkpoint.
    let artifacts = env.jobs.artifacts(id).await.unwrap();
    let training = artifacts
        .iter()
        .find(|a| a.name == "training.json")
        .unwrap();
    let summary: serde_json::Value =
        serde_json::from_slice(&env.storage.store.get(&training.object_key).await.unwrap())
            .unwrap();
    assert_eq!(summary["steps"], 24);
    let resumed_from = summary["resumed_from"]
        .as_str()
        .expect("a resumed run")
        .to_owned();
    assert!(
        resumed_from >= checkpoint,
        "resumed from {resumed_from}, the killed worker left {checkpoint}"
    );
    let resumed_at: u64 = resumed_from
        .trim_start_matches("checkpoint-")
        .parse()
        .unwrap();
    let events = env.jobs.events_since(id, 0).await.unwrap();
    let claims: Vec<_> = events
        .iter()
        .filter(|e| e.kind == "status" && e.data["status"] == "running")
        .collect();
    assert!(claims.len() >= 2, "a second claim: {claims:?}");
    let takeover = claims.last().unwrap().id;
    let first_step_after = events
        .iter()
        .find(|e| e.id > takeover && e.kind == "progress" && e.data["stage"] == "train")
        .map(|e| e.data["step"].as_u64().unwrap())
        .expect("training progress after the takeover");
    assert_eq!(
        first_step_after,
        resumed_at + 1,
        "resumed from {resumed_from}"
    );

    let names: Vec<&str> = artifacts.iter().map(|a| a.name.as_str()).collect();
    assert!(
        names.contains(&format!("weights/{marker}").as_str()),
        "{marker} missing from {names:?}"
    );
    // Only the newest checkpoint is kept in storage: its three files, the pointer, and no
    // upload records.
    let work: Vec<String> = env
        .storage
        .store
        .list(&keys::work(env.tenant, id, ""))
        .await
        .unwrap();
    let blobs = work.iter().filter(|k| k.contains("/work/b-")).count();
    assert_eq!(blobs, 3, "{work:#?}");
    assert!(!work.iter().any(|k| k.ends_with(".upload")), "{work:#?}");

    // Training counted against the tenant's accelerator seconds of the day.
    let (_, usage) = sidbooth_core::quotas::QuotaStore::new(env.db.pool.clone())
        .standing(env.tenant)
        .await
        .unwrap();
    assert!(usage.gpu_seconds_today > 0.0, "{usage:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_resumes_from_the_last_checkpoint_after_a_kill() {
    killed_mid_training_resumes(
        serde_json::json!({"method": "lora", "steps": 24, "rank": 2, "seed": 1}),
        "pytorch_lora_weights.safetensors",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dreambooth_resumes_from_the_last_checkpoint_after_a_kill() {
    killed_mid_training_resumes(
        serde_json::json!({"method": "dreambooth", "steps": 24, "seed": 1,
                           "num_class_images": 2}),
        "model_index.json",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn textual_inversion_resumes_from_the_last_checkpoint_after_a_kill() {
    killed_mid_training_resumes(
        serde_json::json!({"method": "textual_inversion", "steps": 24, "seed": 1,
                           "num_vectors": 2}),
        "learned_embeds.safetensors",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_diffusion_resumes_from_the_last_checkpoint_after_a_kill() {
    killed_mid_training_resumes(
        serde_json::json!({"method": "custom_diffusion", "steps": 24, "seed": 1,
                           "num_class_images": 2}),
        "pytorch_custom_diffusion_weights.safetensors",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svdiff_resumes_from_the_last_checkpoint_after_a_kill() {
    killed_mid_training_resumes(
        serde_json::json!({"method": "svdiff", "steps": 24, "seed": 1}),
        "spectral_shifts.safetensors",
    )
    .await;
}

/// A worker killed while it uploaded a checkpoint leaves that checkpoint's files (and the record
/// of an unfinished multipart upload) where no `latest` pointer names them; the checkpoint
/// journal does, and the next owner's first checkpoint deletes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_of_a_checkpoint_a_killed_worker_left_half_uploaded_are_deleted() {
    let env = Env::new().await;
    let id = env
        .create_job(
            manual_train_spec(serde_json::json!({"method": "lora", "steps": 8, "rank": 2})),
            3,
        )
        .await;
    let store = &env.storage.store;
    let blob = |file: &str| {
        keys::blob(
            env.tenant,
            id,
            "work",
            &format!("train/checkpoint-00000099/{file}"),
        )
    };
    let orphans = [blob(TRAINABLE_FILE), blob(OPTIMIZER_FILE)];
    for key in &orphans {
        store
            .put(
                key,
                Bytes::from_static(b"partial"),
                "application/octet-stream",
            )
            .await
            .unwrap();
    }
    // The record of the third file's upload, to a server that no longer knows the upload.
    let record = format!(
        "{}.upload",
        keys::blob(
            env.tenant,
            id,
            "work",
            &format!("upload/work/train/checkpoint-00000099/{STATE_FILE}")
        )
    );
    let upload = serde_json::json!({"key": blob(STATE_FILE), "upload_id": "gone",
                                    "part_size": 5242880, "size": 20000000, "parts": {}});
    store
        .put(&record, Bytes::from(upload.to_string()), "application/json")
        .await
        .unwrap();
    store
        .put(
            &keys::work(env.tenant, id, "train/written"),
            Bytes::from_static(br#"["checkpoint-00000099"]"#),
            "application/json",
        )
        .await
        .unwrap();

    let mut config = env.config(ShutdownMode::FinishStage);
    config.engine.tiny_model = Some(5);
    config.engine.checkpoint_every = 4;
    let worker = spawn(env.worker_with(config, env.vlm_config()));
    env.wait_status(id, JobStatus::Succeeded, WAIT).await;
    worker.stop().await;

    let work = store.list(&keys::work(env.tenant, id, "")).await.unwrap();
    for key in orphans.iter().chain([&record]) {
        assert!(!work.contains(key), "{key} left in {work:#?}");
    }
    let last = |file: &str| {
        keys::blob(
            env.tenant,
            id,
            "work",
            &format!("train/checkpoint-00000008/{file}"),
        )
    };
    for file in [TRAINABLE_FILE, OPTIMIZER_FILE, STATE_FILE] {
        assert!(work.contains(&last(file)), "{file} of the last checkpoint");
    }
    assert_eq!(
        work.iter().filter(|k| k.contains("/work/b-")).count(),
        3,
        "{work:#?}"
    );
    let journal = store
        .get(&keys::work(env.tenant, id, "train/written"))
        .await
        .unwrap();
    assert_eq!(&journal[..], br#"["checkpoint-00000008"]"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_without_a_model_fails_with_a_clear_error() {
    let env = Env::new().await;
    let id = env
        .create_job(manual_train_spec(serde_json::json!({"steps": 2})), 3)
        .await;
    let worker = spawn(env.worker());
    let job = env.wait_status(id, JobStatus::Failed, WAIT).await;
    worker.stop().await;
    let error = job.error.expect("an error");
    assert_eq!(error.code, "model_not_configured");
    assert!(
        error.message.contains("SIDBOOTH_MODEL_DIR"),
        "{}",
        error.message
    );
}
