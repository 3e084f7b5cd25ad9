//! The Docker Compose stack under test: started, changed and inspected through
//! `deploy/compose.sh` (the same wrapper `make up` uses, so the test exercises what
//! operators run) and the `docker` CLI.
//!
//! Why command lines and not a Docker API crate: Compose has no API of its own (its
//! scaling, dependency order and secrets live in the CLI), and the few container
//! operations beside it (`kill`, `stop`, `rm`, `exec`, `inspect`) are the commands an
//! operator's checklist names, so a failing step can be replayed by hand as it was run.
//!
//! The stack is isolated by its project name: every container, network and volume it
//! creates carries it, and [`Stack::down`] removes exactly those. Its host ports are free
//! loopback ports chosen at start, fixed for the run (a restarted server keeps its port).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::Command;
use tokio::time::Instant;

/// `docker stop` timeout for one replica: above the service's shutdown grace, as the
/// compose file's `stop_grace_period` (`AGGREGATOR_STOP_GRACE`) is; a test keeps them equal.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(35);
/// The compose service that runs the replicas.
pub const AGGREGATOR_SERVICE: &str = "aggregator";
/// Docker Compose's labels on every container it creates (1.29 and v2 alike).
const PROJECT_LABEL: &str = "com.docker.compose.project";
const SERVICE_LABEL: &str = "com.docker.compose.service";
const ONEOFF_LABEL: &str = "com.docker.compose.oneoff";
/// The variables of the test's own environment its compose commands see: where Docker
/// is and how to reach it, and the server images (the test never pulls).
const PASSED_THROUGH: &[&str] = &[
    "PATH",
    "HOME",
    "TMPDIR",
    "DOCKER_HOST",
    "DOCKER_CONFIG",
    "DOCKER_CONTEXT",
    "DOCKER_CERT_PATH",
    "DOCKER_TLS_VERIFY",
    "POSTGRES_IMAGE",
    "RABBITMQ_IMAGE",
    "PROMETHEUS_IMAGE",
];
/// The compose file, alone (no `docker-compose.override.yml`).
const COMPOSE_FILE: &str = "docker-compose.yml";
/// The terminal code "clear line" (ESC [2K).
const CLEAR_LINE: &str = "\u{1b}[2K";

/// Host ports of the stack (loopback only).
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// PostgreSQL.
    pub postgres: u16,
    /// RabbitMQ AMQP.
    pub amqp: u16,
    /// RabbitMQ management UI.
    pub rabbitmq_ui: u16,
    /// Prometheus.
    pub prometheus: u16,
}

impl Ports {
    /// Four free loopback ports (bound, read, released).
    fn free() -> anyhow::Result<Ports> {
        let listeners = (0..4)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<Vec<_>>>()
            .context("cannot find free loopback ports")?;
        let port = |i: usize| -> anyhow::Result<u16> { Ok(listeners[i].local_addr()?.port()) };
        Ok(Ports {
            postgres: port(0)?,
            amqp: port(1)?,
            rabbitmq_ui: port(2)?,
            prometheus: port(3)?,
        })
    }
}

/// One aggregator container, as `docker inspect` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Replica {
    /// Container id.
    pub id: String,
    /// Container name (e.g. `vote-deploy-test-42_aggregator_3`).
    pub name: String,
    /// The image reference it was created from.
    pub image: String,
    /// Whether it is running.
    pub running: bool,
    /// Its address on the stack's network (what Prometheus scrapes).
    pub ip: String,
    /// Host PID of its main process (0 when not running).
    pub pid: u32,
    /// How often Docker restarted it by its restart policy.
    pub restarts: u32,
    /// Exit code of its last run.
    pub exit_code: i64,
}

/// The compose stack of one deployment test.
#[derive(Debug)]
pub struct Stack {
    repo: PathBuf,
    project: String,
    secrets: PathBuf,
    env_file: PathBuf,
    /// Host ports.
    pub ports: Ports,
    /// The aggregator image new replicas are created from.
    pub image: String,
}

impl Stack {
    /// A stack named `project` of the compose file in `repo`, with its secrets and an
    /// empty settings file in `dir` (the secrets are written by the wrapper on first use).
    /// Starts nothing.
    ///
    /// # Errors
    /// When the settings file cannot be written or no free ports are found.
    pub fn new(repo: &Path, project: &str, dir: &Path, image: &str) -> anyhow::Result<Stack> {
        let env_file = dir.join("deploy-test.env");
        std::fs::write(&env_file, "# the deployment test sets everything itself\n")
            .with_context(|| format!("cannot write {}", env_file.display()))?;
        Ok(Stack {
            repo: repo.to_path_buf(),
            project: project.to_owned(),
            secrets: dir.join("secrets"),
            env_file,
            ports: Ports::free()?,
            image: image.to_owned(),
        })
    }

