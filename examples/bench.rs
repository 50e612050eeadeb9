//! Benchmarks of engage-sync against a real PostgreSQL and the local Batch-compatible server, with
//! Batch's rate limits enforced. Run through `bench/run` (release build); it prints figures and
//! asserts nothing.
//!
//! `table [--sizes 100000,1000000]`: for each size, an audience of that many members is synced
//! for the first time by the `engage-sync` binary (a child process, so its peak RSS is its own),
//! then 1% of it churns (0.5% leave, 0.5% enter) and an incremental sync runs. Beside the diff,
//! the bare SQL any diff needs (a FULL OUTER JOIN of the new membership and the snapshot, counting
//! differing rows) is timed on the same tables. Last, an idle `engage-sync run` is watched for 60 s.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use engage_sync::batch::emulator::{Emulator, EmulatorConfig};
use engage_sync::batch::limits::{
    MASS_UPDATE_RATE_PER_SECOND, UPDATE_BURST, UPDATE_RATE_PER_SECOND,
};
use engage_sync::local_pg;
use serde_json::Value;
use sqlx::{Connection, Executor, PgConnection};

const DATABASE: &str = "engage_sync_bench";
const KEY: &str = "bench_members";
const IDLE_WATCH: Duration = Duration::from_secs(60);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sizes: Vec<u64> = match args.as_slice() {
        [] => vec![100_000, 1_000_000],
        [command] if command == "table" => vec![100_000, 1_000_000],
        [command, flag, list] if command == "table" && flag == "--sizes" => list
            .split(',')
            .map(|n| n.trim().replace('_', "").parse::<u64>())
            .collect::<Result<_, _>>()
            .context("--sizes takes numbers separated by commas")?,
        _ => anyhow::bail!("usage: bench table [--sizes 100000,1000000]"),
    };
    let binary = std::env::var_os("ENGAGE_SYNC_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/release/engage-sync"));
    anyhow::ensure!(
        binary.exists(),
        "{} is missing: build it with cargo build --release",
        binary.display()
    );

    let mut server = tokio::task::spawn_blocking(local_pg::locate_or_start).await??;
    eprintln!("PostgreSQL: {}", server.origin);
    let work = std::env::temp_dir().join(format!("engage-sync-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;

    let mut columns = Vec::new();
    for &users in &sizes {
        let database_url = server.recreate_database(DATABASE).await?;
        columns.push(measure_size(&binary, &database_url, &work, users).await?);
        server.drop_database(DATABASE).await?;
    }
    let database_url = server.recreate_database(DATABASE).await?;
    let idle = idle_cpu(&binary, &database_url, &work).await?;
    server.drop_database(DATABASE).await?;
    server.stop();
    let _ = std::fs::remove_dir_all(&work);

    print_table(&columns, idle);
    Ok(())
}

/// The figures of one size.
struct Column {
    users: u64,
    initial_seconds: f64,
    initial_diff_seconds: f64,
    initial_delivery_seconds: f64,
    initial_sweep_seconds: f64,
    initial_bulk_share: f64,
    churn: u64,
    query_seconds: f64,
    diff_seconds: f64,
    bare_sql_seconds: f64,
    delivery_seconds: f64,
    sweep_seconds: f64,
    incremental_seconds: f64,
    incremental_lane: String,
    peak_rss_mb: f64,
}

async fn measure_size(
    binary: &Path,
    database_url: &str,
    work: &Path,
    users: u64,
) -> anyhow::Result<Column> {
    eprintln!("== {users} members ==");
    let (emulator, config, mut db) = prepare(binary, database_url, work, "0 */2 * * *").await?;

    let seeding = Instant::now();
    add_members(&mut db, "user-", users).await?;
    eprintln!("Seeded in {:.1} s.", seeding.elapsed().as_secs_f64());

    let initial = run_child(binary, &config, &["sync"], work).await?;
    anyhow::ensure!(
        initial.success,
        "the initial sync failed: {}",
        initial.stderr
    );
    let stats = emulator.stats();
    let bulk = stats
        .accepted_operations
        .get("profiles/mass-update")
        .copied()
        .unwrap_or(0);
    let total: u64 = stats.accepted_operations.values().sum();
    let (initial_delivery, initial_sweep) = initial.delivery_and_sweep_seconds();
    eprintln!(
        "Initial sync: {:.1} s ({:.1} s delivering, {:.1} s sweeping).",
        initial.wall.as_secs_f64(),
        initial_delivery,
        initial_sweep
    );

    // 1% churn: every 200th member leaves, as many new users enter.
    let churn_each = users / 200;
    sqlx::query("DELETE FROM bench_members WHERE right(user_id, 9)::bigint % 200 = 0")
        .execute(&mut db)
        .await?;
    add_members(&mut db, "new-", churn_each).await?;

    let bare_sql = bare_diff_sql(&mut db).await?;
    let incremental = run_child(binary, &config, &["sync"], work).await?;
    anyhow::ensure!(
        incremental.success,
        "the incremental sync failed: {}",
        incremental.stderr
    );
    let changes = incremental.log_value("Computed changes.", "added")
        + incremental.log_value("Computed changes.", "removed");
    let lane = incremental
        .log_field("Computed changes.", "lane")
        .unwrap_or_else(|| "-".to_owned());
    eprintln!(
        "Incremental sync: {changes} changes in {:.1} s.",
        incremental.wall.as_secs_f64()
    );
    let (delivery, sweep) = incremental.delivery_and_sweep_seconds();
    db.close().await?;
    Ok(Column {
        users,
        initial_seconds: initial.wall.as_secs_f64(),
        initial_diff_seconds: initial.log_value("Computed changes.", "elapsed_ms") / 1000.0,
        initial_delivery_seconds: initial_delivery,
        initial_sweep_seconds: initial_sweep,
        initial_bulk_share: bulk as f64 / total.max(1) as f64,
        churn: changes as u64,
        query_seconds: incremental.log_value("Computed changes.", "query_ms") / 1000.0,
        diff_seconds: incremental.log_value("Computed changes.", "diff_ms") / 1000.0,
        bare_sql_seconds: bare_sql.as_secs_f64(),
        delivery_seconds: delivery,
        sweep_seconds: sweep,
        incremental_seconds: incremental.wall.as_secs_f64(),
        incremental_lane: lane,
        peak_rss_mb: initial.peak_rss_kb.max(incremental.peak_rss_kb) as f64 / 1024.0,
    })
}

/// Adds `count` members named `prefix` and a 9-digit number, and refreshes the statistics.
async fn add_members(db: &mut PgConnection, prefix: &str, count: u64) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO bench_members \
         SELECT $1 || lpad(i::text, 9, '0') FROM generate_series(1, $2) AS i",
    )
    .bind(prefix)
    .bind(count as i64)
    .execute(&mut *db)
    .await?;
    db.execute("ANALYZE bench_members").await?;
    Ok(())
}

