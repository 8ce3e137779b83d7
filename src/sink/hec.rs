//! Splunk HTTP Event Collector: a batch is one POST of concatenated event
//! objects to `/services/collector/event`.
//!
//! Without `ack`, HTTP 200 acknowledges the batch. With `ack`, the response
//! carries an `ackId` and the batch counts as delivered only once
//! `/services/collector/ack` reports it indexed; a timeout sends the batch again.
//!
//! HEC rejects a request with HTTP 400, a status `code` and, for a batch,
//! `invalid-event-number`: the first event it did not take. What follows
//! depends on the code (see [`fault_of`]):
//!
//! - A malformed event (6 "Invalid data format", 12 "Event field is
//!   required", 13 "Event field cannot be blank", 15 "Error in handling
//!   indexed fields"): the events before it were accepted, that one is
//!   rejected for good, and the rest must be sent again. HEC gives no
//!   `ackId` for the accepted events, so with `ack` they are sent again as
//!   a request of their own, and count as delivered only once that
//!   request's `ackId` is indexed. Splunk may then index them twice.
//! - Any other code, known or not (such as 7 "Incorrect index"): the sink's
//!   config, its token or the receiver is at fault, so nothing is rejected
//!   and the whole batch is sent again, with an error that names the fix.
//!
//! An invalid token (401, 403) is retried, because the events are not at fault.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::time::Instant;

use super::http::{is_retryable, Reply};
use super::{Batch, Redactor, SendOutcome, SinkError};
use crate::config::{ConfigError, Secret};

/// First and longest wait between two acknowledgement polls.
const ACK_POLL_FIRST: Duration = Duration::from_millis(100);
const ACK_POLL_MAX: Duration = Duration::from_secs(2);

/// The maximum length in bytes of HEC's `text` kept in an error. Splunk's own texts are shorter.
const HEC_TEXT_BYTES: usize = 200;

/// Everything a HEC sink needs, resolved from its config.
pub struct HecSettings {
    /// Base URL without a trailing slash.
    pub url: String,
    pub token: Secret,
    pub ack: bool,
    pub ack_timeout: Duration,
    pub max_batch_bytes: usize,
    /// Credentials of the sink's proxy, which a proxy may echo.
    pub proxy_secrets: Vec<String>,
    /// The proxy that requests to `url` go through, redacted, for errors.
    pub proxy: Option<String>,
}

pub struct HecTransport {
    client: reqwest::Client,
    event_url: String,
    ack_url: String,
    headers: HeaderMap,
    /// The token and `Splunk <token>`, removed from response text in errors and reasons.
    redactor: Redactor,
    ack_timeout: Option<Duration>,
    max_batch_bytes: usize,
    /// The proxy that requests go through, redacted, for errors.
    proxy: Option<String>,
}

/// The fields of a HEC response this sink reads.
#[derive(Debug, Default)]
struct HecResponse {
    text: Option<String>,
    code: Option<u64>,
    /// `None` without the field, `Some(None)` when it is not a number of
    /// events (negative, fractional, beyond 64 bits or not a number).
    invalid_event_number: Option<Option<u64>>,
    ack_id: Option<u64>,
}

impl HecResponse {
    /// Reads the fields from a response body. Each field is read on its own,
    /// and a number may also come as a string of digits, so one field of an
    /// unexpected type does not hide the others. A body that is not a JSON
    /// object (cut off, HTML) has none.
    fn read(body: &[u8]) -> Self {
        let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
            return Self::default();
        };
        let number = |value: &Value| value.as_u64().or_else(|| value.as_str()?.trim().parse().ok());
        Self {
            text: fields.get("text").map(|text| text.as_str().map_or_else(|| text.to_string(), str::to_string)),
            code: fields.get("code").and_then(number),
            invalid_event_number: fields.get("invalid-event-number").map(number),
            ack_id: fields.get("ackId").and_then(number),
        }
    }
}

