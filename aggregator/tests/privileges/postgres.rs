//! The PostgreSQL runtime role: made by `scripts/roles.sql` (run with psql in the shared
//! container, as operators run it), granted by the migration, used by real replicas.

use std::process::{Command, Stdio};
use std::time::Duration;

use secrecy::SecretString;
use vote_aggregator::config::variables as var;
use vote_aggregator::db;
use vote_testkit::fleet::{Fleet, FleetOptions, ReplicaSpec};
use vote_testkit::infra::{self, SharedServer, exec_in_shared};
use vote_testkit::inspect::{Db, eventually};
use vote_testkit::testbed::TestBed;
use vote_testkit::votes;

use crate::unique;

const BIN: &str = env!("CARGO_BIN_EXE_vote-aggregator");
const WAIT: Duration = Duration::from_secs(60);
const ROLES_SQL: &str = include_str!("../../../scripts/roles.sql");
/// The shared container's superuser (see the test kit's infra).
const SUPERUSER: &str = "votes";

/// A login role made by `scripts/roles.sql` for one test; dropped by [`LoginRole::drop_role`].
struct LoginRole {
    name: String,
    /// The bed's database URL with this role's user and password.
    url: String,
}

/// `url` with another user and password.
fn url_as(url: &str, user: &str, password: &str) -> anyhow::Result<String> {
    let mut u = url::Url::parse(url)?;
    u.set_username(user)
        .map_err(|()| anyhow::anyhow!("cannot set the user of the URL"))?;
    u.set_password(Some(password))
        .map_err(|()| anyhow::anyhow!("cannot set the password of the URL"))?;
    Ok(u.to_string())
}

/// Runs `scripts/roles.sql` with psql as the superuser on `database`, with `vars`.
async fn roles_sql(database: &str, vars: &[(&str, &str)]) -> anyhow::Result<String> {
    let mut cmd = vec![
        "psql".to_owned(),
        "-X".to_owned(),
        "-q".to_owned(),
        "-U".to_owned(),
        SUPERUSER.to_owned(),
        "-d".to_owned(),
        database.to_owned(),
        "-v".to_owned(),
        "ON_ERROR_STOP=1".to_owned(),
    ];
    for (k, v) in vars {
        cmd.push("-v".to_owned());
        cmd.push(format!("{k}={v}"));
    }
    cmd.extend(["-f".to_owned(), "-".to_owned()]);
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    exec_in_shared(
        SharedServer::Postgres,
        &cmd,
        Some(ROLES_SQL.as_bytes().to_vec()),
    )
    .await
}

impl LoginRole {
    /// A runtime login user for `bed`'s database, made by `scripts/roles.sql`.
    async fn runtime(bed: &TestBed) -> anyhow::Result<LoginRole> {
        let name = unique("rt");
        let password = unique("pw");
        roles_sql(
            &bed.database_name(),
            &[("runtime_user", &name), ("runtime_password", &password)],
        )
        .await?;
        Ok(LoginRole {
            url: url_as(&bed.database_url, &name, &password)?,
            name,
        })
    }

    async fn drop_role(self, admin: &mut Db) -> anyhow::Result<()> {
        admin
            .execute(&format!("DROP ROLE IF EXISTS {}", self.name))
            .await?;
        Ok(())
    }
}

