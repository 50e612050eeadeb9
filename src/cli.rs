//! The command line: `migrate`, `sync`, `run`, `status`, `backfill`, `retire`, `preview`,
//! `replay`, `emulator`, `demo`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::batch::emulator::{Emulator, EmulatorConfig, Faults};
use crate::config::Config;
use crate::status::format_duration;
use crate::sync::{App, SyncOptions, SyncReport};
use crate::telemetry::LogFormat;
use crate::{db, demo, status};

#[derive(Debug, Parser)]
#[command(
    name = "engage-sync",
    version,
    about = "Keeps Batch profiles in step with audiences defined as SQL."
)]
pub struct Cli {
    /// The configuration file.
    #[arg(
        long,
        global = true,
        env = "ENGAGE_SYNC_CONFIG",
        default_value = "config.toml"
    )]
    pub config: PathBuf,
    /// Log lines as text or JSON (to stderr).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "ENGAGE_SYNC_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply the database migrations to the state database.
    Migrate,
    /// Run every definition (or those named) once: compute changes and deliver them.
    Sync(SyncArgs),
    /// Run as a daemon: each definition on its schedule, delivery lanes, admin HTTP; stops cleanly
    /// on SIGINT or SIGTERM.
    Run,
    /// Show each definition: members, pending changes, rejections, last run, orphaned keys.
    Status,
    /// Send every current member of a definition again through the bulk lane (after data loss on
    /// Batch's side); non-members get nothing.
    Backfill {
        /// The definition's key.
        key: String,
    },
    /// Delete a removed definition's attribute (null) from every profile holding it, then forget it.
    Retire {
        /// The orphaned key, as `status` lists it.
        key: String,
    },
    /// Read one Segment message (JSON) on stdin and print the Batch operation it becomes; each
    /// rejected field goes to stderr with its reason. Sends nothing.
    Preview,
    /// Replay Segment identify/track messages (NDJSON; `-` for stdin) to Batch: identifies through
    /// the bulk lane, messages already replayed or ingested are skipped.
    Replay {
        /// The NDJSON file, or `-` for stdin.
        file: PathBuf,
    },
    /// Serve a local Batch-compatible API (for trials and tests).
    Emulator(EmulatorArgs),
    /// Seed a sample shop, sync it to an in-process emulator, change it, sync again.
    Demo(DemoArgs),
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// Only this definition key (repeatable).
    #[arg(long = "only", value_name = "KEY")]
    pub only: Vec<String>,
    /// Print the changes (counts and the first operations as JSON); send and store nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct EmulatorArgs {
    #[arg(long, default_value_t = 8089)]
    pub port: u16,
    #[arg(long, default_value = "demo-project", env = "BATCH_PROJECT_KEY")]
    pub project_key: String,
    #[arg(
        long,
        default_value = "demo-rest-api-key",
        env = "BATCH_REST_API_KEY",
        hide_env_values = true
    )]
    pub rest_api_key: String,
    /// Share of requests to answer with 500 (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    pub fail_500: f64,
    /// Share of requests to answer with 429 (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    pub fail_429: f64,
    /// Do not enforce Batch's rate limits.
    #[arg(long)]
    pub no_rate_limits: bool,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Users in the sample shop.
    #[arg(long, default_value_t = 50_000)]
    pub users: u32,
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Migrate => {
            let config = Config::load(&cli.config)?;
            if db::create_database_if_missing(&config.database.url).await? {
                println!("Created {}.", db::describe_url(&config.database.url));
            }
            let pool = db::connect(&config.database, "state").await?;
            db::migrate(&pool).await?;
            println!(
                "Migrations applied to {}.",
                db::describe_url(&config.database.url)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Sync(args) => {
            let config = Config::load(&cli.config)?;
            let app = App::connect(config).await?;
            let options = SyncOptions {
                only: args.only,
                dry_run: args.dry_run,
                preview_limit: 10,
            };
            let report = crate::sync::sync_once(&app, &options).await?;
            print!("{}", render_sync_report(&report, options.dry_run));
            Ok(exit_for(&report))
        }
        Command::Run => {
            let app = App::connect(Config::load(&cli.config)?).await?;
            crate::daemon::run(app, shutdown_signal(), Default::default()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Backfill { key } => {
            let app = App::connect(Config::load(&cli.config)?).await?;
            let report = crate::sync::backfill(&app, &key).await?;
            print!("{}", render_sync_report(&report, false));
            Ok(exit_for(&report))
        }
        Command::Retire { key } => {
            let app = App::connect(Config::load(&cli.config)?).await?;
            let report = crate::sync::retire(&app, &key).await?;
            match &report.end {
                crate::deliver::DrainEnd::Complete => {
                    println!(
                        "Retired {key}: the attribute was deleted from {} profile(s) and the definition forgotten.",
                        report.profiles
                    );
                    Ok(ExitCode::SUCCESS)
                }
                crate::deliver::DrainEnd::Fatal { reason } => {
                    eprintln!("error: retire incomplete: {reason}");
                    Ok(ExitCode::FAILURE)
                }
                crate::deliver::DrainEnd::Incomplete { pending, .. } => {
                    eprintln!("error: retire incomplete: {pending} deletion(s) still pending; run `engage-sync retire {key}` again");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Status => {
            let config = Config::load(&cli.config)?;
            let pool = db::connect(&config.database, "state").await?;
            db::ensure_migrated(&pool).await?;
            let rows = status::load(&pool, &config.keys()).await?;
            if rows.is_empty() {
                println!("No definition has run yet: run `engage-sync sync`.");
            } else {
                print!("{}", status::render(&rows));
            }
            if let Some(forwarding) = status::load_forwarding(&pool).await? {
                print!("{}", forwarding.render());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Preview => {
            // The mapping comes from the config when there is one; the seed's table otherwise.
            let rules = if cli.config.exists() {
                Config::load(&cli.config)?.mapping
            } else {
                crate::segment::MappingRules::default()
            };
            let mut input = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut input)?;
            let preview = crate::segment::preview(&input, &rules, chrono::Utc::now());
            print!("{}", preview.stdout);
            eprint!("{}", preview.stderr);
            Ok(if preview.mapped {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Replay { file } => {
            let app = App::connect(Config::load(&cli.config)?).await?;
            let report = if file.as_os_str() == "-" {
                crate::replay::replay(&app, tokio::io::BufReader::new(tokio::io::stdin())).await?
            } else {
                let opened = tokio::fs::File::open(&file)
                    .await
                    .map_err(|error| anyhow::anyhow!("cannot open {}: {error}", file.display()))?;
                crate::replay::replay(&app, tokio::io::BufReader::new(opened)).await?
            };
            print!("{}", crate::replay::render(&report));
            Ok(match report.failure_reason() {
                None => ExitCode::SUCCESS,
                Some(reason) => {
                    eprintln!("error: replay incomplete: {reason}");
                    ExitCode::FAILURE
                }
            })
        }
        Command::Emulator(args) => {
            let config = EmulatorConfig {
                project_key: args.project_key,
                rest_api_key: args.rest_api_key,
                enforce_rate_limits: !args.no_rate_limits,
                // A long-running server keeps counters and profiles, not every operation.
                record_operations: false,
                ..EmulatorConfig::default()
            };
            let address = SocketAddr::from(([127, 0, 0, 1], args.port));
            let emulator = Emulator::start(config, address).await?;
            emulator.set_faults(Faults {
                fail_500: args.fail_500,
                fail_429: args.fail_429,
                ..Faults::default()
            });
            println!(
                "Batch-compatible emulator on {} (project key {:?}); inspect it at {}/_emulator/summary. Ctrl-C stops it.",
                emulator.url(),
                emulator.config().project_key,
                emulator.url()
            );
            tokio::signal::ctrl_c().await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => {
            demo::run(args.users).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// 0 when every change was acknowledged or recorded as rejected; otherwise 1 with a one-line reason.
fn exit_for(report: &SyncReport) -> ExitCode {
    match report.failure_reason() {
        None => ExitCode::SUCCESS,
        Some(reason) => {
            eprintln!("error: sync incomplete: {reason}");
            ExitCode::FAILURE
        }
    }
}

/// The human summary `sync` prints on stdout.
pub fn render_sync_report(report: &SyncReport, dry_run: bool) -> String {
    let mut out = String::new();
    if dry_run {
        out.push_str("Dry run: nothing was sent and nothing was stored.\n");
    }
    for definition in &report.definitions {
        let verb = if dry_run { "would send" } else { "sent" };
        match (&definition.error, definition.outcome) {
            (Some(error), crate::sync::RunOutcome::Failed) => {
                out.push_str(&format!("{}: failed: {error}\n", definition.key));
            }
            _ => {
                out.push_str(&format!(
                    "{}: {} rows, {} skipped, {} duplicates; {verb} {} entered, {} left{}{}{} [{}]\n",
                    definition.key,
                    definition.source_rows,
                    definition.skipped_rows,
                    definition.duplicate_rows,
                    definition.added,
                    definition.removed,
                    // Only computed traits have members whose value changes in place.
                    if definition.changed > 0 {
                        format!(", {} changed value", definition.changed)
                    } else {
                        String::new()
                    },
                    if definition.held_back > 0 {
                        format!(", {} held back (refused before)", definition.held_back)
                    } else {
                        String::new()
                    },
                    definition
                        .lane
                        .map(|lane| format!(" via the {lane} lane"))
                        .unwrap_or_default(),
                    definition.outcome.as_str(),
                ));
            }
        }
    }
    if dry_run {
        if !report.preview.is_empty() {
            out.push_str(&format!("First {} operation(s):\n", report.preview.len()));
            out.push_str(&serde_json::to_string_pretty(&report.preview).unwrap_or_default());
            out.push('\n');
        }
    } else {
        let totals = &report.delivery;
        out.push_str(&format!(
            "Delivered {} change(s) in {} operation(s) over {} request(s); {} rejected, {} retries ({} rate-limited). Diff {}, delivery {}, total {}.\n",
            totals.acknowledged,
            totals.operations,
            totals.requests,
            totals.rejected,
            totals.retries,
            totals.rate_limited,
            format_duration(report.diff_elapsed),
            format_duration(report.delivery_elapsed),
            format_duration(report.elapsed),
        ));
    }
    out
}
