//! Benchmarks of engage-sync against a real PostgreSQL and the local Batch-compatible server.
//! Run through `bench/run` (release build); it prints figures, it asserts nothing.
//!
//! `initial-sync --users N`: an audience of N members synced for the first time, which Batch's
//! mass-update ceiling (10,000 profiles/s) bounds at N / 10,000 seconds.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use engage_sync::batch::emulator::{Emulator, EmulatorConfig};
use engage_sync::batch::limits::MASS_UPDATE_RATE_PER_SECOND;
use engage_sync::config::Config;
use engage_sync::local_pg;
use engage_sync::sync::{sync_once, App, SyncOptions};
use sqlx::Executor;

const DATABASE: &str = "engage_sync_bench";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    engage_sync::telemetry::init(engage_sync::telemetry::LogFormat::Text);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let users = match args.as_slice() {
        [command, flag, n] if command == "initial-sync" && flag == "--users" => n.parse::<u64>()?,
        [command] if command == "initial-sync" => 1_000_000,
        _ => anyhow::bail!("usage: bench initial-sync [--users N]"),
    };
    initial_sync(users).await
}

async fn initial_sync(users: u64) -> anyhow::Result<()> {
    let mut server = tokio::task::spawn_blocking(local_pg::locate_or_start).await??;
    eprintln!("PostgreSQL: {}", server.origin);
    let database_url = server.recreate_database(DATABASE).await?;

    let emulator = Emulator::start(
        EmulatorConfig {
            record_operations: false,
            ..EmulatorConfig::default()
        },
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .await?;
    let emulator_config = emulator.config().clone();
    let config = Config::parse(
        &format!(
            "[database]\nurl = \"{}\"\n[batch]\napi_url = \"{}\"\nproject_key = \"{}\"\nrest_api_key = \"{}\"\n\
             [admin]\nlisten = \"off\"\n{}\
             [[audience]]\nname = \"Bench Members\"\nquery = \"SELECT user_id FROM bench_members\"\n",
            database_url,
            emulator.url(),
            emulator_config.project_key,
            emulator_config.rest_api_key,
            std::env::var("BENCH_DELIVERY").map(|d| format!("[delivery]\n{d}\n")).unwrap_or_default(),
        ),
        Path::new("bench"),
        |_| None,
    )?;
    let app = App::connect(config).await?;
    engage_sync::db::migrate(&app.pool).await?;
    let seeding = Instant::now();
    app.pool
        .execute("CREATE TABLE bench_members (user_id text NOT NULL)")
        .await?;
    sqlx::query(
        "INSERT INTO bench_members SELECT 'user-' || lpad(i::text, 9, '0') FROM generate_series(1, $1) AS i",
    )
    .bind(users as i64)
    .execute(&app.pool)
    .await?;
    app.pool.execute("ANALYZE bench_members").await?;
    eprintln!(
        "Seeded {users} members in {:.1} s.",
        seeding.elapsed().as_secs_f64()
    );

    let report = sync_once(&app, &SyncOptions::default())
        .await
        .context("the initial sync")?;
    anyhow::ensure!(
        report.is_success(),
        "the sync failed: {:?}",
        report.failure_reason()
    );
    let stats = emulator.stats();
    let bulk = stats
        .accepted_operations
        .get("profiles/mass-update")
        .copied()
        .unwrap_or(0);
    let total: u64 = stats.accepted_operations.values().sum();
    let ceiling_seconds = users as f64 / MASS_UPDATE_RATE_PER_SECOND as f64;
    let elapsed = report.elapsed.as_secs_f64();

    println!("| figure | value |");
    println!("|---|---|");
    println!("| members | {users} |");
    println!(
        "| query + diff into the outbox | {:.1} s |",
        report.diff_elapsed.as_secs_f64()
    );
    println!(
        "| delivery | {:.1} s |",
        report.delivery_elapsed.as_secs_f64()
    );
    println!("| initial sync, end to end | {elapsed:.1} s |");
    println!("| Batch's ceiling (10,000/s) | {ceiling_seconds:.1} s |");
    println!(
        "| end to end / ceiling | {:.2}x (target ≤ 1.5x) |",
        elapsed / ceiling_seconds
    );
    println!(
        "| delivery throughput | {:.0} profiles/s ({:.0}% of the ceiling) |",
        users as f64 / report.delivery_elapsed.as_secs_f64(),
        100.0 * users as f64
            / report.delivery_elapsed.as_secs_f64()
            / MASS_UPDATE_RATE_PER_SECOND as f64
    );
    println!(
        "| operations through mass-update | {bulk} of {total} ({:.1}%, target ≥ 90%) |",
        100.0 * bulk as f64 / total.max(1) as f64
    );
    println!(
        "| requests, 429s answered | {}, {} |",
        report.delivery.requests, report.delivery.rate_limited
    );

    app.pool.close().await;
    server.drop_database(DATABASE).await?;
    server.stop();
    Ok(())
}
