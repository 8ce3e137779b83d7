//! `GET /api/alerts`: bearer token check, injected faults, query and the
//! JSON array response.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use chrono::Utc;
use http_body_util::{BodyExt, Full};
use hyper::header::{
    HeaderValue, ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER, USER_AGENT, WWW_AUTHENTICATE,
};
use hyper::http::request::Parts;
use hyper::{Method, StatusCode};
use serde_json::json;
use tokio::time::Instant;

use super::query::{self, AlertQuery};
use super::server::{json_response, method_not_allowed, text_response, HttpResponse};
use super::state::{CompressedRun, ServedJson, Shared, State};
use super::{Fault, RecordedRequest};

/// The page an intercepting proxy sends in place of the API's response.
const PROXY_ERROR_PAGE: &str = concat!(
    "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n",
    "<body><h1>Bad Gateway</h1>\n",
    "<p>The proxy server received an invalid response from an upstream server.</p>\n",
    "</body></html>\n",
);

/// True for `/api/alerts` and `/api/alerts/`, ignoring case as ASP.NET routing does.
pub(super) fn is_alerts_path(path: &str) -> bool {
    let path = path.strip_suffix('/').unwrap_or(path);
    path.eq_ignore_ascii_case("/api/alerts")
}

/// The caller as identified by its bearer token.
struct Caller {
    tenant_key: String,
    tenant_id: String,
    forbidden: bool,
}

pub(super) async fn handle(shared: &Arc<Shared>, parts: &Parts) -> HttpResponse {
    let pairs: Vec<(String, String)> = parts
        .uri
        .query()
        .map(|query| url::form_urlencoded::parse(query.as_bytes()).into_owned().collect())
        .unwrap_or_default();

    let wants_gzip = accepts_gzip(parts);
    let fault = shared.lock().faults.pop_front();
    let response = match fault {
        None => respond_normally(shared, parts, &pairs, wants_gzip),
        Some(Fault::Slow(delay)) => {
            tokio::time::sleep(delay).await;
            respond_normally(shared, parts, &pairs, wants_gzip)
        }
        // Cut before compressing, so the client sees a truncated array.
        Some(Fault::Truncated) => truncate(respond_normally(shared, parts, &pairs, false)).await,
        Some(Fault::Status { status, retry_after_secs, body }) => status_response(status, retry_after_secs, body),
        Some(Fault::EmptyOk) => json_response(StatusCode::OK, ""),
        Some(Fault::Html) => text_response(StatusCode::OK, "text/html; charset=utf-8", PROXY_ERROR_PAGE),
        Some(Fault::NotArray) => json_response(StatusCode::OK, r#"{"value":[]}"#),
        Some(Fault::Unauthorized) => unauthorized("Authorization has been denied for this request."),
    };

    let response = if wants_gzip { gzip(response).await } else { response };
    let gzip = response.headers().contains_key(CONTENT_ENCODING);
    let user_agent = parts.headers.get(USER_AGENT).and_then(|v| v.to_str().ok()).map(str::to_string);

    let mut state = shared.lock();
    let tenant_id = authenticate(&state, parts).ok().map(|caller| caller.tenant_id);
    tracing::debug!(
        tenant = tenant_id.as_deref().unwrap_or("-"),
        status = response.status().as_u16(),
        query = parts.uri.query().unwrap_or_default(),
        "emulator served /api/alerts"
    );
    state.record(RecordedRequest {
        path: parts.uri.path().to_string(),
        query: pairs,
        status: response.status().as_u16(),
        tenant_id,
        user_agent,
        gzip,
    });
    response
}

/// True when `Accept-Encoding` lists gzip with a non-zero weight.
fn accepts_gzip(parts: &Parts) -> bool {
    parts.headers.get_all(ACCEPT_ENCODING).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(|item| {
        let mut fields = item.split(';').map(str::trim);
        let coding = fields.next().unwrap_or_default();
        let refused = fields.any(|p| p.replace(' ', "").eq_ignore_ascii_case("q=0"));
        coding.eq_ignore_ascii_case("gzip") && !refused
    })
}

/// Compresses a successful response's body with gzip, unless it is already.
async fn gzip(response: HttpResponse) -> HttpResponse {
    if response.status() != StatusCode::OK || response.headers().contains_key(CONTENT_ENCODING) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(never) => match never {},
    };
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let compressed = std::io::Write::write_all(&mut encoder, &bytes).and_then(|()| encoder.finish());
    match compressed {
        Ok(compressed) => {
            parts.headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            parts.headers.remove(hyper::header::CONTENT_LENGTH);
            HttpResponse::from_parts(parts, Full::new(compressed.into()).boxed())
        }
        // Only an allocation failure could fail the write, and then the plain body is still correct.
        Err(_) => HttpResponse::from_parts(parts, Full::new(bytes).boxed()),
    }
}

