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
    /// A cluster we started; stopped on drop.
    private: Option<PrivateCluster>,
}

impl Drop for DevDatabase {
    fn drop(&mut self) {
        if let Some(cluster) = self.private.take() {
            cluster.stop();
        }
    }
}

pub async fn find(data_dir: &Path) -> Result<DevDatabase> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        return Ok(DevDatabase {
            url,
            origin: "DATABASE_URL".into(),
            private: None,
        });
    }
    if answers(5432) {
        let user = std::env::var("PGUSER").unwrap_or_else(|_| "postgres".into());
        let server = format!("postgres://{user}@127.0.0.1:5432/postgres");
        if let Ok(url) = ensure_database(&server, DEV_DATABASE).await {
            return Ok(DevDatabase {
                url,
                origin: format!("the server on localhost:5432 (database {DEV_DATABASE})"),
                private: None,
            });
        }
    }
    if let Some(bin) = server_binaries() {
        let cluster = PrivateCluster::start(&bin, &data_dir.join("postgres"))?;
        let server = format!(
            "postgres://{}@127.0.0.1:{PRIVATE_PORT}/postgres",
            cluster.user
        );
        let url = ensure_database(&server, DEV_DATABASE).await?;
        return Ok(DevDatabase {
            url,
            origin: format!("a private cluster in {}", cluster.dir.display()),
            private: Some(cluster),
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
    fn start(bin: &Path, dir: &Path) -> Result<Self> {
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
            "-p {PRIVATE_PORT} -c listen_addresses=127.0.0.1 -k {}",
            dir.display()
        );
        let log = dir.join("server.log");
        cluster.run(
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
        )?;
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
        let _ = self.run(
            "pg_ctl",
            &["-D", &self.dir.to_string_lossy(), "-m", "fast", "stop"],
        );
    }
}
