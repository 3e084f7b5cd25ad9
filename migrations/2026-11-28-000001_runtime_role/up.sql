-- Least privilege: what the replicas' runtime role may do, declared in ONE place.
--
-- vote_aggregator_runtime is a NOLOGIN group role; the replicas log in as users that
-- are members of it (scripts/roles.sql, `make roles`), never as the schema's owner. It
-- may insert votes and conflicts, insert and bump tally counters, and read what the
-- service reads (the batch statement, in-doubt resolution, `verify`, the migrations
-- check at start). It may not update, delete or truncate votes, disable their triggers
-- (only the owner can), change the schema, or create tables (PostgreSQL 15+ gives
-- PUBLIC no CREATE on schema public).
--
-- Roles are cluster-wide. This migration creates the group role when the migrating user
-- may (superuser or CREATEROLE); otherwise it leaves the grants undone and says so, and
-- the migration still succeeds (a plain database owner keeps migrating): an
-- administrator then runs scripts/roles.sql, which creates the role and calls
-- vote_aggregator_grant_runtime() below. A later migration that adds a table or a
-- statement replaces that function with the extended list and calls it again.

-- SECURITY DEFINER with a pinned search_path: whoever calls it (an administrator
-- running scripts/roles.sql, typically a superuser), it runs with its OWNER's rights
-- only. Otherwise the owner (the migrator) could rewrite the body and have a superuser
-- run it for them.
CREATE FUNCTION vote_aggregator_grant_runtime() RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'vote_aggregator_runtime') THEN
        RAISE WARNING 'role vote_aggregator_runtime does not exist and % may not create roles: the runtime grants are not applied', current_user
            USING HINT = 'have an administrator run scripts/roles.sql (make roles); it creates the role and applies them';
        RETURN false;
    END IF;
    -- The batch statement: INSERT ... ON CONFLICT (vote_id) DO NOTHING RETURNING, and
    -- reads of stored votes to judge conflicts; in-doubt resolution and `verify` read
    -- votes too (xmin included).
    GRANT SELECT, INSERT ON votes TO vote_aggregator_runtime;
    -- The tally upsert reads the row it bumps and updates only the counter columns;
    -- `verify` reads the counters.
    GRANT SELECT, INSERT ON tally_shards TO vote_aggregator_runtime;
    GRANT UPDATE (votes, updated_at) ON tally_shards TO vote_aggregator_runtime;
    -- ON CONFLICT ON CONSTRAINT needs SELECT on the constraint's columns; nothing else
    -- of vote_conflicts is read. The identity column needs no sequence grant.
    GRANT INSERT ON vote_conflicts TO vote_aggregator_runtime;
    GRANT SELECT (vote_id, election_id, candidate_id, precinct_id, cast_at)
        ON vote_conflicts TO vote_aggregator_runtime;
    -- `run` compares the applied migrations with its own before it consumes.
    GRANT SELECT ON __diesel_schema_migrations TO vote_aggregator_runtime;
    RETURN true;
END;
$$;

-- Nobody but the owner (and superusers) may re-apply or change the grants.
REVOKE ALL ON FUNCTION vote_aggregator_grant_runtime() FROM PUBLIC;

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'vote_aggregator_runtime')
       AND (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user) THEN
        BEGIN
            CREATE ROLE vote_aggregator_runtime NOLOGIN;
        EXCEPTION
            -- Another database of the cluster migrating at the same moment made it.
            WHEN duplicate_object OR unique_violation THEN NULL;
        END;
    END IF;
    PERFORM public.vote_aggregator_grant_runtime();
END
$$;