/// Handles a request that no fault replaces; the detections are streamed,
/// compressed with gzip when `gzip` is set.
fn respond_normally(shared: &Shared, parts: &Parts, pairs: &[(String, String)], gzip: bool) -> HttpResponse {
    if parts.method != Method::GET {
        return method_not_allowed("GET");
    }
    let state = shared.lock();
    let caller = match authenticate(&state, parts) {
        Ok(caller) => caller,
        Err(message) => return unauthorized(message),
    };
    if caller.forbidden {
        let message = format!(
            "Tenant '{}' is not onboarded to Microsoft Defender for Endpoint or has no SIEM integration enabled.",
            caller.tenant_id
        );
        return api_error(StatusCode::FORBIDDEN, "Forbidden", &message);
    }
    let query = match query::parse(pairs, Utc::now()) {
        Ok(query) => query,
        Err(message) => return api_error(StatusCode::BAD_REQUEST, "BadRequest", &message),
    };
    array_response(select(&state, &caller.tenant_key, &query), gzip)
}

/// Identifies the caller from the `Authorization` header, or returns the
/// message of a 401 response.
fn authenticate(state: &State, parts: &Parts) -> Result<Caller, &'static str> {
    let Some(header) = parts.headers.get(AUTHORIZATION) else {
        return Err("The Authorization header is missing. Send 'Authorization: Bearer <access token>'.");
    };
    let header = header.to_str().unwrap_or_default().trim();
    let token = match header.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("Bearer") => token.trim(),
        _ => return Err("The Authorization header must have the form 'Bearer <access token>'."),
    };
    let Some(issued) = state.tokens.get(token) else {
        return Err("The access token is invalid. Request a new token.");
    };
    if issued.expires_at <= Instant::now() {
        return Err("The access token has expired. Request a new token.");
    }
    let Some(tenant) = state.tenants.get(&issued.tenant_key) else {
        return Err("The access token is invalid. Request a new token.");
    };
    Ok(Caller {
        tenant_key: issued.tenant_key.clone(),
        tenant_id: tenant.id.clone(),
        forbidden: tenant.credentials.as_ref().is_some_and(|spec| spec.forbidden),
    })
}

/// Returns the matching detections' JSON texts, ascending by
/// `LastProcessedTimeUtc`.
fn select(state: &State, tenant_key: &str, query: &AlertQuery) -> Vec<Arc<ServedJson>> {
    let Some(tenant) = state.tenants.get(tenant_key) else {
        return Vec::new();
    };
    let mut selected: Vec<_> = tenant.detections.iter().filter(|detection| query.matches(detection)).collect();
    // A stable sort keeps insertion order among equal times.
    selected.sort_by_key(|detection| detection.last_processed);
    if let Some(limit) = query.limit {
        let skip = selected.len().saturating_sub(limit);
        selected.drain(..skip);
    }
    selected.into_iter().map(|detection| detection.json.clone()).collect()
}

/// Uncompressed bytes of the array written between two sent chunks.
const CHUNK_BYTES: usize = 256 * 1024;

/// Builds a 200 response whose body is `detections` as one JSON array,
/// written while it is sent, as a server streams a large result. Each chunk
/// is written on the blocking pool, and waiting for a slow client holds no
/// thread.
fn array_response(detections: Vec<Arc<ServedJson>>, gzip: bool) -> HttpResponse {
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut writer = ArrayWriter::new(detections, gzip);
        loop {
            let Ok((returned, chunk)) = tokio::task::spawn_blocking(move || {
                let chunk = writer.next_chunk();
                (writer, chunk)
            })
            .await
            else {
                return;
            };
            writer = returned;
            let Some(chunk) = chunk else { return };
            if !chunk.is_empty() && sender.send(chunk).await.is_err() {
                // The client has gone.
                return;
            }
        }
    });
    let mut response = HttpResponse::new(ChunkBody(receiver).boxed());
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
    if gzip {
        headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    response
}

