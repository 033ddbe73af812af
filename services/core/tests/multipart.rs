//! Multipart uploads of large files against s3s-fs: an interrupted upload resumes with the
//! parts the server already has, and what lands is the file, byte for byte.

use rand::{Rng, SeedableRng};
use sidbooth_core::{testing::TestStorage, CoreError};

/// S3's smallest part (but for the last); s3s-fs enforces it as S3 does.
const PART: u64 = 5 * 1024 * 1024;

fn file_of(dir: &std::path::Path, len: usize, seed: u64) -> (std::path::PathBuf, Vec<u8>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
    let path = dir.join(format!("weights-{seed}.bin"));
    std::fs::write(&path, &bytes).unwrap();
    (path, bytes)
}

#[tokio::test]
async fn an_interrupted_upload_resumes_with_the_missing_parts_only() {
    let storage = TestStorage::start().await;
    let store = &storage.store;
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes) = file_of(dir.path(), 5 * PART as usize + 123, 1);
    let record = "work/uploads/weights.json";

    let stopped = store
        .put_file(
            "artifacts/e1/weights.bin",
            &path,
            "application/octet-stream",
            PART,
            record,
            Some(2),
        )
        .await;
    assert!(matches!(stopped, Err(CoreError::Storage(_))), "{stopped:?}");
    assert!(matches!(
        store.get("artifacts/e1/weights.bin").await,
        Err(CoreError::NotFound)
    ));
    assert!(store.get(record).await.is_ok(), "the upload is recorded");

    // Another worker (a later epoch) uploads the same file: it continues the recorded upload.
    let report = store
        .put_file(
            "artifacts/e2/weights.bin",
            &path,
            "application/octet-stream",
            PART,
            record,
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        report.key, "artifacts/e1/weights.bin",
        "the recorded upload's key"
    );
    assert_eq!((report.parts_reused, report.parts_sent), (2, 4));
    assert_eq!(
        store.get(&report.key).await.unwrap().as_ref(),
        bytes.as_slice()
    );
    assert!(
        matches!(store.get(record).await, Err(CoreError::NotFound)),
        "record removed"
    );

    // And it streams back into a file.
    let back = dir.path().join("back.bin");
    let size = store.get_to_file(&report.key, &back).await.unwrap();
    assert_eq!(size, bytes.len() as u64);
    assert_eq!(std::fs::read(&back).unwrap(), bytes);
    assert!(matches!(
        store
            .get_to_file("no/such/key", &dir.path().join("none.bin"))
            .await,
        Err(CoreError::NotFound)
    ));
    assert!(!dir.path().join("none.bin").exists());
}

#[tokio::test]
async fn a_different_file_starts_over_and_small_files_go_in_one_put() {
    let storage = TestStorage::start().await;
    let store = &storage.store;
    let dir = tempfile::tempdir().unwrap();
    let record = "work/uploads/w.json";
    let (first, _) = file_of(dir.path(), 3 * PART as usize, 2);
    let _ = store
        .put_file(
            "a/w.bin",
            &first,
            "application/octet-stream",
            PART,
            record,
            Some(1),
        )
        .await;
    // Same size, other content: the parts on the server are not this file's.
    let (second, bytes) = file_of(dir.path(), 3 * PART as usize, 3);
    let report = store
        .put_file(
            "a/w.bin",
            &second,
            "application/octet-stream",
            PART,
            record,
            None,
        )
        .await
        .unwrap();
    assert_eq!((report.parts_reused, report.parts_sent), (0, 3));
    assert_eq!(
        store.get("a/w.bin").await.unwrap().as_ref(),
        bytes.as_slice()
    );

    let (small, bytes) = file_of(dir.path(), 100, 4);
    let report = store
        .put_file(
            "a/small.bin",
            &small,
            "application/octet-stream",
            PART,
            record,
            None,
        )
        .await
        .unwrap();
    assert_eq!(report.parts_sent, 1);
    assert_eq!(
        store.get("a/small.bin").await.unwrap().as_ref(),
        bytes.as_slice()
    );
}
