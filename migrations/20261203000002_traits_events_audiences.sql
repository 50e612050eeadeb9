-- Computed traits, Track events and Batch custom audiences.
--
-- One outbox row still holds one (definition, user)'s latest desired value, now with the parts
-- that carry it to Batch: the profile attribute (`attribute`, NULL when not sent or already
-- delivered), a Track event (`event`, the whole event as sent) and a custom-audience list
-- (`audience`, the list's name). A row moves from lane to lane as its parts are acknowledged
-- (bulk → incremental for the event → audience), and only when none is left does its value move
-- into the snapshot.

ALTER TABLE outbox ALTER COLUMN attribute DROP NOT NULL;
ALTER TABLE outbox ADD COLUMN event jsonb;
ALTER TABLE outbox ADD COLUMN audience text;
-- Some part of some value of this row reached Batch without the snapshot knowing (a row
-- acknowledged halfway, then replaced). The diff must re-send such a row, never just drop it.
ALTER TABLE outbox ADD COLUMN partly_delivered boolean NOT NULL DEFAULT false;
ALTER TABLE outbox DROP CONSTRAINT outbox_lane_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_lane_check
    CHECK (lane IN ('incremental', 'bulk', 'audience'));

ALTER TABLE rejections ALTER COLUMN attribute DROP NOT NULL;

-- How a definition reaches Batch, kept so `retire` can undo it after the definition left the
-- configuration: the attribute name as sent (`date(key)` for a timestamp trait; NULL when the
-- identify form is off) and the custom audience's name (NULL when none).
ALTER TABLE definitions ADD COLUMN attribute text;
ALTER TABLE definitions ADD COLUMN custom_audience text;
-- Set once `/audiences/create` succeeded (or answered that the audience exists).
ALTER TABLE definitions ADD COLUMN custom_audience_created_at timestamptz;
UPDATE definitions SET attribute = key WHERE kind = 'audience';
