//! The outbox's operations: claim rows for delivery (committed before any HTTP call), settle what
//! Batch answered (acknowledged values move into the snapshot in the same transaction that removes
//! them from the outbox), and give claims back.

use std::time::Duration;

use serde_json::Value;
use sqlx::{Executor, PgPool};

use crate::batch::client::Endpoint;
use crate::batch::limits::{
    AUDIENCE_UPDATE_MAX_IDS, MASS_UPDATE_MAX_OPERATIONS, UPDATE_MAX_OPERATIONS,
};

/// A delivery lane: which endpoint a change goes through, with that endpoint's own budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// `/profiles/update`: attributes and events.
    Incremental,
    /// `/profiles/mass-update`: attributes only.
    Bulk,
    /// `/audiences/update`: custom-audience membership.
    Audience,
}

impl Lane {
    pub const ALL: [Lane; 3] = [Lane::Bulk, Lane::Incremental, Lane::Audience];

    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Incremental => "incremental",
            Lane::Bulk => "bulk",
            Lane::Audience => "audience",
        }
    }

    pub fn endpoint(self) -> Endpoint {
        match self {
            Lane::Incremental => Endpoint::Update,
            Lane::Bulk => Endpoint::MassUpdate,
            Lane::Audience => Endpoint::AudiencesUpdate,
        }
    }

    /// Users per call.
    pub fn max_operations(self) -> usize {
        match self {
            Lane::Incremental => UPDATE_MAX_OPERATIONS,
            Lane::Bulk => MASS_UPDATE_MAX_OPERATIONS,
            Lane::Audience => AUDIENCE_UPDATE_MAX_IDS,
        }
    }

    /// Where a row goes once this lane delivered its part and others remain: the event goes
    /// through `/profiles/update`, the list last.
    pub fn next_for(self, change: &ClaimedChange) -> Option<Lane> {
        let event_left = self != Lane::Incremental && change.event.is_some();
        let list_left = self != Lane::Audience && change.audience.is_some();
        if event_left {
            Some(Lane::Incremental)
        } else if list_left {
            Some(Lane::Audience)
        } else {
            None
        }
    }
}

/// One outbox row claimed for delivery.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ClaimedChange {
    pub definition_key: String,
    pub custom_id: String,
    /// The profile attribute still to send, if any.
    pub attribute: Option<String>,
    pub value: Value,
    /// The Track event still to send, if any.
    pub event: Option<Value>,
    /// The custom audience still to update, if any.
    pub audience: Option<String>,
    pub seq: i64,
}

/// Rows claimed together under one token; every change of a claimed user is in it.
#[derive(Debug)]
pub struct Claim {
    pub token: String,
    pub changes: Vec<ClaimedChange>,
    /// Taken just before the claim was made: its lease runs from at latest here.
    pub claimed_at: std::time::Instant,
}

impl Claim {
    /// The (definition keys, custom ids) of the claimed rows, as two arrays for `unnest`.
    fn keys(&self) -> (Vec<&str>, Vec<&str>) {
        self.changes
            .iter()
            .map(|change| (change.definition_key.as_str(), change.custom_id.as_str()))
            .unzip()
    }
}

/// First key of the transaction-scoped advisory locks that keep a definition's settling apart from
/// its diff's enqueue (the second is `hashtext(key)`): settles share it, the enqueue takes it alone.
/// Without it, a diff that read the snapshot just before a settle committed would enqueue again a
/// value Batch had just acknowledged, and it would be sent twice.
pub(crate) const SETTLE_LOCK_CLASS: i32 = 0x4553_0003;

/// The group an outbox key belongs to, for settle locks and progress: a definition's own key, or
/// for forwarded Segment messages (`identify:$email_address`, `track:<message id>`) the prefix
/// with its colon, which no definition key can contain. Matches [`FAMILY_SQL`].
pub fn family(key: &str) -> &str {
    match key.find(':') {
        Some(colon) => &key[..=colon],
        None => key,
    }
}

