//! `sidbooth dev`: the whole service in one process on embedded defaults, for a newcomer.
//!
//! Postgres from [`crate::postgres::find`], an embedded S3 server on a local folder, the API and
//! one worker, migrations applied, a key printed. Without a model directory the worker uses the
//! built-in tiny model, and without CLIP the tiny random evaluators (numbers that mean nothing,
//! as the reports say), so every stage runs on a laptop. With `--demo` it also submits a job for
//! the example photos (describe, train, generate, evaluate), waits for it, prints the measures,
//! downloads the artifacts and exits.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context, Result};
use sidbooth_core::{ArtifactStore, DatabaseArgs, StorageArgs};
use sidbooth_s3_embedded::EmbeddedS3;
use tokio_util::sync::CancellationToken;

use crate::{demo, postgres};

#[derive(clap::Args)]
pub struct DevArgs {
    /// Folder for the embedded storage (and a private Postgres cluster, if one is needed).
    #[arg(long, env = "SIDBOOTH_DEV_DIR", default_value = ".dev")]
    data_dir: PathBuf,
    /// Address of the embedded S3 server (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    s3_addr: SocketAddr,
    /// Submit a job for the example photos (describe, train, generate, evaluate), print the
    /// result and exit.
    #[arg(long)]
    demo: bool,
    /// Photo folder the demo submits (with manual-descriptions.json beside the photos).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/dog6"))]
    demo_photos: PathBuf,
    /// Address of the API.
    #[arg(long, env = "SIDBOOTH_API_BIND", default_value = "127.0.0.1:8080")]
    bind: SocketAddr,
    /// Origins of pages that may call the API from a browser (CORS), comma-separated, e.g.
    /// `http://localhost:5173` for a frontend's dev server.
    #[arg(
        long,
        env = "SIDBOOTH_CORS_ALLOWED_ORIGINS",
        value_delimiter = ',',
        value_parser = sidbooth_api::config::parse_origin
    )]
    cors_allowed_origins: Vec<String>,
    /// Worker settings; the API shares its queue settings.
    #[command(flatten)]
    worker: sidbooth_worker::WorkerConfig,
}

const DEV_ACCESS_KEY: &str = "sidbooth-dev";
const DEV_SECRET_KEY: &str = "sidbooth-dev-secret";

/// The seed of the tiny model and evaluators when none are configured.
const DEV_TINY_SEED: u64 = 0;

pub async fn run(mut args: DevArgs) -> Result<()> {
    let engine = &mut args.worker.engine;
    if engine.model_dir.is_none() && engine.tiny_model.is_none() {
        engine.tiny_model = Some(DEV_TINY_SEED);
    }
    let evaluate = &mut args.worker.evaluate;
    if !evaluate.has_clip() && !evaluate.has_sam() && !evaluate.has_dino() {
        evaluate.tiny_evaluators = Some(DEV_TINY_SEED);
    }
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let database = postgres::find(&args.data_dir).await?;
    let db_args = DatabaseArgs::new(database.url.clone(), 16);
    let pool = sidbooth_core::db::connect(&db_args).await?;
    sidbooth_core::db::migrate(&pool).await?;

    let s3 = EmbeddedS3::start(
        &args.data_dir.join("s3"),
        args.s3_addr,
        DEV_ACCESS_KEY,
        DEV_SECRET_KEY,
    )
    .await
    .context("starting the embedded S3 server")?;
    let storage_args = StorageArgs {
        s3_endpoint: Some(s3.endpoint()),
        s3_public_endpoint: None,
        s3_region: "us-east-1".into(),
        s3_bucket: "sidbooth".into(),
        s3_path_style: true,
        presign_ttl_secs: 3600,
    };
    let storage =
        ArtifactStore::with_static_credentials(&storage_args, DEV_ACCESS_KEY, DEV_SECRET_KEY);
    storage.ensure_bucket().await?;

    // One Prometheus recorder for the process: the API serves what the worker records.
    sidbooth_api::metrics::install_recorder();
    let key = sidbooth_core::tenants::create_key(&pool, "dev").await?;
    let shutdown = CancellationToken::new();

    let api_config = sidbooth_api::ApiConfig {
        bind: args.bind,
        queue: args.worker.queue.clone(),
        cors_allowed_origins: args.cors_allowed_origins.clone(),
        // A dev stack's webhooks go to receivers on this machine.
        webhooks: sidbooth_api::config::WebhookSettings {
            allow_private_targets: true,
            ..Default::default()
        },
        ..sidbooth_api::ApiConfig::default()
    };
    let listener = tokio::net::TcpListener::bind(args.bind)
        .await
        .with_context(|| {
            format!(
                "binding the API to {} (choose another with --bind)",
                args.bind
            )
        })?;
    let api_addr = listener.local_addr()?;
    let state = sidbooth_api::AppState::new(pool.clone(), storage.clone(), api_config);
    let api = tokio::spawn({
        let token = shutdown.clone();
        async move { sidbooth_api::serve(listener, state, async move { token.cancelled().await }).await }
    });
    let vlm_configured = args.worker.vlm.config().is_some();
    let worker = sidbooth_worker::Worker::new(pool.clone(), storage.clone(), args.worker.clone())?;
    let worker = tokio::spawn(worker.run(shutdown.clone()));

    let api_url = format!("http://{api_addr}");
    eprintln!("sidbooth dev is running");
    eprintln!("  API:       {api_url}  (OpenAPI: {api_url}/openapi.yaml)");
    eprintln!(
        "  storage:   {} (bucket sidbooth, folder {})",
        s3.endpoint(),
        args.data_dir.join("s3").display()
    );
    eprintln!("  database:  {}", database.origin);
    eprintln!(
        "  VLM:       {}",
        if vlm_configured {
            "configured (SIDBOOTH_VLM_BASE_URL)"
        } else {
            "none (set SIDBOOTH_VLM_BASE_URL; describe jobs need manual descriptions until then)"
        }
    );
    eprintln!(
        "  models:    {} / evaluators {}",
        args.worker.engine.model_name(),
        match args.worker.evaluate.tiny_evaluators {
            Some(seed) => format!(
                "tiny random-weight CLIP, DINO and SAM (seed {seed}; their numbers mean nothing)"
            ),
            None => "from SIDBOOTH_CLIP_DIR / SIDBOOTH_DINO_DIR / SIDBOOTH_SAM_DIR".to_owned(),
        }
    );
    eprintln!("  API key:   {}", key.secret);
    eprintln!(
        "  try:       curl -H 'Authorization: Bearer {}' {api_url}/v1/jobs",
        key.secret
    );

    let outcome = if args.demo {
        let demo = demo::run(
            &api_url,
            &key.secret,
            &args.demo_photos,
            vlm_configured,
            &args.data_dir,
        )
        .await;
        shutdown.cancel();
        demo
    } else {
        wait_for_signal().await;
        eprintln!("shutting down");
        shutdown.cancel();
        Ok(())
    };
    let _ = api.await;
    let _ = worker.await;
    drop(database);
    outcome
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
