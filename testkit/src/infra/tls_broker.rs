//! A RabbitMQ container with a TLS listener next to its plain one, serving the
//! certificates of a [`TestPki`], for the tests of `amqps://` connections.
//!
//! The broker gets the PKI's CA, server certificate and key copied into the container and
//! a `conf.d` snippet: `listeners.ssl.default`, `ssl_options.*` with `verify_peer`, and
//! `fail_if_no_peer_cert` as asked. With [`TlsBrokerOptions::external_auth`] it also
//! enables the `rabbitmq_auth_mechanism_ssl` plugin and the EXTERNAL mechanism (user =
//! the client certificate's common name). The plain listener stays, so tests can publish
//! and inspect without TLS. The container is removed on drop.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;

use super::containers::{Container, host_addr, rabbitmq_spec, remove, start_container};
use super::engine::{block_on_docker, docker, on_docker};
use super::images::{Server, image};
use super::probes::wait_for_rabbitmq;
use super::{CONNECT_TIMEOUT, PASSWORD, USER, init_test_logging};
use crate::tls::TestPki;

/// The container port of RabbitMQ's TLS listener.
pub const RABBITMQ_TLS_PORT: u16 = 5671;

/// Where the PKI's files go in the container.
const TLS_DIR: &str = "/etc/rabbitmq/test-tls";

/// How the TLS listener treats clients.
#[derive(Debug, Clone, Copy, Default)]
pub struct TlsBrokerOptions {
    /// `ssl_options.fail_if_no_peer_cert = true`: refuse a client without a certificate
    /// signed by the PKI's CA (a certificate is always verified when one is presented).
    pub require_client_certificate: bool,
    /// Offer the EXTERNAL mechanism (`?auth_mechanism=external`): the user is the client
    /// certificate's common name, no password.
    pub external_auth: bool,
}

/// A RabbitMQ with a plain and a TLS listener (see the module docs).
pub struct TlsRabbitMq {
    /// `None` only once `Drop` took it.
    container: Option<Arc<Container>>,
    plain: SocketAddr,
    tls: SocketAddr,
}

impl std::fmt::Debug for TlsRabbitMq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsRabbitMq")
            .field("plain", &self.plain)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// Starts a RabbitMQ whose TLS listener presents `pki`'s server certificate and trusts
/// `pki`'s CA for client certificates; returns once its plain listener accepts a login.
///
/// # Errors
/// When Docker or the image is missing, or the broker does not start.
pub async fn start_tls_rabbitmq(
    pki: &TestPki,
    opts: TlsBrokerOptions,
) -> anyhow::Result<TlsRabbitMq> {
    init_test_logging();
    let files = [
        (format!("{TLS_DIR}/ca.pem"), pki.ca_pem.clone()),
        (format!("{TLS_DIR}/server.pem"), pki.server.cert_pem.clone()),
        (format!("{TLS_DIR}/server.key"), pki.server.key_pem.clone()),
        (
            "/etc/rabbitmq/conf.d/90-test-tls.conf".to_owned(),
            tls_conf(opts),
        ),
    ];
    let started = on_docker(async move {
        docker().await?;
        let image = image(None, Server::Rabbitmq).await?;
        let mut spec = rabbitmq_spec(image, "tls").with_extra_port(RABBITMQ_TLS_PORT);
        for (path, contents) in files {
            spec = spec.with_file(path, contents);
        }
        if opts.external_auth {
            spec = spec.with_file(
                "/etc/rabbitmq/enabled_plugins",
                "[rabbitmq_auth_mechanism_ssl].\n",
            );
        }
        let started = start_container(spec).await?;
        match host_addr(&started.container, RABBITMQ_TLS_PORT).await {
            Ok(tls) => Ok((started, tls)),
            Err(err) => {
                remove(started.container).await;
                Err(err)
            }
        }
    })
    .await?;
    let (started, tls) = started;
    let broker = TlsRabbitMq {
        container: Some(started.container),
        plain: started.host_addr,
        tls,
    };
    wait_for_rabbitmq(&broker.amqp_url(), CONNECT_TIMEOUT)
        .await
        .context("the TLS test broker's plain listener")?;
    tracing::info!(plain = %broker.plain, tls = %broker.tls, "TLS test broker ready");
    Ok(broker)
}

/// The `conf.d` snippet of the TLS listener.
fn tls_conf(opts: TlsBrokerOptions) -> String {
    let mut conf = format!(
        "listeners.ssl.default = {RABBITMQ_TLS_PORT}\n\
         ssl_options.cacertfile = {TLS_DIR}/ca.pem\n\
         ssl_options.certfile = {TLS_DIR}/server.pem\n\
         ssl_options.keyfile = {TLS_DIR}/server.key\n\
         ssl_options.verify = verify_peer\n\
         ssl_options.fail_if_no_peer_cert = {}\n",
        opts.require_client_certificate
    );
    if opts.external_auth {
        conf.push_str(
            "auth_mechanisms.1 = PLAIN\n\
             auth_mechanisms.2 = AMQPLAIN\n\
             auth_mechanisms.3 = EXTERNAL\n\
             ssl_cert_login_from = common_name\n",
        );
    }
    conf
}

impl TlsRabbitMq {
    /// URL of the plain listener (default vhost), e.g. `amqp://votes:votes@127.0.0.1:49154/%2f`.
    pub fn amqp_url(&self) -> String {
        format!(
            "amqp://{USER}:{PASSWORD}@{}:{}/%2f",
            self.plain.ip(),
            self.plain.port()
        )
    }

    /// URL of the TLS listener reached as `host` (a name the test resolves to the
    /// loopback address, e.g. `localhost` or `127.0.0.1`: the certificate check uses it).
    pub fn amqps_url(&self, host: &str) -> String {
        format!("amqps://{USER}:{PASSWORD}@{host}:{}/%2f", self.tls.port())
    }

    /// The host port of the plain listener.
    pub fn plain_port(&self) -> u16 {
        self.plain.port()
    }

    /// The host port of the TLS listener.
    pub fn tls_port(&self) -> u16 {
        self.tls.port()
    }
}

impl Drop for TlsRabbitMq {
    fn drop(&mut self) {
        if let Some(container) = self.container.take() {
            block_on_docker(async move {
                remove(container).await;
                true
            });
        }
    }
}
