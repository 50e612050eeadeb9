//! `engage-sync run`: the long-running daemon. Each definition runs on its cron schedule (never
//! twice at once, across every replica on the database), delivery lanes work continuously beside
//! the scheduler, the admin server answers health and metrics, and SIGINT/SIGTERM shut it down
//! without losing anything.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use crate::admin::{self, RunMetrics};
use crate::config::Definition;
use crate::db;
use crate::deliver::{Deliverer, DrainEnd, StopSignal};
use crate::sync::{self, App, PassMode};

/// First key of the session advisory locks that keep a definition's runs apart (the second is
/// `hashtext(key)`); distinct from the claim locks in `outbox`.
const RUN_LOCK_CLASS: i32 = 0x4553_0002;

/// How often a running definition checks whether its changes are all delivered.
const DRAIN_POLL: Duration = Duration::from_millis(250);

/// Options for embedding the daemon (tests).
#[derive(Default)]
pub struct DaemonOptions {
    /// Receives the admin server's bound address (or `None` when it is off) once serving.
    pub on_ready: Option<oneshot::Sender<Option<SocketAddr>>>,
    /// Receives the ingestion endpoint's bound address once serving (when `[ingest]` is set).
    pub on_ingest_ready: Option<oneshot::Sender<SocketAddr>>,
}

struct Daemon {
    app: Arc<App>,
    deliverer: Arc<Deliverer>,
    runs: Arc<RunMetrics>,
    /// Stops the schedulers (the deliverer has its own stop, which stops claiming).
    stop: StopSignal,
}

/// Runs until `shutdown` completes, then stops claiming work, lets in-flight requests finish for
/// up to `[daemon] shutdown_grace_seconds`, gives back every claim and returns.
pub async fn run(
    app: App,
    shutdown: impl std::future::Future<Output = ()>,
    options: DaemonOptions,
) -> anyhow::Result<()> {
    db::ensure_migrated(&app.pool).await?;
    sync::register_definitions(&app.pool, &app.config.definitions).await?;
    let app = Arc::new(app);
    let deliverer = Arc::new(Deliverer::new(
        app.pool.clone(),
        Arc::clone(&app.client),
        app.config.delivery.clone(),
    ));
    let daemon = Arc::new(Daemon {
        app: Arc::clone(&app),
        deliverer: Arc::clone(&deliverer),
        runs: Arc::new(RunMetrics::default()),
        stop: StopSignal::default(),
    });

    let admin = match app.config.daemon.admin_listen {
        Some(address) => {
            let (bound, task) = admin::serve(
                address,
                app.pool.clone(),
                Arc::clone(&deliverer),
                Arc::clone(&daemon.runs),
            )
            .await
            .with_context(|| format!("cannot serve the admin endpoints on {address}"))?;
            info!(address = %bound, "Admin endpoints: /healthz, /readyz, /metrics.");
            Some((bound, task))
        }
        None => None,
    };

    let ingest = match &app.config.ingest {
        Some(settings) => {
            let (bound, task) = crate::ingest::serve(
                settings.listen,
                app.pool.clone(),
                app.config.mapping.clone(),
                &settings.write_key,
                Arc::clone(&deliverer),
            )
            .await
            .with_context(|| {
                format!("cannot serve the ingestion endpoint on {}", settings.listen)
            })?;
            info!(address = %bound, "Segment ingestion: POST /v1/identify, /v1/track, /v1/batch.");
            if let Some(ready) = options.on_ingest_ready {
                let _ = ready.send(bound);
            }
            Some(task)
        }
        None => None,
    };

    // Lanes start at once: changes left in the outbox by an earlier crash go out first.
    let mut lanes = {
        let deliverer = Arc::clone(&deliverer);
        tokio::spawn(async move { deliverer.run_until_stopped().await })
    };
    let reporter = {
        let deliverer = Arc::clone(&deliverer);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(crate::progress::LOG_EVERY);
            loop {
                ticks.tick().await;
                deliverer.progress().log();
            }
        })
    };
    let mut schedulers = tokio::task::JoinSet::new();
    for definition in app.config.definitions.clone() {
        let daemon = Arc::clone(&daemon);
        schedulers.spawn(async move { daemon.schedule(definition).await });
    }
    info!(
        definitions = app.config.definitions.len(),
        "engage-sync is running."
    );
    if let Some(ready) = options.on_ready {
        let _ = ready.send(admin.as_ref().map(|(address, _)| *address));
    }

    let lanes_result = tokio::select! {
        _ = shutdown => {
            info!("Shutting down: no new claims; in-flight requests may finish.");
            None
        }
        // The lanes end on their own only when Batch refused the credentials or the database failed.
        result = &mut lanes => Some(result),
    };
    // No new message is taken in; every message answered 200 is already committed.
    if let Some(task) = &ingest {
        task.abort();
    }
    daemon.stop.stop();
    deliverer.stop.stop();
    let lanes_result = match lanes_result {
        Some(result) => result,
        None => {
            let grace = app.config.daemon.shutdown_grace;
            match tokio::time::timeout(grace, &mut lanes).await {
                Ok(result) => result,
                Err(_) => {
                    warn!(
                        grace_seconds = grace.as_secs(),
                        "In-flight requests outlived the grace period; giving their claims back."
                    );
                    lanes.abort();
                    let _ = (&mut lanes).await;
                    deliverer.release_claims().await?;
                    Ok(Ok(()))
                }
            }
        }
    };
    // Schedulers close their runs (as incomplete) and release their locks promptly once stopped.
    while schedulers.join_next().await.is_some() {}
    reporter.abort();
    if let Some((_, task)) = admin {
        task.abort();
    }
    app.pool.close().await;
    match lanes_result {
        Ok(Ok(())) => {
            info!("Stopped.");
            Ok(())
        }
        Ok(Err(failure)) => Err(failure.context("delivery stopped")),
        Err(join_error) => Err(anyhow::anyhow!("the delivery lanes failed: {join_error}")),
    }
}

