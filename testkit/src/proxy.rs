//! `FaultProxy`: a tiny TCP proxy for fault injection, in the style of toxiproxy.
//!
//! This module owns the one piece of network plumbing the tests and the chaos suite put
//! between a client (the aggregator, a publisher, the checker) and a server (PostgreSQL,
//! RabbitMQ). It exists for two reasons:
//!
//! - **Cutting connections on demand.** [`FaultProxy::break_all`] closes every open
//!   connection at once and refuses new ones until [`FaultProxy::restore`]; this is how a
//!   test simulates a network partition or a server that vanished, without touching the
//!   server itself.
//! - **A stable address across server restarts.** Docker may map a container's port to a
//!   *new* host port after `docker stop` + `docker start`. The proxy keeps a fixed local
//!   port and is re-pointed with [`FaultProxy::set_upstream`], so URLs handed out before a
//!   restart keep working after it.
//!
//! Each accepted connection is forwarded to the current upstream with
//! [`tokio::io::copy_bidirectional`]. Connections are tracked through a "generation"
//! [`CancellationToken`]: `break_all` cancels the current generation (every connection
//! task selects on it and drops both sockets, which closes them) and starts a new one.
//! The proxy runs on the Tokio runtime that called [`FaultProxy::start`] and stops, with
//! all its connections, when the `FaultProxy` is dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// How long a proxied connection waits for the upstream TCP handshake before giving up
/// (and closing the client side).
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP proxy that forwards every accepted connection to an upstream address and can
/// cut all connections on demand.
///
/// Dropping the `FaultProxy` stops the listener and closes every open connection.
pub struct FaultProxy {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    /// Parent of every generation token: cancelled on drop, which stops everything.
    shutdown: CancellationToken,
}

/// State shared between the handle, the accept loop and the connection tasks.
struct Shared {
    state: Mutex<State>,
    /// Number of connections currently being forwarded.
    connections: AtomicUsize,
    shutdown: CancellationToken,
}

/// Everything the accept loop must read atomically with respect to `break_all`.
struct State {
    upstream: SocketAddr,
    broken: bool,
    /// Cancelled by `break_all`: every connection accepted in this generation holds it.
    generation: CancellationToken,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a panic while holding it; the state is still usable
        // (plain fields, no invariants spanning several of them).
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("FaultProxy")
            .field("local_addr", &self.local_addr)
            .field("upstream", &state.upstream)
            .field("broken", &state.broken)
            .field("connections", &self.connection_count())
            .finish()
    }
}

impl FaultProxy {
    /// Binds `listen` (port 0 picks a free port; see [`FaultProxy::local_addr`]) and starts
    /// forwarding every accepted connection to `upstream`.
    ///
    /// Must be called inside a Tokio runtime; the proxy's tasks run on that runtime.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<FaultProxy> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("fault proxy: cannot listen on {listen}"))?;
        let local_addr = listener
            .local_addr()
            .context("fault proxy: cannot read the listening address")?;
        let shutdown = CancellationToken::new();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                upstream,
                broken: false,
                generation: shutdown.child_token(),
            }),
            connections: AtomicUsize::new(0),
            shutdown: shutdown.clone(),
        });
        tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        tracing::debug!(%local_addr, %upstream, "fault proxy started");
        Ok(FaultProxy {
            local_addr,
            shared,
            shutdown,
        })
    }

    /// The address the proxy listens on; clients connect here.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address new connections are forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.lock().upstream
    }

    /// Forwards *new* connections to `upstream` from now on. Open connections keep their
    /// old upstream; call [`FaultProxy::break_all`] + [`FaultProxy::restore`] to move them.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        let mut state = self.shared.lock();
        tracing::debug!(local_addr = %self.local_addr, from = %state.upstream, to = %upstream, "fault proxy re-pointed");
        state.upstream = upstream;
    }

    /// Closes every open connection now and refuses new ones (each is accepted and closed
    /// at once) until [`FaultProxy::restore`] is called.
    pub fn break_all(&self) {
        let mut state = self.shared.lock();
        state.broken = true;
        state.generation.cancel();
        state.generation = self.shutdown.child_token();
        tracing::debug!(local_addr = %self.local_addr, "fault proxy broken");
    }

    /// Accepts and forwards connections again after [`FaultProxy::break_all`].
    pub fn restore(&self) {
        self.shared.lock().broken = false;
        tracing::debug!(local_addr = %self.local_addr, "fault proxy restored");
    }

    /// Whether the proxy is currently refusing connections (see [`FaultProxy::break_all`]).
    pub fn is_broken(&self) -> bool {
        self.shared.lock().broken
    }

    /// Number of connections being forwarded right now (accepted and not yet closed;
    /// connections refused while broken are not counted).
    pub fn connection_count(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Stops the accept loop and every connection task (their tokens are children).
        self.shutdown.cancel();
    }
}

/// Accepts connections until the proxy is dropped.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (client, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                // Typically EMFILE or a connection reset before accept; back off briefly
                // instead of spinning.
                tracing::warn!(error = %err, "fault proxy: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Read the state under the lock so a concurrent `break_all` either sees this
        // connection's generation (and cuts it) or this loop sees `broken`.
        let (upstream, generation) = {
            let state = shared.lock();
            if state.broken {
                tracing::trace!(%peer, "fault proxy broken: closing new connection");
                drop(client);
                continue;
            }
            (state.upstream, state.generation.clone())
        };
        let guard = ConnectionGuard::new(Arc::clone(&shared));
        tokio::spawn(forward(client, upstream, generation, guard));
    }
}

/// Decrements the connection count when a connection task ends, however it ends.
struct ConnectionGuard(Arc<Shared>);

impl ConnectionGuard {
    fn new(shared: Arc<Shared>) -> Self {
        shared.connections.fetch_add(1, Ordering::SeqCst);
        ConnectionGuard(shared)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Forwards one client connection until either side closes or the generation is cut.
async fn forward(
    mut client: TcpStream,
    upstream: SocketAddr,
    generation: CancellationToken,
    _guard: ConnectionGuard,
) {
    let connect = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(upstream));
    let mut server = tokio::select! {
        () = generation.cancelled() => return,
        connected = connect => match connected {
            Ok(Ok(server)) => server,
            Ok(Err(err)) => {
                tracing::debug!(%upstream, error = %err, "fault proxy: upstream refused");
                return;
            }
            Err(_) => {
                tracing::debug!(%upstream, "fault proxy: upstream connect timed out");
                return;
            }
        },
    };
    // Both are best effort: small protocol messages should not wait for Nagle.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    tokio::select! {
        () = generation.cancelled() => {
            tracing::trace!(%upstream, "fault proxy: connection cut");
        }
        copied = tokio::io::copy_bidirectional(&mut client, &mut server) => {
            if let Err(err) = copied {
                tracing::trace!(%upstream, error = %err, "fault proxy: connection ended with an error");
            }
        }
    }
    // Dropping both streams closes them.
}
