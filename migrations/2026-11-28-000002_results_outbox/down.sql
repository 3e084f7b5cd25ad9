-- Drops the outbox (events not yet published are lost: drain it first) and puts back
-- the runtime-role migration's grant function.
DROP TABLE IF EXISTS results_outbox;
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
    RETURN true;
END;
$$;
REVOKE ALL ON FUNCTION vote_aggregator_grant_runtime() FROM PUBLIC;
