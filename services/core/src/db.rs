//! Connecting to Postgres and applying the migrations embedded at build time.

use sqlx::{postgres::PgPoolOptions, PgPool};

use crate::{config::DatabaseArgs, error::Result};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

#[tracing::instrument(skip_all)]
pub async fn connect(args: &DatabaseArgs) -> Result<PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(args.db_max_connections)
        .acquire_timeout(std::time::Duration::from_secs_f64(
            args.db_acquire_timeout_secs.max(0.1),
        ))
        .connect(&args.database_url)
        .await?;
    Ok(pool)
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
