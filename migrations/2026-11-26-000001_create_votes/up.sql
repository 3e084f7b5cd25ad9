-- The vote-aggregator schema. See docs/design.md ("Contract", "Invariants").
--
-- votes         one row per distinct vote UUID, append-only (trigger below)
-- tally_shards  per-candidate counters spread over `shard` rows so concurrent replicas
--               do not queue on one hot row; the view sums them
-- vote_conflicts a vote UUID seen again with a different payload: recorded, never counted

-- Field syntax (charset) is validated by the aggregator before insert; the length
-- checks here are a cheap last line of defence for other writers.
CREATE TABLE votes (
    vote_id      uuid        PRIMARY KEY,
    election_id  text        NOT NULL CHECK (char_length(election_id) BETWEEN 1 AND 64),
    candidate_id text        NOT NULL CHECK (char_length(candidate_id) BETWEEN 1 AND 64),
    precinct_id  text                 CHECK (char_length(precinct_id) BETWEEN 1 AND 64),
    cast_at      timestamptz NOT NULL,
    -- clock_timestamp(): the moment the row is written, just before its COMMIT (the load
    -- runner measures publish-to-commit latency from it).
    recorded_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- No secondary index on votes: every index costs each insert on the hot path, and the
-- per-candidate reads (verify, the checker) are rare full scans; dashboards read
-- tally_shards through vote_statistics.

CREATE FUNCTION votes_reject_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'votes is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'votes are never updated or deleted; record corrections elsewhere';
END;
$$;

CREATE TRIGGER votes_append_only
    BEFORE UPDATE OR DELETE ON votes
    FOR EACH ROW EXECUTE FUNCTION votes_reject_change();

CREATE TRIGGER votes_no_truncate
    BEFORE TRUNCATE ON votes
    FOR EACH STATEMENT EXECUTE FUNCTION votes_reject_change();

CREATE TABLE tally_shards (
    election_id  text     NOT NULL,
    candidate_id text     NOT NULL,
    shard        smallint NOT NULL CHECK (shard >= 0),
    votes        bigint   NOT NULL CHECK (votes >= 0),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (election_id, candidate_id, shard)
);

CREATE TABLE vote_conflicts (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    vote_id      uuid        NOT NULL,
    election_id  text        NOT NULL,
    candidate_id text        NOT NULL,
    precinct_id  text,
    cast_at      timestamptz NOT NULL,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    -- The same conflicting payload redelivered is recorded once.
    CONSTRAINT vote_conflicts_payload_key
        UNIQUE NULLS NOT DISTINCT (vote_id, election_id, candidate_id, precinct_id, cast_at)
);

CREATE INDEX vote_conflicts_vote_id_idx ON vote_conflicts (vote_id);

CREATE VIEW vote_statistics AS
SELECT election_id,
       candidate_id,
       sum(votes)::bigint AS votes,
       round(100.0 * sum(votes) / nullif(sum(sum(votes)) OVER (PARTITION BY election_id), 0), 2)
           AS percentage
FROM tally_shards
GROUP BY election_id, candidate_id;