/// Writes a JSON array of detections chunk by chunk.
struct ArrayWriter {
    detections: Vec<Arc<ServedJson>>,
    /// Detections written so far.
    next: usize,
    /// `None` once the array is closed.
    output: Option<ArrayOutput>,
}

impl ArrayWriter {
    fn new(detections: Vec<Arc<ServedJson>>, gzip: bool) -> Self {
        let mut output = if gzip {
            ArrayOutput::Gzip(Box::new(GzipOutput::new()))
        } else {
            ArrayOutput::Plain(Vec::new())
        };
        output.write(b"[");
        Self { detections, next: 0, output: Some(output) }
    }

    /// Writes the next part of the body, about `CHUNK_BYTES` before
    /// compression, and returns it; `None` after the last.
    fn next_chunk(&mut self) -> Option<Bytes> {
        let output = self.output.as_mut()?;
        let mut written = 0;
        while written < CHUNK_BYTES {
            let Some(json) = self.detections.get(self.next) else {
                output.write(b"]");
                return self.output.take().map(|output| output.finish().into());
            };
            if self.next > 0 {
                output.write(b",");
            }
            if let ArrayOutput::Gzip(gzip) = output {
                if let Some(run) = json.run.get().filter(|run| listed_in_order(run, &self.detections[self.next..])) {
                    let texts = &self.detections[self.next..self.next + run.members.len()];
                    gzip.splice(run, texts);
                    written += texts.iter().map(|json| json.text.len() + 1).sum::<usize>();
                    self.next += texts.len();
                    continue;
                }
            }
            output.write(json.text.as_bytes());
            written += json.text.len() + 1;
            self.next += 1;
        }
        Some(output.take().into())
    }
}

/// Returns whether `listed` starts with the run's members in their order.
fn listed_in_order(run: &CompressedRun, listed: &[Arc<ServedJson>]) -> bool {
    run.members.len() <= listed.len()
        && run.members.iter().zip(listed).all(|(member, json)| std::ptr::eq(member.as_ptr(), Arc::as_ptr(json)))
}

/// Compresses `run`'s texts joined by commas ahead of time, and records the
/// blocks on its first member. Does nothing if compressing fails: the run
/// is then compressed when served.
pub(super) fn compress_run<'a>(run: impl Iterator<Item = &'a Arc<ServedJson>> + Clone) {
    let Some(first) = run.clone().next() else { return };
    let mut compress = flate2::Compress::new(flate2::Compression::fast(), false);
    let mut blocks = Vec::new();
    let mut deflated = Ok(());
    for (index, json) in run.clone().enumerate() {
        if index > 0 {
            deflated = deflated.and_then(|()| deflate_into(&mut compress, b",", &mut blocks, flate2::FlushCompress::None));
        }
        deflated = deflated.and_then(|()| deflate_into(&mut compress, json.text.as_bytes(), &mut blocks, flate2::FlushCompress::None));
    }
    if deflated.and_then(|()| deflate_into(&mut compress, b"", &mut blocks, flate2::FlushCompress::Full)).is_ok() {
        let members = run.map(Arc::downgrade).collect();
        let _ = first.run.set(Arc::new(CompressedRun { members, blocks: blocks.into_boxed_slice() }));
    }
}

/// Compresses all of `input` into `out` with `flush`, growing `out` as needed.
fn deflate_into(
    compress: &mut flate2::Compress,
    input: &[u8],
    out: &mut Vec<u8>,
    flush: flate2::FlushCompress,
) -> Result<(), flate2::CompressError> {
    let start = compress.total_in();
    loop {
        let consumed = usize::try_from(compress.total_in() - start).unwrap_or(input.len()).min(input.len());
        out.reserve(input.len() - consumed + 1024);
        compress.compress_vec(&input[consumed..], out, flush)?;
        // zlib is done once it consumed the input and left output room unused.
        if compress.total_in() - start == input.len() as u64 && out.len() < out.capacity() {
            return Ok(());
        }
    }
}

