-- A draining worker asks whether rows still in an earlier lane carry a part for its own lane
-- (an event after the bulk attribute, a list change after either). Few rows carry such parts,
-- so partial indexes keep that question cheap while a million-row backfill is in the outbox.
CREATE INDEX outbox_events_waiting ON outbox (lane) WHERE event IS NOT NULL;
CREATE INDEX outbox_lists_waiting ON outbox (lane) WHERE audience IS NOT NULL;