/// The least any diff must do: join the new membership with the snapshot and count the users
/// whose value differs. Best of two runs, so the cache favours the bare SQL.
async fn bare_diff_sql(db: &mut PgConnection) -> anyhow::Result<Duration> {
    db.execute(
        "CREATE TEMP TABLE bare_staging AS \
         SELECT DISTINCT user_id AS custom_id, 'true'::jsonb AS value FROM bench_members",
    )
    .await?;
    let mut best = Duration::MAX;
    for _ in 0..2 {
        let started = Instant::now();
        let differing: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM bare_staging s \
             FULL OUTER JOIN (SELECT custom_id, value FROM snapshot WHERE definition_key = $1) p \
               ON p.custom_id = s.custom_id \
             WHERE coalesce(s.value, 'false'::jsonb) IS DISTINCT FROM p.value",
        )
        .bind(KEY)
        .fetch_one(&mut *db)
        .await?;
        best = best.min(started.elapsed());
        eprintln!(
            "Bare FULL OUTER JOIN: {differing} differing rows in {:.2} s.",
            started.elapsed().as_secs_f64()
        );
    }
    db.execute("DROP TABLE bare_staging").await?;
    Ok(best)
}

/// A Batch-compatible server with Batch's limits, a config for it and the database, the migrated
/// schema, and an empty `bench_members` table the audience reads.
async fn prepare(
    binary: &Path,
    database_url: &str,
    work: &Path,
    schedule: &str,
) -> anyhow::Result<(Emulator, PathBuf, PgConnection)> {
    let emulator = Emulator::start(
        EmulatorConfig {
            record_operations: false,
            ..EmulatorConfig::default()
        },
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .await?;
    let config = write_config(work, database_url, &emulator, schedule)?;
    let migrate = run_child(binary, &config, &["migrate"], work).await?;
    anyhow::ensure!(migrate.success, "migrate failed: {}", migrate.stderr);
    let mut db = PgConnection::connect(database_url).await?;
    db.execute("CREATE TABLE bench_members (user_id text NOT NULL)")
        .await?;
    Ok((emulator, config, db))
}

fn write_config(
    work: &Path,
    database_url: &str,
    emulator: &Emulator,
    schedule: &str,
) -> anyhow::Result<PathBuf> {
    let path = work.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[database]\nurl = \"{database_url}\"\n[batch]\napi_url = \"{}\"\nproject_key = \"{}\"\n\
             rest_api_key = \"{}\"\n[admin]\nlisten = \"off\"\n\
             [[audience]]\nname = \"Bench Members\"\nquery = \"SELECT user_id FROM bench_members\"\n\
             schedule = \"{schedule}\"\n",
            emulator.url(),
            emulator.config().project_key,
            emulator.config().rest_api_key,
        ),
    )?;
    Ok(path)
}

