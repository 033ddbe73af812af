//! The real `sidbooth-worker` binary as a child process pointed at a test stack, killed when
//! dropped (no orphaned workers).

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use crate::Stack;

/// The `sidbooth-worker` binary of this build, beside the test executable's folder.
pub fn worker_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let binary = dir.join("sidbooth-worker");
    assert!(
        binary.is_file(),
        "{} is missing: build it with `cargo build --bin sidbooth-worker` \
         (`cargo nextest run --workspace` builds it)",
        binary.display()
    );
    binary
}

/// A worker process; SIGKILLed on drop if still running.
pub struct WorkerProcess(pub Child);

impl WorkerProcess {
    /// Starts the binary on the stack's database, storage and fake VLM, with fast queue timing
    /// and `extra` environment variables.
    pub fn spawn(stack: &Stack, extra: &[(&str, &str)]) -> WorkerProcess {
        let storage = &stack.storage.args;
        let mut command = Command::new(worker_binary());
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .env("DATABASE_URL", &stack.db.url)
            .env(
                "SIDBOOTH_S3_ENDPOINT",
                storage.s3_endpoint.as_ref().unwrap(),
            )
            .env("SIDBOOTH_S3_BUCKET", &storage.s3_bucket)
            .env("SIDBOOTH_S3_REGION", &storage.s3_region)
            .env(
                "AWS_ACCESS_KEY_ID",
                sidbooth_core::testing::TestStorage::ACCESS_KEY,
            )
            .env(
                "AWS_SECRET_ACCESS_KEY",
                sidbooth_core::testing::TestStorage::SECRET_KEY,
            )
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("SIDBOOTH_VLM_BASE_URL", stack.vlm.base_url())
            .env("SIDBOOTH_VLM_API_KEY", "vlm-test-key")
            .env("SIDBOOTH_VLM_MODEL", "fake-gpt")
            .env("SIDBOOTH_VLM_CONCURRENCY", "1")
            .env("SIDBOOTH_LEASE_SECS", "2")
            .env("SIDBOOTH_HEARTBEAT_SECS", "0.2")
            .env("SIDBOOTH_POLL_SECS", "0.2");
        for (k, v) in extra {
            command.env(k, v);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start sidbooth-worker");
        WorkerProcess(child)
    }

    /// SIGKILL: no chance to release the lease.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.try_wait().unwrap()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
