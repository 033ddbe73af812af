//! Finding a Postgres for `sidbooth dev`, in this order:
//! 1. DATABASE_URL;
//! 2. a server answering on localhost:5432, where we create our own database;
//! 3. a private cluster initialised and started in the data folder, where the PostgreSQL server
//!    binaries are installed (as root, the cluster runs as the unprivileged `postgres` or
//!    `nobody` user, since initdb refuses to run as root);
//! 4. otherwise an error that says in one line how to get one.
//!
//! A dev stack owns its database: on a shared server it is named after the data folder
//! (`sidbooth_dev_<hash of the folder's path>`), because a worker of one stack would otherwise
//! claim the jobs of another whose storage it cannot see; and while a stack runs it holds an
//! advisory lock on its database, so a second `sidbooth dev` on the same folder is refused with
//! the reason. The URL is written to `<data folder>/database-url` for `sidbooth keys` and
//! `sidbooth migrate` run beside it.

use std::{
    net::TcpStream,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use sqlx::{Connection, PgConnection};

const PRIVATE_PORT: u16 = 54329;

/// The file in the data folder holding the URL of the stack's database.
pub const URL_FILE: &str = "database-url";

/// The database of the dev stack whose data folder is `data_dir`.
pub fn dev_database_name(data_dir: &Path) -> String {
    use sha2::Digest;
    let path = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let digest = sha2::Sha256::digest(path.as_os_str().as_encoded_bytes());
    format!("sidbooth_dev_{}", hex::encode(&digest[..6]))
}

/// Where the database came from, for the start-up banner.
pub struct DevDatabase {
    pub url: String,
    pub origin: String,
    /// The connection holding the stack's advisory lock; closed (lock released) when dropped,
    /// before the cluster stops.
    _lock: PgConnection,
    /// A cluster we started; it stops when this is dropped.
    _cluster: Option<PrivateCluster>,
}

pub async fn find(data_dir: &Path) -> Result<DevDatabase> {
    let found = locate(data_dir).await?;
    let lock = hold_lock(&found.0, data_dir).await?;
    let file = data_dir.join(URL_FILE);
    write_private(&file, &found.0).with_context(|| format!("writing {}", file.display()))?;
    Ok(DevDatabase {
        url: found.0,
        origin: found.1,
        _lock: lock,
        _cluster: found.2,
    })
}

/// URL, origin and (if we started one) the cluster.
async fn locate(data_dir: &Path) -> Result<(String, String, Option<PrivateCluster>)> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        return Ok((url, "DATABASE_URL".into(), None));
    }
    let name = dev_database_name(data_dir);
    if answers(5432) {
        let user = std::env::var("PGUSER").unwrap_or_else(|_| "postgres".into());
        let server = format!("postgres://{user}@127.0.0.1:5432/postgres");
        if let Ok(url) = ensure_database(&server, &name).await {
            let origin = format!("the server on localhost:5432 (database {name})");
            return Ok((url, origin, None));
        }
    }
    if let Some(bin) = server_binaries() {
        let cluster = PrivateCluster::start(&bin, &data_dir.join("postgres"), PRIVATE_PORT)?;
        let server = format!(
            "postgres://{}@127.0.0.1:{PRIVATE_PORT}/postgres",
            cluster.user
        );
        let url = ensure_database(&server, &name).await?;
        let origin = format!("a private cluster in {}", cluster.dir.display());
        return Ok((url, origin, Some(cluster)));
    }
    bail!(
        "no PostgreSQL found: set DATABASE_URL, start a server on localhost:5432, \
         or install the server binaries (e.g. `apt-get install postgresql`) so sidbooth can run its own"
    )
}

/// Takes the stack's advisory lock on its database, or says which folder's stack holds it.
async fn hold_lock(url: &str, data_dir: &Path) -> Result<PgConnection> {
    let mut conn = PgConnection::connect(url)
        .await
        .with_context(|| format!("connecting to the dev database {}", redact(url)))?;
    // One lock per database: the key is fixed, the database is the stack's own.
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(DEV_LOCK_KEY)
        .fetch_one(&mut conn)
        .await?;
    if !got {
        bail!(
            "another `sidbooth dev` is running on the database {} (data folder {}); stop it, \
             or start this one with another --data-dir",
            redact(url),
            data_dir.display()
        );
    }
    Ok(conn)
}

/// The advisory-lock key a running dev stack holds on its database ("sidbooth" in ASCII).
const DEV_LOCK_KEY: i64 = 0x7369_6462_6f6f_7468;

/// `url` without its password, for messages.
fn redact(url: &str) -> String {
    sidbooth_core::config::redact_url(url)
}

/// Writes `text` to `path` readable by its owner only (it may hold a password).
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

fn answers(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(300)).is_ok()
}

/// Connects to `server` and creates `name` unless it exists; returns the URL of `name`.
async fn ensure_database(server: &str, name: &str) -> Result<String> {
    let mut admin = PgConnection::connect(server).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        // An identifier cannot be bound; `name` is ours (letters, digits, underscores) and is
        // quoted anyway.
        debug_assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await?;
    }
    Ok(format!(
        "{}/{name}",
        server.rsplit_once('/').map_or(server, |(b, _)| b)
    ))
}

