//! `engage-sync demo`: finds or starts PostgreSQL, seeds a sample shop, starts the emulator
//! in-process, runs the initial sync, changes some orders, runs an incremental sync, and prints
//! what was sent and what the emulator holds.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use serde_json::json;
use sqlx::{Executor, PgPool};

use crate::batch::emulator::{Emulator, EmulatorConfig};
use crate::config::Config;
use crate::status::format_duration;
use crate::sync::{sync_once, App, SyncOptions};
use crate::{db, local_pg, status};

const DEMO_DATABASE: &str = "engage_sync_demo";

/// The demo's definitions, shown to the user as the config.toml they would write.
fn demo_config(database_url: &str, api_url: &str, emulator: &EmulatorConfig) -> String {
    format!(
        r#"[database]
url = "{database_url}"

[batch]
api_url = "{api_url}"
api_version = "2.11"
project_key = "{project}"
rest_api_key = "{key}"

[[audience]]
name = "Order Completed Last 30 Days"
query = """
SELECT DISTINCT user_id FROM shop_orders
WHERE status = 'completed' AND completed_at > now() - interval '30 days'"""

[[audience]]
name = "High Value Customers"
query = """
SELECT user_id FROM shop_orders WHERE status = 'completed'
GROUP BY user_id HAVING sum(total_cents) >= 40000"""

[[audience]]
name = "Lapsed Buyers"
query = """
SELECT user_id FROM shop_orders WHERE status = 'completed'
GROUP BY user_id HAVING max(completed_at) < now() - interval '60 days'"""

[[computed_trait]]
name = "Total Revenue 180 Days"
query = """
SELECT user_id, sum(total_cents) / 100.0 FROM shop_orders
WHERE status = 'completed' AND completed_at > now() - interval '180 days'
GROUP BY user_id"""

[[computed_trait]]
name = "Last Order At"
query = "SELECT user_id, max(completed_at) FROM shop_orders WHERE status = 'completed' GROUP BY user_id"
"#,
        project = emulator.project_key,
        key = emulator.rest_api_key,
    )
}

pub async fn run(users: u32) -> anyhow::Result<()> {
    let users = users.max(100);
    let demo_started = Instant::now();
    let mut server = tokio::task::spawn_blocking(local_pg::locate_or_start).await??;
    println!("PostgreSQL: {}.", server.origin);

    let result = run_on(&server, users).await;
    server.stop();
    result?;
    println!(
        "Demo finished in {}.",
        format_duration(demo_started.elapsed())
    );
    Ok(())
}

async fn run_on(server: &local_pg::PgServer, users: u32) -> anyhow::Result<()> {
    let database_url = server.recreate_database(DEMO_DATABASE).await?;

    let emulator_config = EmulatorConfig::default();
    let emulator = Emulator::start(
        emulator_config.clone(),
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .await?;
    let config_text = demo_config(&database_url, &emulator.url(), &emulator_config);
    println!("Batch-compatible emulator: {}.", emulator.url());
    println!("\nThe demo's config.toml:\n{}", indent(&config_text));
    let config = Config::parse(&config_text, Path::new("demo config"), |_| None)?;

    let app = App::connect(config).await?;
    db::migrate(&app.pool).await?;
    let seeded = Instant::now();
    seed_shop(&app.pool, users).await?;
    println!(
        "Seeded a shop of {users} users and {} orders in {}.",
        count(&app.pool, "shop_orders").await?,
        format_duration(seeded.elapsed())
    );

    println!("\n== Initial sync (every member goes out once, through /profiles/mass-update) ==");
    let report = sync_once(&app, &SyncOptions::default()).await?;
    print!("{}", crate::cli::render_sync_report(&report, false));
    show_operations(&emulator, 3);
    anyhow::ensure!(
        report.is_success(),
        "the initial sync did not finish: {:?}",
        report.failure_reason()
    );

    emulator.clear_recorded();
    let churn = churn_orders(&app.pool, users).await?;
    println!("\n== Changed some orders: {churn} ==");

    println!("\n== Incremental sync (only changed users, through /profiles/update) ==");
    let report = sync_once(&app, &SyncOptions::default()).await?;
    print!("{}", crate::cli::render_sync_report(&report, false));
    show_operations(&emulator, 3);
    anyhow::ensure!(
        report.is_success(),
        "the incremental sync did not finish: {:?}",
        report.failure_reason()
    );

    println!("\n== A sync with nothing changed ==");
    emulator.clear_recorded();
    let report = sync_once(&app, &SyncOptions::default()).await?;
    print!("{}", crate::cli::render_sync_report(&report, false));
    println!(
        "Operations received by the emulator: {}.",
        emulator.recorded().len()
    );

    println!("\n== engage-sync status ==");
    print!(
        "{}",
        status::render(&status::load(&app.pool, &app.config.keys()).await?)
    );

    let summary = emulator.summary();
    println!("\n== The emulator's final state ==");
    println!("{} profiles.", summary.profiles);
    for (attribute, values) in &summary.attributes {
        let parts: Vec<String> = values
            .iter()
            .map(|(value, n)| format!("{n} {value}"))
            .collect();
        println!("  {attribute}: {}", parts.join(", "));
    }
    println!(
        "Requests by endpoint: {}; answers by status: {}.",
        json!(summary.stats.requests),
        json!(summary.stats.statuses)
    );
    app.pool.close().await;
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|line| format!("    {line}\n")).collect()
}

