-- The core state of engage-sync: definitions, the acknowledged snapshot, the outbox of changes not
-- yet acknowledged, rejections Batch refused, and a record of every run.
--
-- The large tables (snapshot, outbox) carry no foreign keys: a check per row costs real time on a
-- million-row backfill, and every row is written after its definition is registered anyway.

CREATE TABLE definitions (
    key                       text PRIMARY KEY,
    kind                      text NOT NULL,
    name                      text NOT NULL,
    query                     text NOT NULL,
    schedule                  text NOT NULL,
    first_seen_at             timestamptz NOT NULL DEFAULT now(),
    last_seen_at              timestamptz NOT NULL DEFAULT now(),
    -- Set once every change of the first sync was acknowledged or rejected; until then the
    -- definition's changes go through the bulk lane.
    initial_sync_completed_at timestamptz
);

-- Per (definition, user): exactly the value Batch acknowledged, `false` included (so `retire` knows
-- every profile holding the attribute). A user absent here has no value on Batch from this
-- definition: never sent, or deleted with null.
CREATE TABLE snapshot (
    definition_key  text NOT NULL,
    custom_id       text NOT NULL,
    value           jsonb NOT NULL,
    acknowledged_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (definition_key, custom_id)
);

CREATE SEQUENCE outbox_seq;

-- Per (definition, user): the latest desired value not yet acknowledged.
CREATE TABLE outbox (
    definition_key text NOT NULL,
    custom_id      text NOT NULL,
    -- The profile attribute the value is sent as.
    attribute      text NOT NULL,
    -- The value as sent on the wire (`false` for a user leaving an audience). JSON null deletes the
    -- attribute on Batch, and the snapshot row once acknowledged.
    value          jsonb NOT NULL,
    lane           text NOT NULL CHECK (lane IN ('incremental', 'bulk')),
    -- Bumped whenever the desired value changes, so an acknowledgement of an older value never
    -- removes a newer one.
    seq            bigint NOT NULL DEFAULT nextval('outbox_seq'),
    enqueued_at    timestamptz NOT NULL DEFAULT now(),
    claimed_by     text,
    claimed_until  timestamptz,
    attempts       integer NOT NULL DEFAULT 0,
    last_error     text,
    PRIMARY KEY (definition_key, custom_id)
)
-- Claiming and unclaiming touch only unindexed columns; free room in each page lets those
-- updates stay HOT (no index writes), which is most of the cost of a 10,000-row claim.
WITH (fillfactor = 70);
ALTER SEQUENCE outbox_seq OWNED BY outbox.seq;
CREATE INDEX outbox_by_lane ON outbox (lane, seq);
CREATE INDEX outbox_by_user ON outbox (custom_id);

-- Per (definition, user): the latest value Batch refused, and why. The diff does not send that
-- value again; a different value, or an acknowledgement, clears the row.
CREATE TABLE rejections (
    definition_key text NOT NULL,
    custom_id      text NOT NULL,
    attribute      text NOT NULL,
    value          jsonb NOT NULL,
    reason         text NOT NULL,
    rejected_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (definition_key, custom_id)
);

CREATE TABLE runs (
    id             bigserial PRIMARY KEY,
    definition_key text NOT NULL REFERENCES definitions (key) ON DELETE CASCADE,
    started_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz,
    lane           text,
    source_rows    bigint NOT NULL DEFAULT 0,
    skipped_rows   bigint NOT NULL DEFAULT 0,
    duplicate_rows bigint NOT NULL DEFAULT 0,
    added          bigint NOT NULL DEFAULT 0,
    removed        bigint NOT NULL DEFAULT 0,
    changed        bigint NOT NULL DEFAULT 0,
    -- running | succeeded | incomplete | failed
    outcome        text NOT NULL DEFAULT 'running',
    error          text
);
CREATE INDEX runs_by_definition ON runs (definition_key, started_at DESC);
