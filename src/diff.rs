//! Staging versus snapshot → outbox, as set operations inside PostgreSQL. The diff reconciles the
//! outbox with the newly desired state: values already acknowledged drop out of it, new or changed
//! values replace whatever was pending, and values Batch refused are held back until they change.

use sqlx::{Executor, PgConnection};

use crate::config::Definition;
use crate::outbox::Lane;

/// What one definition's diff put in the outbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiffReport {
    /// Users who entered (no acknowledged value before, or the removal value).
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

    // One pass over both sides. A user absent from staging is desired at the removal value
    // (`false` for an audience), so a user who already got `false` is not sent it again.
    sqlx::query(
        "CREATE TEMP TABLE changes ON COMMIT DROP AS \
         SELECT coalesce(s.custom_id, p.custom_id) AS custom_id, \
                coalesce(s.value, $2::jsonb) AS desired, \
                s.value IS NOT NULL AS present, p.value AS acknowledged, false AS held_back \
         FROM staging s \
         FULL OUTER JOIN (SELECT custom_id, value FROM snapshot WHERE definition_key = $1) p \
           ON p.custom_id = s.custom_id \
         WHERE coalesce(s.value, $2::jsonb) IS DISTINCT FROM p.value",
    )
    .bind(key)
    .bind(&removal)
    .execute(&mut *conn)
    .await?;

    sqlx::query(
        "UPDATE changes c SET held_back = true FROM rejections r \
         WHERE r.definition_key = $1 AND r.custom_id = c.custom_id AND r.value = c.desired",
    )
    .bind(key)
    .execute(&mut *conn)
    .await?;

    let (added, removed, changed, held_back): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE NOT held_back AND present \
                                   AND (acknowledged IS NULL OR acknowledged = $1::jsonb)), \
                count(*) FILTER (WHERE NOT held_back AND NOT present), \
                count(*) FILTER (WHERE NOT held_back AND present \
                                   AND acknowledged IS NOT NULL AND acknowledged <> $1::jsonb), \
                count(*) FILTER (WHERE held_back) \
         FROM changes",
    )
    .bind(&removal)
    .fetch_one(&mut *conn)
    .await?;

    let total = added + removed + changed;
    let lane = choose_lane(conn, key, total, bulk_threshold).await?;

    // A refusal is stale once the user's desired value equals what Batch holds again.
    sqlx::query(
        "DELETE FROM rejections r WHERE r.definition_key = $1 \
           AND NOT EXISTS (SELECT 1 FROM changes c WHERE c.custom_id = r.custom_id)",
    )
    .bind(key)
    .execute(&mut *conn)
    .await?;

    // From here to commit, settles of this definition wait: the enqueue below sees every value
    // acknowledged so far, and none is acknowledged behind its back.
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(crate::outbox::SETTLE_LOCK_CLASS)
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

    enqueue(
        conn,
        key,
        // `changes` was computed before the lock: values acknowledged since are not sent again.
        "SELECT c.custom_id, c.desired FROM changes c WHERE NOT c.held_back \
           AND NOT EXISTS (SELECT 1 FROM snapshot p WHERE p.definition_key = $1 \
                             AND p.custom_id = c.custom_id AND p.value = c.desired)",
        lane,
    )
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

/// The bulk lane for a definition whose first sync has not completed, or for a large diff.
async fn choose_lane(
    conn: &mut PgConnection,
    key: &str,
    changes: i64,
    bulk_threshold: u64,
) -> Result<Lane, sqlx::Error> {
    let initial_sync_done: bool = sqlx::query_scalar(
        "SELECT initial_sync_completed_at IS NOT NULL FROM definitions WHERE key = $1",
    )
    .bind(key)
    .fetch_optional(&mut *conn)
    .await?
    .unwrap_or(false);
    Ok(if !initial_sync_done || changes as u64 > bulk_threshold {
        Lane::Bulk
    } else {
        Lane::Incremental
    })
}

