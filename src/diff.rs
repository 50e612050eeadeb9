//! Staging versus snapshot → outbox, as set operations inside PostgreSQL. The diff reconciles the
//! outbox with the newly desired state: values already acknowledged drop out of it, new or changed
//! values replace whatever was pending, and values Batch refused are held back until they change.

use sqlx::{Executor, PgConnection};

use crate::config::Definition;
use crate::outbox::Lane;
use crate::source::StageReport;

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

/// The parts an outbox row of a definition carries to Batch; see the `outbox` table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forms {
    /// The profile attribute name (`key`, `date(key)`, `url(key)`), when the identify form is on.
    pub attribute: Option<String>,
    /// The Track event, when the track form is on.
    pub event: Option<EventForm>,
    /// The Batch custom audience's name, for `mode = "custom_audience"`.
    pub audience: Option<String>,
}

/// How a change becomes a Track event: `{name, time, attributes: {<key_attribute>: key,
/// <value_attribute>: value}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventForm {
    /// The name for a value other than `false` (entering, or a computed value).
    pub entered: String,
    /// The name for `false` (leaving an audience).
    pub exited: String,
    pub key_attribute: &'static str,
    pub value_attribute: String,
}

impl Forms {
    /// A definition's parts; `attribute` is the name its values go under.
    pub fn of(definition: &Definition, attribute: &str) -> Self {
        Self {
            attribute: definition.send_identify.then(|| attribute.to_owned()),
            event: definition.send_track.then(|| EventForm {
                entered: definition.track_events.entered.as_str().to_owned(),
                exited: definition.track_events.exited.as_str().to_owned(),
                key_attribute: definition.kind.event_key_attribute(),
                value_attribute: attribute.to_owned(),
            }),
            audience: definition.custom_audience.clone(),
        }
    }

    /// State, not history: what `backfill` and `retire` resend (no events).
    pub fn without_events(mut self) -> Self {
        self.event = None;
        self
    }
}

