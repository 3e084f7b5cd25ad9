//! The process-wide server pair: external servers named by `VOTES_TEST_DATABASE_URL` /
//! `VOTES_TEST_AMQP_URL`, or one PostgreSQL and one RabbitMQ container started once.
//!
//! The pair lives in statics, which are never dropped, so testcontainers' remove-on-drop
//! never runs for it: the handles are parked in [`KEPT`] (on purpose never dropped: a drop
//! outside the Docker runtime would need a runtime) and the exit hook of `cleanup` removes
//! the containers by label.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use url::Url;

use super::containers::{
    Container, Started, postgres_spec, rabbitmq_spec, remove, start_container,
};
use super::engine::{docker, on_docker, resolve};
use super::host_network;
use super::images::{Server, image};
use super::probes::{wait_for_postgres, wait_for_rabbitmq};
use super::{
    CONNECT_TIMEOUT, ENV_AMQP_URL, ENV_DATABASE_URL, Infra, InfraOptions, PASSWORD, POSTGRES_PORT,
    RABBITMQ_PORT, USER, init_test_logging, non_empty_env,
};

/// Handles of the shared containers, kept for the life of the process.
static KEPT: Mutex<Vec<Arc<Container>>> = Mutex::new(Vec::new());

/// The process-wide PostgreSQL + RabbitMQ pair, started on first use.
///
/// Uses `VOTES_TEST_DATABASE_URL` + `VOTES_TEST_AMQP_URL` when both are set; otherwise
/// starts one container of each (see [`InfraOptions::default`]) and removes them when the
/// process exits. A failure is remembered: every later call fails at once with the same
/// message instead of trying again.
pub async fn shared() -> anyhow::Result<&'static Infra> {
    static SHARED: tokio::sync::OnceCell<Result<Infra, String>> =
        tokio::sync::OnceCell::const_new();
    init_test_logging();
    let result = SHARED
        .get_or_init(|| async {
            start_shared()
                .await
                .map_err(|err| format!("test infrastructure unavailable: {err:#}"))
        })
        .await;
    result.as_ref().map_err(|msg| anyhow!("{msg}"))
}

async fn start_shared() -> anyhow::Result<Infra> {
    let database_url = non_empty_env(ENV_DATABASE_URL);
    let amqp_url = non_empty_env(ENV_AMQP_URL);
    match (database_url, amqp_url) {
        (Some(database_url), Some(amqp_url)) => {
            let infra = external_infra(&database_url, &amqp_url)?;
            wait_for_postgres(&infra.admin_database_url(), Duration::from_secs(10)).await?;
            wait_for_rabbitmq(&infra.amqp_url(), Duration::from_secs(10)).await?;
            tracing::info!(postgres = %infra.postgres, rabbitmq = %infra.rabbitmq, "using external test servers");
            Ok(infra)
        }
        (Some(_), None) | (None, Some(_)) => bail!(
            "set both {ENV_DATABASE_URL} and {ENV_AMQP_URL} to use running servers, or neither \
             to start containers"
        ),
        (None, None) => {
            let opts = InfraOptions::default();
            let infra = on_docker(async move {
                let pair = start_pair(opts, "shared").await?;
                let infra = container_infra(pair.postgres.host_addr, pair.rabbitmq.host_addr)?;
                if let Ok(mut kept) = KEPT.lock() {
                    kept.extend([pair.postgres.container, pair.rabbitmq.container]);
                }
                wait_for_postgres(&infra.admin_database_url(), CONNECT_TIMEOUT).await?;
                wait_for_rabbitmq(&infra.amqp_url(), CONNECT_TIMEOUT).await?;
                Ok(infra)
            })
            .await?;
            tracing::info!(postgres = %infra.postgres, rabbitmq = %infra.rabbitmq, "shared test infrastructure ready");
            Ok(infra)
        }
    }
}

/// A started pair and the images it runs.
pub(super) struct Pair {
    pub postgres: Started,
    pub rabbitmq: Started,
    pub postgres_image: String,
    pub rabbitmq_image: String,
}

/// Starts PostgreSQL and RabbitMQ in parallel; if one fails, removes the other. Call on the
/// Docker runtime.
pub(super) async fn start_pair(opts: InfraOptions, scope: &'static str) -> anyhow::Result<Pair> {
    // First: connects, registers the exit hook and reaps stale containers before anything
    // is created, and fails with one clear message when Docker is missing.
    docker().await?;
    // Images next, so a missing one fails before any container is started.
    let (postgres_image, rabbitmq_image) = tokio::try_join!(
        image(opts.postgres_image.clone(), Server::Postgres),
        image(opts.rabbitmq_image.clone(), Server::Rabbitmq),
    )?;
    // `join!`, not `try_join!`: cancelling a start half-way would leave a container only
    // the exit hook finds.
    let mut postgres = postgres_spec(&opts, postgres_image.clone(), scope);
    let mut rabbitmq = rabbitmq_spec(rabbitmq_image.clone(), scope);
    if opts.host_network {
        postgres = host_network::postgres(postgres)?;
        rabbitmq = host_network::rabbitmq(rabbitmq)?;
    }
    let (postgres, rabbitmq) = tokio::join!(start_container(postgres), start_container(rabbitmq));
    match (postgres, rabbitmq) {
        (Ok(postgres), Ok(rabbitmq)) => Ok(Pair {
            postgres,
            rabbitmq,
            postgres_image,
            rabbitmq_image,
        }),
        (Ok(one), Err(err)) | (Err(err), Ok(one)) => {
            remove(one.container).await;
            Err(err)
        }
        (Err(err), Err(_)) => Err(err),
    }
}

/// An [`Infra`] for containers (or proxies) reachable at the given addresses.
pub(super) fn container_infra(postgres: SocketAddr, rabbitmq: SocketAddr) -> anyhow::Result<Infra> {
    let admin_url = Url::parse(&format!("postgres://{USER}:{PASSWORD}@{postgres}/postgres"))
        .context("building the PostgreSQL admin URL")?;
    Ok(Infra {
        admin_url,
        amqp_url: format!("amqp://{USER}:{PASSWORD}@{rabbitmq}/%2f"),
        postgres,
        rabbitmq,
    })
}

/// An [`Infra`] for servers given by URL.
pub(super) fn external_infra(database_url: &str, amqp_url: &str) -> anyhow::Result<Infra> {
    let admin_url = Url::parse(database_url)
        .with_context(|| format!("{ENV_DATABASE_URL} is not a valid URL"))?;
    let amqp =
        Url::parse(amqp_url).with_context(|| format!("{ENV_AMQP_URL} is not a valid URL"))?;
    let default_amqp_port = if amqp.scheme() == "amqps" {
        5671
    } else {
        RABBITMQ_PORT
    };
    Ok(Infra {
        postgres: resolve(&admin_url, POSTGRES_PORT, ENV_DATABASE_URL)?,
        rabbitmq: resolve(&amqp, default_amqp_port, ENV_AMQP_URL)?,
        admin_url,
        amqp_url: amqp_url.to_owned(),
    })
}
