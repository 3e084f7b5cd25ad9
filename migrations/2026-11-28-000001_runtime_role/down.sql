-- Takes back every grant of the up migration; the cluster-wide role stays (other
-- databases may use it; an administrator drops it with DROP ROLE).
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'vote_aggregator_runtime') THEN
        REVOKE ALL ON votes, tally_shards, vote_conflicts, __diesel_schema_migrations
            FROM vote_aggregator_runtime;
    END IF;
END
$$;
DROP FUNCTION IF EXISTS vote_aggregator_grant_runtime();
