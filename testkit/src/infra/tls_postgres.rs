//! A PostgreSQL server with `ssl=on`, started from a [`TestPki`], for the tests of the
//! service's TLS settings.
//!
//! PostgreSQL refuses a key file that group or others may read, or that is owned by
//! neither its own user nor root (root may allow its group to read, 0640). Files copied
//! into a container arrive owned by root, and the server runs as `postgres`, so the
//! container starts through a one-line shell that installs the key as
//! `postgres:postgres 0600` in `/run/pgtls` and then runs the image's own entrypoint.
//!
//! The server's `pg_hba.conf` ([`HBA`]): the superuser `votes` logs in with its password
//! with or without TLS (so the test kit's plain admin connection works), and
//! [`CERT_USER`] only over TLS with a client certificate (`cert` authentication: the
//! certificate's common name must be the user name).

use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;

use anyhow::Context as _;

use super::containers::{Container, postgres_spec, remove, start_container};
use super::engine::{block_on_docker, docker, on_docker};
use super::images::{Server, image};
use super::probes::wait_for_postgres;
use super::{CONNECT_TIMEOUT, Infra, InfraOptions, init_test_logging};
use crate::tls::TestPki;

/// The user `pg_hba.conf` admits only with a client certificate whose common name it is
/// (generate the [`TestPki`] with this client name). A superuser, so it can run the
/// service.
pub const CERT_USER: &str = "votes_cert";

/// The server's `pg_hba.conf`.
pub const HBA: &str = "\
local all all trust
hostssl all votes_cert all cert
host all votes all scram-sha-256
";

/// Where the files go in the container.
const DIR: &str = "/tls";
/// Where the key is installed with the owner and mode PostgreSQL accepts.
const KEY: &str = "/run/pgtls/server.key";

/// A PostgreSQL server with TLS on, and an [`Infra`] that pairs it with a RabbitMQ
/// server started elsewhere. Derefs to that [`Infra`] (whose admin URL connects without
/// TLS); the container is removed on drop.
pub struct TlsPostgres {
    infra: Infra,
    container: Option<Arc<Container>>,
}

impl std::fmt::Debug for TlsPostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsPostgres")
            .field("infra", &self.infra)
            .finish_non_exhaustive()
    }
}

impl Deref for TlsPostgres {
    type Target = Infra;

    fn deref(&self) -> &Infra {
        &self.infra
    }
}

impl TlsPostgres {
    /// Where the server listens on this host.
    pub fn addr(&self) -> SocketAddr {
        self.infra.postgres
    }
}

/// Starts PostgreSQL with `ssl=on`, presenting `pki.server` and verifying client
/// certificates against `pki.ca`, creates [`CERT_USER`], and pairs it with the RabbitMQ
/// of `broker` (e.g. [`super::shared`]'s).
///
/// # Errors
/// When Docker or the image is missing, or the server does not come up.
pub async fn start_tls_postgres(pki: &TestPki, broker: &Infra) -> anyhow::Result<TlsPostgres> {
    init_test_logging();
    let mut spec = postgres_spec(&InfraOptions::default(), String::new(), "tls");
    let files = [
        ("server.crt", pki.server.cert_pem.as_bytes()),
        ("server.key", pki.server.key_pem.as_bytes()),
        ("ca.pem", pki.ca_pem.as_bytes()),
        ("pg_hba.conf", HBA.as_bytes()),
    ];
    for (name, text) in files {
        spec = spec.with_file(format!("{DIR}/{name}"), text);
    }
    spec.cmd.extend(
        [
            "ssl=on".to_string(),
            format!("ssl_cert_file={DIR}/server.crt"),
            format!("ssl_key_file={KEY}"),
            format!("ssl_ca_file={DIR}/ca.pem"),
            format!("hba_file={DIR}/pg_hba.conf"),
        ]
        .into_iter()
        .flat_map(|setting| ["-c".to_string(), setting]),
    );
    let install = format!(
        "install -d -o postgres -g postgres -m 0700 /run/pgtls && \
         install -o postgres -g postgres -m 0600 {DIR}/server.key {KEY} && \
         exec docker-entrypoint.sh \"$@\""
    );
    let mut cmd = vec!["-c".to_string(), install, "sh".to_string()];
    cmd.append(&mut spec.cmd);
    spec.cmd = cmd;
    spec.entrypoint = Some("sh");
    let started = on_docker(async move {
        docker().await?;
        spec.image = image(None, Server::Postgres).await?;
        start_container(spec).await
    })
    .await?;
    let mut infra = super::shared::container_infra(started.host_addr, broker.rabbitmq)?;
    infra.amqp_url = broker.amqp_url();
    let server = TlsPostgres {
        infra,
        container: Some(started.container),
    };
    wait_for_postgres(&server.admin_database_url(), CONNECT_TIMEOUT).await?;
    create_cert_user(&server.admin_database_url()).await?;
    tracing::info!(postgres = %server.addr(), "PostgreSQL with TLS ready");
    Ok(server)
}

async fn create_cert_user(admin_url: &str) -> anyhow::Result<()> {
    use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl as _};
    let mut conn = AsyncPgConnection::establish(admin_url).await?;
    diesel::sql_query(format!("CREATE ROLE {CERT_USER} LOGIN SUPERUSER"))
        .execute(&mut conn)
        .await
        .with_context(|| format!("creating {CERT_USER}"))?;
    Ok(())
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        if let Some(container) = self.container.take() {
            block_on_docker(async move {
                remove(container).await;
                true
            });
        }
    }
}
