//! `sidbooth-api`: the HTTP API as its own process.

use clap::Parser;
use sidbooth_api::{ApiConfig, AppState};
use sidbooth_core::{ArtifactStore, DatabaseArgs, StorageArgs};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

/// sidbooth's HTTP API.
#[derive(Debug, Parser)]
#[command(name = "sidbooth-api", version)]
struct Args {
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    storage: StorageArgs,
    #[command(flatten)]
    api: ApiConfig,
    /// Apply database migrations before serving (`sidbooth migrate` does the same on its own).
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

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,aws=warn,hyper=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}

fn main() -> anyhow::Result<()> {
    // Before the runtime's threads start: secrets from *_FILE, empty variables unset.
    sidbooth_core::config::prepare_env()?;
    tokio::runtime::Runtime::new()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(args.log_format);
    tracing::info!(database = ?args.database, storage = ?args.storage, api = ?args.api, "starting");

    let pool = sidbooth_core::db::connect(&args.database).await?;
    if args.migrate {
        sidbooth_core::db::migrate(&pool).await?;
        tracing::info!("migrations applied");
    }
    let storage = ArtifactStore::connect(&args.storage).await?;
    let listener = tokio::net::TcpListener::bind(args.api.bind).await?;
    let state = AppState::new(pool.clone(), storage, args.api);
    sidbooth_api::serve(listener, state, shutdown_signal()).await?;
    pool.close().await;
    tracing::info!("stopped");
    Ok(())
}
