//! `sidbooth`: the command line for operators, researchers and newcomers.
//!
//! * `sidbooth dev [--demo]`: everything in one process on embedded defaults.
//! * `sidbooth migrate`: apply the database migrations.
//! * `sidbooth keys create --tenant NAME`: issue an API key (printed once).
//! * `sidbooth tenants limits --tenant NAME [--max-queued-jobs N ...]`: one tenant's own limits.
//! * `sidbooth train --model DIR --images DIR --class dog --captions FILE --output FILE`:
//!   DreamBooth-LoRA fine-tuning on local photos (no service needed).
//! * `sidbooth generate --model DIR [--lora FILE] --prompt TEXT --seed N`: sampling to PNGs with
//!   the settings in their text chunks, optional initial latents and attention heatmaps.
//! * `sidbooth evaluate --clip DIR [--dino DIR] [--sam DIR] --references DIR [--masks DIR]
//!   --images DIR [--prompt TEXT] --class NAME [--token sks] --out DIR`: the paper's measures
//!   and a report (report.json, report.html).
//! * `sidbooth segment --sam DIR --image FILE [--box x0,y0,x1,y1] --out mask.png`: a subject
//!   mask with SAM.

use anyhow::Result;
use clap::{Parser, Subcommand};
use sidbooth_core::DatabaseArgs;

mod demo;
mod dev;
mod evaluate;
mod generate;
mod model;
mod postgres;
mod s3_server;
mod segment;
mod train;

#[derive(Parser)]
#[command(
    name = "sidbooth",
    version,
    about = "Subject personalization without background leakage"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the API, a worker, an embedded S3 server and (if needed) Postgres in one process.
    Dev(Box<dev::DevArgs>),
    /// Serve S3 (the embedded s3s-fs server) over a folder, as its own process.
    S3Server(s3_server::S3ServerArgs),
    /// Apply the database migrations.
    Migrate {
        /// Apply nothing: exit 0 when the database has every migration this release needs,
        /// else list the pending ones and exit 1 (for readiness checks and init containers).
        #[arg(long)]
        check: bool,
        #[command(flatten)]
        db: LocalDatabaseArgs,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Manage tenants.
    Tenants {
        #[command(subcommand)]
        command: TenantsCommand,
    },
    /// Fine-tune a model on a folder of photos (DreamBooth with LoRA) and write the LoRA file.
    Train(Box<train::TrainArgs>),
    /// Generate images from a model (optionally with a LoRA) into PNGs with their settings.
    Generate(Box<generate::GenerateArgs>),
    /// Measure generated images against the reference photos (CLIP-I, DINO, the paper's
    /// subject-alignment, non-subject-disentanglement and text-alignment) into report.json and
    /// report.html.
    Evaluate(Box<evaluate::EvaluateArgs>),
    /// Make a subject mask with SAM, from a box or from SAM's proposals ranked by CLIP.
    Segment(Box<segment::SegmentArgs>),
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key for a tenant (the tenant is created if new). The key is printed once; only
    /// its hash is stored.
    Create {
        #[arg(long)]
        tenant: String,
        #[command(flatten)]
        db: LocalDatabaseArgs,
    },
    /// Revoke a key by its id.
    Revoke {
        #[arg(long)]
        id: uuid::Uuid,
        #[command(flatten)]
        db: LocalDatabaseArgs,
    },
}

#[derive(Subcommand)]
enum TenantsCommand {
    /// Set a tenant's own limits, replacing the configured defaults for it. A limit left out
    /// goes back to the default; 0 is no limit. Prints the limits stored.
    Limits {
        #[arg(long)]
        tenant: String,
        /// Most queued jobs.
        #[arg(long)]
        max_queued_jobs: Option<u32>,
        /// Most jobs running at once.
        #[arg(long)]
        max_running_jobs: Option<u32>,
        /// Accelerator seconds (train, generate, evaluate) per UTC day.
        #[arg(long)]
        gpu_seconds_per_day: Option<f64>,
        /// `POST /v1/jobs` requests per minute.
        #[arg(long)]
        job_posts_per_minute: Option<u32>,
        #[command(flatten)]
        db: LocalDatabaseArgs,
    },
}

/// The database of an administrative command: `--database-url` / `DATABASE_URL`, else the one
/// a `sidbooth dev` in `--dev-dir` found (it writes the URL into its data folder).
#[derive(clap::Args)]
struct LocalDatabaseArgs {
    /// Postgres connection URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Data folder of the `sidbooth dev` whose database to use when no URL is given.
    #[arg(long, env = "SIDBOOTH_DEV_DIR", default_value = ".dev")]
    dev_dir: std::path::PathBuf,
}

