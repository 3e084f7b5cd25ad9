-- Reverting this migration would drop every counted vote, so it refuses while `votes`
-- holds any row: a rollback of the service is a rollback of the IMAGE, with the schema
-- left in place (every release reads the schema of the releases before it). Only an
-- empty database (a test or a fresh install) can be reverted.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM votes) THEN
        RAISE EXCEPTION 'refusing to revert the vote-aggregator schema: votes holds counted votes and would be dropped'
            USING ERRCODE = 'object_in_use',
                  HINT = 'roll back the service image only and keep the schema; see "Upgrades and rollback" in the README';
    END IF;
END
$$;

DROP VIEW IF EXISTS vote_statistics;
DROP TABLE IF EXISTS vote_conflicts;
DROP TABLE IF EXISTS tally_shards;
DROP TABLE IF EXISTS votes;
DROP FUNCTION IF EXISTS votes_reject_change();
