//! Which PostgreSQL and RabbitMQ images the kit runs: the one place that decides.
//!
//! 1. `VOTES_POSTGRES_IMAGE` / `VOTES_RABBITMQ_IMAGE` when set (and non-empty);
//! 2. else the offline image `vote-aggregator/postgres:17-offline` /
//!    `vote-aggregator/rabbitmq:4.0-offline` when it exists locally (`make images` builds
//!    them without registry access; they honour the official images' environment
//!    variables, ports, STOPSIGNAL and readiness log lines);
//! 3. else the official `postgres:17` / `rabbitmq:4.0`.
//!
//! The chosen image must exist locally or be pullable (testcontainers pulls it); otherwise
//! the start fails with one message saying what to do.

use anyhow::anyhow;
use testcontainers::GenericImage;
use testcontainers::runners::AsyncRunner as _;

use super::engine::{image_exists, on_docker};
use super::{ENV_AMQP_URL, ENV_DATABASE_URL, non_empty_env};

const ENV_POSTGRES_IMAGE: &str = "VOTES_POSTGRES_IMAGE";
const ENV_RABBITMQ_IMAGE: &str = "VOTES_RABBITMQ_IMAGE";
const OFFLINE_POSTGRES_IMAGE: &str = "vote-aggregator/postgres:17-offline";
const OFFLINE_RABBITMQ_IMAGE: &str = "vote-aggregator/rabbitmq:4.0-offline";
const OFFICIAL_POSTGRES_IMAGE: &str = "postgres:17";
const OFFICIAL_RABBITMQ_IMAGE: &str = "rabbitmq:4.0";

/// The two servers the kit runs.
#[derive(Debug, Clone, Copy)]
pub(super) enum Server {
    Postgres,
    Rabbitmq,
}

impl Server {
    fn names(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Server::Postgres => (
                ENV_POSTGRES_IMAGE,
                OFFLINE_POSTGRES_IMAGE,
                OFFICIAL_POSTGRES_IMAGE,
            ),
            Server::Rabbitmq => (
                ENV_RABBITMQ_IMAGE,
                OFFLINE_RABBITMQ_IMAGE,
                OFFICIAL_RABBITMQ_IMAGE,
            ),
        }
    }
}

/// The PostgreSQL image the kit runs (see the module docs), made available locally.
///
/// # Errors
/// When Docker is unreachable or the image is neither local nor pullable.
pub async fn postgres_image() -> anyhow::Result<String> {
    on_docker(image(None, Server::Postgres)).await
}

/// The RabbitMQ image the kit runs (see the module docs), made available locally.
///
/// # Errors
/// When Docker is unreachable or the image is neither local nor pullable.
pub async fn rabbitmq_image() -> anyhow::Result<String> {
    on_docker(image(None, Server::Rabbitmq)).await
}

/// `explicit` (from [`super::InfraOptions`]) or the module's choice, pulled if missing.
/// Call on the Docker runtime.
pub(super) async fn image(explicit: Option<String>, server: Server) -> anyhow::Result<String> {
    let (env, offline, official) = server.names();
    let image = match explicit.or_else(|| non_empty_env(env)) {
        Some(image) => image,
        None if image_exists(offline).await? => offline.to_owned(),
        None => official.to_owned(),
    };
    if !image_exists(&image).await? {
        tracing::info!(image, "image not found locally, pulling it");
        let (name, tag) = split_image(&image);
        GenericImage::new(name, tag)
            .pull_image()
            .await
            .map(drop)
            .map_err(|err| anyhow!(missing_image_message(&image, &err.to_string())))?;
        // Some engines end a pull without an error even though nothing was pulled.
        if !image_exists(&image).await? {
            return Err(anyhow!(missing_image_message(
                &image,
                "the pull brought nothing"
            )));
        }
    }
    Ok(image)
}

fn missing_image_message(image: &str, err: &str) -> String {
    format!(
        "image `{image}` is not available locally and could not be pulled ({err}): run \
         `make images` (needs root) to build {OFFLINE_POSTGRES_IMAGE} and \
         {OFFLINE_RABBITMQ_IMAGE} without a registry, or set {ENV_POSTGRES_IMAGE} / \
         {ENV_RABBITMQ_IMAGE} to images you have, or set {ENV_DATABASE_URL} and \
         {ENV_AMQP_URL} to use running servers"
    )
}

/// Splits `name:tag` at the last ':' (a ':' followed by a '/' belongs to a registry port).
pub(super) fn split_image(image: &str) -> (&str, &str) {
    match image.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, tag),
        _ => (image, "latest"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_split_at_the_last_colon() {
        assert_eq!(split_image("postgres:17"), ("postgres", "17"));
        assert_eq!(
            split_image("vote-aggregator/rabbitmq:4.0-offline"),
            ("vote-aggregator/rabbitmq", "4.0-offline")
        );
        assert_eq!(
            split_image("registry:5000/postgres"),
            ("registry:5000/postgres", "latest")
        );
        assert_eq!(
            split_image("registry:5000/postgres:17"),
            ("registry:5000/postgres", "17")
        );
    }
}
