//! Commands run inside this process's shared server containers (`docker exec`), for what
//! no client protocol offers: creating RabbitMQ users and permissions with `rabbitmqctl`,
//! or running a psql script (`scripts/roles.sql`) as the database superuser.
//!
//! The containers are found by their labels (role, scope `shared`, this process's pid),
//! so nothing about the shared pair's handles changes. With external servers
//! (`VOTES_TEST_DATABASE_URL` / `VOTES_TEST_AMQP_URL`) there is no container: the call
//! fails saying so.

use anyhow::{Context as _, bail};
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use futures_util::StreamExt as _;
use tokio::io::AsyncWriteExt as _;

use super::engine::{docker, list_labelled, on_docker};
use super::{LABEL_PID, LABEL_ROLE, LABEL_SCOPE, LABEL_TEST};

/// Which shared server to run a command in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedServer {
    /// The shared PostgreSQL container (`psql` is there; the superuser is `votes`).
    Postgres,
    /// The shared RabbitMQ container (`rabbitmqctl` is there).
    Rabbitmq,
}

impl SharedServer {
    fn role(self) -> &'static str {
        match self {
            SharedServer::Postgres => "postgres",
            SharedServer::Rabbitmq => "rabbitmq",
        }
    }
}

/// Runs `cmd` in the shared `server` container (started by [`super::shared`] first),
/// with `stdin` as its input, and returns its output (stdout and stderr interleaved).
///
/// # Errors
/// When the shared pair runs no container (external servers), Docker fails, or the
/// command exits non-zero (its output is in the message).
pub async fn exec_in_shared(
    server: SharedServer,
    cmd: &[&str],
    stdin: Option<Vec<u8>>,
) -> anyhow::Result<String> {
    super::shared().await?;
    let cmd: Vec<String> = cmd.iter().map(|s| (*s).to_owned()).collect();
    on_docker(async move { exec(server, cmd, stdin).await }).await
}

async fn exec(
    server: SharedServer,
    cmd: Vec<String>,
    stdin: Option<Vec<u8>>,
) -> anyhow::Result<String> {
    let docker = docker().await?;
    let labels = vec![
        format!("{LABEL_TEST}=1"),
        format!("{LABEL_PID}={}", std::process::id()),
        format!("{LABEL_ROLE}={}", server.role()),
        format!("{LABEL_SCOPE}=shared"),
    ];
    let Some((id, _)) = list_labelled(&docker, labels).await?.into_iter().next() else {
        bail!(
            "no shared {} container of this process: this test runs commands inside the test containers, so it cannot run against external servers",
            server.role()
        );
    };
    exec_in_container(&id, cmd, stdin)
        .await
        .with_context(|| format!("in the shared {} container", server.role()))
}

/// Runs `cmd` in the running container `id` (call on the Docker runtime), with `stdin` as
/// its input, and returns its output (stdout and stderr interleaved).
///
/// # Errors
/// When Docker fails or the command exits non-zero (its output is in the message).
pub(super) async fn exec_in_container(
    id: &str,
    cmd: Vec<String>,
    stdin: Option<Vec<u8>>,
) -> anyhow::Result<String> {
    let docker = docker().await?;
    let shown = cmd.join(" ");
    let created = docker
        .create_exec(
            id,
            CreateExecOptions {
                attach_stdin: Some(stdin.is_some()),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                cmd: Some(cmd),
                ..CreateExecOptions::default()
            },
        )
        .await
        .with_context(|| format!("docker exec {shown}"))?;
    let started = docker
        .start_exec(&created.id, None::<StartExecOptions>)
        .await
        .with_context(|| format!("docker exec {shown}"))?;
    let mut text = String::new();
    if let StartExecResults::Attached {
        mut output,
        mut input,
    } = started
    {
        if let Some(bytes) = stdin {
            input.write_all(&bytes).await?;
            input.shutdown().await?;
        }
        drop(input);
        while let Some(frame) = output.next().await {
            let frame = frame.with_context(|| format!("reading the output of {shown}"))?;
            text.push_str(&String::from_utf8_lossy(&frame.into_bytes()));
        }
    }
    let code = docker
        .inspect_exec(&created.id)
        .await
        .with_context(|| format!("docker exec {shown}"))?
        .exit_code
        .unwrap_or(-1);
    if code != 0 {
        bail!("`{shown}` exited {code}: {}", text.trim());
    }
    Ok(text)
}
