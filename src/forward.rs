//! Segment messages into engage-sync: each accepted message is stored in `events` (where audience
//! and trait queries can read it), mapped by [`crate::segment`], and its Batch parts queued in the
//! outbox, all in one transaction, so a message acknowledged to its sender is never lost.
//!
//! Outbox keys: an identify's attribute travels as `identify:<attribute>` (one row per profile and
//! attribute, so a later value replaces a pending one and the snapshot remembers what Batch
//! acknowledged); a track's event as `track:<message id>` with a null value (nothing to remember
//! once delivered). Neither can clash with a definition key, which has no colon.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;

use crate::outbox::{Lane, SETTLE_LOCK_CLASS};
use crate::segment::{map_message, MappingRules};

pub const IDENTIFY_PREFIX: &str = "identify:";
pub const TRACK_PREFIX: &str = "track:";
/// Rejections of a whole message are kept under `message:<message id>`, of a field that is not an
/// attribute under `message:<message id>/<field>`.
pub const MESSAGE_PREFIX: &str = "message:";

/// How queued identify attributes are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Live traffic: every identify attribute is forwarded, through `/profiles/update`.
    Live,
    /// Historical replay: identify attributes go through the bulk lane, and a value Batch already
    /// acknowledged is not sent again (so a second replay sends nothing new).
    Replay,
}

/// What one call of [`accept`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Accepted {
    /// Messages stored for the first time.
    pub stored: u64,
    /// Messages whose id was already stored: neither stored nor forwarded again.
    pub duplicates: u64,
    /// Outbox rows queued (attributes and events).
    pub queued: u64,
    /// Messages refused as a whole (no userId…): stored, recorded in `rejections`, not forwarded.
    pub refused_messages: u64,
    /// Single fields or events left out, each recorded in `rejections` with its reason.
    pub refused_fields: u64,
}

impl std::ops::AddAssign for Accepted {
    fn add_assign(&mut self, other: Self) {
        self.stored += other.stored;
        self.duplicates += other.duplicates;
        self.queued += other.queued;
        self.refused_messages += other.refused_messages;
        self.refused_fields += other.refused_fields;
    }
}

/// One outbox row to queue, keyed by (key, custom_id).
struct Queued {
    attribute: Option<String>,
    value: Value,
    event: Option<Value>,
    lane: Lane,
}

/// One rejection row, keyed by (key, custom_id).
struct Refusal {
    attribute: Option<String>,
    value: Value,
    reason: String,
}

