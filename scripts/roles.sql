-- vote-aggregator's PostgreSQL roles, for an administrator (a superuser: step 4 calls the
-- schema owner's grant function, and step 3 grants on schema public). Run it connected to the service's database;
-- it is idempotent (run it again to change a password or after an upgrade):
--
--   RUNTIME_PASSWORD="$(cat runtime.pw)" [MIGRATOR_PASSWORD="$(cat migrator.pw)"] \
--   psql "postgres://ADMIN@HOST/DATABASE" -v ON_ERROR_STOP=1 \
--     -v runtime_user=vote_aggregator [-v migrator_user=vote_migrator] -f scripts/roles.sql
--
-- (`make roles` does this for the compose stack.) Passwords come from the environment
-- (psql 15+ `\getenv`) or psql variables, never from this file; not `-v
-- runtime_password=...` on a shared host: every local user can read a process's argv. Server logs show the statement if log_statement = 'all' or 'ddl':
-- turn that off for this session's role or rotate afterwards.
--
-- What it does:
--  1. creates the NOLOGIN group role vote_aggregator_runtime (the grants go to it; the
--     migration declares them) unless it exists;
--  2. creates or updates the login user :runtime_user (LOGIN, nothing else) and makes it a
--     member of the group; it refuses a user that is a superuser or owns the schema;
--  3. optionally creates or updates the login user :migrator_user, which may create
--     objects in schema public: the owner/migrator for `vote-aggregator migrate` on a
--     fresh database (on an existing one, the schema's current owner stays the migrator:
--     objects keep their owner);
--  4. applies the runtime grants now if the schema exists (they are applied by the
--     migration otherwise), for databases migrated by a user that could not create the
--     group role.

\set ON_ERROR_STOP on
\if :{?runtime_user}
\else
DO $$ BEGIN RAISE EXCEPTION 'scripts/roles.sql: set -v runtime_user=NAME -v runtime_password=SECRET (and optionally migrator_user, migrator_password)'; END $$;
\endif
-- Passwords from the environment (RUNTIME_PASSWORD, MIGRATOR_PASSWORD) unless given as
-- variables: the environment of a process is private to its user, its argv is not.
\if :{?runtime_password}
\else
\getenv runtime_password RUNTIME_PASSWORD
\endif
\if :{?runtime_password}
\else
DO $$ BEGIN RAISE EXCEPTION 'scripts/roles.sql: set RUNTIME_PASSWORD in the environment (or -v runtime_password=SECRET) for the runtime user'; END $$;
\endif
\if :{?migrator_user}
  \if :{?migrator_password}
  \else
\getenv migrator_password MIGRATOR_PASSWORD
  \endif
  \if :{?migrator_password}
  \else
DO $$ BEGIN RAISE EXCEPTION 'scripts/roles.sql: set MIGRATOR_PASSWORD in the environment (or -v migrator_password=SECRET) with migrator_user'; END $$;
  \endif
\endif

-- 1. the group role the migration grants to
SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'vote_aggregator_runtime') AS create_group
\gset
\if :create_group
CREATE ROLE vote_aggregator_runtime NOLOGIN;
\endif

-- 2. the replicas' login user: a member of the group and nothing more
SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = :'runtime_user') AS runtime_exists,
       EXISTS (SELECT FROM pg_roles WHERE rolname = :'runtime_user' AND rolsuper)
         OR :'runtime_user' = current_user
         OR EXISTS (SELECT FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner
                    WHERE c.oid = to_regclass('public.votes')
                      AND CASE WHEN EXISTS (SELECT FROM pg_roles WHERE rolname = :'runtime_user')
                               THEN pg_has_role(:'runtime_user', r.oid, 'MEMBER') END)
         OR EXISTS (SELECT FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba
                    WHERE d.datname = current_database() AND r.rolname = :'runtime_user')
         AS runtime_too_strong
\gset
\if :runtime_too_strong
DO $$ BEGIN RAISE EXCEPTION 'scripts/roles.sql: the runtime user is a superuser, this session''s user, the owner of the votes table (or a member of it) or the owner of this database: choose a separate user for the replicas'; END $$;
\endif
\if :runtime_exists
ALTER ROLE :"runtime_user" WITH LOGIN INHERIT NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    PASSWORD :'runtime_password';
\else
CREATE ROLE :"runtime_user" WITH LOGIN PASSWORD :'runtime_password';
\endif
GRANT vote_aggregator_runtime TO :"runtime_user";

-- 3. optionally, a dedicated owner/migrator
\if :{?migrator_user}
SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = :'migrator_user') AS migrator_exists
\gset
  \if :migrator_exists
ALTER ROLE :"migrator_user" WITH LOGIN PASSWORD :'migrator_password';
  \else
CREATE ROLE :"migrator_user" WITH LOGIN NOCREATEDB NOCREATEROLE PASSWORD :'migrator_password';
  \endif
GRANT USAGE, CREATE ON SCHEMA public TO :"migrator_user";
\endif

-- 4. the grants, if the schema is there (the migration's function holds the one list)
SELECT to_regprocedure('vote_aggregator_grant_runtime()') IS NOT NULL AS schema_exists
\gset
\if :schema_exists
SELECT public.vote_aggregator_grant_runtime() AS runtime_grants_applied;
\endif
