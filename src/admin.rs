//! The daemon's admin HTTP server: `/healthz` (the process answers), `/readyz` (the database
//! answers) and `/metrics` in Prometheus text format.
//!
//! Metrics are rendered by hand from the counters the daemon already keeps and from a few
//! queries at scrape time (outbox depth, age of the last successful run): the values live in the
//! database and in `DeliveryStats`, so a separate metrics registry would only copy them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sqlx::PgPool;

use crate::deliver::Deliverer;
use crate::sync::DefinitionOutcome;

/// Counters of the daemon's runs, by definition.
#[derive(Default)]
pub struct RunMetrics {
    /// (definition, outcome) → runs.
    runs: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// (definition, kind) → changes computed.
    changes: Mutex<BTreeMap<(String, &'static str), u64>>,
}

impl RunMetrics {
    pub fn record(&self, outcome: &DefinitionOutcome) {
        *self
            .runs
            .lock()
            .expect("not poisoned")
            .entry((outcome.key.clone(), outcome.outcome.as_str()))
            .or_default() += 1;
        let mut changes = self.changes.lock().expect("not poisoned");
        for (kind, count) in [
            ("added", outcome.added),
            ("removed", outcome.removed),
            ("changed", outcome.changed),
        ] {
            *changes.entry((outcome.key.clone(), kind)).or_default() += count.max(0) as u64;
        }
    }
}

#[derive(Clone)]
struct AdminState {
    pool: PgPool,
    deliverer: Arc<Deliverer>,
    runs: Arc<RunMetrics>,
}

/// Binds `address` and serves until the returned task is aborted.
pub async fn serve(
    address: SocketAddr,
    pool: PgPool,
    deliverer: Arc<Deliverer>,
    runs: Arc<RunMetrics>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AdminState {
            pool,
            deliverer,
            runs,
        });
    let listener = tokio::net::TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok((bound, task))
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let check = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&state.pool),
    )
    .await;
    match check {
        Ok(Ok(_)) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Err(error)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "database unreachable: {}\n",
                crate::source::database_message(&error)
            ),
        )
            .into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "database did not answer within 2 s\n",
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    match render(&state).await {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "metrics unavailable: {}\n",
                crate::source::database_message(&error)
            ),
        )
            .into_response(),
    }
}

/// One metric family in the text exposition format.
struct Family<'a> {
    out: &'a mut String,
}

impl<'a> Family<'a> {
    fn start(out: &'a mut String, name: &str, kind: &str, help: &str) -> Self {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        Self { out }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let labels: Vec<String> = labels
            .iter()
            .map(|(label, value)| format!("{label}=\"{}\"", escape(value)))
            .collect();
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {value}");
        } else {
            let _ = writeln!(self.out, "{name}{{{}}} {value}", labels.join(","));
        }
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

async fn render(state: &AdminState) -> Result<String, sqlx::Error> {
    let mut out = String::new();
    {
        let runs = state.runs.runs.lock().expect("not poisoned").clone();
        let mut family = Family::start(
            &mut out,
            "engage_sync_runs_total",
            "counter",
            "Runs by definition and outcome.",
        );
        for ((definition, outcome), count) in &runs {
            family.sample(
                "engage_sync_runs_total",
                &[("definition", definition), ("outcome", outcome)],
                count,
            );
        }
    }
    {
        let changes = state.runs.changes.lock().expect("not poisoned").clone();
        let mut family = Family::start(
            &mut out,
            "engage_sync_changes_total",
            "counter",
            "Changes computed by definition and kind.",
        );
        for ((definition, kind), count) in &changes {
            family.sample(
                "engage_sync_changes_total",
                &[("definition", definition), ("kind", kind)],
                count,
            );
        }
    }
    let totals = state.deliverer.stats.totals();
    {
        let mut family = Family::start(
            &mut out,
            "engage_sync_operations_sent_total",
            "counter",
            "Operations Batch accepted, by lane.",
        );
        family.sample(
            "engage_sync_operations_sent_total",
            &[("lane", "bulk")],
            totals.bulk_operations,
        );
        family.sample(
            "engage_sync_operations_sent_total",
            &[("lane", "incremental")],
            totals.operations - totals.bulk_operations - totals.audience_operations,
        );
        family.sample(
            "engage_sync_operations_sent_total",
            &[("lane", "audience")],
            totals.audience_operations,
        );
    }
    for (name, help, value) in [
        (
            "engage_sync_requests_total",
            "Calls made to Batch.",
            totals.requests,
        ),
        (
            "engage_sync_retries_total",
            "Calls retried after a retryable failure.",
            totals.retries,
        ),
        (
            "engage_sync_rate_limited_total",
            "Calls answered 429.",
            totals.rate_limited,
        ),
        (
            "engage_sync_rejections_total",
            "Changes Batch refused (recorded in rejections).",
            totals.rejected,
        ),
        (
            "engage_sync_acknowledged_total",
            "Changes Batch acknowledged.",
            totals.acknowledged,
        ),
    ] {
        Family::start(&mut out, name, "counter", help).sample(name, &[], value);
    }

    let depth: Vec<(String, i64)> =
        sqlx::query_as("SELECT lane, count(*) FROM outbox GROUP BY lane ORDER BY lane")
            .fetch_all(&state.pool)
            .await?;
    {
        let mut family = Family::start(
            &mut out,
            "engage_sync_outbox_depth",
            "gauge",
            "Changes waiting for delivery, by lane.",
        );
        for lane in ["audience", "bulk", "incremental"] {
            let count = depth
                .iter()
                .find(|(name, _)| name == lane)
                .map_or(0, |(_, n)| *n);
            family.sample("engage_sync_outbox_depth", &[("lane", lane)], count);
        }
    }

    let ages: Vec<(String, Option<f64>)> = sqlx::query_as(
        "SELECT d.key, extract(epoch FROM now() - max(r.finished_at))::float8 \
         FROM definitions d LEFT JOIN runs r ON r.definition_key = d.key AND r.outcome = 'succeeded' \
         GROUP BY d.key ORDER BY d.key",
    )
    .fetch_all(&state.pool)
    .await?;
    {
        let mut family = Family::start(
            &mut out,
            "engage_sync_seconds_since_last_success",
            "gauge",
            "Seconds since the definition's last successful run (absent: never).",
        );
        for (definition, age) in &ages {
            if let Some(age) = age {
                family.sample(
                    "engage_sync_seconds_since_last_success",
                    &[("definition", definition)],
                    format!("{age:.3}"),
                );
            }
        }
    }

    let progress = state.deliverer.progress().snapshot();
    {
        let mut family = Family::start(
            &mut out,
            "engage_sync_delivery_done",
            "gauge",
            "Changes of the current run settled so far, by definition.",
        );
        for (definition, done, _) in &progress {
            family.sample(
                "engage_sync_delivery_done",
                &[("definition", definition)],
                done,
            );
        }
    }
    {
        let mut family = Family::start(
            &mut out,
            "engage_sync_delivery_total",
            "gauge",
            "Changes of the current run to deliver, by definition.",
        );
        for (definition, _, total) in &progress {
            family.sample(
                "engage_sync_delivery_total",
                &[("definition", definition)],
                total,
            );
        }
    }
    Ok(out)
}