/// Diffs the `staging` temp table (see [`crate::source::stage`], whose report is `stage`) against
/// the definition's snapshot and reconciles the outbox. Runs in the caller's transaction.
pub async fn diff_into_outbox(
    conn: &mut PgConnection,
    definition: &Definition,
    stage: &StageReport,
    forms: &Forms,
    bulk_threshold: u64,
) -> Result<DiffReport, sqlx::Error> {
    let key = definition.key.as_str();
    let removal = definition.kind.removal_value().to_string();

    // One pass over both sides. A user absent from staging is desired at the removal value
    // (`false` for an audience, null for a trait), so a user who already got it is not sent it
    // again; a trait's null equals "no value on Batch". Users whose value Batch would refuse
    // (`problem`) keep what Batch has: they are neither changed nor removed.
    sqlx::query(
        "CREATE TEMP TABLE changes ON COMMIT DROP AS \
         SELECT coalesce(s.custom_id, p.custom_id) AS custom_id, \
                coalesce(s.value, $2::jsonb) AS desired, \
                p.value AS acknowledged, false AS held_back \
         FROM staging s \
         FULL OUTER JOIN (SELECT custom_id, value FROM snapshot WHERE definition_key = $1) p \
           ON p.custom_id = s.custom_id \
         WHERE s.problem IS NULL \
           AND coalesce(s.value, $2::jsonb) IS DISTINCT FROM coalesce(p.value, 'null'::jsonb)",
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
        "SELECT count(*) FILTER (WHERE NOT held_back AND desired <> $1::jsonb \
                                   AND (acknowledged IS NULL OR acknowledged = $1::jsonb)), \
                count(*) FILTER (WHERE NOT held_back AND desired = $1::jsonb), \
                count(*) FILTER (WHERE NOT held_back AND desired <> $1::jsonb \
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
    // Values Batch would refuse are recorded as refused, with the reason, and never sent. Staging
    // counted them already, so a clean staging (every audience's) is not scanned again.
    if stage.invalid_values > 0 {
        sqlx::query(
            "INSERT INTO rejections (definition_key, custom_id, attribute, value, reason) \
             SELECT $1, custom_id, $2, coalesce(value, 'null'::jsonb), problem \
             FROM staging WHERE problem IS NOT NULL \
             ON CONFLICT (definition_key, custom_id) DO UPDATE \
             SET attribute = EXCLUDED.attribute, value = EXCLUDED.value, \
                 reason = EXCLUDED.reason, rejected_at = now()",
        )
        .bind(key)
        .bind(forms.attribute.as_deref())
        .execute(&mut *conn)
        .await?;
    }

    // From here to commit, settles of this definition wait: the enqueue below sees every value
    // acknowledged so far, and none is acknowledged behind its back.
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(crate::outbox::SETTLE_LOCK_CLASS)
        .bind(key)
        .execute(&mut *conn)
        .await?;

    // Pending values that are no longer wanted: the user is back to what Batch acknowledged.
    // A row that already delivered part of an older value cannot just go: it is sent again below.
    sqlx::query(
        "DELETE FROM outbox o WHERE o.definition_key = $1 AND NOT o.partly_delivered \
           AND NOT EXISTS (SELECT 1 FROM changes c \
                           WHERE c.custom_id = o.custom_id AND NOT c.held_back)",
    )
    .bind(key)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO changes (custom_id, desired, acknowledged, held_back) \
         SELECT o.custom_id, coalesce(p.value, $2::jsonb), p.value, false FROM outbox o \
         LEFT JOIN snapshot p ON p.definition_key = o.definition_key AND p.custom_id = o.custom_id \
         WHERE o.definition_key = $1 AND o.partly_delivered \
           AND NOT EXISTS (SELECT 1 FROM changes c WHERE c.custom_id = o.custom_id)",
    )
    .bind(key)
    .bind(&removal)
    .execute(&mut *conn)
    .await?;

    // With no attribute and no list to update, a deleted trait value has nothing to send (no
    // event carries a null): the snapshot forgets it at once.
    if forms.attribute.is_none() && forms.audience.is_none() {
        sqlx::query(
            "DELETE FROM snapshot p USING changes c \
             WHERE p.definition_key = $1 AND p.custom_id = c.custom_id \
               AND c.desired = 'null'::jsonb AND NOT c.held_back",
        )
        .bind(key)
        .execute(&mut *conn)
        .await?;
    }

    enqueue(
        conn,
        key,
        // `changes` was computed before the lock: values acknowledged since are not sent again.
        // A correlated scalar subquery is always one primary-key probe per change; an anti join
        // would be planned against the snapshot's statistics, and right after a backfill those
        // still describe an empty table (a sort of the whole snapshot for a 1% churn).
        "SELECT c.custom_id, c.desired FROM changes c WHERE NOT c.held_back \
           AND (SELECT p.value FROM snapshot p \
                WHERE p.definition_key = $1 AND p.custom_id = c.custom_id) \
               IS DISTINCT FROM c.desired",
        forms,
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
/// outbox as the desired values of `key`, each with the parts `forms` asks for. A pending row with
/// the same value is left alone, so a change already on its way keeps its place.
async fn enqueue(
    conn: &mut PgConnection,
    key: &str,
    rows_sql: &str,
    forms: &Forms,
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
         SET attribute = EXCLUDED.attribute, value = EXCLUDED.value, event = EXCLUDED.event, \
             audience = EXCLUDED.audience, lane = EXCLUDED.lane, seq = EXCLUDED.seq, \
             enqueued_at = now(), attempts = 0, last_error = NULL, partly_delivered = false \
         WHERE outbox.value IS DISTINCT FROM EXCLUDED.value OR outbox.partly_delivered"
    };
    // Rows go in sorted by user: each index of the outbox is then filled from left to right
    // instead of at random places (a million rows: 5.2 s instead of 9.3 s, sort included), and
    // since `seq` follows, claims and their settles into the snapshot proceed in the same order.
    // The event carries the run's time (the transaction's start). Events never take the bulk
    // lane: a row whose attribute goes through mass-update moves on to the incremental lane for
    // its event (see `outbox::settle`). A null (a deleted trait value) has no event.
    let statement = format!(
        "INSERT INTO outbox (definition_key, custom_id, attribute, value, event, audience, lane) \
         SELECT $1, r.custom_id, $3::text, r.value, e.event, $8::text, \
                CASE WHEN $3::text IS NOT NULL THEN $2::text \
                     WHEN e.event IS NOT NULL THEN 'incremental' ELSE 'audience' END \
         FROM ({rows_sql}) AS r(custom_id, value) \
         CROSS JOIN LATERAL (SELECT CASE WHEN $4::text IS NOT NULL AND r.value <> 'null'::jsonb THEN \
             jsonb_build_object( \
               'name', CASE WHEN r.value = 'false'::jsonb THEN $5::text ELSE $4::text END, \
               'time', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
               'attributes', jsonb_build_object($6::text, $1::text, $7::text, r.value)) \
             END AS event) AS e \
         WHERE $3::text IS NOT NULL OR $8::text IS NOT NULL OR e.event IS NOT NULL \
         ORDER BY r.custom_id \
         {merge}"
    );
    let event = forms.event.as_ref();
    let enqueued = sqlx::query(&statement)
        .bind(key)
        .bind(lane.as_str())
        .bind(forms.attribute.as_deref())
        .bind(event.map(|event| event.entered.as_str()))
        .bind(event.map(|event| event.exited.as_str()))
        .bind(event.map(|event| event.key_attribute))
        .bind(event.map(|event| event.value_attribute.as_str()))
        .bind(forms.audience.as_deref())
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

