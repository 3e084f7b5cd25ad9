//! The operator's actions the deployment test performs on a running stack, each verified
//! by what Docker and the replicas show afterwards. Each returns one line of evidence, or
//! an error saying what did not happen.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::time::Instant;

use vote_testkit::signal::{self, Signal};

use super::stack::{Replica, Stack, docker};

/// How long a replica (or the whole set) has to become ready after a change: a start
/// waits for the servers, and after a server restart the replicas reconnect with up to
/// 5 s of backoff.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// `docker stop` timeout for one replica: above the service's shutdown grace (25 s by
/// default), like the compose file's `stop_grace_period`.
const STOP_TIMEOUT_SECS: &str = "35";

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

/// SIGKILL the main process of one replica from the host, as a crash (or the kernel's
/// OOM killer) would: the restart policy brings the container back by itself.
///
/// # Errors
/// When the container is not restarted and ready again in time.
pub async fn crash_and_self_restart(stack: &Stack, replicas: usize) -> anyhow::Result<String> {
    let victim = first_running(stack).await?;
    signal::send(victim.pid, Signal::KILL)
        .with_context(|| format!("cannot SIGKILL pid {} of {}", victim.pid, victim.name))?;
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
/// the extra replicas gracefully (each must exit 0: its batch committed and acked).
///
/// # Errors
/// When the count or readiness is not reached, or a stopped replica did not exit 0.
pub async fn scale(stack: &Stack, to: usize) -> anyhow::Result<String> {
    let before: HashSet<String> = stack.running().await?.into_iter().map(|r| r.id).collect();
    let scale = format!("{}={to}", super::stack::AGGREGATOR_SERVICE);
    stack
        .compose(&["up", "-d", "--no-recreate", "--scale", &scale])
        .await?;
    let now = stack.wait_ready(to, READY_TIMEOUT).await?;
    let still: HashSet<&String> = now.iter().map(|r| &r.id).collect();
    let removed: Vec<&String> = before.iter().filter(|id| !still.contains(id)).collect();
    let mut gone = Vec::new();
    for r in stack.replicas().await? {
        if removed.contains(&&r.id) && r.exit_code != 0 {
            bail!("{} exited {} when scaled down", r.name, r.exit_code);
        }
        if removed.contains(&&r.id) {
            gone.push(r.name);
        }
    }
    Ok(format!(
        "{} → {to} replicas ready{}",
        before.len(),
        if gone.is_empty() {
            String::new()
        } else {
            format!("; stopped cleanly: {}", gone.join(", "))
        }
    ))
}

/// Replaces every replica, one at a time, by one from `image`: start the new one beside
/// the old ones, wait until it is ready, then stop the oldest old one gracefully (exit 0
/// required) and remove it. The number of ready replicas never drops below the start's.
///
/// # Errors
/// When a new replica does not get ready or an old one does not stop cleanly.
pub async fn rolling_replace(stack: &mut Stack, image: &str) -> anyhow::Result<String> {
    stack.image = image.to_owned();
    let old: Vec<Replica> = stack
        .running()
        .await?
        .into_iter()
        .filter(|r| r.image != image)
        .collect();
    let n = stack.running().await?.len();
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
        docker(&["stop", "--time", STOP_TIMEOUT_SECS, &replaced.id]).await?;
        let stopped = find(stack, &replaced.id).await?;
        if stopped.exit_code != 0 {
            bail!(
                "{} exited {} on a graceful stop",
                replaced.name,
                stopped.exit_code
            );
        }
        docker(&["rm", "-v", &replaced.id]).await?;
        stack.wait_ready(n, READY_TIMEOUT).await?;
    }
    let now = stack.running().await?;
    if let Some(r) = now.iter().find(|r| r.image != image) {
        bail!("{} still runs {}", r.name, r.image);
    }
    Ok(format!(
        "{} replica(s) replaced one at a time by {image}, each old one stopped with exit 0",
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
            super::stack::AGGREGATOR_SERVICE,
            "verify",
        ])
        .await?;
    Ok(format!(
        "vote-aggregator verify exited 0: {}",
        out.lines().last().unwrap_or("").trim()
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
