//! Finding a Postgres for `sidbooth dev`, in this order:
//! 1. DATABASE_URL;
//! 2. a server answering on localhost:5432, where we create our own database;
//! 3. a private cluster initialised and started in the data folder, where the PostgreSQL server
//!    binaries are installed (as root, the cluster runs as the unprivileged `postgres` or
//!    `nobody` user, since initdb refuses to run as root);
//! 4. otherwise an error that says in one line how to get one.

use std::{
    net::TcpStream,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use sqlx::{Connection, PgConnection};

const DEV_DATABASE: &str = "sidbooth_dev";
const PRIVATE_PORT: u16 = 54329;

/// Where the database came from, for the start-up banner.
pub struct DevDatabase {
    pub url: String,
    pub origin: String,
    /// A cluster we started; it stops when this is dropped.
    _cluster: Option<PrivateCluster>,
}

pub async fn find(data_dir: &Path) -> Result<DevDatabase> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        return Ok(DevDatabase {
            url,
            origin: "DATABASE_URL".into(),
            _cluster: None,
        });
    }
    if answers(5432) {
        let user = std::env::var("PGUSER").unwrap_or_else(|_| "postgres".into());
        let server = format!("postgres://{user}@127.0.0.1:5432/postgres");
        if let Ok(url) = ensure_database(&server, DEV_DATABASE).await {
            return Ok(DevDatabase {
                url,
                origin: format!("the server on localhost:5432 (database {DEV_DATABASE})"),
                _cluster: None,
            });
        }
    }
    if let Some(bin) = server_binaries() {
        let cluster = PrivateCluster::start(&bin, &data_dir.join("postgres"), PRIVATE_PORT)?;
        let server = format!(
            "postgres://{}@127.0.0.1:{PRIVATE_PORT}/postgres",
            cluster.user
        );
        let url = ensure_database(&server, DEV_DATABASE).await?;
        return Ok(DevDatabase {
            url,
            origin: format!("a private cluster in {}", cluster.dir.display()),
            _cluster: Some(cluster),
        });
    }
    bail!(
        "no PostgreSQL found: set DATABASE_URL, start a server on localhost:5432, \
         or install the server binaries (e.g. `apt-get install postgresql`) so sidbooth can run its own"
    )
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
        sqlx::query(&format!("CREATE DATABASE {name}"))
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
        let url = ensure_database(&server, DEV_DATABASE)
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
