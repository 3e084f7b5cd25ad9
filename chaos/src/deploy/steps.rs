//! The operator's actions the deployment test performs on a running stack, each verified
//! by what Docker and the replicas show afterwards. Each returns one line of evidence, or
//! an error saying what did not happen.

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::time::Instant;
use vote_aggregator::config::DEFAULT_METRICS_ADDR;
use vote_aggregator::http::paths;
use vote_aggregator::http_client;
use vote_aggregator::metrics::names::VOTES_COUNTED_TOTAL;

use super::stack::{
    AGGREGATOR_SERVICE, Replica, STOP_TIMEOUT, Stack, docker, docker_now, save_replica_log,
};

/// How long a replica (or the whole set) has to become ready after a change: a start
/// waits for the servers, and after a server restart the replicas reconnect with up to
/// 5 s of backoff.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// The compose service that applies migrations.
const MIGRATE_SERVICE: &str = "migrate";

/// `docker kill` one replica: Docker does not restart a container killed by hand (its
/// restart policy treats that as a deliberate stop), so compose brings it back, as an
/// operator's `up -d` does. Verifies it stayed down, then that the same container is
/// running and ready again.
///
/// # Errors
/// When any of that does not happen.
pub async fn kill_and_bring_back(stack: &Stack, replicas: usize) -> anyhow::Result<String> {
    let victim = first_running(stack).await?;
    docker(&["kill", &victim.id]).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = find(stack, &victim.id).await?;
    if after.running {
        bail!("{} still runs after docker kill", victim.name);
    }
    stack.up(replicas).await?;
    stack.wait_ready(replicas, READY_TIMEOUT).await?;
    if !find(stack, &victim.id).await?.running {
        bail!(
            "compose started another container instead of {}",
            victim.name
        );
    }
    Ok(format!(
        "{} killed (exit {}), stayed down, started again by compose and ready",
        victim.name, after.exit_code
    ))
}

