#![recursion_limit = "256"]

//! `sidbooth-worker`: claims describe (and later train/generate) jobs and runs them.
//!
//! SIGTERM or Ctrl-C stops claiming; running jobs finish their stage and are given back
//! (`--shutdown-mode finish-stage`, the default; with `--shutdown-timeout-secs` a stage still
//! running after that long is stopped and its job given back) or are given back at once
//! (`--shutdown-mode release`). A second signal exits immediately; the leases then lapse.

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use sidbooth_core::{db, ArtifactStore, DatabaseArgs, StorageArgs};
use sidbooth_worker::{Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "sidbooth-worker",
    version,
    about = "Runs sidbooth jobs from the Postgres queue"
)]
struct Args {
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    storage: StorageArgs,
    #[command(flatten)]
    worker: WorkerConfig,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, env = "SIDBOOTH_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Apply the database migrations before starting.
    #[arg(long, env = "SIDBOOTH_MIGRATE")]
    migrate: bool,
    /// Log format.
    #[arg(
        long,
        env = "SIDBOOTH_LOG_FORMAT",
        value_enum,
        default_value = "pretty"
    )]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

/// Frees the tensors of weight files mapped into memory (see `sidbooth_engine::mapped`).
#[global_allocator]
static ALLOC: sidbooth_engine::mapped::MappedAware = sidbooth_engine::mapped::MappedAware;

fn main() -> anyhow::Result<()> {
    // Before the runtime's threads start: secrets from *_FILE, empty variables unset.
    sidbooth_core::config::prepare_env()?;
    tokio::runtime::Runtime::new()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    sidbooth_engine::kernels::keep_freed_memory();
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,aws=warn,hyper=warn"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match args.log_format {
        LogFormat::Pretty => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    tracing::info!(?args, "starting");

    if let Some(addr) = args.metrics_addr {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .context("starting the metrics listener")?;
        sidbooth_worker::metrics::describe();
        tracing::info!(%addr, "serving metrics");
    }

    let pool = db::connect(&args.database)
        .await
        .context("connecting to Postgres")?;
    if args.migrate {
        db::migrate(&pool).await.context("applying migrations")?;
    }
    let store = ArtifactStore::connect(&args.storage)
        .await
        .context("configuring storage")?;
    let worker = Worker::new(pool, store, args.worker).context("configuring the worker")?;

    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    worker.run(shutdown).await
}

/// The first SIGTERM/Ctrl-C asks for a graceful shutdown; the second exits at once.
async fn signals(shutdown: CancellationToken) {
    for round in 0.. {
        wait_for_signal().await;
        if round == 0 {
            tracing::info!("shutdown requested; send the signal again to exit at once");
            shutdown.cancel();
        } else {
            tracing::warn!("exiting without waiting for running jobs");
            std::process::exit(130);
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install the SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
