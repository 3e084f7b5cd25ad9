//! The replica's HTTP endpoint (hyper): `/metrics` (Prometheus text), `/healthz` (the
//! process is alive and serving) and `/readyz` (200 only while connected to both
//! RabbitMQ and PostgreSQL, else 503 with the dependency that is down).
//!
//! It binds before anything else so a port clash stops start-up at once, and serves
//! until the shutdown token fires.

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::error::Error;
use crate::metrics::{DEP_POSTGRES, DEP_RABBITMQ, Metrics};

/// The paths the endpoint serves, declared once for the service and its probes.
pub mod paths {
    /// Prometheus text exposition of the replica's metrics.
    pub const METRICS: &str = "/metrics";
    /// 200 while the process is alive and serving.
    pub const HEALTHZ: &str = "/healthz";
    /// 200 only while connected to RabbitMQ and PostgreSQL (and commits succeed).
    pub const READYZ: &str = "/readyz";
}

/// Binds the endpoint.
///
/// # Errors
/// [`Error::Bind`] when the address is in use or not local.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|e| Error::Bind {
        addr,
        reason: e.to_string(),
    })
}

/// Serves requests on `listener` until `shutdown` fires.
pub async fn serve(listener: TcpListener, metrics: Metrics, shutdown: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(s) => s,
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(route(&req, &metrics)) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
    }
    match req.uri().path() {
        paths::METRICS => {
            let mut resp = text(StatusCode::OK, metrics.render());
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            resp
        }
        paths::HEALTHZ => text(StatusCode::OK, "ok\n".into()),
        paths::READYZ => {
            let mut down: Vec<&str> = [DEP_RABBITMQ, DEP_POSTGRES]
                .into_iter()
                .filter(|d| !metrics.is_up(d))
                .collect();
            if metrics.commits_failing.get() != 0 {
                down.push("batch commits (failing)");
            }
            if down.is_empty() {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {} down\n", down.join(", ")),
                )
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}
