//! Test helpers shared by the crates' tests: a fresh database per test on the local Postgres
//! server, and an embedded S3 server on a temporary folder.

use std::net::SocketAddr;

use sqlx::{Connection, PgConnection, PgPool};
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
    /// A migrated database.
    pub async fn new() -> Self {
        let db = Self::empty().await;
        db::migrate(&db.pool).await.expect("migrate test database");
        db
    }

    /// A database with no migrations applied.
    pub async fn empty() -> Self {
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
        let pool = db::pool_options(20, std::time::Duration::from_secs(30))
            .connect(&url)
            .await
            .expect("connect to test database");
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
            s3_public_endpoint: None,
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

/// A Postgres server of a test's own, on a free port and a temporary folder, which the test may
/// stop and start (outages). Needs `initdb` and `pg_ctl` on PATH (or in SIDBOOTH_PG_BIN); as
/// root they run as the `postgres` user, since Postgres refuses to run as root. The server is
/// stopped when the value is dropped.
pub struct PgCluster {
    pub port: u16,
    dir: tempfile::TempDir,
    as_postgres: bool,
}

impl PgCluster {
    fn tool(name: &str) -> std::path::PathBuf {
        match std::env::var_os("SIDBOOTH_PG_BIN") {
            Some(dir) => std::path::PathBuf::from(dir).join(name),
            None => std::path::PathBuf::from(name),
        }
    }

    fn run(&self, tool: &str, args: &[&str]) -> std::io::Result<std::process::Output> {
        let mut command = if self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(Self::tool(tool));
            c
        } else {
            std::process::Command::new(Self::tool(tool))
        };
        command
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
    }

    fn check(&self, tool: &str, args: &[&str]) {
        let out = self
            .run(tool, args)
            .unwrap_or_else(|e| panic!("running {tool} (install PostgreSQL's server tools): {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Makes and starts the server.
    pub fn start() -> Self {
        let as_postgres = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        let dir = tempfile::Builder::new()
            .prefix("sidbooth-pg-")
            .tempdir()
            .expect("temp dir");
        if as_postgres {
            let _ = std::process::Command::new("chown")
                .args(["-R", "postgres"])
                .arg(dir.path())
                .status();
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let cluster = Self {
            port,
            dir,
            as_postgres,
        };
        let data = cluster.data();
        cluster.check(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"],
        );
        cluster.start_again();
        cluster
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the stopped server and waits until it accepts connections.
    pub fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log").display().to_string();
        self.check(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-l",
                &log,
                "-w",
                "start",
            ],
        );
    }

    /// Stops the server (fast: open connections are cut, as when a server goes down).
    pub fn stop(&self) {
        self.check("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
    }
}

/// A TCP forwarder in front of a server (storage, say) that a test can cut: while cut, open
/// connections are dropped and new ones are closed as soon as they are accepted, so the server
/// looks unreachable on the same address; after [`TcpProxy::restore`] it forwards again.
pub struct TcpProxy {
    pub addr: SocketAddr,
    cut: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a proxy");
        let addr = listener.local_addr().expect("an address");
        let (cut, _) = tokio::sync::watch::channel(false);
        let cut = std::sync::Arc::new(cut);
        let task = tokio::spawn({
            let cut = cut.clone();
            async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    if *cut.borrow() {
                        drop(inbound);
                        continue;
                    }
                    let mut cut_seen = cut.subscribe();
                    tokio::spawn(async move {
                        let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                            return;
                        };
                        let (mut a, mut b) = (inbound, outbound);
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                            _ = cut_seen.wait_for(|c| *c) => {}
                        }
                    });
                }
            }
        });
        Self { addr, cut, task }
    }

    /// `http://ADDR`, for HTTP servers behind the proxy.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn restore(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut.send_replace(true);
        self.task.abort();
    }
}

/// A new dog job of `tenant` with one image per file name (objects under the job's input
/// keys, which the caller stores if it needs them).
pub fn new_job(tenant: Uuid, file_names: &[&str]) -> crate::NewJob {
    let id = Uuid::now_v7();
    crate::NewJob {
        id,
        tenant_id: tenant,
        spec: serde_json::from_value(serde_json::json!({"subject_class": "dog"}))
            .expect("a valid spec"),
        images: file_names
            .iter()
            .enumerate()
            .map(|(i, name)| crate::NewImage {
                file_name: (*name).to_owned(),
                object_key: crate::keys::input(tenant, id, i, name),
                content_type: "image/jpeg".into(),
                sha256: "00".into(),
                width: 8,
                height: 8,
                bytes: 5,
                mask_object_key: None,
            })
            .collect(),
        idempotency_key: None,
        request_hash: vec![0],
        max_attempts: 3,
    }
}