/// Runs the binary with only `env` set and returns (exit code, stderr).
fn run_bin(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<(Option<i32>, String)> {
    let out = Command::new(BIN)
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Every statement the runtime role must be refused, each with what the server says.
const FORBIDDEN: &[&str] = &[
    "UPDATE votes SET candidate_id = 'x'",
    "DELETE FROM votes",
    "TRUNCATE votes",
    "ALTER TABLE votes DISABLE TRIGGER votes_append_only",
    "ALTER TABLE votes DISABLE TRIGGER ALL",
    "SET session_replication_role = replica",
    "DROP TABLE votes",
    "CREATE TABLE sneaky (id int)",
    "DELETE FROM vote_conflicts",
    "UPDATE vote_conflicts SET candidate_id = 'x'",
    "DELETE FROM tally_shards",
    "TRUNCATE tally_shards",
    "UPDATE tally_shards SET candidate_id = 'x'",
    "SELECT vote_aggregator_grant_runtime()",
    "UPDATE results_outbox SET increments = '{}'",
    "UPDATE results_outbox SET xid = '1'",
    "TRUNCATE results_outbox",
];

#[tokio::test]
async fn the_runtime_role_counts_with_real_replicas_and_is_refused_everything_else()
-> anyhow::Result<()> {
    let bed = TestBed::new(infra::shared().await?).await?;
    // The owner migrates (the test servers' superuser owns the bed's database).
    db::run_migrations(&SecretString::from(bed.database_url.clone())).await?;
    let role = LoginRole::runtime(&bed).await?;
    let mut admin = bed.db().await?;

    // Two replicas as the runtime role: the production setting, and the default
    // RUN_MIGRATIONS=true, which skips migrating on a current schema.
    let mut base = bed.replica_base_env();
    base.retain(|(k, _)| k != var::DATABASE_URL);
    base.push((var::DATABASE_URL.into(), role.url.clone()));
    base.push((var::BATCH_SIZE.into(), "50".into()));
    let log_dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("privileges-{}", role.name));
    let specs = vec![
        ReplicaSpec::new("runtime-a").with_env(var::RUN_MIGRATIONS, "false"),
        ReplicaSpec::new("runtime-b"),
    ];
    let fleet = Fleet::start(FleetOptions::new(&log_dir, base)?, specs).await?;

    // Originals, exact duplicates and conflicting copies: every path of the batch
    // statement (insert, tally upsert, conflict judgement and insert).
    let originals = votes::spread(600, &["e1", "e2"], &["a", "b", "c"]);
    let duplicates: Vec<_> = originals.iter().step_by(5).cloned().collect();
    let conflicts: Vec<_> = originals
        .iter()
        .step_by(20)
        .map(|v| votes::conflicting(v, "z"))
        .collect();
    let publisher = bed.publisher().await?;
    publisher.publish_votes(&originals).await?;
    publisher.publish_votes(&duplicates).await?;
    publisher.publish_votes(&conflicts).await?;
    eventually("600 votes and 30 conflicts stored", WAIT, async || {
        Ok(admin.vote_count().await? == 600 && admin.conflict_count().await? == 30)
    })
    .await?;
    let mut counted = 0;
    for scrape in fleet.scrape_all().await {
        counted += scrape?.counted();
    }
    assert_eq!(
        counted, 600,
        "each vote counted once, by one of the replicas"
    );
    assert_eq!(
        admin.counted_per_candidate().await?,
        admin.tallies().await?,
        "tallies equal the counted votes"
    );
    // The relays (as the runtime role) claimed, published and deleted every event.
    eventually("the results outbox emptied", WAIT, async || {
        Ok(admin
            .scalar("SELECT count(*) AS n FROM results_outbox")
            .await?
            == 0)
    })
    .await?;
    for i in 0..fleet.len() {
        let log = fleet.log_tail(i, 400);
        assert!(
            !log.contains("permission denied"),
            "replica {i} was refused something: {log}"
        );
    }
    let statuses = fleet.shutdown().await?;
    assert!(
        statuses.iter().all(|s| s.is_some_and(|s| s.success())),
        "{statuses:?}"
    );

    // `verify` reads as the runtime role too.
    let (code, stderr) = run_bin(&["verify"], &[(var::DATABASE_URL, &role.url)])?;
    assert_eq!(code, Some(0), "{stderr}");

    // Each forbidden action is refused by the server, and nothing changed.
    let mut runtime = Db::connect(&role.url).await?;
    for sql in FORBIDDEN {
        let err = match runtime.execute(sql).await {
            Ok(_) => panic!("the runtime role was allowed: {sql}"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains("permission denied") || err.contains("must be owner"),
            "{sql}: refused for another reason: {err}"
        );
    }
    assert_eq!(admin.vote_count().await?, 600);
    assert_eq!(admin.conflict_count().await?, 30);
    assert_eq!(
        admin
            .scalar("SELECT count(*) AS n FROM pg_trigger WHERE tgname LIKE 'votes_%' AND tgenabled = 'O'")
            .await?,
        2,
        "both append-only triggers still enabled"
    );

    // `migrate` as the runtime role: one line naming the user and the fix, no secret.
    let (code, stderr) = run_bin(&["migrate"], &[(var::DATABASE_URL, &role.url)])?;
    assert_eq!(code, Some(1), "{stderr}");
    let line = stderr.trim_end();
    eprintln!("migrate as the runtime role: {line}");
    assert!(!line.contains('\n'), "one line: {line}");
    assert!(
        line.starts_with(&format!(
            "error: PostgreSQL user {} may not apply migrations (permission denied",
            role.name
        )) && line.contains("RUN_MIGRATIONS=false"),
        "{line}"
    );
    let password = url::Url::parse(&role.url)?
        .password()
        .unwrap_or_default()
        .to_owned();
    assert!(!line.contains(&password), "password leaked: {line}");

    drop(runtime);
    role.drop_role(&mut admin).await?;
    bed.finish().await
}

#[tokio::test]
async fn run_as_the_runtime_role_on_an_unmigrated_database_stops_with_one_line()
-> anyhow::Result<()> {
    let bed = TestBed::new(infra::shared().await?).await?;
    let role = LoginRole::runtime(&bed).await?;
    let mut env: Vec<(String, String)> = bed.env("runtime-unmigrated");
    env.retain(|(k, _)| k != var::DATABASE_URL);
    env.push((var::DATABASE_URL.into(), role.url.clone()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (code, stderr) = run_bin(&["run"], &env)?;
    assert_eq!(code, Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!(
            "error: PostgreSQL user {} may not apply migrations",
            role.name
        )) && last.contains("RUN_MIGRATIONS=false"),
        "{stderr}"
    );
    role.drop_role(&mut bed.db().await?).await?;
    bed.finish().await
}

#[tokio::test]
async fn a_database_owner_without_createrole_keeps_migrating_and_grants_to_the_runtime_role()
-> anyhow::Result<()> {
    let infra = infra::shared().await?;
    let bed = TestBed::new(infra).await?;
    let owner = unique("owner");
    let password = unique("pw");
    let mut admin = Db::connect(&infra.admin_database_url()).await?;
    admin
        .execute(&format!(
            "CREATE ROLE {owner} LOGIN NOCREATEROLE NOSUPERUSER PASSWORD '{password}'"
        ))
        .await?;
    admin
        .execute(&format!(
            "ALTER DATABASE {} OWNER TO {owner}",
            bed.database_name()
        ))
        .await?;
    let owner_url = url_as(&bed.database_url, &owner, &password)?;
    let applied = db::run_migrations(&SecretString::from(owner_url.clone())).await?;
    assert_eq!(applied.len(), db::schema::embedded_versions()?.len());
    // The group role exists in this cluster (the superuser's migrations of other beds, or
    // roles.sql, made it): the plain owner could grant on its own tables.
    let mut as_owner = Db::connect(&owner_url).await?;
    let granted = as_owner
        .scalar(
            "SELECT (has_table_privilege('vote_aggregator_runtime', 'votes', 'INSERT') \
                 AND NOT has_table_privilege('vote_aggregator_runtime', 'votes', 'UPDATE') \
                 AND has_column_privilege('vote_aggregator_runtime', 'tally_shards', 'votes', 'UPDATE') \
                 AND NOT has_column_privilege('vote_aggregator_runtime', 'tally_shards', 'candidate_id', 'UPDATE') \
                 AND has_table_privilege('vote_aggregator_runtime', 'results_outbox', 'INSERT, SELECT, DELETE') \
                 AND has_column_privilege('vote_aggregator_runtime', 'results_outbox', 'created_at', 'UPDATE') \
                 AND NOT has_column_privilege('vote_aggregator_runtime', 'results_outbox', 'increments', 'UPDATE'))::int::bigint AS n",
        )
        .await?;
    assert_eq!(granted, 1, "runtime grants in place");
    // Its tables are its own, and a second `migrate` is a no-op.
    assert!(
        db::run_migrations(&SecretString::from(owner_url))
            .await?
            .is_empty()
    );
    drop(as_owner);
    bed.finish().await?;
    admin.execute(&format!("DROP ROLE {owner}")).await?;
    Ok(())
}