/// [`family`] of `definition_key`, in SQL.
pub const FAMILY_SQL: &str =
    "CASE WHEN strpos(definition_key, ':') > 0 THEN split_part(definition_key, ':', 1) || ':' ELSE definition_key END";

/// First key of the advisory locks that serialise claims (the second is the lane).
const CLAIM_LOCK_CLASS: i32 = 0x4553_0001;

/// Deadlocks and serialization failures: PostgreSQL aborted the transaction, a retry may succeed.
pub fn is_transient(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("40P01" | "40001")))
}

/// A random id for one process's claims: every claim token starts with it, so a process can give
/// back all it holds on shutdown.
pub fn new_instance_id() -> String {
    format!("{:016x}", fastrand::u64(..))
}

/// Claims the oldest unclaimed changes of a lane: up to `max_users` users and, for each of them,
/// every pending change in that lane, so one user's changes travel in one operation.
pub async fn claim(
    pool: &PgPool,
    lane: Lane,
    max_users: usize,
    only: Option<&[String]>,
    lease: Duration,
    token: String,
) -> Result<Claim, sqlx::Error> {
    let mut attempt = 0;
    loop {
        let claimed_at = std::time::Instant::now();
        match try_claim(pool, lane, max_users, only, lease, &token).await {
            Ok(changes) => {
                return Ok(Claim {
                    token,
                    changes,
                    claimed_at,
                })
            }
            // A diff upserting the same rows can deadlock with a claim; the loser tries again.
            Err(error) if is_transient(&error) && attempt < 5 => attempt += 1,
            Err(error) => return Err(error),
        }
    }
}

/// Claims are taken one at a time per lane (a transaction-scoped advisory lock), so two claimers
/// never lock one user's rows in different orders, and a user's changes never split between two
/// concurrent claims.
async fn try_claim(
    pool: &PgPool,
    lane: Lane,
    max_users: usize,
    only: Option<&[String]>,
    lease: Duration,
    token: &str,
) -> Result<Vec<ClaimedChange>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
        .bind(CLAIM_LOCK_CLASS)
        .bind(lane as i32)
        .execute(&mut *tx)
        .await?;
    // Two steps, each with one obvious plan (the (lane, seq) index, then the custom_id index), so
    // stale statistics after a million-row diff cannot turn the claim into a nested loop.
    let picked: Vec<String> = sqlx::query_scalar(
        "SELECT custom_id FROM outbox \
         WHERE lane = $1 AND (claimed_until IS NULL OR claimed_until < now()) \
           AND ($3::text[] IS NULL OR definition_key = ANY($3)) \
         ORDER BY seq LIMIT $2 \
         FOR UPDATE SKIP LOCKED",
    )
    .bind(lane.as_str())
    .bind(max_users as i64)
    .bind(only)
    .fetch_all(&mut *tx)
    .await?;
    if picked.is_empty() {
        tx.commit().await?;
        return Ok(Vec::new());
    }
    let changes = sqlx::query_as::<_, ClaimedChange>(
        "UPDATE outbox o SET claimed_by = $3, \
                claimed_until = now() + make_interval(secs => $5), \
                attempts = o.attempts + 1 \
         WHERE o.custom_id = ANY($2) AND o.lane = $1 \
           AND (o.claimed_until IS NULL OR o.claimed_until < now()) \
           AND ($4::text[] IS NULL OR o.definition_key = ANY($4)) \
         RETURNING o.definition_key, o.custom_id, o.attribute, o.value, o.event, o.audience, o.seq",
    )
    .bind(lane.as_str())
    .bind(&picked)
    .bind(token)
    .bind(only)
    .bind(lease.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(changes)
}

