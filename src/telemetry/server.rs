//! The optional HTTP listener (`[service] listen`): `GET /health` and
//! `GET /metrics`, plus the client behind `mde-forwarder health`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::store::Store;

/// Maximum time a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

type HttpResponse = Response<Full<Bytes>>;

/// Serves `/health` and `/metrics` until `stop` turns true.
pub async fn serve(listener: TcpListener, store: Arc<Store>, mut stop: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(serve_connection(stream, peer, store.clone()));
                }
                Err(error) => {
                    // Usually out of file descriptors: pause instead of spinning.
                    if let Some(suppressed) = super::should_log(&format!("listener accept {error}")) {
                        tracing::warn!(%error, suppressed, "health listener failed to accept a connection; retrying");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
}

/// Completes when the stop flag is true or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn serve_connection(stream: TcpStream, peer: SocketAddr, store: Arc<Store>) {
    let service = service_fn(move |request| {
        let store = store.clone();
        async move { Ok::<_, Infallible>(route(&store, &request)) }
    });
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
    if let Err(error) = builder.serve_connection(TokioIo::new(stream), service).await {
        tracing::debug!(%peer, %error, "health listener connection ended with an error");
    }
}

fn route(store: &Store, request: &Request<Incoming>) -> HttpResponse {
    let path = request.uri().path();
    if path != "/health" && path != "/metrics" {
        return response(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", format!("not found: {path}; use /health or /metrics\n"));
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut reply = response(StatusCode::METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", "method not allowed, use GET\n");
        reply.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return reply;
    }
    let telemetry = super::global();
    if path == "/health" {
        let report = telemetry.tenants.health(Instant::now());
        let status = if report.healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        return response(status, "application/json", report.body.to_string() + "\n");
    }
    telemetry.collect_store_gauges(store);
    response(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", telemetry.metrics.render())
}

fn response(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> HttpResponse {
    let mut reply = Response::new(Full::new(body.into()));
    *reply.status_mut() = status;
    reply.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    reply
}

/// Sends `GET url` and returns the body, or an error unless the status is
/// 200. Used by container health checks in images without curl.
pub async fn check_health(url: &str, timeout: Duration) -> Result<String, String> {
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    let reply = client.get(url).send().await.map_err(|e| format!("GET {url} failed: {e}"))?;
    let status = reply.status();
    let body = reply.text().await.map_err(|e| format!("GET {url}: cannot read the body: {e}"))?;
    if status == reqwest::StatusCode::OK {
        Ok(body)
    } else {
        Err(format!("GET {url} returned HTTP {}: {}", status.as_u16(), body.trim_end()))
    }
}
