DROP VIEW IF EXISTS vote_statistics;
DROP TABLE IF EXISTS vote_conflicts;
DROP TABLE IF EXISTS tally_shards;
DROP TABLE IF EXISTS votes;
DROP FUNCTION IF EXISTS votes_reject_change();
