//! Connecting to Postgres and applying the migrations embedded at build time.

use std::time::Duration;

use sqlx::{postgres::PgPoolOptions, Connection, PgPool};

use crate::{config::DatabaseArgs, error::Result};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

#[tracing::instrument(skip_all)]
pub async fn connect(args: &DatabaseArgs) -> Result<PgPool> {
    let pool = pool_options(
        args.db_max_connections,
        Duration::from_secs_f64(args.db_acquire_timeout_secs.max(0.1)),
    )
    .connect(&args.database_url)
    .await?;
    Ok(pool)
}

/// A connection idle at least this long is pinged before it is handed out.
const CHECK_AFTER_IDLE: Duration = Duration::from_secs(1);

/// The pool every process uses. sqlx's default pings each connection before handing it out, a
/// round trip per query; here only a connection that sat idle is checked (one that died while
/// idle, say in a restart of Postgres, is replaced before anyone sees it), and one in steady use
/// reports a dropped connection on the query itself, which the caller treats as an outage.
pub fn pool_options(max_connections: u32, acquire_timeout: Duration) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(acquire_timeout)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= CHECK_AFTER_IDLE {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
}

#[tracing::instrument(skip_all)]
pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Cheap round trip used by readiness checks.
pub async fn ping(pool: &PgPool) -> Result<()> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

/// How the database's migrations compare with the ones built into this binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationStatus {
    /// Built in but not applied (successfully), oldest first: version and description.
    pub pending: Vec<(i64, String)>,
    /// Applied but unknown to this binary (the database belongs to a newer release).
    pub unknown: Vec<i64>,
}

impl MigrationStatus {
    pub fn is_current(&self) -> bool {
        self.pending.is_empty()
    }
}

/// Compares the applied migrations with [`MIGRATOR`]'s, writing nothing (a fresh database has
/// every migration pending).
pub async fn migration_status(pool: &PgPool) -> Result<MigrationStatus> {
    let table: Option<String> = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
        .fetch_one(pool)
        .await?;
    let applied: Vec<i64> = match table {
        Some(_) => {
            sqlx::query_scalar(
                "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
            )
            .fetch_all(pool)
            .await?
        }
        None => Vec::new(),
    };
    let known: Vec<i64> = MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .map(|m| m.version)
        .collect();
    Ok(MigrationStatus {
        pending: MIGRATOR
            .iter()
            .filter(|m| m.migration_type.is_up_migration() && !applied.contains(&m.version))
            .map(|m| (m.version, m.description.to_string()))
            .collect(),
        unknown: applied.into_iter().filter(|v| !known.contains(v)).collect(),
    })
}