/// SIGKILL the main process of one replica (the newest: not the one the kill step chose),
/// as a crash or the kernel's OOM killer would: its restart policy brings the container
/// back by itself. The signal comes from a throw-away container in the host's PID
/// namespace, so it reaches the process wherever the test itself runs.
///
/// # Errors
/// When the container is not restarted and ready again in time.
pub async fn crash_and_self_restart(stack: &Stack, replicas: usize) -> anyhow::Result<String> {
    let victim = stack
        .running()
        .await?
        .pop()
        .context("no replica is running")?;
    let kill = format!("kill -KILL {}", victim.pid);
    docker(&[
        "run",
        "--rm",
        "--pid=host",
        "--user",
        "0",
        "--entrypoint",
        "bash",
        &stack.image,
        "-c",
        &kill,
    ])
    .await?;
    let started = Instant::now();
    loop {
        let now = find(stack, &victim.id).await?;
        if now.restarts > victim.restarts && now.running {
            break;
        }
        if started.elapsed() > READY_TIMEOUT {
            bail!("{} was not restarted by its restart policy", victim.name);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stack.wait_ready(replicas, READY_TIMEOUT).await?;
    Ok(format!(
        "{} (pid {}) SIGKILLed, restarted by its restart policy and ready",
        victim.name, victim.pid
    ))
}

/// `up -d --scale aggregator=N`, then exactly N replicas are ready; a scale-down stops
/// the extra replicas gracefully: each must exit 0 (its batch committed and acked), which
/// Docker's events still tell after compose removed the container. Their logs are saved
/// under `dir/replicas/` first.
///
/// # Errors
/// When the count or readiness is not reached, or a stopped replica did not exit 0.
pub async fn scale(stack: &Stack, to: usize, dir: &Path) -> anyhow::Result<String> {
    let before = stack.running().await?;
    if to < before.len() {
        for r in &before {
            save_replica_log(&r.id, &r.name, dir).await?;
        }
    }
    let since = docker_now().await?;
    stack.up(to).await?;
    let now = stack.wait_ready(to, READY_TIMEOUT).await?;
    let still: HashSet<&String> = now.iter().map(|r| &r.id).collect();
    let removed: Vec<&Replica> = before.iter().filter(|r| !still.contains(&r.id)).collect();
    let exits = stack.exits_since(&since).await?;
    for r in &removed {
        match exits.iter().find(|(id, _)| *id == r.id) {
            Some((_, 0)) => {}
            Some((_, code)) => bail!("{} exited {code} when scaled down", r.name),
            None => bail!("{} was removed without a recorded exit", r.name),
        }
    }
    let names: Vec<&str> = removed.iter().map(|r| r.name.as_str()).collect();
    Ok(format!(
        "{} → {to} replicas ready{}",
        before.len(),
        if names.is_empty() {
            String::new()
        } else {
            format!("; stopped with exit 0: {}", names.join(", "))
        }
    ))
}

/// Replaces every replica, one at a time, by one from `image`, as the README's upgrade
/// procedure does: first `image`'s migration (`run --rm --no-deps migrate`), then for each
/// old replica: start a new one beside the others, wait until it is ready, stop the old
/// one gracefully (exit 0 required; its log saved under `dir/replicas/`) and remove it.
/// The number of ready replicas never drops below the start's.
///
/// # Errors
/// When the migration fails, a new replica does not get ready or an old one does not
/// stop cleanly.
pub async fn rolling_replace(stack: &mut Stack, image: &str, dir: &Path) -> anyhow::Result<String> {
    stack.image = image.to_owned();
    stack
        .compose(&["run", "--rm", "--no-deps", "-T", MIGRATE_SERVICE])
        .await
        .with_context(|| format!("the migration of {image} failed"))?;
    let running = stack.running().await?;
    let n = running.len();
    let old: Vec<Replica> = running.into_iter().filter(|r| r.image != image).collect();
    for replaced in &old {
        let known: HashSet<String> = stack.replicas().await?.into_iter().map(|r| r.id).collect();
        stack.up(n + 1).await?;
        let ready = stack.wait_ready(n + 1, READY_TIMEOUT).await?;
        let fresh = ready
            .iter()
            .find(|r| !known.contains(&r.id))
            .context("compose started no new replica")?;
        if fresh.image != image {
            bail!(
                "the new replica {} runs {}, not {image}",
                fresh.name,
                fresh.image
            );
        }
        docker(&[
            "stop",
            "--time",
            &STOP_TIMEOUT.as_secs().to_string(),
            &replaced.id,
        ])
        .await?;
        let stopped = find(stack, &replaced.id).await?;
        if stopped.exit_code != 0 {
            bail!(
                "{} exited {} on a graceful stop",
                replaced.name,
                stopped.exit_code
            );
        }
        save_replica_log(&stopped.id, &stopped.name, dir).await?;
        docker(&["rm", "-v", &replaced.id]).await?;
        stack.wait_ready(n, READY_TIMEOUT).await?;
    }
    let now = stack.running().await?;
    if let Some(r) = now.iter().find(|r| r.image != image) {
        bail!("{} still runs {}", r.name, r.image);
    }
    Ok(format!(
        "migrated, then {} replica(s) replaced one at a time by {image}, each old one stopped with exit 0",
        old.len()
    ))
}

/// `restart` a server's container (`postgres` or `rabbitmq`), then the server is healthy
/// and every replica ready again by itself.
///
/// # Errors
/// When the server or a replica does not come back in time.
pub async fn restart_server(
    stack: &Stack,
    service: &str,
    replicas: usize,
) -> anyhow::Result<String> {
    let started = Instant::now();
    stack.compose(&["restart", service]).await?;
    stack.wait_healthy(service, READY_TIMEOUT).await?;
    stack.wait_ready(replicas, READY_TIMEOUT).await?;
    Ok(format!(
        "{service} restarted; healthy and all {replicas} replicas ready again after {:.1}s",
        started.elapsed().as_secs_f64()
    ))
}

/// `vote-aggregator verify` in a one-off container of the aggregator service.
///
/// # Errors
/// When it does not exit 0 (with its output).
pub async fn verify(stack: &Stack) -> anyhow::Result<String> {
    let out = stack
        .compose(&[
            "run",
            "--rm",
            "--no-deps",
            "-T",
            AGGREGATOR_SERVICE,
            "verify",
        ])
        .await?;
    Ok(format!(
        "vote-aggregator verify exited 0: {}",
        out.lines().last().unwrap_or("").trim()
    ))
}

/// The checklist's plain `docker run --env-file .env.production -p 8001:8001 --restart
/// unless-stopped`: one more replica outside compose, on the stack's network, with its
/// secrets mounted as files and a host port. It must get ready, serve `/metrics` on the
/// host port, count along with the others, and stop with exit 0. It is removed whatever
/// happens; its log is saved under `dir/replicas/`.
///
/// # Errors
/// When any of that does not happen.
pub async fn plain_docker_run(stack: &Stack, dir: &Path) -> anyhow::Result<String> {
    let env_file = dir.join(".env.production");
    std::fs::write(
        &env_file,
        "DATABASE_URL_FILE=/run/secrets/database_url\nAMQP_URL_FILE=/run/secrets/amqp_url\n\
         RUN_MIGRATIONS=false\nREPLICA_ID=docker-run\n",
    )?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let name = format!("{}-docker-run", stack.project());
    // The replicas' own least-privilege users, as compose mounts them.
    let mount = |secret: &str, target: &str| {
        format!(
            "{}:/run/secrets/{target}:ro",
            stack.secret_path(secret).display()
        )
    };
    let database = mount("aggregator_database_url", "database_url");
    let amqp = mount("aggregator_amqp_url", "amqp_url");
    let publish = format!("127.0.0.1:{port}:{}", DEFAULT_METRICS_ADDR.port());
    let stop = STOP_TIMEOUT.as_secs().to_string();
    let env_arg = env_file.display().to_string();
    let id = docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        &stack.network(),
        "--env-file",
        &env_arg,
        "-p",
        &publish,
        "--restart",
        "unless-stopped",
        "--stop-timeout",
        &stop,
        "-v",
        &database,
        "-v",
        &amqp,
        &stack.image,
    ])
    .await?;
    let id = id.trim().to_owned();
    let checked = check_plain_replica(port, &id).await;
    let log = save_replica_log(&id, &name, dir).await;
    let _ = docker(&["rm", "-f", "-v", &id]).await;
    let evidence = checked?;
    log?;
    Ok(format!("{name} on host port {port}: {evidence}"))
}

