//! A one-shot HTTP/1 GET against a replica's endpoint (hyper's client on one
//! connection), for the `healthcheck` subcommand a container runtime calls and for the
//! test kit's probes: one client for both.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// A GET that did not produce an answer.
#[derive(Debug, thiserror::Error)]
#[error("GET {path} at {addr}: {reason}")]
pub struct GetError {
    /// Where it was sent.
    pub addr: SocketAddr,
    /// The path asked for.
    pub path: String,
    /// What went wrong (connect, protocol).
    pub reason: String,
}

/// GETs `path` from `addr` on a fresh connection, closed afterwards: (status, body).
///
/// It has no timeout of its own, on purpose: a frozen process accepts the TCP connection
/// in the kernel but never answers, and each caller picks how long to wait by wrapping
/// the call in [`tokio::time::timeout`] (dropping the future closes the connection).
///
/// # Errors
/// [`GetError`] when the endpoint cannot be reached or the answer is not valid HTTP.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), GetError> {
    let fail = |reason: String| GetError {
        addr,
        path: path.to_owned(),
        reason,
    };
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| fail(format!("cannot connect: {e}")))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| fail(e.to_string()))?;
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| fail(format!("bad request path: {e}")))?;
    // The connection is driven alongside the request (never detached), so a caller's
    // timeout drops both and no socket outlives the call.
    let exchange = async move {
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>((status, String::from_utf8_lossy(&body).into_owned()))
    };
    let (answer, _) = futures_util::future::join(exchange, connection).await;
    answer.map_err(|e| fail(e.to_string()))
}

/// The address to reach a replica listening on `listen` from the same host: the loopback
/// address when it listens on every interface (`0.0.0.0` / `::`).
pub fn local_address(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, listen.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, listen.port()).into(),
        _ => listen,
    }
}

/// Asks the replica listening on `listen` whether it is alive (`path` =
/// [`crate::http::paths::HEALTHZ`], as a container health check does) or ready to count
/// ([`crate::http::paths::READYZ`], as a rolling upgrade waits for): 200 within `timeout`.
///
/// # Errors
/// One line saying what failed: no answer in time, no connection, or another status.
pub async fn healthcheck(listen: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    let addr = local_address(listen);
    match tokio::time::timeout(timeout, get(addr, path)).await {
        Err(_) => Err(format!(
            "no answer from {addr}{path} within {timeout:?}: the replica is frozen or overloaded"
        )),
        Ok(Err(e)) => Err(format!(
            "{e} (is the replica running with this METRICS_ADDR?)"
        )),
        Ok(Ok((200, _))) => Ok(()),
        Ok(Ok((status, body))) => Err(format!("{addr}{path} answered {status}: {}", body.trim())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::paths;

    #[test]
    fn every_interface_is_reached_on_loopback() {
        let any4: SocketAddr = "0.0.0.0:8001".parse().expect("addr");
        let any6: SocketAddr = "[::]:8001".parse().expect("addr");
        let one: SocketAddr = "10.1.2.3:9000".parse().expect("addr");
        assert_eq!(local_address(any4), "127.0.0.1:8001".parse().expect("addr"));
        assert_eq!(local_address(any6), "[::1]:8001".parse().expect("addr"));
        assert_eq!(local_address(one), one);
    }

    #[tokio::test]
    async fn a_closed_port_is_one_clear_line() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let e = healthcheck(addr, paths::HEALTHZ, Duration::from_secs(2))
            .await
            .expect_err("nothing listens");
        assert!(e.contains("cannot connect"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }
}
