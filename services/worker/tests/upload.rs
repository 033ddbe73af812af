//! A multi-part weights upload broken off midway (its worker died after a few parts) is finished
//! by the job's next owner: it sends only the parts the server lacks, and the artifact it
//! records is the file byte for byte. Parts are S3's smallest, 5 MiB, so a 16 MiB file stands
//! in for a multi-GB pipeline.

mod support;

use std::time::Duration;

use sha2::{Digest, Sha256};
use sidbooth_core::{keys, Queue};
use sidbooth_worker::io::JobIo;
use support::{queue_settings, Env};

const PART: u64 = 5 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_weights_upload_is_finished_by_the_next_owner() {
    let env = Env::new().await;
    let spec = serde_json::json!({"subject_class": "dog"});
    let id = env.create_job(spec, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("unet.safetensors");
    let bytes: Vec<u8> = (0..(3 * PART + 1234) as usize)
        .map(|i| ((i * 31 + i / 4099) % 251) as u8)
        .collect();
    std::fs::write(&path, &bytes).unwrap();
    let name = "weights/unet/diffusion_pytorch_model.safetensors";

    // The first owner sends two of the four parts, then dies.
    let first = Queue::new(env.db.pool.clone(), queue_settings());
    let claimed = first.claim().await.unwrap().expect("the job is claimable");
    assert_eq!(claimed.lease.job_id, id);
    let io = JobIo::new(&first, &env.jobs, &env.storage.store, &claimed.lease, PART)
        .with_upload_limit(2);
    let broken = io.store_file(name, "application/octet-stream", &path).await;
    assert!(broken.is_err(), "{broken:?}");
    assert!(
        env.jobs.artifacts(id).await.unwrap().is_empty(),
        "nothing recorded"
    );
    let work_files = || async {
        env.storage
            .store
            .list(&keys::work(env.tenant, id, ""))
            .await
            .unwrap()
    };
    assert_eq!(work_files().await.len(), 1, "the upload is recorded");

    // Its lease lapses; another worker claims the job and uploads the same file.
    tokio::time::sleep(Duration::from_secs_f64(queue_settings().lease_secs + 0.3)).await;
    let second = Queue::new(env.db.pool.clone(), queue_settings());
    let claimed_again = second.claim().await.unwrap().expect("the lease lapsed");
    assert!(claimed_again.lease.epoch > claimed.lease.epoch);
    let io = JobIo::new(
        &second,
        &env.jobs,
        &env.storage.store,
        &claimed_again.lease,
        PART,
    );
    let report = io
        .store_file(name, "application/octet-stream", &path)
        .await
        .unwrap();
    assert_eq!(
        (report.parts_reused, report.parts_sent),
        (2, 2),
        "{report:?}"
    );
    // The key is derived from the epoch the upload started under, so the second owner
    // finished the first owner's upload rather than starting its own.
    let started_under = keys::blob(
        env.tenant,
        id,
        "artifacts",
        &format!("e{}/{name}", claimed.lease.epoch),
    );
    assert_eq!(
        report.key, started_under,
        "the upload keeps the key it started under"
    );

    let artifacts = env.jobs.artifacts(id).await.unwrap();
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    let artifact = &artifacts[0];
    assert_eq!(artifact.name, name);
    assert_eq!(artifact.object_key, report.key);
    assert_eq!(artifact.size, bytes.len() as i64);
    assert_eq!(artifact.sha256, hex::encode(Sha256::digest(&bytes)));
    let stored = env.storage.store.get(&artifact.object_key).await.unwrap();
    assert!(
        stored.as_ref() == bytes.as_slice(),
        "the object is the file"
    );
    // The record of the finished upload is gone.
    let left = work_files().await;
    assert!(left.is_empty(), "{left:?}");
}