/// Keeps claimed rows alive (before a call, and while it is retried), noting why they are still
/// pending when retried. Returns how many of them this claim still held: fewer means another
/// worker took some after the lease ran out, and they are theirs to send now.
/// Rows are found by key: `claimed_by` carries no index, so that claiming stays a HOT update.
pub async fn extend_claim(
    pool: &PgPool,
    token: &str,
    changes: &[&ClaimedChange],
    lease: Duration,
    last_error: Option<&str>,
) -> Result<u64, sqlx::Error> {
    let (keys, ids): (Vec<&str>, Vec<&str>) = changes
        .iter()
        .map(|change| (change.definition_key.as_str(), change.custom_id.as_str()))
        .unzip();
    Ok(sqlx::query(
        "UPDATE outbox o SET claimed_until = now() + make_interval(secs => $4), \
                last_error = coalesce($5, o.last_error) \
         FROM unnest($1::text[], $2::text[]) AS a(k, u) \
         WHERE o.definition_key = a.k AND o.custom_id = a.u AND o.claimed_by = $3",
    )
    .bind(keys)
    .bind(ids)
    .bind(token)
    .bind(lease.as_secs_f64())
    .bind(last_error)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Gives back whatever the claim still holds, so the next worker or run can take it at once.
pub async fn release_claim(
    pool: &PgPool,
    claim: &Claim,
    last_error: Option<&str>,
) -> Result<u64, sqlx::Error> {
    let (keys, ids) = claim.keys();
    Ok(sqlx::query(
        "UPDATE outbox o SET claimed_by = NULL, claimed_until = NULL, \
                last_error = coalesce($4, o.last_error) \
         FROM unnest($1::text[], $2::text[]) AS a(k, u) \
         WHERE o.definition_key = a.k AND o.custom_id = a.u AND o.claimed_by = $3",
    )
    .bind(keys)
    .bind(ids)
    .bind(&claim.token)
    .bind(last_error)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Gives back every claim of a process (tokens `{instance}-…`), on shutdown. A full scan: rare.
pub async fn release_instance(pool: &PgPool, instance: &str) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE outbox SET claimed_by = NULL, claimed_until = NULL \
         WHERE claimed_by LIKE $1 || '-%'",
    )
    .bind(instance)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Records Batch's answer for some claimed changes of `lane`, in one transaction. An acknowledged
/// row with parts left for another lane (an event after mass-update, a list after the profile)
/// moves on to that lane; a finished one moves its value into the snapshot (an acknowledged null
/// deletes the snapshot row). Refused rows go to `rejections`. Both leave the outbox unless a newer
/// value replaced them meanwhile (then that newer row is just unclaimed).
pub async fn settle(
    pool: &PgPool,
    token: &str,
    lane: Lane,
    acknowledged: &[&ClaimedChange],
    rejected: &[(&ClaimedChange, String)],
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut definitions: Vec<&str> = acknowledged
        .iter()
        .copied()
        .chain(rejected.iter().map(|(change, _)| *change))
        .map(|change| family(&change.definition_key))
        .collect();
    definitions.sort_unstable();
    definitions.dedup();
    // Sorted, so two settles never wait on each other in a cycle.
    sqlx::query(
        "SELECT pg_advisory_xact_lock_shared($1, hashtext(k)) \
         FROM unnest($2::text[]) AS a(k)",
    )
    .bind(SETTLE_LOCK_CLASS)
    .bind(&definitions)
    .execute(&mut *tx)
    .await?;

    let (moving, finished): (Vec<&ClaimedChange>, Vec<&ClaimedChange>) = acknowledged
        .iter()
        .copied()
        .partition(|change| lane.next_for(change).is_some());
    if !moving.is_empty() {
        let (keys, ids, _) = columns(&moving);
        let seqs: Vec<i64> = moving.iter().map(|change| change.seq).collect();
        let next: Vec<&str> = moving
            .iter()
            .map(|change| lane.next_for(change).expect("moving").as_str())
            .collect();
        sqlx::query(
            "UPDATE outbox o SET \
                 attribute = CASE WHEN $5 = 'audience' THEN o.attribute END, \
                 event = CASE WHEN $5 <> 'incremental' THEN o.event END, \
                 lane = a.next, claimed_by = NULL, claimed_until = NULL, attempts = 0, \
                 last_error = NULL \
             FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[]) AS a(k, u, s, next) \
             WHERE o.definition_key = a.k AND o.custom_id = a.u AND o.seq = a.s",
        )
        .bind(&keys)
        .bind(&ids)
        .bind(&seqs)
        .bind(&next)
        .bind(lane.as_str())
        .execute(&mut *tx)
        .await?;
        // A part of a value that was replaced meanwhile reached Batch: the newer row must be
        // delivered in full, whatever the next diff finds.
        sqlx::query(
            "UPDATE outbox o SET partly_delivered = true \
             FROM unnest($1::text[], $2::text[], $3::bigint[]) AS a(k, u, s) \
             WHERE o.definition_key = a.k AND o.custom_id = a.u AND o.seq <> a.s",
        )
        .bind(&keys)
        .bind(&ids)
        .bind(&seqs)
        .execute(&mut *tx)
        .await?;
    }

    let (kept, dropped): (Vec<&ClaimedChange>, Vec<&ClaimedChange>) = finished
        .iter()
        .copied()
        .partition(|change| !change.value.is_null());
    if !kept.is_empty() {
        let (keys, ids, values) = columns(&kept);
        sqlx::query(
            "INSERT INTO snapshot (definition_key, custom_id, value) \
             SELECT k, u, v::jsonb FROM unnest($1::text[], $2::text[], $3::text[]) AS a(k, u, v) \
             ON CONFLICT (definition_key, custom_id) \
             DO UPDATE SET value = EXCLUDED.value, acknowledged_at = now()",
        )
        .bind(keys)
        .bind(ids)
        .bind(values)
        .execute(&mut *tx)
        .await?;
    }
    if !dropped.is_empty() {
        let (keys, ids, _) = columns(&dropped);
        sqlx::query(
            "DELETE FROM snapshot s USING unnest($1::text[], $2::text[]) AS a(k, u) \
             WHERE s.definition_key = a.k AND s.custom_id = a.u",
        )
        .bind(keys)
        .bind(ids)
        .execute(&mut *tx)
        .await?;
    }
    if !finished.is_empty() {
        let (keys, ids, _) = columns(&finished);
        sqlx::query(
            "DELETE FROM rejections r USING unnest($1::text[], $2::text[]) AS a(k, u) \
             WHERE r.definition_key = a.k AND r.custom_id = a.u",
        )
        .bind(keys)
        .bind(ids)
        .execute(&mut *tx)
        .await?;
    }
    if !rejected.is_empty() {
        let changes: Vec<&ClaimedChange> = rejected.iter().map(|(change, _)| *change).collect();
        let (keys, ids, values) = columns(&changes);
        let attributes: Vec<Option<&str>> =
            changes.iter().map(|c| c.attribute.as_deref()).collect();
        let reasons: Vec<&str> = rejected.iter().map(|(_, reason)| reason.as_str()).collect();
        sqlx::query(
            "INSERT INTO rejections (definition_key, custom_id, attribute, value, reason) \
             SELECT k, u, a, v::jsonb, r \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) AS x(k, u, a, v, r) \
             ON CONFLICT (definition_key, custom_id) DO UPDATE \
             SET attribute = EXCLUDED.attribute, value = EXCLUDED.value, \
                 reason = EXCLUDED.reason, rejected_at = now()",
        )
        .bind(keys)
        .bind(ids)
        .bind(attributes)
        .bind(values)
        .bind(reasons)
        .execute(&mut *tx)
        .await?;
    }

    let settled: Vec<&ClaimedChange> = finished
        .iter()
        .copied()
        .chain(rejected.iter().map(|(change, _)| *change))
        .collect();
    let (keys, ids, _) = columns(&settled);
    let seqs: Vec<i64> = settled.iter().map(|change| change.seq).collect();
    sqlx::query(
        "DELETE FROM outbox o USING unnest($1::text[], $2::text[], $3::bigint[]) AS a(k, u, s) \
         WHERE o.definition_key = a.k AND o.custom_id = a.u AND o.seq = a.s",
    )
    .bind(&keys)
    .bind(&ids)
    .bind(seqs)
    .execute(&mut *tx)
    .await?;
    // Rows replaced by a newer value meanwhile are still claimed by this token.
    let answered: Vec<&ClaimedChange> = acknowledged
        .iter()
        .copied()
        .chain(rejected.iter().map(|(change, _)| *change))
        .collect();
    let (keys, ids, _) = columns(&answered);
    sqlx::query(
        "UPDATE outbox o SET claimed_by = NULL, claimed_until = NULL \
         FROM unnest($1::text[], $2::text[]) AS a(k, u) \
         WHERE o.definition_key = a.k AND o.custom_id = a.u AND o.claimed_by = $3",
    )
    .bind(&keys)
    .bind(&ids)
    .bind(token)
    .execute(&mut *tx)
    .await?;

    tx.commit().await
}

fn columns(changes: &[&ClaimedChange]) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut keys = Vec::with_capacity(changes.len());
    let mut ids = Vec::with_capacity(changes.len());
    let mut values = Vec::with_capacity(changes.len());
    for change in changes {
        keys.push(change.definition_key.clone());
        ids.push(change.custom_id.clone());
        values.push(change.value.to_string());
    }
    (keys, ids, values)
}

/// Changes still waiting, for the given definitions (all when `None`).
pub async fn pending(pool: &PgPool, only: Option<&[String]>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE ($1::text[] IS NULL OR definition_key = ANY($1))",
    )
    .bind(only)
    .fetch_one(pool)
    .await
}

/// Rows settled after which a drained lane sweeps the outbox (see [`sweep`]).
pub const SWEEP_AFTER_ROWS: u64 = 10_000;

/// Vacuums the outbox (every settled row leaves a dead one behind) and refreshes the statistics
/// of the outbox and the snapshot. Left to autovacuum, a diff or claim run right after a backfill
/// scans a million dead rows and plans against the statistics of an empty snapshot; where
/// autovacuum is off, the bloat would only grow. The snapshot is only analysed: vacuuming it means
/// a full scan of its index, seconds at ten million members, for the few rows a run updates.
/// Tables another replica is sweeping are skipped rather than waited for.
pub async fn sweep(pool: &PgPool) -> Result<(), sqlx::Error> {
    // VACUUM cannot run inside a transaction block.
    pool.execute("VACUUM (ANALYZE, SKIP_LOCKED) outbox").await?;
    pool.execute("ANALYZE (SKIP_LOCKED) snapshot").await?;
    Ok(())
}

/// Whether any change of the given definitions (all when `None`) still waits in a lane, or will
/// reach it once an earlier lane delivered its part.
pub async fn has_pending_in_lane(
    pool: &PgPool,
    lane: Lane,
    only: Option<&[String]>,
) -> Result<bool, sqlx::Error> {
    // Rows still in an earlier lane count too when they carry a part for this one: a worker
    // that stopped before they moved over would leave them behind.
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM outbox \
                        WHERE lane = $1 AND ($2::text[] IS NULL OR definition_key = ANY($2))) \
             OR ($1 = 'incremental' AND EXISTS (SELECT 1 FROM outbox \
                        WHERE event IS NOT NULL AND lane = 'bulk' \
                          AND ($2::text[] IS NULL OR definition_key = ANY($2)))) \
             OR ($1 = 'audience' AND EXISTS (SELECT 1 FROM outbox \
                        WHERE audience IS NOT NULL AND lane <> 'audience' \
                          AND ($2::text[] IS NULL OR definition_key = ANY($2))))",
    )
    .bind(lane.as_str())
    .bind(only)
    .fetch_one(pool)
    .await
}