/// What a finished child printed, how long it took and its peak RSS.
struct ChildRun {
    success: bool,
    wall: Duration,
    peak_rss_kb: u64,
    stderr: String,
    /// Log lines (JSON) by message.
    logs: BTreeMap<String, Vec<Value>>,
}

impl ChildRun {
    /// The sum of a numeric field over every log line with this message.
    fn log_value(&self, message: &str, field: &str) -> f64 {
        self.logs
            .get(message)
            .into_iter()
            .flatten()
            .filter_map(|line| line[field].as_f64())
            // Not `sum()`: an empty f64 sum is -0.0, printed as "-0.00".
            .fold(0.0, |total, value| total + value)
    }

    /// Seconds spent delivering, and apart from that sweeping the outbox (which the workers do
    /// once the lane ran dry, inside the delivery's elapsed time).
    fn delivery_and_sweep_seconds(&self) -> (f64, f64) {
        let sweep = self.log_value("Swept the outbox after a large delivery.", "elapsed_ms");
        let delivery = self.log_value("Delivery finished.", "elapsed_ms") - sweep;
        (delivery / 1000.0, sweep / 1000.0)
    }

    fn log_field(&self, message: &str, field: &str) -> Option<String> {
        self.logs.get(message)?.first()?[field]
            .as_str()
            .map(str::to_owned)
    }
}

