//! The HTTP/1.1 server: accept loop, one task per connection, routing, and
//! graceful shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::state::Shared;
use super::token::TokenVersion;
use super::{alerts, control, token};

/// How long shutdown waits for requests in flight (a `Slow` fault, for
/// example) before it closes their connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Maximum request body of the token endpoint; real token requests are a few
/// hundred bytes.
const MAX_TOKEN_BODY: usize = 64 * 1024;

/// Maximum request body of the control API, which may carry many detections.
const MAX_CONTROL_BODY: usize = 256 * 1024 * 1024;

pub(super) type HttpResponse = Response<BoxBody<Bytes, Infallible>>;

/// Accepts connections until `stop` turns true or its sender is dropped,
/// then drains the open connections.
pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let connection_stop = stop.clone();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(serve_connection(stream, peer, Arc::clone(&shared), connection_stop.clone()));
                }
                Err(error) => {
                    // Usually out of file descriptors; pausing lets closing
                    // connections free some instead of spinning.
                    tracing::warn!(%error, "emulator failed to accept a connection, retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);

    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        tracing::warn!(open = connections.len(), "emulator closing connections still busy after the grace period");
        connections.shutdown().await;
    }
}

/// Completes when the stop flag is true or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

async fn serve_connection(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |request| {
        let shared = Arc::clone(&shared);
        async move { Ok::<_, Infallible>(route(&shared, request).await) }
    });
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);

    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = stopped(&mut stop) => {
            // Finishes the request in progress, then closes instead of
            // waiting for the next keep-alive request.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "emulator connection ended with an error");
    }
}

async fn route(shared: &Arc<Shared>, request: Request<Incoming>) -> HttpResponse {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_string();

    if alerts::is_alerts_path(&path) {
        return alerts::handle(shared, &parts).await;
    }

    if let Some(action) = path.strip_prefix("/_emulator/") {
        let body = match read_body(body, MAX_CONTROL_BODY).await {
            Ok(body) => body,
            Err(response) => return response,
        };
        return control::handle(shared, &parts.method, action, parts.uri.query(), &body);
    }

    if let Some((tenant_id, version)) = token_path(&path) {
        if parts.method != Method::POST {
            return method_not_allowed("POST");
        }
        let body = match read_body(body, MAX_TOKEN_BODY).await {
            Ok(body) => body,
            Err(response) => return response,
        };
        let audiences = token_audiences(&parts, &path);
        return token::handle(shared, tenant_id, version, &body, &audiences);
    }

    text_response(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", format!("no emulated endpoint at {path}\n"))
}

/// Returns the token URL as the client sees it, with http and https, for
/// the `aud` claim of a client assertion. The emulator serves plain HTTP, but a client
/// may reach it through a TLS front or a proxy.
fn token_audiences(parts: &hyper::http::request::Parts, path: &str) -> Vec<String> {
    let host = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| parts.headers.get(hyper::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string))
        .unwrap_or_default();
    vec![format!("http://{host}{path}"), format!("https://{host}{path}")]
}

/// Splits `/{tenant}/oauth2/token` and `/{tenant}/oauth2/v2.0/token`.
fn token_path(path: &str) -> Option<(&str, TokenVersion)> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        [tenant, "oauth2", "token"] if !tenant.is_empty() => Some((tenant, TokenVersion::V1)),
        [tenant, "oauth2", "v2.0", "token"] if !tenant.is_empty() => Some((tenant, TokenVersion::V2)),
        _ => None,
    }
}

async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, HttpResponse> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) => Err(text_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "text/plain; charset=utf-8",
            format!("failed to read the request body (limit {limit} bytes): {error}\n"),
        )),
    }
}

pub(super) fn text_response(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> HttpResponse {
    let mut response = Response::new(Full::new(body.into()).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

pub(super) fn json_response(status: StatusCode, body: impl Into<Bytes>) -> HttpResponse {
    text_response(status, "application/json; charset=utf-8", body)
}

pub(super) fn method_not_allowed(allow: &'static str) -> HttpResponse {
    let mut response = text_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "text/plain; charset=utf-8",
        format!("method not allowed, use {allow}\n"),
    );
    response.headers_mut().insert(ALLOW, HeaderValue::from_static(allow));
    response
}
