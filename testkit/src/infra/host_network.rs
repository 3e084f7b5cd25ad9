//! Servers in the host's network namespace, listening on loopback only: the data path of
//! benchmarks without Docker's userland port proxy.
//!
//! A published port on `127.0.0.1` is served by `docker-proxy`, a userland process that
//! copies every byte between two sockets: a cost no production deployment pays, and one
//! that competes for the same cores as the servers. With `network_mode: host` a client
//! connects straight to the server's own socket. Loopback-only still holds: every
//! listener is bound to `127.0.0.1` (PostgreSQL's `listen_addresses`, RabbitMQ's AMQP
//! and distribution listeners, and `epmd` through `ERL_EPMD_ADDRESS`), on ports picked
//! free at start, so several pairs and the host's own servers never collide.

use std::net::{Ipv4Addr, TcpListener};

use anyhow::Context as _;

use super::containers::ContainerSpec;

/// Where RabbitMQ's configuration fragments are read from (the official image and the
/// offline one alike); files there override `rabbitmq.conf` in name order.
const RABBITMQ_CONF_D: &str = "/etc/rabbitmq/conf.d/90-host-network.conf";

/// `n` distinct loopback ports that were free a moment ago (bound together, then
/// released). Another process could take one in between; the server's start then fails
/// with "address in use", which is loud, not silent.
///
/// # Errors
/// When the system has no free ephemeral port.
pub(super) fn free_loopback_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<Vec<_>, _>>()
        .context("finding free loopback ports for the host-network servers")?;
    let mut ports = [0u16; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

/// PostgreSQL on `127.0.0.1:<free port>` in the host's network namespace. `PGPORT` is the
/// server's default port and also what `psql`/`pg_isready` inside the container use.
pub(super) fn postgres(spec: ContainerSpec) -> anyhow::Result<ContainerSpec> {
    let [port] = free_loopback_ports::<1>()?;
    let mut spec = spec
        .with_env("PGPORT", port.to_string())
        .on_host_network(port);
    spec.cmd
        .extend(["-c".to_owned(), "listen_addresses=127.0.0.1".to_owned()]);
    Ok(spec)
}

/// RabbitMQ on `127.0.0.1:<free port>` in the host's network namespace, its inter-node
/// listener and `epmd` on loopback too (on their own free ports: the defaults 25672 and
/// 4369 could belong to another broker on the host). `rabbitmqctl` run inside the
/// container inherits `ERL_EPMD_PORT` and finds the node.
pub(super) fn rabbitmq(spec: ContainerSpec) -> anyhow::Result<ContainerSpec> {
    let [amqp, distribution, epmd] = free_loopback_ports::<3>()?;
    let conf = format!(
        "# written by the test kit: every listener on loopback, ports chosen at start\n\
         listeners.tcp.default = 127.0.0.1:{amqp}\n\
         distribution.listener.interface = 127.0.0.1\n\
         distribution.listener.port_range.min = {distribution}\n\
         distribution.listener.port_range.max = {distribution}\n"
    );
    Ok(spec
        .with_file(RABBITMQ_CONF_D, conf)
        .with_env("ERL_EPMD_ADDRESS", "127.0.0.1")
        .with_env("ERL_EPMD_PORT", epmd.to_string())
        .on_host_network(amqp))
}
