//! What a replica needs to know about the schema before it consumes, and how a user
//! without DDL rights is told apart from a broken migration.
//!
//! Least privilege (`migrations/*_runtime_role`): the schema belongs to an owner that
//! migrates it; replicas log in as members of the NOLOGIN group role
//! [`RUNTIME_GROUP_ROLE`], which may write votes but not change the schema. So:
//! - `run` with `RUN_MIGRATIONS=true` first asks which embedded migrations are not
//!   applied yet ([`pending_migrations`], a plain `SELECT` the runtime role may run) and
//!   skips migrating when none are: a runtime role then starts cleanly on a current
//!   schema. Only when some are pending does it migrate, and a refusal for lack of
//!   privileges stops it with one line saying what to do ([`DbError::MigrationNotPermitted`]);
//! - `migrate` reports when the runtime grants are not in place in this database (the
//!   group role is missing and the migrating user may not create it, or it was created
//!   after the migration ran) ([`runtime_grants_in_place`]).

use diesel::QueryableByName;
use diesel::migration::MigrationSource;
use diesel::pg::Pg;
use diesel::sql_types::{Bool, Text};
use diesel_async::RunQueryDsl;
use secrecy::SecretString;

use super::{MIGRATIONS, connect_one};
use crate::error::DbError;

/// The NOLOGIN group role the runtime grants go to (fixed: migrations take no
/// parameters). Login users are made members of it by `scripts/roles.sql`.
pub const RUNTIME_GROUP_ROLE: &str = "vote_aggregator_runtime";

#[derive(QueryableByName)]
struct Applied {
    #[diesel(sql_type = Text)]
    version: String,
}

#[derive(QueryableByName)]
struct Exists {
    #[diesel(sql_type = Bool)]
    exists: bool,
}

/// The versions of the migrations embedded in this binary, oldest first.
///
/// # Errors
/// [`DbError::Migration`] if the embedded set cannot be read (a build defect).
pub fn embedded_versions() -> Result<Vec<String>, DbError> {
    let migrations = MigrationSource::<Pg>::migrations(&MIGRATIONS)
        .map_err(|e| DbError::Migration(e.to_string()))?;
    Ok(migrations
        .iter()
        .map(|m| m.name().version().to_string())
        .collect())
}

/// The embedded migrations the database has not applied (all of them when it has no
/// migrations table yet). Versions the database has and this binary does not know (a
/// newer release migrated it: a rollback) are fine and not reported.
///
/// Asked on a session of its own ([`connect_one`], TLS as the URL says, like migrations),
/// so an unreachable server fails at once and the caller's retry loop logs it, rather than waiting out a pool checkout.
///
/// # Errors
/// [`DbError`] when PostgreSQL cannot be asked.
pub async fn pending_migrations(url: &SecretString) -> Result<Vec<String>, DbError> {
    let mut conn = connect_one(url).await?;
    let table: Exists =
        diesel::sql_query("SELECT to_regclass('__diesel_schema_migrations') IS NOT NULL AS exists")
            .get_result(&mut conn)
            .await?;
    let applied: Vec<String> = if table.exists {
        diesel::sql_query("SELECT version FROM __diesel_schema_migrations")
            .load::<Applied>(&mut conn)
            .await?
            .into_iter()
            .map(|a| a.version)
            .collect()
    } else {
        Vec::new()
    };
    Ok(embedded_versions()?
        .into_iter()
        .filter(|v| !applied.contains(v))
        .collect())
}

/// Whether the runtime group role [`RUNTIME_GROUP_ROLE`] exists AND holds its grants in
/// this database (a role created after a plain owner migrated has none here), the
/// results outbox's included.
///
/// # Errors
/// [`DbError`] when PostgreSQL cannot be asked.
pub async fn runtime_grants_in_place(url: &SecretString) -> Result<bool, DbError> {
    let mut conn = connect_one(url).await?;
    // CASE: has_table_privilege fails on a role that does not exist.
    let found: Exists = diesel::sql_query(
        "SELECT CASE WHEN EXISTS (SELECT FROM pg_roles WHERE rolname = $1) \
         THEN has_table_privilege($1, 'public.votes', 'INSERT') \
          AND (to_regclass('public.results_outbox') IS NULL \
               OR has_table_privilege($1, 'public.results_outbox', 'DELETE')) \
         ELSE false END AS exists",
    )
    .bind::<Text, _>(RUNTIME_GROUP_ROLE)
    .get_result(&mut conn)
    .await?;
    Ok(found.exists)
}

/// A failed migration, as [`DbError::MigrationNotPermitted`] when the server refused it
/// for lack of privileges (the user of `url` is not the schema's owner), else as is.
pub fn classify_migration_error(url: &str, error: DbError) -> DbError {
    let reason = match &error {
        DbError::Migration(reason) => reason.clone(),
        DbError::Query(e) => e.to_string(),
        _ => return error,
    };
    if reason.contains("permission denied") || reason.contains("must be owner") {
        let user = url::Url::parse(url)
            .ok()
            .map(|u| u.username().to_owned())
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "of DATABASE_URL".to_owned());
        let reason = reason.lines().next().unwrap_or_default().to_owned();
        return DbError::MigrationNotPermitted { user, reason };
    }
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_migration_names_the_user_and_the_fix() {
        let e = classify_migration_error(
            "postgres://runtime:secret@db/votes",
            DbError::Migration("permission denied for schema public".into()),
        );
        let line = e.to_string();
        assert!(matches!(e, DbError::MigrationNotPermitted { .. }), "{line}");
        assert!(line.contains("user runtime") && line.contains("RUN_MIGRATIONS=false"));
        assert!(!line.contains("secret") && !line.contains('\n'), "{line}");
        let other = classify_migration_error("postgres://u@db/v", DbError::Migration("x".into()));
        assert!(matches!(other, DbError::Migration(_)));
    }

    #[test]
    fn every_embedded_migration_has_a_version() {
        let versions = embedded_versions().expect("embedded");
        assert!(versions.len() >= 2, "{versions:?}");
        assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
    }
}
