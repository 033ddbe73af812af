//! `sidbooth s3-server` as its own process: clients signing with its key store and read objects
//! through it, other keys are refused, and SIGTERM ends it cleanly.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use sidbooth_core::config::StorageArgs;
use sidbooth_core::storage::ArtifactStore;

const BIN: &str = env!("CARGO_BIN_EXE_sidbooth");

/// Kills the server if a test fails before stopping it.
struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn store(endpoint: &str, secret: &str) -> ArtifactStore {
    let args = StorageArgs {
        s3_endpoint: Some(endpoint.into()),
        s3_public_endpoint: None,
        s3_region: "us-east-1".into(),
        s3_bucket: "jobs".into(),
        s3_path_style: true,
        presign_ttl_secs: 60,
    };
    ArtifactStore::with_static_credentials(&args, "access", secret)
}

#[tokio::test]
async fn serves_a_folder_over_s3_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("s3");
    let mut child = Command::new(BIN)
        .args([
            "s3-server",
            "--dir",
            data.to_str().unwrap(),
            "--bind",
            "127.0.0.1:0",
        ])
        .args(["--bucket", "jobs"])
        .env("AWS_ACCESS_KEY_ID", "access")
        .env("AWS_SECRET_ACCESS_KEY", "secret")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let server = Server(child);
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let endpoint = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no endpoint in {line:?}"))
        .to_string();
    assert!(
        data.join("jobs").is_dir(),
        "the bucket's folder is made at start"
    );

    let s3 = store(&endpoint, "secret");
    s3.put("a/b.txt", "hello".into(), "text/plain")
        .await
        .unwrap();
    assert_eq!(&s3.get("a/b.txt").await.unwrap()[..], b"hello");
    let wrong = store(&endpoint, "not-the-secret");
    assert!(
        wrong.get("a/b.txt").await.is_err(),
        "another key reads nothing"
    );
    assert!(wrong.put("c.txt", "x".into(), "text/plain").await.is_err());

    let pid = server.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut server = server;
    let status = server.0.wait().unwrap();
    assert!(status.success(), "SIGTERM is a clean stop: {status:?}");
}
