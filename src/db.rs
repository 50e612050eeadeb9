//! Connections to the state database (and the source database), and the embedded migrations.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::ConnectOptions;
use sqlx::PgPool;

use crate::config::DatabaseSettings;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// `host:port/database` of a URL, for messages: never the user or password.
pub fn describe_url(url: &str) -> String {
    match PgConnectOptions::from_str(url) {
        Ok(options) => format!(
            "{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or("(default)")
        ),
        Err(_) => "(unparsable database URL)".to_owned(),
    }
}

pub async fn connect(settings: &DatabaseSettings, role: &str) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(&settings.url)
        .with_context(|| format!("the {role} database URL is not valid"))?
        .application_name("engage-sync")
        // Large diffs legitimately take seconds; sqlx's default would warn at one second.
        .log_slow_statements(tracing::log::LevelFilter::Info, Duration::from_secs(30));
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options)
        .await
        .with_context(|| {
            format!(
                "cannot connect to the {role} database at {}",
                describe_url(&settings.url)
            )
        })
}

/// `migrate` on a server without the state database creates it, as a new installation expects.
/// Returns whether it did. When the server cannot even be asked (down, no right to the maintenance
/// database), nothing is done here and the connection that follows reports the problem.
pub async fn create_database_if_missing(url: &str) -> anyhow::Result<bool> {
    use sqlx::migrate::MigrateDatabase;
    match sqlx::Postgres::database_exists(url).await {
        Ok(false) => {
            sqlx::Postgres::create_database(url)
                .await
                .with_context(|| format!("cannot create the database {}", describe_url(url)))?;
            Ok(true)
        }
        Ok(true) => Ok(false),
        Err(error) => {
            tracing::debug!(%error, "Could not check whether the state database exists.");
            Ok(false)
        }
    }
}

pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR
        .run(pool)
        .await
        .context("applying migrations failed")
}

/// Fails with a clear hint when the schema is older than this binary expects.
pub async fn ensure_migrated(pool: &PgPool) -> anyhow::Result<()> {
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(pool)
            .await
            .unwrap_or_default();
    let missing = MIGRATOR
        .iter()
        .filter(|migration| !applied.contains(&migration.version))
        .count();
    if missing > 0 {
        anyhow::bail!(
            "the state database lacks {missing} migration(s): run `engage-sync migrate` first"
        );
    }
    Ok(())
}