fn show_operations(emulator: &Emulator, limit: usize) {
    let recorded = emulator.recorded();
    println!(
        "The emulator received {} operation(s); the first {}:",
        recorded.len(),
        limit.min(recorded.len())
    );
    for operation in recorded.iter().take(limit) {
        println!(
            "  {} {}",
            operation.endpoint,
            json!({"identifiers": {"custom_id": operation.custom_id}, "attributes": operation.attributes})
        );
    }
}

async fn count(pool: &PgPool, table: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await?)
}

/// Users with 0 to 5 orders over the last 120 days, reproducibly random.
async fn seed_shop(pool: &PgPool, users: u32) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    tx.execute(
        "CREATE TABLE shop_users (user_id text PRIMARY KEY, email text NOT NULL, signed_up_at timestamptz NOT NULL);
         CREATE TABLE shop_orders (
             order_id bigserial PRIMARY KEY,
             user_id text NOT NULL REFERENCES shop_users,
             total_cents integer NOT NULL,
             status text NOT NULL,
             completed_at timestamptz NOT NULL);
         CREATE INDEX ON shop_orders (user_id);
         SELECT setseed(0.42);",
    )
    .await?;
    sqlx::query(
        "INSERT INTO shop_users \
         SELECT 'user-' || lpad(i::text, 7, '0'), 'user' || i || '@example.com', \
                now() - random() * interval '400 days' \
         FROM generate_series(1, $1) AS i",
    )
    .bind(users as i64)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO shop_orders (user_id, total_cents, status, completed_at) \
         SELECT u.user_id, (500 + random() * 20000)::int, \
                CASE WHEN random() < 0.9 THEN 'completed' ELSE 'refunded' END, \
                now() - random() * interval '120 days' \
         FROM shop_users u, LATERAL generate_series(1, (random() * 5)::int + (u.user_id > '')::int - 1) AS n",
    )
    .execute(&mut *tx)
    .await?;
    tx.execute("ANALYZE shop_users; ANALYZE shop_orders")
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Ages 2% of recent orders out of the 30-day window and adds fresh orders for 1% of users.
async fn churn_orders(pool: &PgPool, users: u32) -> anyhow::Result<String> {
    let aged = sqlx::query(
        "UPDATE shop_orders SET completed_at = completed_at - interval '45 days' \
         WHERE order_id IN (SELECT order_id FROM shop_orders \
                            WHERE completed_at > now() - interval '30 days' \
                            ORDER BY order_id LIMIT (SELECT count(*) / 50 FROM shop_orders))",
    )
    .execute(pool)
    .await?
    .rows_affected();
    let fresh = sqlx::query(
        "INSERT INTO shop_orders (user_id, total_cents, status, completed_at) \
         SELECT user_id, 25000, 'completed', now() FROM shop_users \
         ORDER BY md5(user_id) LIMIT $1",
    )
    .bind((users / 100).max(1) as i64)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(format!(
        "{aged} orders moved back 45 days, {fresh} new orders"
    ))
}
