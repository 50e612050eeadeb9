//! Test environment: a fresh database on the shared server, an emulator, and configs wired to both.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use engage_sync::batch::emulator::{Emulator, EmulatorConfig, RecordedOperation};
use engage_sync::config::Config;
use engage_sync::local_pg::{self, PgServer};
use engage_sync::sync::{sync_once, App, SyncOptions, SyncReport};
use serde_json::{json, Value};
use sqlx::{Connection, Executor, PgConnection, PgPool};

static SERVER: OnceLock<PgServer> = OnceLock::new();
static NEXT_DATABASE: AtomicU32 = AtomicU32::new(0);

fn server() -> &'static PgServer {
    SERVER.get_or_init(|| {
        let server = local_pg::locate_or_start().expect("a PostgreSQL server for the tests");
        eprintln!("tests use PostgreSQL: {}", server.origin);
        server
    })
}

/// With `RUST_LOG` set, the crate's logs go to each test's captured output (shown when it fails, or
/// with `--nocapture`), so a failure seen only in CI can be read after the fact.
fn init_test_logs() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        if let Ok(filter) = std::env::var("RUST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
    });
}

/// A database of its own plus an emulator of its own.
pub struct TestEnv {
    pub database_url: String,
    pub pool: PgPool,
    pub emulator: Emulator,
    /// Extra `[delivery]` lines for the generated config.
    pub delivery: String,
}

impl TestEnv {
    pub async fn new() -> Self {
        Self::with_emulator(EmulatorConfig::default()).await
    }

