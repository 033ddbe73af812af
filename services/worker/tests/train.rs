//! The train and generate stages with the built-in tiny model: a worker killed mid-training is
//! taken over, and the new owner continues from the last checkpoint in storage instead of
//! starting again.

mod support;

use std::time::Duration;

use sidbooth_core::keys;
use sidbooth_domain::JobStatus;
use sidbooth_worker::ShutdownMode;
use support::{spawn, Env};

const WAIT: Duration = Duration::from_secs(120);

fn manual_train_spec(steps: u32) -> serde_json::Value {
    let texts: Vec<String> = (0..3)
        .map(|i| format!("a photo of sks dog in front of an orange wall, view {i}"))
        .collect();
    serde_json::json!({
        "subject_class": "dog",
        "descriptions": {"source": "manual", "texts": texts},
        "stages": ["describe", "train"],
        "train": {"steps": steps, "rank": 2, "seed": 1},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_training_resumes_from_the_last_checkpoint() {
    let env = Env::new().await;
    let id = env.create_job(manual_train_spec(60), 3).await;
    let mut config = env.config(ShutdownMode::FinishStage);
    config.engine.tiny_model = Some(5);
    config.engine.checkpoint_every = 5;
    let latest = keys::work(env.tenant, id, "train/latest");

    let first = spawn(env.worker_with(config.clone(), env.vlm_config()));
    env.wait_until("a checkpoint at step 10 or later", WAIT, || async {
        match env.storage.store.get(&latest).await {
            Ok(name) => String::from_utf8_lossy(&name).as_ref() >= "checkpoint-00000010",
            Err(_) => false,
        }
    })
    .await;
    first.task.abort();
    let _ = first.task.await;
    let checkpoint =
        String::from_utf8(env.storage.store.get(&latest).await.unwrap().to_vec()).unwrap();
    let resumed_at: u64 = checkpoint
        .trim_start_matches("checkpoint-")
        .parse()
        .unwrap();
    assert!(resumed_at < 60, "killed before the end: {checkpoint}");

    let second = spawn(env.worker_with(config, env.vlm_config()));
    env.wait_status(id, JobStatus::Succeeded, WAIT).await;
    second.stop().await;

    // After the takeover the first training step reported is the one after the checkpoint.
    let events = env.jobs.events_since(id, 0).await.unwrap();
    let takeover = events
        .iter()
        .filter(|e| e.kind == "status" && e.data["status"] == "running")
        .nth(1)
        .expect("a second claim")
        .id;
    let first_step_after = events
        .iter()
        .find(|e| e.id > takeover && e.kind == "progress" && e.data["stage"] == "train")
        .map(|e| e.data["step"].as_u64().unwrap())
        .expect("training progress after the takeover");
    assert_eq!(
        first_step_after,
        resumed_at + 1,
        "resumed from {checkpoint}"
    );

    let artifacts = env.jobs.artifacts(id).await.unwrap();
    let training = artifacts
        .iter()
        .find(|a| a.name == "training.json")
        .unwrap();
    let summary: serde_json::Value =
        serde_json::from_slice(&env.storage.store.get(&training.object_key).await.unwrap())
            .unwrap();
    assert_eq!(summary["resumed_from"], checkpoint.as_str());
    assert_eq!(summary["steps"], 60);
    assert!(artifacts.iter().any(|a| a.name == "lora.safetensors"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_without_a_model_fails_with_a_clear_error() {
    let env = Env::new().await;
    let id = env.create_job(manual_train_spec(2), 3).await;
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
