#!/usr/bin/env bash
# Writes one SQL script (default: init_db.sql) from migrations/, for operators who apply
# schema with psql instead of `vote-aggregator migrate`:
#   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f init_db.sql
# It records each migration in diesel's bookkeeping table, exactly as `migrate` would,
# so a replica started later with RUN_MIGRATIONS=true sees the schema as current.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-init_db.sql}"
{
  echo "-- Generated from migrations/ by scripts/init-db-sql.sh (make init-db-sql). Do not edit."
  echo "BEGIN;"
  echo "CREATE TABLE IF NOT EXISTS __diesel_schema_migrations ("
  echo "    version VARCHAR(50) PRIMARY KEY NOT NULL,"
  echo "    run_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP);"
  for dir in migrations/*/; do
    name=$(basename "$dir")
    version=$(echo "${name%%_*}" | tr -d -)
    echo
    echo "-- migration $name"
    echo "DO \$guard\$ BEGIN"
    echo "  IF EXISTS (SELECT 1 FROM __diesel_schema_migrations WHERE version = '$version') THEN"
    echo "    RAISE EXCEPTION 'migration $version is already applied: use vote-aggregator migrate for upgrades';"
    echo "  END IF;"
    echo "END \$guard\$;"
    cat "$dir/up.sql"
    echo "INSERT INTO __diesel_schema_migrations (version) VALUES ('$version');"
  done
  echo "COMMIT;"
} > "$out"
echo "wrote $out"