/// Upserts `(custom_id, value)` rows produced by `rows_sql` (which may use `$1`, the key) into the
/// outbox as the desired values of `key`. Identical pending rows are left alone, so a change already on its way keeps its place.
async fn enqueue(
    conn: &mut PgConnection,
    key: &str,
    rows_sql: &str,
    lane: Lane,
) -> Result<u64, sqlx::Error> {
    let nothing_pending: bool =
        sqlx::query_scalar("SELECT NOT EXISTS (SELECT 1 FROM outbox WHERE definition_key = $1)")
            .bind(key)
            .fetch_one(&mut *conn)
            .await?;
    // A first sync (or a clean incremental one) has no pending row to merge with; a plain insert
    // skips the speculative insertion of ON CONFLICT, about a third of the cost per row.
    let merge = if nothing_pending {
        ""
    } else {
        "ON CONFLICT (definition_key, custom_id) DO UPDATE \
         SET attribute = EXCLUDED.attribute, value = EXCLUDED.value, lane = EXCLUDED.lane, \
             seq = EXCLUDED.seq, enqueued_at = now(), attempts = 0, last_error = NULL \
         WHERE (outbox.attribute, outbox.value) IS DISTINCT FROM (EXCLUDED.attribute, EXCLUDED.value)"
    };
    let statement = format!(
        "INSERT INTO outbox (definition_key, custom_id, attribute, value, lane) \
         SELECT $1, r.custom_id, $1, r.value, $2 FROM ({rows_sql}) AS r(custom_id, value) {merge}"
    );
    let enqueued = sqlx::query(&statement)
        .bind(key)
        .bind(lane.as_str())
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if enqueued >= ANALYZE_AFTER_ROWS {
        // Autovacuum would notice a backfill's rows only after the claims planned against an
        // empty table; refresh the statistics now.
        conn.execute("ANALYZE outbox").await?;
    }
    Ok(enqueued)
}

/// An enqueue at least this large refreshes the outbox's planner statistics.
const ANALYZE_AFTER_ROWS: u64 = 10_000;

/// `backfill`: every staged member is desired again through the bulk lane, whatever the snapshot
/// says (Batch lost data); non-members get nothing.
pub async fn enqueue_all_members(conn: &mut PgConnection, key: &str) -> Result<(), sqlx::Error> {
    // `enqueue` leaves identical pending rows alone; they must take the bulk lane too.
    sqlx::query(
        "UPDATE outbox o SET lane = 'bulk' FROM staging s \
         WHERE o.definition_key = $1 AND o.custom_id = s.custom_id AND o.value = s.value",
    )
    .bind(key)
    .execute(&mut *conn)
    .await?;
    enqueue(
        conn,
        key,
        "SELECT custom_id, value FROM staging",
        Lane::Bulk,
    )
    .await?;
    Ok(())
}

/// `retire`: every profile holding the definition's attribute gets it deleted (null), through the
/// bulk lane when there are many. Acknowledged nulls remove the snapshot rows.
pub async fn enqueue_retirement(
    conn: &mut PgConnection,
    key: &str,
    bulk_threshold: u64,
) -> Result<i64, sqlx::Error> {
    let holders: i64 =
        sqlx::query_scalar("SELECT count(*) FROM snapshot WHERE definition_key = $1")
            .bind(key)
            .fetch_one(&mut *conn)
            .await?;
    let lane = if holders as u64 > bulk_threshold {
        Lane::Bulk
    } else {
        Lane::Incremental
    };
    sqlx::query("DELETE FROM outbox WHERE definition_key = $1")
        .bind(key)
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM rejections WHERE definition_key = $1")
        .bind(key)
        .execute(&mut *conn)
        .await?;
    enqueue(
        conn,
        key,
        // `$1` is the key, bound by `enqueue`.
        "SELECT custom_id, 'null'::jsonb FROM snapshot WHERE definition_key = $1",
        lane,
    )
    .await?;
    Ok(holders)
}
