//! Staging versus snapshot → outbox, as set operations inside PostgreSQL. The diff reconciles the
//! outbox with the newly desired state: values already acknowledged drop out of it, new or changed
//! values replace whatever was pending, and values Batch refused are held back until they change.

use sqlx::{Executor, PgConnection};

use crate::config::Definition;
use crate::outbox::Lane;

/// What one definition's diff put in the outbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiffReport {
    /// Users who entered (no acknowledged value before).
    pub added: i64,
    /// Users who left (an acknowledged value, now absent from the query's result).
    pub removed: i64,
    /// Users whose value changed (computed traits; never for audiences).
    pub changed: i64,
    /// Changes not sent because Batch refused that very value before.
    pub held_back: i64,
    pub lane: Option<Lane>,
}

impl DiffReport {
    pub fn total(&self) -> i64 {
        self.added + self.removed + self.changed
    }
}

/// Diffs the `staging` temp table (see [`crate::source::stage`]) against the definition's
/// snapshot and reconciles the outbox. Runs in the caller's transaction.
pub async fn diff_into_outbox(
    conn: &mut PgConnection,
    definition: &Definition,
    bulk_threshold: u64,
) -> Result<DiffReport, sqlx::Error> {
    let key = definition.key.as_str();
    let removal = definition.kind.removal_value().to_string();

    // One pass over both sides; `IS DISTINCT FROM` covers entering (no snapshot row), leaving (no
    // staging row) and changing values alike.
    sqlx::query(
        "CREATE TEMP TABLE changes ON COMMIT DROP AS \
         SELECT coalesce(s.custom_id, p.custom_id) AS custom_id, \
                s.value AS desired, p.value AS acknowledged, false AS held_back \
         FROM staging s \
         FULL OUTER JOIN (SELECT custom_id, value FROM snapshot WHERE definition_key = $1) p \
           ON p.custom_id = s.custom_id \
         WHERE s.value IS DISTINCT FROM p.value",
    )
    .bind(key)
    .execute(&mut *conn)
    .await?;

    sqlx::query(
        "UPDATE changes c SET held_back = true FROM rejections r \
         WHERE r.definition_key = $1 AND r.custom_id = c.custom_id \
           AND r.value = coalesce(c.desired, $2::jsonb)",
    )
    .bind(key)
    .bind(&removal)
    .execute(&mut *conn)
    .await?;

    let (added, removed, changed, held_back): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE NOT held_back AND acknowledged IS NULL), \
                count(*) FILTER (WHERE NOT held_back AND desired IS NULL), \
                count(*) FILTER (WHERE NOT held_back AND desired IS NOT NULL AND acknowledged IS NOT NULL), \
                count(*) FILTER (WHERE held_back) \
         FROM changes",
    )
    .fetch_one(&mut *conn)
    .await?;

    let initial_sync_done: bool = sqlx::query_scalar(
        "SELECT initial_sync_completed_at IS NOT NULL FROM definitions WHERE key = $1",
    )
    .bind(key)
    .fetch_optional(&mut *conn)
    .await?
    .unwrap_or(false);
    let total = added + removed + changed;
    let lane = if !initial_sync_done || total as u64 > bulk_threshold {
        Lane::Bulk
    } else {
        Lane::Incremental
    };

    // A refusal is stale once the user's desired value equals what Batch holds again.
    sqlx::query(
        "DELETE FROM rejections r WHERE r.definition_key = $1 \
           AND NOT EXISTS (SELECT 1 FROM changes c WHERE c.custom_id = r.custom_id)",
    )
    .bind(key)
    .execute(&mut *conn)
    .await?;

    // Pending values that are no longer wanted: the user is back to what Batch acknowledged.
    sqlx::query(
        "DELETE FROM outbox o WHERE o.definition_key = $1 \
           AND NOT EXISTS (SELECT 1 FROM changes c \
                           WHERE c.custom_id = o.custom_id AND NOT c.held_back)",
    )
    .bind(key)
    .execute(&mut *conn)
    .await?;

    // Identical pending rows are left alone, so a change already on its way keeps its place.
    sqlx::query(
        "INSERT INTO outbox (definition_key, custom_id, attribute, value, retain, lane) \
         SELECT $1, c.custom_id, $1, coalesce(c.desired, $2::jsonb), c.desired IS NOT NULL, $3 \
         FROM changes c WHERE NOT c.held_back \
         ON CONFLICT (definition_key, custom_id) DO UPDATE \
         SET attribute = EXCLUDED.attribute, value = EXCLUDED.value, retain = EXCLUDED.retain, \
             lane = EXCLUDED.lane, seq = EXCLUDED.seq, enqueued_at = now(), attempts = 0, \
             last_error = NULL \
         WHERE (outbox.attribute, outbox.value, outbox.retain) \
               IS DISTINCT FROM (EXCLUDED.attribute, EXCLUDED.value, EXCLUDED.retain)",
    )
    .bind(key)
    .bind(&removal)
    .bind(lane.as_str())
    .execute(&mut *conn)
    .await?;

    conn.execute("DROP TABLE changes").await?;

    Ok(DiffReport {
        added,
        removed,
        changed,
        held_back,
        lane: (total > 0).then_some(lane),
    })
}