    pub async fn with_emulator(emulator_config: EmulatorConfig) -> Self {
        init_test_logs();
        let server = tokio::task::spawn_blocking(server)
            .await
            .expect("server lookup");
        let name = format!(
            "engage_it_{}_{}",
            std::process::id(),
            NEXT_DATABASE.fetch_add(1, Ordering::SeqCst)
        );
        let database_url = create_database(server, &name).await;
        let pool = PgPool::connect(&database_url).await.expect("connect");
        engage_sync::db::migrate(&pool).await.expect("migrate");
        pool.execute("CREATE TABLE memberships (audience text NOT NULL, user_id text)")
            .await
            .expect("source table");
        let emulator = Emulator::start(emulator_config, SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("emulator");
        Self {
            database_url,
            pool,
            emulator,
            delivery: String::new(),
        }
    }

    /// The TOML of a config pointing at this database and emulator, plus `definitions`.
    pub fn config_text(&self, definitions: &str) -> String {
        let emulator = self.emulator.config();
        format!(
            r#"[database]
url = "{}"
[batch]
api_url = "{}"
api_version = "2.11"
project_key = "{}"
rest_api_key = "{}"
request_timeout_seconds = 5
[admin]
listen = "127.0.0.1:0"
[delivery]
retry_base_ms = 20
retry_cap_seconds = 1
claim_lease_seconds = 2
{}
{definitions}"#,
            self.database_url,
            self.emulator.url(),
            emulator.project_key,
            emulator.rest_api_key,
            self.delivery,
        )
    }

    pub fn config(&self, definitions: &str) -> Config {
        Config::parse(
            &self.config_text(definitions),
            Path::new("test.toml"),
            |_| None,
        )
        .expect("valid test config")
    }

    pub async fn app(&self, definitions: &str) -> App {
        App::connect(self.config(definitions)).await.expect("app")
    }

    /// Replaces an audience's members in the source table.
    pub async fn set_members(&self, audience: &str, ids: &[String]) {
        let mut tx = self.pool.begin().await.unwrap();
        sqlx::query("DELETE FROM memberships WHERE audience = $1")
            .bind(audience)
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query("INSERT INTO memberships SELECT $1, unnest($2::text[])")
            .bind(audience)
            .bind(ids)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }

    pub async fn snapshot(&self, key: &str) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT custom_id FROM snapshot WHERE definition_key = $1 AND value = 'true' ORDER BY custom_id",
        )
        .bind(key)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    pub async fn outbox_len(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Waits until the emulator has recorded at least `count` operations (30 s at most).
    pub async fn wait_for_recorded(&self, count: usize) {
        let started = tokio::time::Instant::now();
        while self.emulator.recorded().len() < count {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(30),
                "delivery never reached {count} operations"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Asserts that Batch and the snapshot hold exactly `members` as `true` and `former` as `false`
    /// for `key`, with nothing left in the outbox.
    pub async fn assert_converged(&self, key: &str, members: &[String], former: &[String]) {
        assert_eq!(self.outbox_len().await, 0, "nothing left to deliver");
        assert_eq!(self.emulator.custom_ids_with(key, &json!(true)), members);
        assert_eq!(self.emulator.custom_ids_with(key, &json!(false)), former);
        assert_eq!(self.snapshot(key).await, members);
    }

    /// Operations received since the last call, grouped by custom_id.
    pub fn take_recorded(&self) -> Vec<RecordedOperation> {
        let recorded = self.emulator.recorded();
        self.emulator.clear_recorded();
        recorded
    }
}

/// A daemon running in the test's runtime.
pub struct RunningDaemon {
    pub admin: Option<std::net::SocketAddr>,
    /// The ingestion endpoint, when the config has `[ingest]`.
    pub ingest: Option<std::net::SocketAddr>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningDaemon {
    pub async fn start(app: App) -> Self {
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready, admin) = tokio::sync::oneshot::channel();
        let (ingest_ready, ingest) = tokio::sync::oneshot::channel();
        let serves_ingest = app.config.ingest.is_some();
        let options = engage_sync::daemon::DaemonOptions {
            on_ready: Some(ready),
            on_ingest_ready: Some(ingest_ready),
        };
        let task = tokio::spawn(engage_sync::daemon::run(
            app,
            async move {
                let _ = stopped.await;
            },
            options,
        ));
        let admin = admin.await.expect("the daemon starts");
        let ingest = if serves_ingest {
            Some(ingest.await.expect("the ingestion endpoint starts"))
        } else {
            None
        };
        Self {
            admin,
            ingest,
            shutdown: Some(shutdown),
            task,
        }
    }

    /// Asks for a graceful shutdown and waits for it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        (&mut self.task).await.expect("the daemon task")
    }
}

/// A definition block for an audience reading `memberships`.
pub fn audience(name: &str, source_audience: &str) -> String {
    format!(
        "[[audience]]\nname = \"{name}\"\nquery = \"SELECT user_id FROM memberships WHERE audience = '{source_audience}'\"\n"
    )
}

/// The same, run on `schedule`.
pub fn scheduled_audience(name: &str, source_audience: &str, schedule: &str) -> String {
    format!(
        "{}schedule = \"{schedule}\"\n",
        audience(name, source_audience)
    )
}

pub fn ids(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i:05}")).collect()
}

pub async fn sync(app: &App) -> SyncReport {
    sync_once(app, &SyncOptions::default())
        .await
        .expect("sync runs")
}

/// custom_id → the attribute values it received, in order.
pub fn values_by_user(
    recorded: &[RecordedOperation],
    attribute: &str,
) -> BTreeMap<String, Vec<Value>> {
    let mut by_user: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for operation in recorded {
        if let Some(value) = operation.attributes.get(attribute) {
            by_user
                .entry(operation.custom_id.clone())
                .or_default()
                .push(value.clone());
        }
    }
    by_user
}

async fn create_database(server: &PgServer, name: &str) -> String {
    let mut admin = PgConnection::connect(&server.url_for("postgres"))
        .await
        .expect("connect to the postgres database");
    static CLEANED: OnceLock<()> = OnceLock::new();
    if CLEANED.set(()).is_ok() {
        // Databases left by earlier runs of this binary (other pids).
        let stale: Vec<String> = sqlx::query_scalar(
            "SELECT datname FROM pg_database WHERE datname LIKE 'engage_it_%' AND datname NOT LIKE $1",
        )
        .bind(format!("engage_it_{}_%", std::process::id()))
        .fetch_all(&mut admin)
        .await
        .unwrap_or_default();
        for database in stale {
            let _ = admin
                .execute(format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)").as_str())
                .await;
        }
    }
    admin
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .expect("create database");
    server.url_for(name)
}
