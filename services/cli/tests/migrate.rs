//! `sidbooth migrate` and `migrate --check` against a real database, configured the ways a
//! deployment does it: a secret file (`DATABASE_URL_FILE`) and empty variables left over from
//! templates.

use std::process::{Command, Output};

use sidbooth_core::testing::TestDb;

const BIN: &str = env!("CARGO_BIN_EXE_sidbooth");

/// Runs the CLI with only the given variables of ours set (the test's own environment may
/// have DATABASE_URL or SIDBOOTH_DEV_DIR).
fn sidbooth(args: &[&str], env: &[(&str, &str)], cwd: &std::path::Path) -> Output {
    let mut command = Command::new(BIN);
    command.args(args).current_dir(cwd);
    for (name, _) in std::env::vars() {
        if name.starts_with("SIDBOOTH_") || name.starts_with("DATABASE_URL") {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().copied());
    command.output().expect("run sidbooth")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test]
async fn check_reports_pending_migrations_until_they_are_applied() {
    let db = TestDb::empty().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("database-url");
    std::fs::write(&secret, format!("{}\n", db.url)).unwrap();
    let secret = secret.to_str().unwrap();
    // compose's `${DATABASE_URL:-}` passes an empty value when only the file is given.
    let env = [("DATABASE_URL", ""), ("DATABASE_URL_FILE", secret)];

    let before = sidbooth(&["migrate", "--check"], &env, dir.path());
    assert_eq!(before.status.code(), Some(1), "{}", text(&before));
    let shown = text(&before);
    assert!(shown.contains("pending: "), "{shown}");
    assert!(
        shown.contains("migration(s) pending: run `sidbooth migrate`"),
        "{shown}"
    );
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(tables, 0, "a check writes nothing");

    let applied = sidbooth(&["migrate"], &env, dir.path());
    assert!(applied.status.success(), "{}", text(&applied));
    assert!(text(&applied).contains("migrations applied"));

    let after = sidbooth(&["migrate", "--check"], &env, dir.path());
    assert!(after.status.success(), "{}", text(&after));
    assert!(text(&after).contains("the database is up to date"));
}

#[tokio::test]
async fn a_secret_given_twice_or_unreadable_is_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let both = sidbooth(
        &["migrate", "--check"],
        &[
            ("DATABASE_URL", "postgres://127.0.0.1:1/x"),
            ("DATABASE_URL_FILE", "/dev/null"),
        ],
        dir.path(),
    );
    assert!(!both.status.success());
    assert!(
        text(&both).contains("DATABASE_URL and DATABASE_URL_FILE are both set; set one"),
        "{}",
        text(&both)
    );
    let missing = sidbooth(
        &["migrate", "--check"],
        &[("DATABASE_URL_FILE", "/nonexistent/secret")],
        dir.path(),
    );
    assert!(!missing.status.success());
    assert!(
        text(&missing)
            .contains("DATABASE_URL_FILE names /nonexistent/secret, which cannot be read"),
        "{}",
        text(&missing)
    );
    // An empty DATABASE_URL is no URL: the command says where to get one.
    let empty = sidbooth(&["migrate", "--check"], &[("DATABASE_URL", "")], dir.path());
    assert!(!empty.status.success());
    assert!(
        text(&empty).contains("no database: pass --database-url"),
        "{}",
        text(&empty)
    );
}