impl Daemon {
    /// Waits for each tick of the definition's schedule and runs it. A tick that passes during a
    /// run is not queued: the next tick is computed from the end of the run, so missed ticks
    /// collapse into one.
    async fn schedule(&self, definition: Definition) {
        let key = definition.key.as_str().to_owned();
        loop {
            let now = Utc::now();
            let Some(next) = definition
                .schedule
                .after(&now.with_timezone(&definition.timezone))
                .next()
            else {
                warn!(definition = %key, "The schedule has no future tick; the definition will not run.");
                return;
            };
            let jitter = self.app.config.daemon.jitter.mul_f64(fastrand::f64());
            let wait = (next.with_timezone(&Utc) - now)
                .to_std()
                .unwrap_or_default()
                + jitter;
            debug!(definition = %key, next = %next, "Next run scheduled.");
            if !self.stop.sleep(wait).await {
                return;
            }
            if let Err(failure) = self.run_definition(&definition).await {
                error!(definition = %key, error = %format!("{failure:#}"), "The run could not be carried out.");
            }
        }
    }

    /// One run: take the definition's lock (or skip: another replica runs it), diff, wait until
    /// the lanes delivered its changes, close the run.
    async fn run_definition(&self, definition: &Definition) -> anyhow::Result<()> {
        let key = definition.key.as_str();
        let mut lock = self.app.pool.acquire().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
            .bind(RUN_LOCK_CLASS)
            .bind(key)
            .fetch_one(&mut *lock)
            .await?;
        if !locked {
            debug!(definition = %key, "Another replica is running this definition; skipping the tick.");
            return Ok(());
        }
        let result = self.run_locked(definition).await;
        // The lock is per session: release it before the connection goes back to the pool.
        let unlocked = sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2))")
            .bind(RUN_LOCK_CLASS)
            .bind(key)
            .execute(&mut *lock)
            .await;
        if unlocked.is_err() {
            // A connection that may still hold the lock must not be reused.
            lock.detach();
        }
        result
    }

    async fn run_locked(&self, definition: &Definition) -> anyhow::Result<()> {
        let key = definition.key.as_str();
        let mut outcome = sync::diff_definition(&self.app, definition, PassMode::Diff).await;
        if outcome.error.is_some() {
            self.runs.record(&outcome);
            return Ok(());
        }
        let changes = (outcome.added + outcome.removed + outcome.changed).max(0) as u64;
        let progress = self.deliverer.progress();
        if changes > 0 {
            progress.track(key, changes);
            self.deliverer.wake();
        }
        let deadline = Instant::now() + self.app.config.delivery.deadline;
        let only = [key.to_owned()];
        let end = loop {
            let pending = crate::outbox::pending(&self.app.pool, Some(&only)).await?;
            if pending == 0 {
                break DrainEnd::Complete;
            }
            if let Some(reason) = self.deliverer.fatal_error() {
                break DrainEnd::Fatal { reason };
            }
            if self.stop.is_stopped() {
                break DrainEnd::Incomplete {
                    pending,
                    last_error: Some(
                        "the daemon shut down; the rest goes out on its next start".to_owned(),
                    ),
                };
            }
            if Instant::now() >= deadline {
                break DrainEnd::Incomplete {
                    pending,
                    last_error: Some("the delivery deadline passed".to_owned()),
                };
            }
            self.stop.sleep(DRAIN_POLL).await;
        };
        progress.forget(key);
        sync::finish_runs(&self.app.pool, std::slice::from_mut(&mut outcome), &end).await?;
        self.runs.record(&outcome);
        Ok(())
    }
}