/// An enqueue at least this large refreshes the outbox's planner statistics (86 ms at 10,000 rows
/// beside a million settled ones). Below it, a claim planned against stale statistics scans at
/// most a few tens of thousands of rows, milliseconds; above it, a stale plan once cost minutes.
const ANALYZE_AFTER_ROWS: u64 = 50_000;

/// `backfill`: every staged member is desired again through the bulk lane, whatever the snapshot
/// says (Batch lost data); non-members get nothing. State only: no events.
pub async fn enqueue_all_members(
    conn: &mut PgConnection,
    key: &str,
    forms: &Forms,
) -> Result<(), sqlx::Error> {
    // `enqueue` leaves identical pending rows alone; their attribute must take the bulk lane too,
    // and their lists must be updated again.
    sqlx::query(
        "UPDATE outbox o SET lane = CASE WHEN $2::text IS NOT NULL THEN 'bulk' ELSE o.lane END, \
                attribute = coalesce(o.attribute, $2::text), audience = coalesce(o.audience, $3::text) \
         FROM staging s \
         WHERE o.definition_key = $1 AND o.custom_id = s.custom_id AND o.value = s.value",
    )
    .bind(key)
    .bind(forms.attribute.as_deref())
    .bind(forms.audience.as_deref())
    .execute(&mut *conn)
    .await?;
    enqueue(
        conn,
        key,
        "SELECT custom_id, value FROM staging WHERE problem IS NULL AND value IS NOT NULL",
        &forms.clone().without_events(),
        Lane::Bulk,
    )
    .await?;
    Ok(())
}

/// `retire`: every profile holding the definition's attribute gets it deleted (null), and every
/// member leaves its custom audience, through the bulk lane when there are many. Acknowledged
/// nulls remove the snapshot rows.
pub async fn enqueue_retirement(
    conn: &mut PgConnection,
    key: &str,
    forms: &Forms,
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
        &forms.clone().without_events(),
        lane,
    )
    .await?;
    Ok(holders)
}