/// The folder holding initdb and pg_ctl: PATH first, then Debian's layout.
fn server_binaries() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .find(|p| p.join("initdb").is_file() && p.join("pg_ctl").is_file())
    });
    on_path.or_else(|| {
        let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|bin| bin.join("initdb").is_file())
            .collect();
        versions.sort();
        versions.pop()
    })
}

/// A cluster started by us; stopped when dropped (also when a caller panics).
struct PrivateCluster {
    bin: PathBuf,
    dir: PathBuf,
    user: String,
    /// Set when we run as root: commands go through `runuser -u <user>`.
    run_as: Option<String>,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn user_exists(name: &str) -> bool {
    Command::new("id")
        .arg(name)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

impl PrivateCluster {
    fn start(bin: &Path, dir: &Path, port: u16) -> Result<Self> {
        let run_as = if is_root() {
            let user = ["postgres", "nobody"]
                .into_iter()
                .find(|u| user_exists(u))
                .context(
                    "running as root and no unprivileged user (postgres, nobody) to run initdb as; \
                     create one or set DATABASE_URL",
                )?;
            Some(user.to_owned())
        } else {
            None
        };
        let user = "postgres".to_owned();
        let cluster = Self {
            bin: bin.to_owned(),
            dir: dir.to_owned(),
            user,
            run_as,
        };
        std::fs::create_dir_all(dir)?;
        if let Some(owner) = &cluster.run_as {
            let status = Command::new("chown")
                .args(["-R", owner])
                .arg(dir)
                .status()?;
            if !status.success() {
                bail!("could not hand {} to user {owner}", dir.display());
            }
        }
        if !dir.join("PG_VERSION").exists() {
            cluster.run(
                "initdb",
                &[
                    "-D",
                    &dir.to_string_lossy(),
                    "-U",
                    &cluster.user,
                    "--auth=trust",
                    "-E",
                    "UTF8",
                ],
            )?;
        }
        let opts = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -k {}",
            dir.display()
        );
        let log = dir.join("server.log");
        let started = cluster.run(
            "pg_ctl",
            &[
                "-D",
                &dir.to_string_lossy(),
                "-o",
                &opts,
                "-l",
                &log.to_string_lossy(),
                "-w",
                "start",
            ],
        );
        if let Err(e) = started {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect::<Vec<_>>();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("{e}\nserver log {}:\n{}", log.display(), tail.join("\n"));
        }
        Ok(cluster)
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<()> {
        let exe = self.bin.join(program);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out = cmd
            .args(args)
            .output()
            .with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    fn stop(&self) {
        // pg_ctl refuses to stop a stopped server; nothing to do then.
        let _ = self.run(
            "pg_ctl",
            &["-D", &self.dir.to_string_lossy(), "-m", "fast", "stop"],
        );
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_data_folder_names_its_own_database() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let name = dev_database_name(a.path());
        assert_ne!(name, dev_database_name(b.path()));
        // The same folder however it is spelled.
        let spelled = a.path().join("x").join("..");
        std::fs::create_dir(a.path().join("x")).unwrap();
        assert_eq!(name, dev_database_name(&spelled));
        assert!(name.starts_with("sidbooth_dev_") && name.len() == "sidbooth_dev_".len() + 12);
    }

    /// A second stack on the same database is refused, naming the folder; the lock goes with the
    /// first stack.
    #[tokio::test]
    async fn a_second_stack_on_the_same_database_is_refused() {
        let db = sidbooth_core::testing::TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let first = hold_lock(&db.url, dir.path()).await.unwrap();
        let err = hold_lock(&db.url, dir.path())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("another `sidbooth dev` is running"), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        drop(first);
        // The server releases the lock when the connection's backend ends; give it a moment.
        let mut last = None;
        for _ in 0..50 {
            match hold_lock(&db.url, dir.path()).await {
                Ok(_) => return,
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the lock was not released: {last:?}");
    }

    /// The third way `sidbooth dev` finds a database: a cluster of its own, initialised and
    /// started in the data folder (as root through an unprivileged user), then stopped.
    #[tokio::test]
    async fn a_private_cluster_is_initialised_started_and_stopped() {
        let bin = server_binaries().expect("the PostgreSQL server binaries (initdb, pg_ctl)");
        let data = tempfile::tempdir().unwrap();
        // The cluster's user must be able to reach its folder.
        std::fs::set_permissions(
            data.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cluster = PrivateCluster::start(&bin, &data.path().join("postgres"), port).unwrap();
        let server = format!("postgres://{}@127.0.0.1:{port}/postgres", cluster.user);
        let url = ensure_database(&server, "sidbooth_dev_test")
            .await
            .unwrap_or_else(|e| {
                let log = std::fs::read_to_string(data.path().join("postgres/server.log"))
                    .unwrap_or_default();
                panic!("{e}; server log:\n{log}")
            });
        let mut conn = PgConnection::connect(&url).await.unwrap();
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(one, 1);
        drop(conn);
        // Idempotent: a second start on the initialised folder finds it running or starts it.
        drop(cluster);
        assert!(!answers(port), "the cluster stopped");
        let again = PrivateCluster::start(&bin, &data.path().join("postgres"), port).unwrap();
        assert!(answers(port), "restarted on the existing folder");
        drop(again);
        assert!(!answers(port), "stopped again");
    }
}