/// A gzip member header: deflate, no name or time, unknown OS.
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

/// A gzip body compressed as it is written, into which runs compressed
/// ahead of time can be spliced.
struct GzipOutput {
    compress: flate2::Compress,
    out: Vec<u8>,
    crc: flate2::Crc,
    /// Whether text was compressed since the last full flush.
    unflushed: bool,
}

impl GzipOutput {
    fn new() -> Self {
        Self {
            compress: flate2::Compress::new(flate2::Compression::fast(), false),
            out: GZIP_HEADER.to_vec(),
            crc: flate2::Crc::new(),
            unflushed: false,
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        self.crc.update(bytes);
        self.unflushed = true;
        // zlib reports an error here only for a broken stream state. The
        // client would then see a corrupt body and fail its gzip check.
        let _ = deflate_into(&mut self.compress, bytes, &mut self.out, flate2::FlushCompress::None);
    }

    /// Appends a run's blocks after a full flush, so that nothing compressed
    /// later refers back into them. `texts` are the run's members.
    fn splice(&mut self, run: &CompressedRun, texts: &[Arc<ServedJson>]) {
        if self.unflushed {
            let _ = deflate_into(&mut self.compress, b"", &mut self.out, flate2::FlushCompress::Full);
            self.unflushed = false;
        }
        self.out.extend_from_slice(&run.blocks);
        for (index, json) in texts.iter().enumerate() {
            if index > 0 {
                self.crc.update(b",");
            }
            self.crc.update(json.text.as_bytes());
        }
    }

    fn finish(mut self) -> Vec<u8> {
        let _ = deflate_into(&mut self.compress, b"", &mut self.out, flate2::FlushCompress::Finish);
        self.out.extend_from_slice(&self.crc.sum().to_le_bytes());
        self.out.extend_from_slice(&self.crc.amount().to_le_bytes());
        self.out
    }
}

enum ArrayOutput {
    Plain(Vec<u8>),
    Gzip(Box<GzipOutput>),
}

impl ArrayOutput {
    fn write(&mut self, bytes: &[u8]) {
        match self {
            ArrayOutput::Plain(out) => out.extend_from_slice(bytes),
            ArrayOutput::Gzip(gzip) => gzip.write(bytes),
        }
    }

    /// Takes the output written so far.
    fn take(&mut self) -> Vec<u8> {
        match self {
            ArrayOutput::Plain(out) => std::mem::take(out),
            ArrayOutput::Gzip(gzip) => std::mem::take(&mut gzip.out),
        }
    }

    fn finish(self) -> Vec<u8> {
        match self {
            ArrayOutput::Plain(out) => out,
            ArrayOutput::Gzip(gzip) => gzip.finish(),
        }
    }
}

/// A response body fed chunk by chunk through a channel.
struct ChunkBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChunkBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|chunk| chunk.map(|bytes| Ok(hyper::body::Frame::data(bytes))))
    }
}

fn unauthorized(message: &str) -> HttpResponse {
    let mut response = api_error(StatusCode::UNAUTHORIZED, "Unauthorized", message);
    response.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

fn api_error(status: StatusCode, code: &str, message: &str) -> HttpResponse {
    let body = json!({ "error": { "code": code, "message": message } });
    json_response(status, body.to_string())
}

/// Cuts a successful response's body in the middle, keeping the status.
async fn truncate(response: HttpResponse) -> HttpResponse {
    if response.status() != StatusCode::OK {
        return response;
    }
    let (parts, body) = response.into_parts();
    let bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(never) => match never {},
    };
    let cut = bytes.slice(..bytes.len() / 2);
    HttpResponse::from_parts(parts, Full::new(cut).boxed())
}

/// Builds the response of a `Status` fault. A body that looks like JSON is
/// labelled as JSON, anything else as plain text.
fn status_response(status: u16, retry_after_secs: Option<u64>, body: String) -> HttpResponse {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let trimmed = body.trim_start();
    let content_type = if trimmed.starts_with('{') || trimmed.starts_with('[') {
        "application/json; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    let mut response = text_response(status, content_type, body);
    if let Some(secs) = retry_after_secs {
        response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}
