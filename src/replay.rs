//! `engage-sync replay FILE`: the seed's "historical backfill". Identify/track messages, one JSON
//! object per line, are stored and queued as ingestion does, but identifies go through the bulk
//! lane and values Batch already acknowledged are skipped; messages already stored (same
//! `messageId`, or same content when it has none) are skipped too, so a second replay of the same
//! file sends nothing new. Bad lines are reported by number and never stop the good ones.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tracing::{info, warn};

use crate::deliver::{DeliveryTotals, DrainEnd};
use crate::forward::{self, Accepted, Mode};
use crate::sync::App;

/// Messages stored per transaction.
const CHUNK: usize = 2_000;
/// How many bad line numbers the summary names.
const BAD_LINE_EXAMPLES: usize = 5;
const LOG_EVERY: Duration = Duration::from_secs(5);

/// What a replay did.
#[derive(Debug)]
pub struct ReplayReport {
    pub lines: u64,
    pub accepted: Accepted,
    pub bad_lines: u64,
    /// The first bad lines: number and reason.
    pub bad_examples: Vec<(u64, String)>,
    pub delivery: DeliveryTotals,
    pub end: DrainEnd,
    pub elapsed: Duration,
}

impl ReplayReport {
    /// One line saying why the replay is not a success, if it is not.
    pub fn failure_reason(&self) -> Option<String> {
        match &self.end {
            DrainEnd::Fatal { reason } => return Some(reason.clone()),
            DrainEnd::Incomplete { pending, last_error } => {
                return Some(format!(
                    "{pending} change(s) still pending when delivery ended (last error: {}); run replay again or sync",
                    last_error.as_deref().unwrap_or("none")
                ))
            }
            DrainEnd::Complete => {}
        }
        (self.bad_lines > 0).then(|| {
            format!(
                "{} line(s) could not be read as messages (first: {})",
                self.bad_lines,
                self.bad_examples
                    .iter()
                    .map(|(line, reason)| format!("line {line}: {reason}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        })
    }
}

/// Reads NDJSON from `input`, stores and queues its messages, then delivers what is pending.
pub async fn replay(app: &App, input: impl AsyncBufRead + Unpin) -> anyhow::Result<ReplayReport> {
    let started = Instant::now();
    crate::db::ensure_migrated(&app.pool).await?;
    let mut lines = input.lines();
    let mut report = ReplayReport {
        lines: 0,
        accepted: Accepted::default(),
        bad_lines: 0,
        bad_examples: Vec::new(),
        delivery: DeliveryTotals::default(),
        end: DrainEnd::Complete,
        elapsed: Duration::ZERO,
    };
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut last_log = Instant::now();
    while let Some(line) = lines.next_line().await? {
        report.lines += 1;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(&line) {
            Ok(message) if message.is_object() => chunk.push(message),
            Ok(_) => bad_line(&mut report, "not a JSON object".to_owned()),
            Err(error) => bad_line(&mut report, format!("malformed JSON: {error}")),
        }
        if chunk.len() == CHUNK {
            store(app, &mut chunk, &mut report).await?;
            if last_log.elapsed() >= LOG_EVERY {
                last_log = Instant::now();
                info!(
                    lines = report.lines,
                    stored = report.accepted.stored,
                    queued = report.accepted.queued,
                    "Replaying."
                );
            }
        }
    }
    store(app, &mut chunk, &mut report).await?;
    info!(
        lines = report.lines,
        stored = report.accepted.stored,
        already_stored = report.accepted.duplicates,
        queued = report.accepted.queued,
        "Replay read; delivering."
    );
    let (delivery, end) = crate::sync::deliver_pending(app).await?;
    report.delivery = delivery;
    report.end = end;
    report.elapsed = started.elapsed();
    Ok(report)
}

fn bad_line(report: &mut ReplayReport, reason: String) {
    report.bad_lines += 1;
    if report.bad_examples.len() < BAD_LINE_EXAMPLES {
        warn!(line = report.lines, %reason, "Skipped a line of the replay.");
        report.bad_examples.push((report.lines, reason));
    }
}

async fn store(app: &App, chunk: &mut Vec<Value>, report: &mut ReplayReport) -> anyhow::Result<()> {
    let accepted = forward::accept(
        &app.pool,
        chunk,
        &app.config.mapping,
        Mode::Replay,
        chrono::Utc::now(),
    )
    .await?;
    report.accepted += accepted;
    chunk.clear();
    Ok(())
}

/// The summary `replay` prints.
pub fn render(report: &ReplayReport) -> String {
    let accepted = &report.accepted;
    format!(
        "Read {} line(s): {} message(s) stored, {} already stored (skipped), {} bad line(s).\n\
         Queued {} change(s); {} message(s) and {} field(s) refused (see the rejections table).\n\
         Delivered {} change(s) in {} operation(s) over {} request(s); {} rejected by Batch. Took {:.1}s.\n",
        report.lines,
        accepted.stored,
        accepted.duplicates,
        report.bad_lines,
        accepted.queued,
        accepted.refused_messages,
        accepted.refused_fields,
        report.delivery.acknowledged,
        report.delivery.operations,
        report.delivery.requests,
        report.delivery.rejected,
        report.elapsed.as_secs_f64(),
    )
}
