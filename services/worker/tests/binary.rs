//! The `sidbooth-worker` binary: configuration from the environment, a job run end to end,
//! Prometheus metrics, and a graceful exit on SIGTERM.

mod support;

use std::{process::Stdio, time::Duration};

use sidbooth_core::testing::TestStorage;
use sidbooth_domain::JobStatus;
use support::Env;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_runs_a_job_serves_metrics_and_exits_on_sigterm() {
    let env = Env::new().await;
    let id = env
        .create_job(serde_json::json!({"subject_class": "dog"}), 2)
        .await;
    let metrics_port = free_port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sidbooth-worker"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &env.db.url)
        .env(
            "SIDBOOTH_S3_ENDPOINT",
            env.storage.args.s3_endpoint.as_deref().unwrap(),
        )
        .env("SIDBOOTH_S3_BUCKET", &env.storage.args.s3_bucket)
        .env("AWS_ACCESS_KEY_ID", TestStorage::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", TestStorage::SECRET_KEY)
        .env("SIDBOOTH_VLM_BASE_URL", env.vlm.base_url())
        .env("SIDBOOTH_VLM_API_KEY", "sk-binary-test-secret")
        .env("SIDBOOTH_VLM_MODEL", "fake-model")
        .env("SIDBOOTH_POLL_SECS", "0.2")
        .env("SIDBOOTH_HEARTBEAT_SECS", "0.2")
        .env("SIDBOOTH_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    env.wait_status(id, JobStatus::Succeeded, Duration::from_secs(30))
        .await;
    let requests = env.vlm.requests();
    assert_eq!(requests.len(), 2);
    assert!(requests
        .iter()
        .all(|r| r.model == "fake-model"
            && r.authorization() == Some("Bearer sk-binary-test-secret")));

    let metrics = http_get(metrics_port, "/metrics").await;
    assert!(
        metrics.contains("sidbooth_jobs_claimed_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "sidbooth_stage_duration_seconds_count{stage=\"describe\",outcome=\"succeeded\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("sidbooth_vlm_request_duration_seconds"),
        "{metrics}"
    );

    let pid = child.id().unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let output = tokio::time::timeout(Duration::from_secs(10), async {
        let status = child.wait().await.unwrap();
        let mut logs = String::new();
        use tokio::io::AsyncReadExt;
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut logs)
            .await
            .unwrap();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut logs)
            .await
            .unwrap();
        (status, logs)
    })
    .await
    .expect("the worker exits after SIGTERM");
    let (status, logs) = output;
    assert!(status.success(), "{status:?}\n{logs}");
    assert!(logs.contains("worker stopped"), "{logs}");
    assert!(
        !logs.contains("sk-binary-test-secret"),
        "the API key leaked into the logs"
    );
}

/// A minimal HTTP/1.0 GET over loopback.
async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}
