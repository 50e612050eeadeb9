//! The `status` table: each definition with its snapshot size, pending changes, rejections and
//! last run.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DefinitionStatus {
    pub key: String,
    /// Not in the current configuration: its attribute stays on Batch until `retire`.
    #[sqlx(default)]
    pub orphaned: bool,
    pub kind: String,
    pub members: i64,
    pub pending: i64,
    pub rejected: i64,
    pub last_started_at: Option<DateTime<Utc>>,
    pub last_finished_at: Option<DateTime<Utc>>,
    pub last_added: Option<i64>,
    pub last_removed: Option<i64>,
    pub last_outcome: Option<String>,
    pub last_error: Option<String>,
}

/// Segment forwarding at a glance: messages stored, changes waiting, fields and messages refused.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ForwardingStatus {
    pub messages: i64,
    pub last_received_at: Option<DateTime<Utc>>,
    pub pending: i64,
    pub rejected: i64,
}

/// `None` when no Segment message was ever stored.
pub async fn load_forwarding(pool: &PgPool) -> Result<Option<ForwardingStatus>, sqlx::Error> {
    let status: ForwardingStatus = sqlx::query_as(
        "SELECT (SELECT count(*) FROM events) AS messages, \
                (SELECT max(received_at) FROM events) AS last_received_at, \
                (SELECT count(*) FROM outbox \
                 WHERE definition_key LIKE 'identify:%' OR definition_key LIKE 'track:%') AS pending, \
                (SELECT count(*) FROM rejections \
                 WHERE definition_key LIKE 'identify:%' OR definition_key LIKE 'track:%' \
                    OR definition_key LIKE 'message:%') AS rejected",
    )
    .fetch_one(pool)
    .await?;
    Ok((status.messages > 0).then_some(status))
}

impl ForwardingStatus {
    pub fn render(&self) -> String {
        format!(
            "Segment forwarding: {} message(s) stored (last received {}), {} change(s) pending, {} rejection(s).\n",
            self.messages,
            self.last_received_at
                .map(|at| at.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                .unwrap_or_else(|| "-".to_owned()),
            self.pending,
            self.rejected
        )
    }
}

/// Loads every definition ever registered; those not in `configured_keys` are marked orphaned.
pub async fn load(
    pool: &PgPool,
    configured_keys: &[String],
) -> Result<Vec<DefinitionStatus>, sqlx::Error> {
    let mut rows: Vec<DefinitionStatus> = sqlx::query_as(
        "SELECT d.key, d.kind, \
                coalesce(s.members, 0) AS members, \
                coalesce(o.pending, 0) AS pending, \
                coalesce(r.rejected, 0) AS rejected, \
                lr.started_at AS last_started_at, lr.finished_at AS last_finished_at, \
                lr.added AS last_added, lr.removed AS last_removed, \
                lr.outcome AS last_outcome, lr.error AS last_error \
         FROM definitions d \
         LEFT JOIN (SELECT definition_key, count(*) FILTER (WHERE value <> 'false'::jsonb) AS members \
                    FROM snapshot GROUP BY 1) s \
                ON s.definition_key = d.key \
         LEFT JOIN (SELECT definition_key, count(*) AS pending FROM outbox GROUP BY 1) o \
                ON o.definition_key = d.key \
         LEFT JOIN (SELECT definition_key, count(*) AS rejected FROM rejections GROUP BY 1) r \
                ON r.definition_key = d.key \
         LEFT JOIN LATERAL (SELECT * FROM runs WHERE definition_key = d.key \
                            ORDER BY started_at DESC, id DESC LIMIT 1) lr ON true \
         ORDER BY d.key",
    )
    .fetch_all(pool)
    .await?;
    for row in &mut rows {
        row.orphaned = !configured_keys.contains(&row.key);
    }
    Ok(rows)
}

/// Renders the rows as an aligned text table.
pub fn render(rows: &[DefinitionStatus]) -> String {
    let header = [
        "KEY",
        "KIND",
        "MEMBERS",
        "PENDING",
        "REJECTED",
        "LAST RUN (UTC)",
        "ADDED",
        "REMOVED",
        "DURATION",
        "OUTCOME",
    ];
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for row in rows {
        let duration = match (row.last_started_at, row.last_finished_at) {
            (Some(start), Some(end)) => format_duration((end - start).to_std().unwrap_or_default()),
            (Some(_), None) => "running".to_owned(),
            _ => "-".to_owned(),
        };
        table.push(vec![
            row.key.clone(),
            row.kind.clone(),
            row.members.to_string(),
            row.pending.to_string(),
            row.rejected.to_string(),
            row.last_started_at
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_else(|| "never".to_owned()),
            row.last_added
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".to_owned()),
            row.last_removed
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".to_owned()),
            duration,
            row.last_outcome.clone().unwrap_or_else(|| "-".to_owned()),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|column| {
            table
                .iter()
                .map(|row| row[column].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &table {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(column, cell)| {
                // Text left, figures right.
                if (2..=4).contains(&column) || (6..=7).contains(&column) {
                    format!("{cell:>width$}", width = widths[column])
                } else {
                    format!("{cell:<width$}", width = widths[column])
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    for row in rows.iter().filter(|row| row.orphaned) {
        out.push_str(&format!(
            "{}: orphaned: no longer in the configuration; its attribute stays on Batch until \
             `engage-sync retire {}`\n",
            row.key, row.key
        ));
    }
    for row in rows {
        if let (Some(outcome), Some(error)) = (&row.last_outcome, &row.last_error) {
            if outcome != "succeeded" {
                out.push_str(&format!("{}: {outcome}: {error}\n", row.key));
            }
        }
    }
    out
}

pub fn format_duration(duration: std::time::Duration) -> String {
    let seconds = duration.as_secs_f64();
    if seconds < 60.0 {
        format!("{seconds:.1}s")
    } else if seconds < 3600.0 {
        format!(
            "{}m{:02}s",
            (seconds / 60.0) as u64,
            (seconds % 60.0) as u64
        )
    } else {
        format!(
            "{}h{:02}m",
            (seconds / 3600.0) as u64,
            ((seconds % 3600.0) / 60.0) as u64
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        use std::time::Duration;
        assert_eq!(format_duration(Duration::from_millis(4200)), "4.2s");
        assert_eq!(format_duration(Duration::from_secs(125)), "2m05s");
        assert_eq!(format_duration(Duration::from_secs(7260)), "2h01m");
    }

    #[test]
    fn the_table_aligns_and_explains_failures() {
        let row = DefinitionStatus {
            key: "buyers".into(),
            orphaned: false,
            kind: "audience".into(),
            members: 1200,
            pending: 3,
            rejected: 0,
            last_started_at: None,
            last_finished_at: None,
            last_added: None,
            last_removed: None,
            last_outcome: Some("incomplete".into()),
            last_error: Some("3 change(s) pending".into()),
        };
        let text = render(&[row]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("KEY"));
        assert!(lines[1].starts_with("buyers  audience     1200"), "{text}");
        assert_eq!(lines[2], "buyers: incomplete: 3 change(s) pending");
    }
}