/// Ready on the host port, `/metrics` served, then a graceful stop with exit 0.
async fn check_plain_replica(port: u16, id: &str) -> anyhow::Result<String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let started = Instant::now();
    while http_client::get(addr, paths::READYZ)
        .await
        .map(|r| r.0)
        .ok()
        != Some(200)
    {
        if started.elapsed() > READY_TIMEOUT {
            bail!("not ready on 127.0.0.1:{port} after {READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (status, metrics) = http_client::get(addr, paths::METRICS)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if status != 200 || !metrics.contains(VOTES_COUNTED_TOTAL) {
        bail!("/metrics answered {status} without {VOTES_COUNTED_TOTAL}");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    docker(&["stop", "--time", &STOP_TIMEOUT.as_secs().to_string(), id]).await?;
    let code = docker(&["inspect", "-f", "{{.State.ExitCode}}", id]).await?;
    if code.trim() != "0" {
        bail!("exited {} on docker stop", code.trim());
    }
    Ok("ready, /metrics served on the host, stopped with exit 0".to_owned())
}

/// `SELECT * FROM vote_statistics` in the stack's database, as `make stats` runs it: the
/// votes it shows must add up to `counted`.
///
/// # Errors
/// When the query fails or the sum differs.
pub async fn stats(stack: &Stack, counted: usize) -> anyhow::Result<String> {
    let table = stack.psql("SELECT * FROM vote_statistics").await?;
    let mut rows = 0;
    let mut total = 0usize;
    for line in table.lines().filter(|l| !l.trim().is_empty()) {
        let votes = line
            .split('|')
            .nth(2)
            .and_then(|v| v.trim().parse::<usize>().ok())
            .with_context(|| format!("unexpected vote_statistics row {line:?}"))?;
        rows += 1;
        total += votes;
    }
    if total != counted {
        bail!("vote_statistics shows {total} votes; the checker counted {counted}");
    }
    Ok(format!(
        "SELECT * FROM vote_statistics: {rows} rows adding up to the {counted} counted votes"
    ))
}

/// The dead-letter retention operator policy of `deploy/rabbitmq` applies to the stack's
/// `<queue>.dlq` and to nothing else: not the votes queue, not `<queue>.dlq.unexplained`.
///
/// # Errors
/// When `rabbitmqctl` fails or a queue carries the wrong policy.
pub async fn dead_letter_retention(stack: &Stack, queue: &str) -> anyhow::Result<String> {
    use vote_aggregator::broker::DEAD_LETTER_RETENTION_POLICY as POLICY;
    let listed = stack
        .compose(&[
            "exec",
            "-T",
            "rabbitmq",
            "rabbitmqctl",
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "operator_policy",
        ])
        .await?;
    let policy_of = |name: &str| {
        listed
            .lines()
            .find_map(|l| l.split_once('\t').filter(|(n, _)| n.trim() == name))
            .map(|(_, policy)| policy.trim().to_string())
    };
    let dead_letters = vote_aggregator::broker::dead_letter_queue(queue);
    if policy_of(&dead_letters).as_deref() != Some(POLICY) {
        bail!("{dead_letters} does not carry the {POLICY} operator policy:\n{listed}");
    }
    let unexplained = format!(
        "{queue}{}",
        vote_aggregator::broker::UNEXPLAINED_QUEUE_SUFFIX
    );
    for name in [queue, unexplained.as_str()] {
        if policy_of(name).as_deref() != Some("") {
            bail!("{name} must carry no operator policy:\n{listed}");
        }
    }
    Ok(format!(
        "{dead_letters} carries {POLICY}; {queue} and {unexplained} none"
    ))
}

/// The replicas log in with least-privilege users: every PostgreSQL session named
/// `vote-aggregator` belongs to a non-superuser member of the runtime group role, and no
/// RabbitMQ connection of a replica uses an administrator.
///
/// # Errors
/// When a query fails or a replica logs in with more rights.
pub async fn least_privilege_logins(stack: &Stack) -> anyhow::Result<String> {
    let group = vote_aggregator::db::schema::RUNTIME_GROUP_ROLE;
    let sql = format!(
        "SELECT DISTINCT a.usename, r.rolsuper, pg_has_role(a.usename, '{group}', 'MEMBER') \
         FROM pg_stat_activity a JOIN pg_roles r ON r.rolname = a.usename \
         WHERE a.application_name = '{}'",
        vote_aggregator::db::APPLICATION_NAME
    );
    let sessions = stack.psql(&sql).await?;
    let mut db_users = Vec::new();
    for line in sessions.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split('|').map(str::trim).collect();
        match fields.as_slice() {
            [user, "f", "t"] => db_users.push(user.to_string()),
            _ => bail!("a replica's PostgreSQL session is not a runtime-role login: {line}"),
        }
    }
    if db_users.is_empty() {
        bail!("no replica session found in pg_stat_activity");
    }
    let rabbitmqctl = |args: &'static [&'static str]| {
        let mut all = vec!["exec", "-T", "rabbitmq", "rabbitmqctl", "-q"];
        all.extend_from_slice(args);
        async move { stack.compose(&all).await }
    };
    let admins: Vec<String> = rabbitmqctl(&["list_users", "--no-table-headers"])
        .await?
        .lines()
        .filter(|l| l.contains("administrator"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    let connections = rabbitmqctl(&[
        "list_connections",
        "--no-table-headers",
        "user",
        "client_properties",
    ])
    .await?;
    let replica_users: Vec<&str> = connections
        .lines()
        // A replica names its connection `vote-aggregator/<replica id>`.
        .filter(|l| l.contains(&format!("{}/", vote_aggregator::broker::CLIENT_NAME)))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    if replica_users.is_empty() {
        bail!("no replica connection found on RabbitMQ:\n{connections}");
    }
    if let Some(admin) = replica_users
        .iter()
        .find(|u| admins.iter().any(|a| a == *u))
    {
        bail!("a replica connects to RabbitMQ as the administrator {admin}");
    }
    db_users.dedup();
    Ok(format!(
        "replicas log in as {} (PostgreSQL, member of {group}, not superuser) and {} (RabbitMQ, not administrator)",
        db_users.join(", "),
        replica_users.first().copied().unwrap_or_default()
    ))
}

async fn first_running(stack: &Stack) -> anyhow::Result<Replica> {
    stack
        .running()
        .await?
        .into_iter()
        .next()
        .context("no replica is running")
}

async fn find(stack: &Stack, id: &str) -> anyhow::Result<Replica> {
    stack
        .replicas()
        .await?
        .into_iter()
        .find(|r| r.id == id)
        .with_context(|| format!("container {id} is gone"))
}