/// Stores, maps and queues `messages` (each already a JSON object) in one transaction.
pub async fn accept(
    pool: &PgPool,
    messages: &[Value],
    rules: &MappingRules,
    mode: Mode,
    now: DateTime<Utc>,
) -> Result<Accepted, sqlx::Error> {
    let mut accepted = Accepted::default();
    if messages.is_empty() {
        return Ok(accepted);
    }
    let times: Vec<DateTime<Utc>> = messages
        .iter()
        .map(|message| happened_at(message).unwrap_or(now))
        .collect();
    let mut tx = pool.begin().await?;
    // A message without messageId gets one from its content, so replaying the same file twice
    // still finds it stored.
    let stored: Vec<(i64, String)> = sqlx::query_as(
        "WITH input AS ( \
             SELECT DISTINCT ON (id) id, m, t, position \
             FROM (SELECT coalesce(nullif(m->>'messageId', ''), 'md5-' || md5(m::text)) AS id, \
                          m, t, position \
                   FROM unnest($1::jsonb[], $2::timestamptz[]) WITH ORDINALITY AS a(m, t, position)) x \
             ORDER BY id, position), \
         inserted AS ( \
             INSERT INTO events (message_id, type, user_id, anonymous_id, event, properties, \
                                 traits, context, \"timestamp\", received_at, message) \
             SELECT id, coalesce(m->>'type', ''), m->>'userId', m->>'anonymousId', m->>'event', \
                    m->'properties', m->'traits', m->'context', t, $3, m \
             FROM input \
             ON CONFLICT (message_id) DO NOTHING \
             RETURNING message_id) \
         SELECT input.position, input.id FROM input JOIN inserted ON inserted.message_id = input.id",
    )
    .bind(messages)
    .bind(&times)
    .bind(now)
    .fetch_all(&mut *tx)
    .await?;
    accepted.stored = stored.len() as u64;
    accepted.duplicates = messages.len() as u64 - accepted.stored;

    let mut queued: HashMap<(String, String), Queued> = HashMap::new();
    let mut refusals: HashMap<(String, String), Refusal> = HashMap::new();
    let mut stored = stored;
    // In message order, so a later identify's value wins over an earlier one in the same batch.
    stored.sort_unstable_by_key(|(position, _)| *position);
    for (position, message_id) in stored {
        let message = &messages[(position - 1) as usize];
        let mapped = match map_message(message, rules, now) {
            Ok(mapped) => mapped,
            Err(error) => {
                accepted.refused_messages += 1;
                let who = ["userId", "anonymousId"]
                    .into_iter()
                    .find_map(|field| message.get(field).and_then(Value::as_str))
                    .unwrap_or_default()
                    .to_owned();
                refusals.insert(
                    (format!("{MESSAGE_PREFIX}{message_id}"), who),
                    Refusal {
                        attribute: None,
                        value: Value::Null,
                        reason: error.to_string(),
                    },
                );
                continue;
            }
        };
        for rejection in &mapped.rejections {
            accepted.refused_fields += 1;
            let key = match &rejection.attribute {
                Some(attribute) => format!("{IDENTIFY_PREFIX}{attribute}"),
                // Not an attribute (a dropped event property, an unusable key, a stale event):
                // kept per message and field, so each reason stays on record.
                None => format!("{MESSAGE_PREFIX}{message_id}/{}", rejection.field),
            };
            let value = value_at(message, &rejection.field);
            refusals.insert(
                (key, mapped.custom_id.clone()),
                Refusal {
                    attribute: rejection.attribute.clone(),
                    value,
                    reason: format!("{}: {}", rejection.field, rejection.reason),
                },
            );
        }
        let identify_lane = match mode {
            Mode::Live => Lane::Incremental,
            Mode::Replay => Lane::Bulk,
        };
        for attribute in mapped.attributes {
            queued.insert(
                (
                    format!("{IDENTIFY_PREFIX}{}", attribute.name),
                    mapped.custom_id.clone(),
                ),
                Queued {
                    attribute: Some(attribute.name),
                    value: attribute.value,
                    event: None,
                    lane: identify_lane,
                },
            );
        }
        if let Some(event) = mapped.event {
            queued.insert(
                (
                    format!("{TRACK_PREFIX}{message_id}"),
                    mapped.custom_id.clone(),
                ),
                Queued {
                    attribute: None,
                    value: Value::Null,
                    event: Some(event),
                    lane: Lane::Incremental,
                },
            );
        }
    }

    if mode == Mode::Replay {
        // Settles of forwarded identifies wait until this commits, so the comparison with the
        // snapshot below never misses a value being acknowledged at this moment.
        sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
            .bind(SETTLE_LOCK_CLASS)
            .bind(IDENTIFY_PREFIX)
            .execute(&mut *tx)
            .await?;
    }
    let mut keys = Vec::with_capacity(queued.len());
    let mut users = Vec::with_capacity(queued.len());
    let mut attributes = Vec::with_capacity(queued.len());
    let mut values = Vec::with_capacity(queued.len());
    let mut events = Vec::with_capacity(queued.len());
    let mut lanes = Vec::with_capacity(queued.len());
    for ((key, user), row) in queued {
        keys.push(key);
        users.push(user);
        attributes.push(row.attribute);
        values.push(row.value);
        events.push(row.event);
        lanes.push(row.lane.as_str());
    }
    accepted.queued = sqlx::query(
        "INSERT INTO outbox (definition_key, custom_id, attribute, value, event, lane) \
         SELECT k, u, a, v, e, l \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::jsonb[], $6::text[]) \
              AS r(k, u, a, v, e, l) \
         WHERE NOT ($7 AND EXISTS (SELECT 1 FROM snapshot s \
                                   WHERE s.definition_key = r.k AND s.custom_id = r.u AND s.value = r.v)) \
         ON CONFLICT (definition_key, custom_id) DO UPDATE \
         SET attribute = EXCLUDED.attribute, value = EXCLUDED.value, event = EXCLUDED.event, \
             lane = EXCLUDED.lane, seq = nextval('outbox_seq'), enqueued_at = now(), attempts = 0, \
             last_error = NULL, partly_delivered = false \
         WHERE outbox.value IS DISTINCT FROM EXCLUDED.value OR outbox.partly_delivered",
    )
    .bind(&keys)
    .bind(&users)
    .bind(&attributes)
    .bind(&values)
    .bind(&events)
    .bind(&lanes)
    .bind(mode == Mode::Replay)
    .execute(&mut *tx)
    .await?
    .rows_affected();

    let mut keys = Vec::with_capacity(refusals.len());
    let mut users = Vec::with_capacity(refusals.len());
    let mut attributes = Vec::with_capacity(refusals.len());
    let mut values = Vec::with_capacity(refusals.len());
    let mut reasons = Vec::with_capacity(refusals.len());
    for ((key, user), refusal) in refusals {
        keys.push(key);
        users.push(user);
        attributes.push(refusal.attribute);
        values.push(refusal.value);
        reasons.push(refusal.reason);
    }
    sqlx::query(
        "INSERT INTO rejections (definition_key, custom_id, attribute, value, reason) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::text[]) \
         ON CONFLICT (definition_key, custom_id) DO UPDATE \
         SET attribute = EXCLUDED.attribute, value = EXCLUDED.value, reason = EXCLUDED.reason, \
             rejected_at = now()",
    )
    .bind(&keys)
    .bind(&users)
    .bind(&attributes)
    .bind(&values)
    .bind(&reasons)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(accepted)
}

/// The message's own time (`timestamp`, else `originalTimestamp`), when it has a valid one.
fn happened_at(message: &Value) -> Option<DateTime<Utc>> {
    ["timestamp", "originalTimestamp"]
        .into_iter()
        .find_map(|field| {
            message
                .get(field)
                .and_then(Value::as_str)
                .and_then(|text| DateTime::parse_from_rfc3339(text).ok())
                .map(|time| time.with_timezone(&Utc))
        })
}

/// The value a rejection is about, for the record (`traits.phone` → the phone).
fn value_at(message: &Value, field: &str) -> Value {
    field
        .split('.')
        .try_fold(message, |value, segment| value.get(segment))
        .cloned()
        .unwrap_or(Value::Null)
}