    /// The project name.
    pub fn project(&self) -> &str {
        &self.project
    }

    /// Runs `deploy/compose.sh ARGS` for this stack.
    ///
    /// # Errors
    /// When the command cannot run or exits non-zero (with its last output lines).
    pub async fn compose(&self, args: &[&str]) -> anyhow::Result<String> {
        self.script("compose.sh", args, &[]).await
    }

    /// Runs `query` with psql in the stack's `postgres` container, as its superuser on its
    /// database: tuples only, unaligned (`|` between fields), stopping at the first error.
    /// The query is passed as an argument, never spliced into the shell command.
    ///
    /// # Errors
    /// When the container cannot be reached or the query fails.
    pub async fn psql(&self, query: &str) -> anyhow::Result<String> {
        const PSQL: &str =
            "psql -X -U \"$POSTGRES_USER\" -d \"$POSTGRES_DB\" -v ON_ERROR_STOP=1 -tA -c \"$1\"";
        self.compose(&["exec", "-T", "postgres", "sh", "-c", PSQL, "sh", query])
            .await
    }

    /// Runs `deploy/SCRIPT ARGS` (e.g. `backup.sh`) for this stack, as `make` does, with
    /// `env` set besides the stack's settings.
    ///
    /// # Errors
    /// When the script cannot run or exits non-zero (with its last output lines).
    pub async fn script(
        &self,
        script: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<String> {
        let port = |p: u16| p.to_string();
        let mut command = Command::new(self.repo.join("deploy").join(script));
        // Only what the test sets: no `.env`, override file or variable of the developer's
        // reaches its stack.
        command.env_clear();
        for name in PASSED_THROUGH {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        let out = command
            .args(args)
            .current_dir(&self.repo)
            .env("ENV_FILE", &self.env_file)
            .env("COMPOSE_FILE", COMPOSE_FILE)
            .env("COMPOSE_PROJECT_NAME", &self.project)
            .env("SECRETS_DIR", &self.secrets)
            .env("AGGREGATOR_IMAGE", &self.image)
            .env("PUBLISH_ADDRESS", "127.0.0.1")
            .env("POSTGRES_PORT", port(self.ports.postgres))
            .env("RABBITMQ_PORT", port(self.ports.amqp))
            .env("RABBITMQ_UI_PORT", port(self.ports.rabbitmq_ui))
            .env("PROMETHEUS_PORT", port(self.ports.prometheus))
            .envs(env.iter().copied())
            .output()
            .await
            .with_context(|| format!("cannot run deploy/{script}"))?;
        let what = match script {
            "compose.sh" => format!("compose {}", args.join(" ")),
            _ => format!("deploy/{script} {}", args.join(" ")),
        };
        succeeded(&what, out)
    }

    /// `up -d` as an operator types it: the compose file's replica count.
    ///
    /// # Errors
    /// When compose fails.
    pub async fn up_default(&self) -> anyhow::Result<()> {
        self.compose(&["up", "-d"]).await.map(drop)
    }

    /// `up -d` with `replicas` aggregators; containers that exist are left as they are
    /// (started if stopped), new ones are created from [`Stack::image`].
    ///
    /// # Errors
    /// When compose fails.
    pub async fn up(&self, replicas: usize) -> anyhow::Result<()> {
        let scale = format!("{AGGREGATOR_SERVICE}={replicas}");
        self.compose(&["up", "-d", "--no-recreate", "--scale", &scale])
            .await
            .map(drop)
    }

    /// Every aggregator container of the stack (running or not), oldest first.
    ///
    /// # Errors
    /// When Docker cannot be asked.
    pub async fn replicas(&self) -> anyhow::Result<Vec<Replica>> {
        let project = format!("label={PROJECT_LABEL}={}", self.project);
        let service = format!("label={SERVICE_LABEL}={AGGREGATOR_SERVICE}");
        let oneoff = format!("label={ONEOFF_LABEL}=False");
        let ids = docker(&[
            "ps", "-aq", "--filter", &project, "--filter", &service, "--filter", &oneoff,
        ])
        .await?;
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let format = "{{.Id}}|{{.Name}}|{{.Config.Image}}|{{.State.Running}}|\
             {{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}|{{.State.Pid}}|\
             {{.RestartCount}}|{{.State.ExitCode}}|{{.Created}}";
        let mut args = vec!["inspect", "-f", format];
        args.extend(ids);
        let mut out: Vec<(String, Replica)> = docker(&args)
            .await?
            .lines()
            .map(parse_replica)
            .collect::<anyhow::Result<_>>()?;
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out.into_iter().map(|(_, r)| r).collect())
    }

    /// The running aggregator containers.
    ///
    /// # Errors
    /// When Docker cannot be asked.
    pub async fn running(&self) -> anyhow::Result<Vec<Replica>> {
        Ok(self
            .replicas()
            .await?
            .into_iter()
            .filter(|r| r.running)
            .collect())
    }

    /// Waits until exactly `n` aggregators run and each answers `/readyz` 200 (asked
    /// inside its container with `vote-aggregator healthcheck --ready`).
    ///
    /// # Errors
    /// After `timeout`, saying how many ran and which were not ready.
    pub async fn wait_ready(&self, n: usize, timeout: Duration) -> anyhow::Result<Vec<Replica>> {
        let started = Instant::now();
        loop {
            let running = self.running().await?;
            let mut not_ready = Vec::new();
            for r in &running {
                if let Err(e) = replica_ready(&r.id).await {
                    not_ready.push(format!("{} ({e:#})", r.name));
                }
            }
            if running.len() == n && not_ready.is_empty() {
                return Ok(running);
            }
            if started.elapsed() >= timeout {
                bail!(
                    "after {timeout:?}: {} of {n} replica(s) running; not ready: {}",
                    running.len(),
                    if not_ready.is_empty() {
                        "none".to_owned()
                    } else {
                        not_ready.join("; ")
                    }
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Waits until the compose service `service` reports a healthy container.
    ///
    /// # Errors
    /// After `timeout`.
    pub async fn wait_healthy(&self, service: &str, timeout: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let id = self.compose(&["ps", "-q", service]).await?;
            let id = id.trim();
            if !id.is_empty() {
                let health = docker(&["inspect", "-f", "{{.State.Health.Status}}", id]).await?;
                if health.trim() == "healthy" {
                    return Ok(());
                }
            }
            if started.elapsed() >= timeout {
                bail!("{service} not healthy after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Writes the whole stack's logs (every service, timestamps) to `path`.
    ///
    /// # Errors
    /// When compose fails or the file cannot be written.
    pub async fn save_logs(&self, path: &Path) -> anyhow::Result<()> {
        let logs = self
            .compose(&["logs", "--no-color", "--timestamps"])
            .await?;
        // Compose v2 (seen with 2.26) starts every line with a clear-line code even with
        // --no-color; the file should be plain text.
        let plain: String = logs
            .lines()
            .map(|l| format!("{}\n", l.trim_start_matches(CLEAR_LINE)))
            .collect();
        std::fs::write(path, plain).with_context(|| format!("cannot write {}", path.display()))
    }

    /// Exit codes of the stack's aggregator containers that stopped since `since` (a
    /// `docker events` time, e.g. from [`docker_now`]), by container id; they survive the
    /// container's removal.
    ///
    /// # Errors
    /// When Docker cannot be asked.
    pub async fn exits_since(&self, since: &str) -> anyhow::Result<Vec<(String, i64)>> {
        let until = docker_now().await?;
        let project = format!("label={PROJECT_LABEL}={}", self.project);
        let service = format!("label={SERVICE_LABEL}={AGGREGATOR_SERVICE}");
        let events = docker(&[
            "events",
            "--since",
            since,
            "--until",
            &until,
            "--filter",
            "type=container",
            "--filter",
            "event=die",
            "--filter",
            &project,
            "--filter",
            &service,
            "--format",
            "{{.Actor.ID}} {{index .Actor.Attributes \"exitCode\"}}",
        ])
        .await?;
        events
            .lines()
            .map(|l| {
                let (id, code) = l.split_once(' ').context("bad docker events line")?;
                Ok((id.to_owned(), code.trim().parse()?))
            })
            .collect()
    }

    /// Removes the stack: its containers, network and volumes, nothing else.
    ///
    /// # Errors
    /// When compose fails.
    pub async fn down(&self) -> anyhow::Result<()> {
        let timeout = STOP_TIMEOUT.as_secs().to_string();
        self.compose(&["down", "-v", "--remove-orphans", "--timeout", &timeout])
            .await
            .map(drop)
    }

    /// Where the secret file `name` is.
    pub fn secret_path(&self, name: &str) -> PathBuf {
        self.secrets.join(name)
    }

    /// The stack's network (Compose names it `<project>_default`, 1.29 and v2 alike).
    pub fn network(&self) -> String {
        format!("{}_default", self.project)
    }

    /// The URL in the secret file `name` (the replicas' own), reached from the host: the
    /// service name and port replaced by loopback and `port`.
    fn host_url(&self, name: &str, port: u16) -> anyhow::Result<String> {
        let path = self.secret_path(name);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read the secret {}", path.display()))?;
        let mut url = url::Url::parse(text.trim())
            .map_err(|e| anyhow::anyhow!("{} does not hold a URL: {e}", path.display()))?;
        url.set_host(Some("127.0.0.1"))?;
        url.set_port(Some(port))
            .map_err(|()| anyhow::anyhow!("{} holds a URL without a port", path.display()))?;
        Ok(url.to_string())
    }

    /// The schema owner's database URL from the host (the checks read every table).
    ///
    /// # Errors
    /// When the secret file cannot be read or holds no URL.
    pub fn database_url(&self) -> anyhow::Result<String> {
        self.host_url("database_url", self.ports.postgres)
    }

    /// The broker administrator's URL from the host (inspection, dead letters).
    ///
    /// # Errors
    /// When the secret file cannot be read or holds no URL.
    pub fn amqp_url(&self) -> anyhow::Result<String> {
        self.host_url("amqp_url", self.ports.amqp)
    }

    /// The publisher user's URL from the host (it may only publish).
    ///
    /// # Errors
    /// When the secret file cannot be read or holds no URL.
    pub fn publisher_amqp_url(&self) -> anyhow::Result<String> {
        self.host_url("publisher_amqp_url", self.ports.amqp)
    }

    /// Prometheus from the host.
    pub fn prometheus(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.prometheus))
    }
}

/// Whether the replica in container `id` is ready (its own `healthcheck --ready`).
///
/// # Errors
/// Why not, in one line.
pub async fn replica_ready(id: &str) -> anyhow::Result<()> {
    docker(&[
        "exec",
        id,
        "vote-aggregator",
        "healthcheck",
        "--ready",
        "--timeout-seconds",
        "2",
    ])
    .await
    .map(drop)
}

/// Saves the log of container `id` as `<dir>/replicas/<name>.log` (for replicas about to
/// be removed, whose logs `compose logs` no longer shows).
///
/// # Errors
/// When Docker cannot be asked or the file cannot be written.
pub async fn save_replica_log(id: &str, name: &str, dir: &Path) -> anyhow::Result<()> {
    let out = Command::new("docker")
        .args(["logs", "--timestamps", id])
        .output()
        .await
        .context("cannot run docker logs")?;
    let dir = dir.join("replicas");
    std::fs::create_dir_all(&dir)?;
    let mut log = out.stdout;
    log.extend_from_slice(&out.stderr);
    std::fs::write(dir.join(format!("{name}.log")), log)
        .with_context(|| format!("cannot save the log of {name}"))
}

/// The Docker daemon's clock, as `docker events --since` takes it.
///
/// # Errors
/// When Docker cannot be asked.
pub async fn docker_now() -> anyhow::Result<String> {
    let out = docker(&["system", "info", "--format", "{{.SystemTime}}"]).await?;
    Ok(out.trim().to_owned())
}

/// Runs `docker ARGS`.
///
/// # Errors
/// When it cannot run or exits non-zero (with its last output lines).
pub async fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .await
        .context("cannot run the docker CLI")?;
    succeeded(&format!("docker {}", args.join(" ")), out)
}

/// The command's stdout, or an error with the tail of its stderr and stdout.
fn succeeded(what: &str, out: Output) -> anyhow::Result<String> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().chain(stdout.lines()).collect();
    let tail = tail[tail.len().saturating_sub(8)..].join(" | ");
    bail!("`{what}` failed ({}): {tail}", out.status)
}

/// One line of the `replicas` inspect format: (created, replica).
fn parse_replica(line: &str) -> anyhow::Result<(String, Replica)> {
    let f: Vec<&str> = line.trim().split('|').collect();
    let [
        id,
        name,
        image,
        running,
        ip,
        pid,
        restarts,
        exit_code,
        created,
    ] = f[..]
    else {
        bail!("unexpected docker inspect line: {line:?}");
    };
    let number = |what: &str, v: &str| -> anyhow::Result<i64> {
        v.parse()
            .with_context(|| format!("bad {what} {v:?} in docker inspect line {line:?}"))
    };
    Ok((
        created.to_owned(),
        Replica {
            id: id.to_owned(),
            name: name.trim_start_matches('/').to_owned(),
            image: image.to_owned(),
            running: running == "true",
            ip: ip.to_owned(),
            pid: u32::try_from(number("pid", pid)?)?,
            restarts: u32::try_from(number("restart count", restarts)?)?,
            exit_code: number("exit code", exit_code)?,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inspect_line_reads_into_a_replica() {
        let (created, r) = parse_replica(
            "abc|/p_aggregator_2|vote-aggregator:0.1.0|true|172.20.0.5|4242|1|0|2026-11-27T20:00:00Z",
        )
        .expect("parses");
        assert_eq!(created, "2026-11-27T20:00:00Z");
        assert_eq!(r.name, "p_aggregator_2");
        assert!(r.running);
        assert_eq!((r.pid, r.restarts, r.exit_code), (4242, 1, 0));
        assert!(parse_replica("abc|too|few").is_err());
    }
}
