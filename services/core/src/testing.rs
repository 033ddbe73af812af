//! Test helpers shared by the crates' tests: a fresh database per test on the local Postgres
//! server, and an embedded S3 server on a temporary folder.

use std::net::SocketAddr;

use sqlx::{postgres::PgPoolOptions, Connection, PgConnection, PgPool};
use uuid::Uuid;

use crate::{config::StorageArgs, db, storage::ArtifactStore};

/// The server tests create their databases on: SIDBOOTH_TEST_DATABASE_URL, else the local
/// server every development machine and CI run has.
pub fn server_url() -> String {
    std::env::var("SIDBOOTH_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn with_database(server: &str, name: &str) -> String {
    let (base, query) = match server.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (server, None),
    };
    let base = base.rsplit_once('/').map_or(base, |(b, _)| b);
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// A database created for one test, migrated, dropped when the value is dropped.
pub struct TestDb {
    pub pool: PgPool,
    pub url: String,
    name: String,
}

impl TestDb {
    pub async fn new() -> Self {
        let server = server_url();
        let name = format!("sidbooth_test_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&server)
            .await
            .unwrap_or_else(|e| panic!("tests need Postgres at {server}: {e}"));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create test database");
        let url = with_database(&server, &name);
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .connect(&url)
            .await
            .expect("connect to test database");
        db::migrate(&pool).await.expect("migrate test database");
        Self { pool, url, name }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop runs outside async context; a short-lived thread with its own runtime removes the
        // database so test runs do not pile them up on a shared server.
        let server = server_url();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    if let Ok(mut admin) = PgConnection::connect(&server).await {
                        let _ =
                            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                                .execute(&mut admin)
                                .await;
                    }
                });
            }
        })
        .join();
    }
}

/// An embedded S3 server on a temporary folder, with a bucket ready.
pub struct TestStorage {
    pub server: sidbooth_s3_embedded::EmbeddedS3,
    pub store: ArtifactStore,
    pub args: StorageArgs,
    pub dir: tempfile::TempDir,
}

impl TestStorage {
    pub const ACCESS_KEY: &'static str = "test-access";
    pub const SECRET_KEY: &'static str = "test-secret";

    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let server = sidbooth_s3_embedded::EmbeddedS3::start(
            dir.path(),
            SocketAddr::from(([127, 0, 0, 1], 0)),
            Self::ACCESS_KEY,
            Self::SECRET_KEY,
        )
        .await
        .expect("start embedded S3");
        let args = StorageArgs {
            s3_endpoint: Some(server.endpoint()),
            s3_region: "us-east-1".into(),
            s3_bucket: "sidbooth-test".into(),
            s3_path_style: true,
            presign_ttl_secs: 600,
        };
        let store =
            ArtifactStore::with_static_credentials(&args, Self::ACCESS_KEY, Self::SECRET_KEY);
        store.ensure_bucket().await.expect("create bucket");
        Self {
            server,
            store,
            args,
            dir,
        }
    }

    /// Every object key in the bucket.
    pub async fn all_keys(&self) -> Vec<String> {
        self.store.list("").await.expect("list objects")
    }
}
