-- The results outbox: what each batch transaction counted, per election, as an event
-- written in that same transaction (docs/RESULTS.md). A relay inside each replica
-- publishes committed rows to the `votes.results` exchange with publisher confirms and
-- deletes them in the transaction that claimed them (`FOR UPDATE SKIP LOCKED`), so the
-- table holds only events not yet confirmed by the broker.
--
-- event_id     unique id of the event (the AMQP message_id): a consumer dedupes by it
-- election_id  the election (the routing key)
-- increments   {"<candidate_id>": <votes added>, ...}: what this transaction added
-- xid          the counting transaction (pg_current_xact_id()): a consumer that starts
--              from a vote_statistics snapshot skips the events its snapshot holds
--              (pg_visible_in_snapshot)
-- created_at   when it was written (its pending age)
CREATE TABLE results_outbox (
    event_id    uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    election_id text        NOT NULL,
    increments  jsonb       NOT NULL,
    xid         xid8        NOT NULL DEFAULT pg_current_xact_id(),
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- The relay claims the oldest rows first; the pending-age gauge reads min(created_at).
CREATE INDEX results_outbox_created_at_idx ON results_outbox (created_at);

-- The runtime grants, extended: the batch statement inserts outbox rows; the relay
-- reads, locks and deletes them. Everything else as in the runtime-role migration.
CREATE OR REPLACE FUNCTION vote_aggregator_grant_runtime() RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'vote_aggregator_runtime') THEN
        RAISE WARNING 'role vote_aggregator_runtime does not exist and % may not create roles: the runtime grants are not applied', current_user
            USING HINT = 'have an administrator run scripts/roles.sql (make roles); it creates the role and applies them';
        RETURN false;
    END IF;
    GRANT SELECT, INSERT ON votes TO vote_aggregator_runtime;
    GRANT SELECT, INSERT ON tally_shards TO vote_aggregator_runtime;
    GRANT UPDATE (votes, updated_at) ON tally_shards TO vote_aggregator_runtime;
    GRANT INSERT ON vote_conflicts TO vote_aggregator_runtime;
    GRANT SELECT (vote_id, election_id, candidate_id, precinct_id, cast_at)
        ON vote_conflicts TO vote_aggregator_runtime;
    GRANT SELECT ON __diesel_schema_migrations TO vote_aggregator_runtime;
    -- The batch statement writes events; the relay claims them (SELECT ... FOR UPDATE
    -- SKIP LOCKED, which PostgreSQL allows only with UPDATE privilege on some column:
    -- created_at, which only the pending-age gauge reads) and deletes them.
    GRANT SELECT, INSERT, DELETE ON results_outbox TO vote_aggregator_runtime;
    GRANT UPDATE (created_at) ON results_outbox TO vote_aggregator_runtime;
    RETURN true;
END;
$$;

REVOKE ALL ON FUNCTION vote_aggregator_grant_runtime() FROM PUBLIC;

DO $$
BEGIN
    PERFORM public.vote_aggregator_grant_runtime();
END
$$;