/// Returns whether the acknowledgement response `body` reports `ack_id`
/// indexed, or `None` when it has no `acks` object with a boolean (or the
/// string `true` or `false`) for it.
fn ack_indexed(body: &[u8], ack_id: u64) -> Option<bool> {
    let response: Value = serde_json::from_slice(body).ok()?;
    match response.get("acks")?.get(ack_id.to_string())? {
        Value::Bool(indexed) => Some(*indexed),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

impl HecTransport {
    /// `key` is the sink's config position, for errors.
    pub fn new(key: &str, settings: HecSettings, client: reqwest::Client) -> Result<Self, ConfigError> {
        let mut headers = HeaderMap::new();
        let authorization_text = format!("Splunk {}", settings.token.expose());
        let url_secrets = crate::redact::url_secrets(&settings.url);
        let tokens = [settings.token.expose(), authorization_text.as_str()];
        let url_parts = url_secrets.iter().chain(&settings.proxy_secrets).map(String::as_str);
        let redactor = Redactor::new(tokens.into_iter().chain(url_parts));
        let mut authorization = HeaderValue::from_str(&authorization_text).map_err(|_| {
            ConfigError::Invalid { key: format!("{key}.token"), message: "contains characters not allowed in HTTP headers".into() }
        })?;
        authorization.set_sensitive(true);
        headers.insert(AUTHORIZATION, authorization);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if settings.ack {
            let channel = HeaderValue::from_str(&new_channel()).map_err(|_| ConfigError::Invalid {
                key: format!("{key}.ack"),
                message: "cannot build the request channel header".into(),
            })?;
            headers.insert("x-splunk-request-channel", channel);
        }
        Ok(Self {
            client,
            event_url: format!("{}/services/collector/event", settings.url),
            ack_url: format!("{}/services/collector/ack", settings.url),
            headers,
            redactor,
            ack_timeout: settings.ack.then_some(settings.ack_timeout),
            max_batch_bytes: settings.max_batch_bytes,
            proxy: settings.proxy,
        })
    }

    pub fn max_batch_bytes(&self) -> usize {
        self.max_batch_bytes
    }

    pub async fn send(&mut self, batch: &Batch) -> Result<SendOutcome, SinkError> {
        match self.send_request(batch).await? {
            SendOutcome::Rejected { delivered, reason } if self.ack_timeout.is_some() && delivered > 0 => {
                self.confirm_accepted(batch, delivered, reason).await
            }
            outcome => Ok(outcome),
        }
    }

    /// Sends `batch` as one request. A [`SendOutcome::Rejected`] here means
    /// that HEC accepted the events before the rejected one, not that it
    /// indexed them: with `ack`, [`Self::confirm_accepted`] confirms them.
    async fn send_request(&self, batch: &Batch) -> Result<SendOutcome, SinkError> {
        let reply = self.post(&self.event_url, bytes::Bytes::from_owner(batch.shared_bytes())).await?;
        let parsed = HecResponse::read(&reply.body);
        match reply.status {
            status if status.is_success() => match self.ack_timeout {
                None => Ok(SendOutcome::Delivered),
                Some(limit) => {
                    let ack_id = parsed.ack_id.ok_or_else(|| {
                        self.bad_response(
                            &self.event_url,
                            &reply,
                            "no ackId although ack = true; a token with indexer acknowledgement off answers so: turn it on for the token, or set ack = false on this sink",
                        )
                    })?;
                    self.wait_for_ack(ack_id, limit).await
                }
            },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(SinkError::InvalidToken {
                url: crate::redact::url(&self.event_url),
                status: reply.status.as_u16(),
                body: reply.excerpt(&self.redactor),
            }),
            // A retryable status sends the whole batch again, even with an
            // event number: a repeat of the events before it, never a loss.
            status if is_retryable(status) => Err(reply.into_error(&self.event_url, &self.redactor)),
            StatusCode::PAYLOAD_TOO_LARGE => reply.too_large(&self.event_url, &self.redactor, batch.len(), batch.bytes().len()),
            // HEC rejects events with 400 only. Another status, such as a
            // 404 from a server that is not HEC, blames the request.
            status if status != StatusCode::BAD_REQUEST => Err(reply.request_rejected(&self.event_url, &self.redactor)),
            _ => {
                if let Some(error) = self.sink_fault(&self.event_url, &reply, &parsed) {
                    return Err(error);
                }
                let reason = reply.reason(&self.redactor);
                match (parsed.code, parsed.invalid_event_number) {
                    (_, Some(Some(index))) if index < batch.len() as u64 => {
                        Ok(SendOutcome::Rejected { delivered: index as usize, reason })
                    }
                    (_, Some(number)) => {
                        let number = number.map_or_else(|| "an invalid invalid-event-number".to_string(), |index| format!("event {index}"));
                        Err(self.bad_response(&self.event_url, &reply, &format!("HEC named {number} of a batch of {} as invalid", batch.len())))
                    }
                    (Some(_), None) => Ok(SendOutcome::AllRejected { reason }),
                    // A 400 without a code or an event number is not a HEC
                    // rejection: a proxy or another server sent it.
                    (None, None) => Err(reply.request_rejected(&self.event_url, &self.redactor)),
                }
            }
        }
    }

    /// Sends events `0..accepted` of `batch` again as a request of their own
    /// and waits for its acknowledgement, after HEC accepted them but
    /// rejected event `accepted` with `reason`. HEC returns no `ackId` with a
    /// rejection, so only this request can confirm them indexed, and Splunk
    /// may index them twice. An error sends the whole batch again.
    async fn confirm_accepted(&self, batch: &Batch, mut accepted: usize, mut reason: String) -> Result<SendOutcome, SinkError> {
        loop {
            let mut part = Batch::default();
            for message in batch.messages().take(accepted) {
                part.push_message(message);
            }
            match self.send_request(&part).await? {
                SendOutcome::Delivered => return Ok(SendOutcome::Rejected { delivered: accepted, reason }),
                // HEC now rejects an earlier event. That one becomes the
                // rejected event, and the events before it are confirmed in
                // turn. The events after it, the first rejected one too,
                // are sent again.
                SendOutcome::Rejected { delivered, reason: earlier } if delivered > 0 => {
                    accepted = delivered;
                    reason = earlier;
                }
                SendOutcome::Rejected { delivered, reason: earlier } => return Ok(SendOutcome::Rejected { delivered, reason: earlier }),
                // HEC rejected the whole part for good without naming an
                // event. Only its first event is rejected, so the others
                // are sent again instead of moving to dead letters untried.
                SendOutcome::AllRejected { reason: all } => return Ok(SendOutcome::Rejected { delivered: 0, reason: all }),
            }
        }
    }

    /// Returns the error for a rejection whose `code` is not one event's
    /// fault (see [`fault_of`]), or `None` when the code blames an event or
    /// the response has no code.
    fn sink_fault(&self, url: &str, reply: &Reply, parsed: &HecResponse) -> Option<SinkError> {
        let code = parsed.code?;
        let Fault::Sink { advice, needs_operator } = fault_of(code) else {
            return None;
        };
        let text = parsed.text.as_deref().map(|text| self.redactor.excerpt(text.as_bytes(), HEC_TEXT_BYTES)).unwrap_or_default();
        Some(SinkError::HecStatus { url: crate::redact::url(url), status: reply.status.as_u16(), code, text, advice, needs_operator })
    }

    async fn post(&self, url: &str, body: impl Into<reqwest::Body>) -> Result<Reply, SinkError> {
        let response = self
            .client
            .post(url)
            .headers(self.headers.clone())
            .body(body)
            .send()
            .await
            .map_err(|source| SinkError::http(url, self.proxy.as_deref(), source))?;
        Reply::read(response, url, self.proxy.as_deref()).await
    }

    /// Polls the acknowledgement endpoint until `ack_id` is indexed.
    ///
    /// A poll that fails in a way that may pass (a network error, 408, 429
    /// or 5xx) is repeated until the deadline: HEC has the events, and
    /// failing here would post them again, to be indexed twice.
    async fn wait_for_ack(&self, ack_id: u64, limit: Duration) -> Result<SendOutcome, SinkError> {
        let deadline = Instant::now() + limit;
        let query = format!("{{\"acks\":[{ack_id}]}}").into_bytes();
        let mut pause = ACK_POLL_FIRST;
        loop {
            let transient = match self.post(&self.ack_url, query.clone()).await {
                Ok(reply) if reply.status.is_success() || !is_retryable(reply.status) => Ok(reply),
                Ok(reply) => Err(reply.into_error(&self.ack_url, &self.redactor)),
                Err(error) => Err(error),
            };
            let reply = match transient {
                Ok(reply) => reply,
                Err(error) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(error);
                    }
                    tracing::debug!(url = %crate::redact::url(&self.ack_url), ack_id, error = %error, "acknowledgement poll failed; polling again");
                    tokio::time::sleep(pause.min(deadline - now)).await;
                    pause = (pause * 2).min(ACK_POLL_MAX);
                    continue;
                }
            };
            if reply.status.is_redirection() {
                return Err(reply.request_rejected(&self.ack_url, &self.redactor));
            }
            if !reply.status.is_success() {
                // Such as code 14 "ACK is disabled", for a token without acknowledgement.
                let parsed = HecResponse::read(&reply.body);
                let fault = self.sink_fault(&self.ack_url, &reply, &parsed);
                return Err(fault.unwrap_or_else(|| reply.into_error(&self.ack_url, &self.redactor)));
            }
            let indexed = ack_indexed(&reply.body, ack_id).ok_or_else(|| {
                self.bad_response(&self.ack_url, &reply, &format!("acknowledgement response without true or false for ackId {ack_id} in \"acks\""))
            })?;
            if indexed {
                return Ok(SendOutcome::Delivered);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(SinkError::AckTimeout { url: crate::redact::url(&self.ack_url), ack_id, secs: limit.as_secs() });
            }
            // The last poll happens at the deadline, not a pause before it.
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(ACK_POLL_MAX);
        }
    }

    fn bad_response(&self, url: &str, reply: &Reply, problem: &str) -> SinkError {
        SinkError::BadResponse {
            url: crate::redact::url(url),
            status: reply.status.as_u16(),
            body: format!("{problem}: {}", reply.excerpt(&self.redactor)),
        }
    }
}

