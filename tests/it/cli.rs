//! The binary as an operator uses it: migrate, sync, status, dry runs, errors, kill -9.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::harness::{audience, ids, TestEnv};

const BINARY: &str = env!("CARGO_BIN_EXE_engage-sync");

/// A config file in a folder of its own, deleted when dropped.
struct ConfigFile {
    path: PathBuf,
}

impl std::ops::Deref for ConfigFile {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.path
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn config_file(env: &TestEnv, definitions: &str) -> ConfigFile {
    let dir = std::env::temp_dir().join(format!(
        "engage-sync-it-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.toml");
    std::fs::write(&path, env.config_text(definitions)).unwrap();
    ConfigFile { path }
}

fn engage_sync(config: &PathBuf, args: &[&str]) -> Command {
    let mut command = Command::new(BINARY);
    command
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("BATCH_API_URL")
        .env_remove("BATCH_PROJECT_KEY")
        .env_remove("BATCH_REST_API_KEY")
        .env_remove("SOURCE_DATABASE_URL")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    command
}

async fn run(mut command: Command) -> Output {
    tokio::task::spawn_blocking(move || command.output().expect("run engage-sync"))
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_sync_status_on_a_fresh_database() {
    let env = TestEnv::new().await;
    // A database without engage-sync's schema: `sync` must ask for `migrate` first.
    env.set_members("m", &ids("u", 0..25)).await;
    sqlx::query(
        "DROP TABLE _sqlx_migrations, runs, definitions, snapshot, outbox, rejections, events",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let config = config_file(&env, &audience("Order Completed Last 30 Days", "m"));

    let output = run(engage_sync(&config, &["sync"])).await;
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("engage-sync migrate"),
        "{}",
        text(&output.stderr)
    );

    let output = run(engage_sync(&config, &["migrate"])).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("Migrations applied"));

    let output = run(engage_sync(&config, &["sync", "--dry-run"])).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert!(
        stdout.contains("Dry run") && stdout.contains("would send 25 entered"),
        "{stdout}"
    );
    assert!(
        stdout.contains(r#""order_completed_last_30_days": true"#),
        "{stdout}"
    );
    assert!(env.emulator.recorded().is_empty());

    let output = run(engage_sync(&config, &["sync"])).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        text(&output.stdout).contains("sent 25 entered, 0 left"),
        "{}",
        text(&output.stdout)
    );
    assert_eq!(
        env.emulator
            .custom_ids_with("order_completed_last_30_days", &json!(true))
            .len(),
        25
    );

    let output = run(engage_sync(
        &config,
        &["sync", "--only", "order_completed_last_30_days"],
    ))
    .await;
    assert!(output.status.success());
    assert!(text(&output.stdout).contains("sent 0 entered, 0 left"));

    let output = run(engage_sync(&config, &["status"])).await;
    assert!(output.status.success());
    let stdout = text(&output.stdout);
    let row = stdout
        .lines()
        .find(|line| line.starts_with("order_completed_last_30_days"))
        .expect(&stdout);
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        &cells[..5],
        &["order_completed_last_30_days", "audience", "25", "0", "0"],
        "{stdout}"
    );
    assert_eq!(cells.last(), Some(&"succeeded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_a_missing_state_database() {
    let env = TestEnv::new().await;
    let missing = format!("{}_new", env.database_url);
    let name = missing.rsplit('/').next().unwrap().to_owned();
    let dir = config_file(&env, "");
    std::fs::write(
        &*dir,
        env.config_text("").replace(&env.database_url, &missing),
    )
    .unwrap();

    let output = run(engage_sync(&dir, &["migrate"])).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert!(
        stdout.starts_with("Created ") && stdout.contains(&format!("/{name}.")),
        "{stdout}"
    );
    let output = run(engage_sync(&dir, &["migrate"])).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(!text(&output.stdout).contains("Created"), "only once");
    assert!(text(&output.stdout).contains("Migrations applied"));

    sqlx::query(&format!("DROP DATABASE \"{name}\" WITH (FORCE)"))
        .execute(&env.pool)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_errors_name_the_definition_in_one_line() {
    let env = TestEnv::new().await;
    let config = config_file(
        &env,
        "[[audience]]\nname = \"Customers Who Ordered In The Last Thirty Days Twice\"\nquery = \"SELECT 1\"\n",
    );
    let output = run(engage_sync(&config, &["sync"])).await;
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("Customers Who Ordered") && stderr.contains("key ="),
        "{stderr}"
    );

    let missing = std::env::temp_dir().join("engage-sync-no-such-config.toml");
    let output = run(engage_sync(&missing, &["sync"])).await;
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("engage-sync-no-such-config.toml"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_api_key_never_reaches_logs_or_errors() {
    let env = TestEnv::new().await;
    env.set_members("m", &ids("u", 0..5)).await;
    let config = config_file(&env, &audience("Members", "m"));
    let secret = "sk-live-do-not-print-0123456789";
    let text_with_secret = std::fs::read_to_string(&config.path).unwrap().replace(
        &format!("rest_api_key = \"{}\"", env.emulator.config().rest_api_key),
        &format!("rest_api_key = \"{secret}\""),
    );
    std::fs::write(&config.path, text_with_secret).unwrap();
    let mut command = engage_sync(&config, &["sync"]);
    command.env("RUST_LOG", "trace");
    let output = run(command).await;
    assert!(!output.status.success(), "the emulator refuses the key");
    let everything = format!("{}{}", text(&output.stdout), text(&output.stderr));
    assert!(everything.contains("401"), "{everything}");
    assert!(!everything.contains(secret), "the key leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_killed_with_sigkill_mid_delivery_converges_on_rerun() {
    let mut env = TestEnv::new().await;
    env.delivery = "rate_per_second = 250\nburst = 200\nworkers = 1".into();
    let members = ids("u", 0..300);
    env.set_members("m", &members).await;
    let config = config_file(&env, &audience("Members", "m"));
    let output = run(engage_sync(&config, &["sync"])).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    env.take_recorded();

    let next = ids("n", 0..1200);
    env.set_members("m", &next).await;
    let mut child = engage_sync(&config, &["sync"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let waited = std::time::Instant::now();
    while env.emulator.recorded().len() < 400 {
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "delivery never started"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "sync ended before it could be killed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(env.outbox_len().await > 0, "the kill left work behind");

    let output = run(engage_sync(&config, &["sync"])).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    env.assert_converged("members", &next, &members).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_stops_on_sigterm_within_the_grace_period_and_loses_nothing() {
    let mut env = TestEnv::new().await;
    env.delivery = "bulk_rate_per_second = 8000\n[daemon]\nshutdown_grace_seconds = 5".into();
    let members = ids("u", 0..40_000);
    env.set_members("m", &members).await;
    let config = config_file(
        &env,
        &crate::harness::scheduled_audience("Members", "m", "* * * * * *"),
    );
    let mut child = engage_sync(&config, &["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    env.wait_for_recorded(10_000).await;
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let signalled = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        (status, stderr)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "exit 0 on SIGTERM: {}", status.1);
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "stopped within the grace period"
    );
    assert!(status.1.contains("Shutting down"), "{}", status.1);
    let claimed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE claimed_by IS NOT NULL")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(claimed, 0, "claims were given back");
    let runs: Vec<String> = sqlx::query_scalar("SELECT outcome FROM runs")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert!(
        runs.iter().all(|outcome| outcome != "running"),
        "runs were closed: {runs:?}"
    );

    let output = run(engage_sync(&config, &["sync"])).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    env.assert_converged("members", &members, &[]).await;
}