impl LocalDatabaseArgs {
    fn resolve(self) -> Result<DatabaseArgs> {
        let database_url = match self.database_url {
            Some(url) => url,
            None => {
                let file = self.dev_dir.join(postgres::URL_FILE);
                match std::fs::read_to_string(&file) {
                    Ok(url) => url.trim().to_owned(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
                        "no database: pass --database-url (or set DATABASE_URL), or run this \
                         beside a `sidbooth dev` (none has written {})",
                        file.display()
                    ),
                    Err(e) => {
                        return Err(
                            anyhow::Error::new(e).context(format!("reading {}", file.display()))
                        )
                    }
                }
            }
        };
        Ok(DatabaseArgs::new(database_url, 2))
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,aws=warn,hyper=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .try_init();
}

/// Frees the tensors of weight files mapped into memory (see `sidbooth_engine::mapped`).
#[global_allocator]
static ALLOC: sidbooth_engine::mapped::MappedAware = sidbooth_engine::mapped::MappedAware;

fn main() -> Result<()> {
    // Before the runtime's threads start: secrets from *_FILE, empty variables unset.
    sidbooth_core::config::prepare_env()?;
    tokio::runtime::Runtime::new()?.block_on(run())
}

async fn run() -> Result<()> {
    sidbooth_engine::kernels::keep_freed_memory();
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Command::Dev(args) => dev::run(*args).await,
        Command::S3Server(args) => s3_server::run(args).await,
        Command::Train(args) => train::run(*args).await,
        Command::Generate(args) => {
            tokio::task::spawn_blocking(move || generate::run(*args)).await?
        }
        Command::Evaluate(args) => {
            tokio::task::spawn_blocking(move || evaluate::run(*args)).await?
        }
        Command::Segment(args) => tokio::task::spawn_blocking(move || segment::run(*args)).await?,
        Command::Migrate { check: false, db } => {
            let pool = sidbooth_core::db::connect(&db.resolve()?).await?;
            sidbooth_core::db::migrate(&pool).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Migrate { check: true, db } => {
            let pool = sidbooth_core::db::connect(&db.resolve()?).await?;
            let status = sidbooth_core::db::migration_status(&pool).await?;
            for version in &status.unknown {
                println!("applied but unknown to this release: {version} (the database is newer)");
            }
            if status.is_current() {
                println!("the database is up to date");
                return Ok(());
            }
            for (version, description) in &status.pending {
                println!("pending: {version} {description}");
            }
            anyhow::bail!(
                "{} migration(s) pending: run `sidbooth migrate`",
                status.pending.len()
            )
        }
        Command::Tenants { command } => match command {
            TenantsCommand::Limits {
                tenant,
                max_queued_jobs,
                max_running_jobs,
                gpu_seconds_per_day,
                job_posts_per_minute,
                db,
            } => {
                let pool = sidbooth_core::db::connect(&db.resolve()?).await?;
                let count = |v: Option<u32>| v.map(|n| i32::try_from(n).unwrap_or(i32::MAX));
                let overrides = sidbooth_core::quotas::LimitOverrides {
                    max_queued_jobs: count(max_queued_jobs),
                    max_running_jobs: count(max_running_jobs),
                    gpu_seconds_per_day: gpu_seconds_per_day.map(|s| s.max(0.0)),
                    job_posts_per_minute: count(job_posts_per_minute),
                };
                match sidbooth_core::quotas::QuotaStore::new(pool)
                    .set_overrides(&tenant, &overrides)
                    .await
                {
                    Ok(_) => {
                        println!("limits of tenant {tenant:?} (none: the default): {overrides:?}");
                        Ok(())
                    }
                    Err(sidbooth_core::CoreError::NotFound) => {
                        anyhow::bail!("no tenant {tenant:?} (keys create --tenant makes one)")
                    }
                    Err(e) => Err(e.into()),
                }
            }
        },
        Command::Keys { command } => match command {
            KeysCommand::Create { tenant, db } => {
                let pool = sidbooth_core::db::connect(&db.resolve()?).await?;
                sidbooth_core::db::migrate(&pool).await?;
                let key = sidbooth_core::tenants::create_key(&pool, &tenant).await?;
                eprintln!(
                    "key {} for tenant {tenant:?} (shown once; only its hash is stored):",
                    key.key_id
                );
                println!("{}", key.secret);
                Ok(())
            }
            KeysCommand::Revoke { id, db } => {
                let pool = sidbooth_core::db::connect(&db.resolve()?).await?;
                if sidbooth_core::tenants::revoke_key(&pool, id).await? {
                    println!("key {id} revoked");
                    Ok(())
                } else {
                    anyhow::bail!("no live key with id {id}")
                }
            }
        },
    }
}
