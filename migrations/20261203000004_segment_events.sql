-- Segment identify/track messages taken in by the ingestion endpoint or `replay`.
--
-- Every accepted message is kept here, so audience and trait queries can read behaviour
-- ("users with an Order Completed in the last 30 days") as plain SQL. `message_id` makes a
-- message count once however often it is posted or replayed.
CREATE TABLE events (
    message_id   text PRIMARY KEY,
    type         text NOT NULL,
    user_id      text,
    anonymous_id text,
    -- A track's event name as sent ("Order Completed"); NULL for an identify.
    event        text,
    properties   jsonb,
    traits       jsonb,
    context      jsonb,
    -- When it happened: the message's timestamp, else when it was received.
    "timestamp"  timestamptz NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    -- The whole message as received.
    message      jsonb NOT NULL
);
CREATE INDEX events_by_name_and_time ON events (event, "timestamp");
CREATE INDEX events_by_user ON events (user_id);
