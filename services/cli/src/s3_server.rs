//! `sidbooth s3-server`: the embedded S3-protocol server (s3s-fs over a folder) as a process of
//! its own, for compose and for running the API and workers as separate local processes.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use sidbooth_s3_embedded::EmbeddedS3;

#[derive(Args, Debug)]
pub struct S3ServerArgs {
    /// Folder holding the buckets (one sub-folder each); created if missing.
    #[arg(long, env = "SIDBOOTH_S3_DIR")]
    dir: PathBuf,
    /// Address to serve S3 on.
    #[arg(long, env = "SIDBOOTH_S3_BIND", default_value = "127.0.0.1:9000")]
    bind: SocketAddr,
    /// The one access key clients sign with (the same variable the API and workers read).
    #[arg(long, env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    access_key: String,
    /// Its secret.
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    secret_key: String,
    /// Buckets to create at start if missing (repeatable).
    #[arg(long = "bucket", env = "SIDBOOTH_S3_BUCKETS", value_delimiter = ',')]
    buckets: Vec<String>,
}

pub async fn run(args: S3ServerArgs) -> Result<()> {
    for b in &args.buckets {
        // s3s-fs keeps a bucket as a folder; a name with a path separator is no bucket name.
        anyhow::ensure!(
            !b.is_empty() && !b.contains(['/', '\\']) && b != "." && b != "..",
            "{b:?} is not a bucket name"
        );
        let dir = args.dir.join(b);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let server = EmbeddedS3::start(&args.dir, args.bind, &args.access_key, &args.secret_key)
        .await
        .with_context(|| format!("serving S3 on {}", args.bind))?;
    eprintln!(
        "S3 on {} (folder {}); stop with Ctrl-C or SIGTERM",
        server.endpoint(),
        args.dir.display()
    );
    shutdown_signal().await?;
    drop(server);
    Ok(())
}

/// Ctrl-C or SIGTERM (what compose and Kubernetes send).
async fn shutdown_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