/// The party that a HEC rejection blames, read from its status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// One event is malformed, so it is rejected for good.
    Event,
    /// The sink's config, its token or the receiver: nothing is rejected
    /// and the batch is sent again. `advice` is the fix for the operator,
    /// and `needs_operator` is false when the receiver may recover alone.
    Sink { advice: &'static str, needs_operator: bool },
}

/// Classifies a HEC status code. The codes 0 to 16 and their texts are
/// Splunk's, as HEC client libraries and Splunk admin tools list them.
/// Splunk sends 1 to 4 with HTTP 401 or 403 and 8 and 9 with 500 or 503,
/// which the sink handles before it reads a code.
fn fault_of(code: u64) -> Fault {
    let sink = |advice| Fault::Sink { advice, needs_operator: true };
    match code {
        // 6 "Invalid data format", 12 "Event field is required", 13 "Event
        // field cannot be blank", 15 "Error in handling indexed fields".
        6 | 12 | 13 | 15 => Fault::Event,
        // "Token disabled", "Token is required", "Invalid authorization", "Invalid token".
        1..=4 => sink("the token is missing, invalid or disabled: check the sink's token, token_file or token_env, and that the token is enabled in Splunk"),
        5 => sink("HEC found no data in a request that carried events: check that no proxy between the sink and HEC removes request bodies"),
        7 => sink("the index does not exist, or the token may not write to it: check the sink's index key against the token's allowed indexes in Splunk (without index, HEC uses the token's default index)"),
        // "Internal server error", "Server is busy".
        8 | 9 => Fault::Sink { advice: "the receiver failed or is busy, and may recover by itself", needs_operator: false },
        10 => sink("the token has indexer acknowledgement on, so HEC requires a request channel: set ack = true on this sink, or turn acknowledgement off for the token"),
        11 => sink("HEC rejected the X-Splunk-Request-Channel header of this sink: check that no proxy between them changes it"),
        14 => sink("the token has indexer acknowledgement off: set ack = false on this sink, or turn acknowledgement on for the token"),
        16 => sink("HEC rejects a token in the URL query: remove it from the sink's url, because the sink sends its token in the Authorization header"),
        // A code this release does not know may blame the whole sink, as 7
        // does. Dead-lettering would then move every detection out of the
        // queue, one request at a time, while retrying keeps them queued
        // and loses nothing.
        // NOTE: an unknown code that does blame one event blocks the sink
        // until a release classifies it.
        _ => sink("this release does not know that code, so it keeps the batch queued instead of dead-lettering detections that may not be at fault: look the code up in Splunk's HEC documentation"),
    }
}

/// Returns a random channel identifier in UUID form, new for each start of a sink.
fn new_channel() -> String {
    // RandomState is seeded from the OS random source once per process and
    // varied per instance, which is enough for a channel name.
    let word = || {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
        hasher.finish()
    };
    let bits = (u128::from(word()) << 64) | u128::from(word());
    let hex = format!("{bits:032x}");
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_that_blame_one_event() {
        for code in [6, 12, 13, 15] {
            assert_eq!(fault_of(code), Fault::Event, "code {code}");
        }
    }

    #[test]
    fn codes_that_blame_the_sink() {
        for code in [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 14, 16, 17, 99] {
            assert!(matches!(fault_of(code), Fault::Sink { .. }), "code {code}");
        }
        assert!(matches!(fault_of(7), Fault::Sink { needs_operator: true, .. }));
        assert!(matches!(fault_of(9), Fault::Sink { needs_operator: false, .. }));
    }

    #[test]
    fn channel_is_uuid_shaped_and_varies() {
        let a = new_channel();
        let b = new_channel();
        assert_eq!(a.len(), 36);
        assert_eq!(a.matches('-').count(), 4);
        assert_ne!(a, b);
    }
}