/// Runs the binary to completion; output goes to files (no pipe can fill up). Its peak RSS is
/// read from `VmHWM` while it runs: `wait4`'s `ru_maxrss` would report this process's own peak,
/// because the child starts as a vfork of it and Linux carries the old high-water mark over exec.
async fn run_child(
    binary: &Path,
    config: &Path,
    args: &[&str],
    work: &Path,
) -> anyhow::Result<ChildRun> {
    let stderr_path = work.join("stderr.log");
    let mut child = Command::new(binary)
        .arg("--config")
        .arg(config)
        .args(["--log-format", "json"])
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path)?)
        .spawn()?;
    let started = Instant::now();
    let (status, peak_rss_kb) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut peak_rss_kb = 0;
        loop {
            // The high-water mark only grows, so the last reading before exit is the peak.
            if let Some(hwm) = high_water_rss_kb(child.id()) {
                peak_rss_kb = hwm;
            }
            if let Some(status) = child.try_wait()? {
                return Ok((status, peak_rss_kb));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await??;
    let wall = started.elapsed();
    let stderr = std::fs::read_to_string(&stderr_path)?;
    let mut logs: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for line in stderr.lines() {
        if let Ok(value) = serde_json::from_str::<Value>(line) {
            // Events are flattened: the message and fields sit at the top level.
            if let Some(message) = value["message"].as_str() {
                logs.entry(message.to_owned())
                    .or_default()
                    .push(value.clone());
            }
        }
    }
    Ok(ChildRun {
        success: status.success(),
        wall,
        peak_rss_kb,
        stderr,
        logs,
    })
}

/// CPU time of an idle `engage-sync run` (nothing scheduled, nothing pending) over 60 s, as a
/// share of one core.
async fn idle_cpu(binary: &Path, database_url: &str, work: &Path) -> anyhow::Result<f64> {
    eprintln!("== idle daemon, {} s ==", IDLE_WATCH.as_secs());
    // Once a year: the daemon only waits.
    let (_emulator, config, db) = prepare(binary, database_url, work, "0 0 1 1 *").await?;
    db.close().await?;
    let mut child = Command::new(binary)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = cpu_ticks(child.id())?;
    tokio::time::sleep(IDLE_WATCH).await;
    let after = cpu_ticks(child.id())?;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    child.wait()?;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((after - before) as f64 / ticks_per_second / IDLE_WATCH.as_secs_f64())
}

/// `VmHWM` (peak resident set) of a running process, from /proc.
fn high_water_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User + system CPU ticks of a process, from /proc.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at state; utime, stime are 14, 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("unexpected /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

fn print_table(columns: &[Column], idle_share: f64) {
    let header: Vec<String> = columns.iter().map(|c| thousands(c.users)).collect();
    println!("| figure (users →) | {} | target |", header.join(" | "));
    println!("|---|{}---|", "---|".repeat(columns.len()));
    let row = |name: &str, cells: Vec<String>, target: &str| {
        println!("| {name} | {} | {target} |", cells.join(" | "));
    };
    let each = |f: &dyn Fn(&Column) -> String| columns.iter().map(f).collect::<Vec<_>>();
    let seconds_row = |name: &str, field: fn(&Column) -> f64| {
        row(name, each(&|c| seconds(field(c))), "");
    };
    row("1% churn (changes sent)", each(&|c| thousands(c.churn)), "");
    seconds_row("diff step", |c| c.diff_seconds);
    seconds_row("bare FULL OUTER JOIN, same tables", |c| c.bare_sql_seconds);
    row(
        "diff / bare SQL",
        each(&|c| format!("**{:.2}×**", c.diff_seconds / c.bare_sql_seconds)),
        "≤ 1.5× at 1M and 10M",
    );
    seconds_row("incremental: query into staging", |c| c.query_seconds);
    seconds_row("incremental: diff", |c| c.diff_seconds);
    row(
        "incremental: delivery",
        each(&|c| {
            format!(
                "{} ({} lane)",
                seconds(c.delivery_seconds),
                c.incremental_lane
            )
        }),
        "",
    );
    seconds_row("incremental: outbox sweep after delivery", |c| {
        c.sweep_seconds
    });
    seconds_row("incremental: end to end (process)", |c| {
        c.incremental_seconds
    });
    row(
        "incremental delivery throughput",
        each(&|c| {
            let rate = c.churn as f64 / c.delivery_seconds;
            let allowed = allowed_rate(&c.incremental_lane, c.delivery_seconds);
            format!(
                "{}/s (**{:.0}%** of the {}/s allowed)",
                thousands(rate as u64),
                100.0 * rate / allowed,
                thousands(allowed as u64)
            )
        }),
        "≥ 90% of the ceiling",
    );
    seconds_row("initial sync: end to end (process)", |c| c.initial_seconds);
    seconds_row("initial sync: query + diff into the outbox", |c| {
        c.initial_diff_seconds
    });
    seconds_row("initial sync: delivery", |c| c.initial_delivery_seconds);
    seconds_row("initial sync: outbox sweep after delivery", |c| {
        c.initial_sweep_seconds
    });
    row(
        "initial sync: delivery throughput",
        each(&|c| {
            let rate = c.users as f64 / c.initial_delivery_seconds;
            format!(
                "{}/s (**{:.0}%** of 10,000/s)",
                thousands(rate as u64),
                100.0 * rate / MASS_UPDATE_RATE_PER_SECOND as f64
            )
        }),
        "≥ 90%",
    );
    row(
        "initial sync: end to end / ceiling",
        each(&|c| {
            format!(
                "{:.2}×",
                c.initial_seconds / (c.users as f64 / MASS_UPDATE_RATE_PER_SECOND as f64)
            )
        }),
        "≤ 1.5×",
    );
    row(
        "initial sync: operations through mass-update",
        each(&|c| format!("{:.1}%", 100.0 * c.initial_bulk_share)),
        "≥ 90%",
    );
    row(
        "peak RSS of engage-sync",
        each(&|c| format!("**{:.0} MB**", c.peak_rss_mb)),
        "≤ 150 MB at 10M",
    );
    println!(
        "\nIdle `engage-sync run` over {} s: **{:.2}% of a core** (target ≤ 1%).",
        IDLE_WATCH.as_secs(),
        100.0 * idle_share
    );
}

/// The rate Batch's limit allows over a delivery of `seconds` on a lane: `/profiles/update` adds
/// its burst of 1,000 on top of 300/s (so a short delivery may run far above 300/s); mass-update
/// has no burst.
fn allowed_rate(lane: &str, seconds: f64) -> f64 {
    if lane == "bulk" {
        MASS_UPDATE_RATE_PER_SECOND as f64
    } else {
        UPDATE_RATE_PER_SECOND as f64 + UPDATE_BURST as f64 / seconds
    }
}

fn seconds(value: f64) -> String {
    format!("{value:.2} s")
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
