//! The HTTP and Splunk HEC sinks end to end: the binary against the
//! emulator, sending to an in-process HTTP server that answers as a
//! collector or as HEC does.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::http_server::{hec_events, Answer, HttpReceiver};
use common::*;
use mde_forwarder::emulator::{sample_detections, EmulatorOptions};
use base64::Engine;
use serde_json::Value;

const HEC_TOKEN: &str = "11111111-hec-token-secret-2222";
const EVENT_PATH: &str = "/services/collector/event";
const ACK_PATH: &str = "/services/collector/ack";

/// Requests a receiver that rejects every request (HTTP 400) gets for the
/// 46 sample detections. Three times the batch is sent in halves down to
/// one rejected detection (46, 23, 11, 5, 2, 1, then 45 and 44 the same
/// way, 6 requests each). Then the sink sends one detection per request,
/// so the remaining 43 take 43 requests.
const ALL_REJECTED_REQUESTS: usize = 3 * 6 + 43;

fn hec_sink_toml(url: &str, extra: &str) -> String {
    format!(
        r#"
[[sink]]
name = "splunk"
type = "splunk_hec"
url = "{url}"
token = "{HEC_TOKEN}"
retry_initial_ms = 50
retry_max_secs = 1
{extra}
"#
    )
}

fn http_sink_toml(url: &str, extra: &str) -> String {
    format!(
        r#"
[[sink]]
name = "collector"
type = "http"
url = "{url}/ingest"
retry_initial_ms = 50
retry_max_secs = 1
{extra}
"#
    )
}

fn hec_ok() -> Answer {
    Answer::new(200, r#"{"text":"Success","code":0}"#)
}

/// FullIds of every event HEC accepted, with how often each was accepted.
fn accepted_hec_ids(receiver: &HttpReceiver, accepted: impl Fn(usize) -> bool) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for request in receiver.requests_to(EVENT_PATH) {
        if accepted(request.index) {
            for event in hec_events(&request.body) {
                *counts.entry(full_id_of(&event["event"])).or_insert(0) += 1;
            }
        }
    }
    counts
}

async fn run_with(sinks: &str) -> (tempfile::TempDir, std::process::Output) {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), sinks);
    let output = run_once(&config).await;
    (dir, output)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hec_sends_events_with_metadata() {
    let receiver = HttpReceiver::start(|_| hec_ok()).await;
    let (_dir, output) = run_with(&hec_sink_toml(&receiver.url(), "index = \"defender\"")).await;
    assert_success(&output);

    let requests = receiver.requests_to(EVENT_PATH);
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].header("authorization"), Some(format!("Splunk {HEC_TOKEN}").as_str()));
    assert!(requests[0].header("x-splunk-request-channel").is_none());
    let events = hec_events(&requests[0].body);
    assert_eq!(events.len(), 46);
    let samples: HashMap<String, Value> = sample_detections().into_iter().map(|d| (full_id_of(&d), d)).collect();
    for event in &events {
        let detection = &event["event"];
        let sample = &samples[&full_id_of(detection)];
        assert_eq!(event["source"], "mde-forwarder");
        assert_eq!(event["sourcetype"], "wdatp:alerts");
        assert_eq!(event["index"], "defender");
        assert_eq!(event["host"], sample["ComputerDnsName"]);
        let alert_time = chrono::DateTime::parse_from_rfc3339(detection["AlertTime"].as_str().unwrap()).unwrap();
        let time = event["time"].as_f64().unwrap();
        assert!((time - alert_time.timestamp_micros() as f64 / 1e6).abs() < 1e-3, "time {time} vs {alert_time}");
        for (key, value) in sample.as_object().unwrap() {
            if key != "AlertTime" && key != "LastProcessedTimeUtc" && key != "FirstEventTime" && key != "LastEventTime" {
                assert_eq!(&detection[key], value, "field {key}");
            }
        }
    }
    assert!(!stderr(&output).contains(HEC_TOKEN), "token logged");
}

/// HEC names the first event it rejected with `invalid-event-number`. With
/// a code that blames that event, or with no code, the events before it are
/// indexed, that one is rejected, and only the ones after it are sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hec_partial_rejection_dead_letters_one_event() {
    let answers = [
        (Some(6), "Invalid data format"),
        (Some(12), "Event field is required"),
        (Some(13), "Event field cannot be blank"),
        (Some(15), "Error in handling indexed fields"),
        (None, "Bad event"),
    ];
    for (code, text) in answers {
        let code_field = code.map(|code| format!(r#","code":{code}"#)).unwrap_or_default();
        let body = format!(r#"{{"text":"{text}"{code_field},"invalid-event-number":5}}"#);
        let receiver = HttpReceiver::start(move |request| if request.index == 0 { Answer::new(400, body.clone()) } else { hec_ok() }).await;
        let (dir, output) = run_with(&hec_sink_toml(&receiver.url(), "")).await;
        assert_dead_letters_stored(&output);

        let requests = receiver.requests_to(EVENT_PATH);
        assert_eq!(requests.len(), 2, "code {code:?}");
        let first = hec_events(&requests[0].body);
        let second = hec_events(&requests[1].body);
        assert_eq!(first.len(), 46, "code {code:?}");
        assert_eq!(second.len(), 40, "code {code:?}: only the events after the rejected one are sent again");
        let rejected = full_id_of(&first[5]["event"]);
        let mut delivered: Vec<String> = first[..5].iter().chain(&second).map(|e| full_id_of(&e["event"])).collect();
        delivered.sort();
        delivered.dedup();
        assert_eq!(delivered.len(), 45, "code {code:?}");
        assert!(!delivered.contains(&rejected), "code {code:?}");

        let letters = dead_letters(dir.path());
        assert_eq!(letters.len(), 1, "code {code:?}");
        assert_eq!(letters[0].sink, "splunk");
        let letter: Value = serde_json::from_str(&letters[0].detection).unwrap();
        assert_eq!(full_id_of(&letter), rejected, "code {code:?}");
        assert!(letters[0].reason.contains("HTTP 400"), "{}", letters[0].reason);
        assert!(letters[0].reason.contains(text), "{}", letters[0].reason);
        assert_eq!(pending(dir.path(), "splunk"), 0, "code {code:?}");
    }
}

/// FullIds of the detections in a HEC request body, in order.
fn hec_full_ids(request: &common::http_server::Recorded) -> Vec<String> {
    hec_events(&request.body).iter().map(|event| full_id_of(&event["event"])).collect()
}

/// Starts a HEC receiver that rejects the first event requests with the
/// HTTP 400 bodies of `rejections`, in turn, and returns an `ackId` for
/// later ones, which its acknowledgement endpoint reports indexed at once.
async fn hec_rejecting_then_acking(rejections: Vec<&'static str>) -> HttpReceiver {
    let posts = AtomicUsize::new(0);
    HttpReceiver::start(move |request| match request.path.as_str() {
        EVENT_PATH => {
            let n = posts.fetch_add(1, Ordering::SeqCst);
            match rejections.get(n) {
                Some(body) => Answer::new(400, *body),
                None => Answer::new(200, format!(r#"{{"text":"Success","code":0,"ackId":{n}}}"#)),
            }
        }
        ACK_PATH => {
            let query: Value = serde_json::from_slice(&request.body).unwrap();
            let id = query["acks"][0].as_u64().unwrap();
            Answer::new(200, format!(r#"{{"acks":{{"{id}":true}}}}"#))
        }
        _ => Answer::new(404, ""),
    })
    .await
}

/// With `ack`, the events HEC accepted before the one it rejected count as
/// delivered only after a request of their own is acknowledged: the 400
/// carries no `ackId`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hec_ack_confirms_events_before_rejected() {
    let receiver = hec_rejecting_then_acking(vec![r#"{"text":"Invalid data format","code":6,"invalid-event-number":5}"#]).await;
    let (dir, output) = run_with(&hec_sink_toml(&receiver.url(), "ack = true\nack_timeout_secs = 10")).await;
    assert_dead_letters_stored(&output);

    let events = receiver.requests_to(EVENT_PATH);
    assert_eq!(events.len(), 3, "the batch, its accepted events again, the rest");
    let first = hec_full_ids(&events[0]);
    assert_eq!(first.len(), 46);
    assert_eq!(hec_full_ids(&events[1]), first[..5], "the accepted events are sent again alone");
    assert_eq!(hec_full_ids(&events[2]), first[6..], "the events after the rejected one are sent again");

    let acks = receiver.requests_to(ACK_PATH);
    let first_ack = acks.iter().find(|ack| ack.text().contains("[1]")).expect("ackId 1 of the accepted events is polled");
    assert!(first_ack.index < events[2].index, "the accepted events are confirmed before the rest is sent");

    let letters = dead_letters(dir.path());
    assert_eq!(letters.len(), 1);
    let letter: Value = serde_json::from_str(&letters[0].detection).unwrap();
    assert_eq!(full_id_of(&letter), first[5]);
    assert!(letters[0].reason.contains("Invalid data format"), "{}", letters[0].reason);
    assert_eq!(pending(dir.path(), "splunk"), 0);
}

/// With `ack`, HEC may reject the resent accepted events too. An event it
/// names then becomes the dead letter instead, and a rejection that names
/// none makes only the first event one: everything after it is sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hec_ack_resent_events_rejected_again() {
    let named = r#"{"text":"Invalid data format","code":6,"invalid-event-number":2}"#;
    let unnamed = r#"{"text":"Invalid data format","code":6}"#;
    // The response to the resent events, the dead letter's position in the
    // batch, and the sizes of the event requests.
    let cases = [(named, 2, vec![46, 5, 2, 43]), (unnamed, 0, vec![46, 5, 45])];
    for (answer, rejected, sizes) in cases {
        let receiver = hec_rejecting_then_acking(vec![r#"{"text":"Invalid data format","code":6,"invalid-event-number":5}"#, answer]).await;
        let (dir, output) = run_with(&hec_sink_toml(&receiver.url(), "ack = true\nack_timeout_secs = 10")).await;
        assert_dead_letters_stored(&output);

        let events = receiver.requests_to(EVENT_PATH);
        let first = hec_full_ids(&events[0]);
        let sent: Vec<usize> = events.iter().map(|request| hec_full_ids(request).len()).collect();
        assert_eq!(sent, sizes, "{answer}");
        assert_eq!(hec_full_ids(events.last().unwrap()), first[rejected + 1..], "{answer}: the events after the dead letter are sent again");

        let letters = dead_letters(dir.path());
        assert_eq!(letters.len(), 1, "{answer}");
        let letter: Value = serde_json::from_str(&letters[0].detection).unwrap();
        assert_eq!(full_id_of(&letter), first[rejected], "{answer}");
        assert_eq!(pending(dir.path(), "splunk"), 0, "{answer}");
    }
}

/// With `ack`, events HEC accepted before a rejected one but never
/// acknowledged are not delivered, and the rejected one is not
/// dead-lettered yet: the whole batch stays queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hec_ack_unconfirmed_events_stay_queued() {
    let receiver = HttpReceiver::start(|request| match request.path.as_str() {
        EVENT_PATH if hec_events(&request.body).len() == 46 => {
            Answer::new(400, r#"{"text":"Invalid data format","code":6,"invalid-event-number":5}"#)
        }
        EVENT_PATH => Answer::new(200, r#"{"text":"Success","code":0,"ackId":1}"#),
        ACK_PATH => Answer::new(200, r#"{"acks":{"1":false}}"#),
        _ => Answer::new(404, ""),
    })
    .await;
    let (dir, output) = run_with(&hec_sink_toml(&receiver.url(), "ack = true\nack_timeout_secs = 1")).await;
    assert_eq!(output.status.code(), Some(1), "stderr:\n{}", stderr(&output));

    let events = receiver.requests_to(EVENT_PATH);
    assert_eq!(events.len(), 10, "5 attempts of the batch and of its accepted events");
    for pair in events.chunks(2) {
        let whole = hec_full_ids(&pair[0]);
        assert_eq!(whole.len(), 46);
        assert_eq!(hec_full_ids(&pair[1]), whole[..5]);
    }
    assert!(dead_letters(dir.path()).is_empty(), "nothing is dead-lettered before the events before it are confirmed");
    assert_eq!(pending(dir.path(), "splunk"), 46, "nothing counts as delivered");
    assert!(stderr(&output).contains("did not acknowledge ackId 1"), "{}", stderr(&output));
}

/// A HEC code that blames the sink's config or the receiver, not an event,
/// dead-letters nothing: the batch is sent again, and an ERROR names the
/// code, HEC's text and the fix. Unknown codes are treated the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hec_sink_fault_codes_retry_batch() {
    let answers = [
        (5, "No data", Some(0), "removes request bodies"),
        (7, "Incorrect index", Some(0), "check the sink's index key"),
        (7, "Incorrect index", None, "check the sink's index key"),
        (10, "Data channel is missing", Some(0), "set ack = true"),
        (11, "Invalid data channel", Some(0), "X-Splunk-Request-Channel"),
        (14, "ACK is disabled", Some(0), "set ack = false"),
        (16, "Query string authorization is not enabled", Some(0), "remove it from the sink's url"),
        (42, "Some future error", Some(5), "does not know that code"),
    ];
    for (code, text, event_number, advice) in answers {
        let number = event_number.map(|n| format!(r#","invalid-event-number":{n}"#)).unwrap_or_default();
        let body = format!(r#"{{"text":"{text}","code":{code}{number}}}"#);
        let (dir, output) = hec_retried_twice(400, body, &format!("code {code}")).await;
        assert_eq!(pending(dir.path(), "splunk"), 0, "code {code}");

        let log = stderr(&output);
        let error_lines: Vec<&str> = log.lines().filter(|l| l.contains("ERROR") && l.contains("splunk")).collect();
        assert_eq!(error_lines.len(), 1, "code {code}: {log}");
        assert!(error_lines[0].contains(&format!("code {code} \"{text}\"")), "code {code}: {log}");
        assert!(error_lines[0].contains(advice), "code {code}: {log}");
    }
}

/// Responses that are not a HEC rejection of an event, or that contradict
/// the batch, are retried: a field of an odd type, a body cut off or not
/// JSON, a 404 page, an event number outside the batch. None moves a
/// detection to dead letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hec_odd_answers_retry_batch() {
    let huge = format!(r#"{{"text":"Incorrect index","code":7,"padding":"{}"}}"#, "x".repeat(300_000));
    let answers: Vec<(u16, String, &str)> = vec![
        (400, r#"{"text":"Incorrect index","code":"7","invalid-event-number":0}"#.into(), "check the sink's index key"),
        (400, r#"{"text":"Incorrect index","code":7,"invalid-event-number":-1}"#.into(), "check the sink's index key"),
        (400, r#"{"text":7,"code":7}"#.into(), "check the sink's index key"),
        (400, r#"{"text":"Invalid data format","code":6,"invalid-event-number":99999999999999999999999}"#.into(), "an invalid invalid-event-number"),
        (400, r#"{"text":"Invalid data format","code":6,"invalid-event-number":99}"#.into(), "HEC named event 99 of a batch of 46"),
        (400, huge, "not a detection in it"),
        (400, "<html>bad request</html>".into(), "an HTML page answered instead of the collector"),
        (404, "<html><body>Not Found</body></html>".into(), "check the sink's url"),
        (405, "".into(), "check the sink's url"),
    ];
    for (status, body, advice) in answers {
        let case = format!("{status} {}", &body[..body.len().min(80)]);
        let (_dir, output) = hec_retried_twice(status, body, &case).await;
        let log = stderr(&output);
        assert!(log.contains(advice), "{case}: {log}");
    }
}

/// Runs `--once` against a HEC receiver that returns `status` and `body` to
/// the first two event requests and accepts the third. Checks that the
/// whole batch was sent each time and nothing became a dead letter.
async fn hec_retried_twice(status: u16, body: String, case: &str) -> (tempfile::TempDir, std::process::Output) {
    let receiver = HttpReceiver::start(move |request| if request.index < 2 { Answer::new(status, body.clone()) } else { hec_ok() }).await;
    let (dir, output) = run_with(&hec_sink_toml(&receiver.url(), "")).await;
    assert_success(&output);

    let requests = receiver.requests_to(EVENT_PATH);
    assert_eq!(requests.len(), 3, "{case}");
    for request in &requests {
        assert_eq!(hec_events(&request.body).len(), 46, "{case}: the whole batch is sent each time");
    }
    assert!(dead_letters(dir.path()).is_empty(), "{case}");
    (dir, output)
}

/// A HEC token with indexer acknowledgement off returns 200 without an
/// `ackId`: the error names the fix. `"true"` as a string counts as true.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hec_ack_answers_read_leniently() {
    let receiver = HttpReceiver::start(|request| match request.path.as_str() {
        EVENT_PATH if request.index == 0 => hec_ok(),
        EVENT_PATH => Answer::new(200, r#"{"text":"Success","code":0,"ackId":"3"}"#),
        ACK_PATH => Answer::new(200, r#"{"acks":{"3":"true"}}"#),
        _ => Answer::new(404, ""),
    })
    .await;
    let (dir, output) = run_with(&hec_sink_toml(&receiver.url(), "ack = true\nack_timeout_secs = 5")).await;
    assert_success(&output);
    let log = stderr(&output);
    assert!(log.contains("no ackId although ack = true"), "{log}");
    assert!(log.contains("set ack = false on this sink"), "{log}");
    assert_eq!(receiver.requests_to(ACK_PATH).len(), 1, "{log}");
    assert_eq!(pending(dir.path(), "splunk"), 0);
}

/// An index that does not exist, or that the token may not write to, is no
/// detection's fault: `run --once` gives up with every detection still
/// queued, none delivered and none dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hec_incorrect_index_keeps_detections_queued() {
    let receiver = HttpReceiver::start(|_| Answer::new(400, r#"{"text":"Incorrect index","code":7,"invalid-event-number":0}"#)).await;
    let (dir, output) = run_with(&hec_sink_toml(&receiver.url(), "index = \"missing\"")).await;
    assert_eq!(output.status.code(), Some(1), "stderr:\n{}", stderr(&output));

    let requests = receiver.requests_to(EVENT_PATH);
    assert_eq!(requests.len(), 5, "one request per attempt");
    for request in &requests {
        assert_eq!(hec_events(&request.body).len(), 46);
    }
    assert!(dead_letters(dir.path()).is_empty());
    assert_eq!(pending(dir.path(), "splunk"), 46);
    assert!(stderr(&output).contains("check the sink's index key"), "{}", stderr(&output));
}

/// HEC rejects an acknowledgement query with code 14 when the token has
/// acknowledgement off. The error names the fix, and the batch is sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hec_ack_disabled_names_the_fix() {
    let ack_queries = Arc::new(AtomicUsize::new(0));
    let queries = ack_queries.clone();
    let receiver = HttpReceiver::start(move |request| match request.path.as_str() {
        EVENT_PATH => Answer::new(200, r#"{"text":"Success","code":0,"ackId":1}"#),
        ACK_PATH if queries.fetch_add(1, Ordering::SeqCst) == 0 => Answer::new(400, r#"{"text":"ACK is disabled","code":14}"#),
        ACK_PATH => Answer::new(200, r#"{"acks":{"1":true}}"#),
        _ => Answer::new(404, ""),
    })
    .await;
    let (dir, output) = run_with(&hec_sink_toml(&receiver.url(), "ack = true\nack_timeout_secs = 10")).await;
    assert_success(&output);

    let events = receiver.requests_to(EVENT_PATH);
    assert_eq!(events.len(), 2, "the batch is sent again");
    assert_eq!(hec_events(&events[1].body).len(), 46);
    assert!(dead_letters(dir.path()).is_empty());
    let log = stderr(&output);
    assert!(log.contains("set ack = false on this sink"), "{log}");
}

/// An acknowledgement poll that fails in a way that may pass is repeated:
/// HEC has the events, so posting them again would index them twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hec_ack_poll_failure_posts_once() {
    let ack_queries = Arc::new(AtomicUsize::new(0));
    let queries = ack_queries.clone();
    let receiver = HttpReceiver::start(move |request| match request.path.as_str() {
        EVENT_PATH => Answer::new(200, r#"{"text":"Success","code":0,"ackId":1}"#),
        ACK_PATH => match queries.fetch_add(1, Ordering::SeqCst) {
            0 => Answer::new(503, r#"{"text":"Server is busy","code":9}"#),
            1 => Answer::new(429, "slow down"),
            _ => Answer::new(200, r#"{"acks":{"1":true}}"#),
        },
        _ => Answer::new(404, ""),
    })
    .await;
    let (_dir, output) = run_with(&hec_sink_toml(&receiver.url(), "ack = true\nack_timeout_secs = 10")).await;
    assert_success(&output);

    assert_eq!(receiver.requests_to(EVENT_PATH).len(), 1, "the events are posted once");
    assert_eq!(receiver.requests_to(ACK_PATH).len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hec_server_busy_is_retried() {
    let receiver = HttpReceiver::start(|request| {
        if request.index < 2 {
            Answer::new(503, r#"{"text":"Server is busy","code":9}"#)
        } else {
            hec_ok()
        }
    })
    .await;
    let (dir, output) = run_with(&hec_sink_toml(&receiver.url(), "")).await;
    assert_success(&output);

    assert_eq!(receiver.requests_to(EVENT_PATH).len(), 3);
    let accepted = accepted_hec_ids(&receiver, |index| index == 2);
    assert_eq!(accepted.len(), 46);
    assert!(dead_letters(dir.path()).is_empty());
    assert!(stderr(&output).contains("503"), "{}", stderr(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hec_invalid_token_retried_with_error() {
    let receiver = HttpReceiver::start(|request| {
        if request.index < 2 {
            Answer::new(403, r#"{"text":"Invalid token","code":4}"#)
        } else {
            hec_ok()
        }
    })
    .await;
    let (dir, output) = run_with(&hec_sink_toml(&receiver.url(), "")).await;
    assert_success(&output);

    let log = stderr(&output);
    let error_lines: Vec<&str> = log.lines().filter(|l| l.contains("ERROR") && l.contains("splunk")).collect();
    // The second identical error falls inside the repeat window and is only counted.
    assert_eq!(error_lines.len(), 1, "{log}");
    assert!(error_lines[0].contains("check the sink's token"), "{log}");
    assert!(!log.contains(HEC_TOKEN), "token logged");
    assert!(dead_letters(dir.path()).is_empty(), "an invalid token is not the events' fault");
    assert_eq!(accepted_hec_ids(&receiver, |index| index == 2).len(), 46);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hec_ack_polls_until_indexed() {
    let polls = Arc::new(AtomicUsize::new(0));
    let seen = polls.clone();
    let receiver = HttpReceiver::start(move |request| match request.path.as_str() {
        EVENT_PATH => Answer::new(200, r#"{"text":"Success","code":0,"ackId":7}"#),
        ACK_PATH => {
            let done = seen.fetch_add(1, Ordering::SeqCst) >= 2;
            Answer::new(200, format!(r#"{{"acks":{{"7":{done}}}}}"#))
        }
        _ => Answer::new(404, ""),
    })
    .await;
    let (_dir, output) = run_with(&hec_sink_toml(&receiver.url(), "ack = true\nack_timeout_secs = 10")).await;
    assert_success(&output);

    let events = receiver.requests_to(EVENT_PATH);
    let acks = receiver.requests_to(ACK_PATH);
    assert_eq!(events.len(), 1);
    assert_eq!(acks.len(), 3);
    let channel = events[0].header("x-splunk-request-channel").expect("channel header").to_string();
    assert_eq!(channel.len(), 36);
    for ack in &acks {
        assert_eq!(ack.header("x-splunk-request-channel"), Some(channel.as_str()));
        assert_eq!(ack.header("authorization"), Some(format!("Splunk {HEC_TOKEN}").as_str()));
        assert_eq!(serde_json::from_slice::<Value>(&ack.body).unwrap(), serde_json::json!({"acks": [7]}));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hec_ack_timeout_resends_batch() {
    let receiver = HttpReceiver::start(|request| {
        let event_posts_before = request.index;
        match request.path.as_str() {
            // The first batch gets ackId 1, which is never indexed; the
            // batch sent again gets ackId 2, which is.
            EVENT_PATH if event_posts_before == 0 => Answer::new(200, r#"{"text":"Success","code":0,"ackId":1}"#),
            EVENT_PATH => Answer::new(200, r#"{"text":"Success","code":0,"ackId":2}"#),
            ACK_PATH if request.text().contains("[1]") => Answer::new(200, r#"{"acks":{"1":false}}"#),
            ACK_PATH => Answer::new(200, r#"{"acks":{"2":true}}"#),
            _ => Answer::new(404, ""),
        }
    })
    .await;
    let started = Instant::now();
    let (_dir, output) = run_with(&hec_sink_toml(&receiver.url(), "ack = true\nack_timeout_secs = 1")).await;
    assert_success(&output);

    assert!(started.elapsed() >= Duration::from_secs(1));
    let events = receiver.requests_to(EVENT_PATH);
    assert_eq!(events.len(), 2, "the unacknowledged batch is sent again");
    assert_eq!(hec_events(&events[1].body).len(), 46);
    assert!(stderr(&output).contains("did not acknowledge ackId 1"), "{}", stderr(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_json_array_with_headers_and_gzip() {
    let receiver = HttpReceiver::start(|_| Answer::new(200, "ok")).await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("api-key");
    std::fs::write(&key_file, "from-file-secret\n").unwrap();
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let extra = format!(
        "gzip = true\nheaders = {{ \"X-Literal\" = \"literal-value\" }}\nheaders_from_files = {{ \"Authorization\" = \"{}\" }}\nheaders_from_env = {{ \"X-From-Env\" = \"MDE_TEST_HEADER\" }}",
        key_file.display()
    );
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &http_sink_toml(&receiver.url(), &extra));
    let output = run_cli_env(&["run", "--once", "--config", config.to_str().unwrap()], &[("MDE_TEST_HEADER", "env-secret")]).await;
    assert_success(&output);

    let requests = receiver.requests_to("/ingest");
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert!(request.gzipped);
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(request.header("x-literal"), Some("literal-value"));
    assert_eq!(request.header("authorization"), Some("from-file-secret"));
    assert_eq!(request.header("x-from-env"), Some("env-secret"));
    let body: Vec<Value> = serde_json::from_slice(&request.body).unwrap();
    let mut ids = full_ids(&body);
    ids.sort();
    let mut expected = sample_full_ids();
    expected.sort();
    assert_eq!(ids, expected);
    let log = stderr(&output);
    for secret in ["literal-value", "from-file-secret", "env-secret"] {
        assert!(!log.contains(secret), "{secret} logged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_ndjson_body() {
    let receiver = HttpReceiver::start(|_| Answer::new(204, "")).await;
    let (_dir, output) = run_with(&http_sink_toml(&receiver.url(), "body_format = \"ndjson\"")).await;
    assert_success(&output);

    let requests = receiver.requests_to("/ingest");
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].header("content-type"), Some("application/x-ndjson"));
    assert!(!requests[0].gzipped);
    let text = requests[0].text();
    assert!(text.ends_with('\n'));
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 46);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_client_error_dead_letters_batch() {
    for status in [400, 422] {
        let long_body = format!("schema mismatch: {}", "x".repeat(5000));
        let answer_body = long_body.clone();
        let receiver = HttpReceiver::start(move |_| Answer::new(status, answer_body.clone())).await;
        let (dir, output) = run_with(&http_sink_toml(&receiver.url(), "")).await;
        assert_dead_letters_stored(&output);

        assert_eq!(receiver.requests_to("/ingest").len(), ALL_REJECTED_REQUESTS, "{status}");
        let letters = dead_letters(dir.path());
        assert_eq!(letters.len(), 46);
        for letter in &letters {
            assert_eq!(letter.sink, "collector");
            assert!(letter.reason.starts_with(&format!("HTTP {status}: schema mismatch: xxx")), "{}", letter.reason);
            assert!(letter.reason.len() < 1100, "reason is {} bytes", letter.reason.len());
        }
        assert_eq!(pending(dir.path(), "collector"), 0);
    }
}

/// A collector that rejects one detection with a 400 (naming none) gets the
/// batch in halves: only that detection becomes a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_400_dead_letters_only_the_rejected_detection() {
    let bad = sample_full_ids()[17].clone();
    let needle = bad.clone();
    let receiver = HttpReceiver::start(move |request| {
        if request.text().contains(&needle) { Answer::new(400, "schema mismatch") } else { Answer::new(200, "ok") }
    })
    .await;
    let (dir, output) = run_with(&http_sink_toml(&receiver.url(), "body_format = \"ndjson\"")).await;
    assert_dead_letters_stored(&output);

    let letters = dead_letters(dir.path());
    assert_eq!(letters.iter().map(|l| full_id_of(&serde_json::from_str(&l.detection).unwrap())).collect::<Vec<_>>(), [bad.clone()]);
    let mut accepted: Vec<String> = receiver
        .requests_to("/ingest")
        .iter()
        .filter(|r| !r.text().contains(&bad))
        .flat_map(|r| r.text().lines().map(|l| full_id_of(&serde_json::from_str(l).unwrap())).collect::<Vec<_>>())
        .collect();
    let mut expected = sample_full_ids();
    expected.retain(|id| *id != bad);
    accepted.sort();
    expected.sort();
    assert_eq!(accepted, expected, "every other detection delivered once");
}

/// A receiver with a size limit (413) that also rejects one detection (400):
/// the halves sent to find that detection teach no size limit, so the
/// detections after it still go in batches, not one per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_400_halving_learns_no_size_limit() {
    let bad = sample_full_ids()[5].clone();
    let needle = bad.clone();
    let receiver = HttpReceiver::start(move |request| {
        if request.body.len() > 40_000 {
            Answer::new(413, "too large")
        } else if request.text().contains(&needle) {
            Answer::new(400, "schema mismatch")
        } else {
            Answer::new(200, "ok")
        }
    })
    .await;
    let (dir, output) = run_with(&http_sink_toml(&receiver.url(), "body_format = \"ndjson\"")).await;
    assert_dead_letters_stored(&output);

    assert_eq!(dead_letters(dir.path()).len(), 1);
    let accepted_alone = receiver.requests_to("/ingest").iter().filter(|r| r.text().lines().count() == 1 && !r.text().contains(&bad)).count();
    assert!(accepted_alone <= 2, "{accepted_alone} detections went alone: {}", stderr(&output));
}

/// A 400 that is an HTML page comes from a proxy or web server in front of
/// the collector: nothing is dead-lettered and the batch stays queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn html_400_page_dead_letters_nothing() {
    let page = "<!DOCTYPE html>\n<html><head><title>400 Bad Request</title></head><body>The plain HTTP request was sent to HTTPS port</body></html>";
    let receiver = HttpReceiver::start(move |_| Answer::new(400, page)).await;
    let (dir, output) = run_with(&http_sink_toml(&receiver.url(), "")).await;

    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("an HTML page answered instead of the collector"), "{}", stderr(&output));
    assert!(dead_letters(dir.path()).is_empty());
    assert_eq!(pending(dir.path(), "collector"), 46);
}

/// A redirect is not followed: a POST turned into a GET whose 200 counted
/// as delivered lost the batch. It is retried with an error that names
/// where it points, for HTTP and HEC sinks alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_redirects_not_followed() {
    for status in [301, 302, 303, 307, 308] {
        let receiver = HttpReceiver::start(move |request| {
            if request.path == "/moved" {
                Answer::new(200, r#"{"text":"Success","code":0}"#)
            } else {
                Answer::new(status, "").with_header("location", "/moved")
            }
        })
        .await;
        for sink in [http_sink_toml(&receiver.url(), ""), hec_sink_toml(&receiver.url(), "")] {
            let (dir, output) = run_with(&sink).await;
            assert_eq!(output.status.code(), Some(1), "{status}: {}", stderr(&output));
            assert!(receiver.requests_to("/moved").is_empty(), "{status}: the redirect was followed");
            assert!(dead_letters(dir.path()).is_empty(), "{status}");
            let name = if sink.contains("splunk_hec") { "splunk" } else { "collector" };
            assert_eq!(pending(dir.path(), name), 46, "{status}");
            let log = stderr(&output);
            assert!(log.contains(&format!("redirected the request (HTTP {status}) to /moved")), "{status}: {log}");
        }
    }
}

/// A redirect from the acknowledgement endpoint is not followed either: the
/// batch stays queued and the ERROR names where it points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hec_ack_redirect_not_followed() {
    let receiver = HttpReceiver::start(|request| match request.path.as_str() {
        EVENT_PATH => Answer::new(200, r#"{"text":"Success","code":0,"ackId":1}"#),
        ACK_PATH => Answer::new(307, "").with_header("location", "/elsewhere"),
        _ => Answer::new(200, r#"{"acks":{"1":true}}"#),
    })
    .await;
    let (dir, output) = run_with(&hec_sink_toml(&receiver.url(), "ack = true\nack_timeout_secs = 5")).await;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(receiver.requests_to("/elsewhere").is_empty(), "the redirect was followed");
    assert_eq!(pending(dir.path(), "splunk"), 46);
    let log = stderr(&output);
    assert!(log.contains("redirected the request (HTTP 307) to /elsewhere"), "{log}");
}

/// A status that rejects the request (credentials, URL, body format) is the
/// sink's to fix: the batch stays queued, with an ERROR that names the fix,
/// instead of every detection moving to dead letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_request_errors_keep_batch() {
    let cases = [
        (401, "check the sink's token or headers"),
        (403, "check the sink's token or headers"),
        (404, "check the sink's url"),
        (405, "check the sink's url"),
        (415, "check the sink's body_format and gzip"),
        (418, "not a detection in it"),
    ];
    for (status, advice) in cases {
        let receiver = HttpReceiver::start(move |_| Answer::new(status, "no")).await;
        let (dir, output) = run_with(&http_sink_toml(&receiver.url(), "")).await;
        assert_eq!(output.status.code(), Some(1), "{status}: {}", stderr(&output));

        assert_eq!(receiver.requests_to("/ingest").len(), 5, "{status}: one request per attempt");
        assert!(dead_letters(dir.path()).is_empty(), "{status}");
        assert_eq!(pending(dir.path(), "collector"), 46, "{status}");
        let log = stderr(&output);
        assert!(log.contains(&format!("HTTP {status}: no;")), "{status}: {log}");
        assert!(log.contains(advice), "{status}: {log}");
        assert!(log.contains("No detection is dead-lettered for it"), "{status}: {log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_throttling_honours_retry_after() {
    let receiver = HttpReceiver::start(|request| {
        if request.index == 0 {
            Answer::new(429, "slow down").with_header("retry-after", "2")
        } else {
            Answer::new(200, "ok")
        }
    })
    .await;
    let started = Instant::now();
    let (dir, output) = run_with(&http_sink_toml(&receiver.url(), "")).await;
    assert_success(&output);

    assert!(started.elapsed() >= Duration::from_secs(2), "retried before Retry-After");
    let requests = receiver.requests_to("/ingest");
    assert_eq!(requests.len(), 2);
    assert!(dead_letters(dir.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_server_error_then_success() {
    let receiver = HttpReceiver::start(|request| {
        if request.index == 0 {
            Answer::new(500, "internal error")
        } else {
            Answer::new(200, "ok")
        }
    })
    .await;
    let (dir, output) = run_with(&http_sink_toml(&receiver.url(), "")).await;
    assert_success(&output);

    let requests = receiver.requests_to("/ingest");
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].body, requests[1].body, "the same batch is sent again");
    assert!(dead_letters(dir.path()).is_empty());
    assert!(stderr(&output).contains("HTTP 500"), "{}", stderr(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_batches_stay_under_max_batch_bytes() {
    let receiver = HttpReceiver::start(|_| Answer::new(200, "ok")).await;
    let (_dir, output) = run_with(&http_sink_toml(&receiver.url(), "max_batch_bytes = 4096")).await;
    assert_success(&output);

    let requests = receiver.requests_to("/ingest");
    assert!(requests.len() > 5, "{} requests", requests.len());
    let mut ids = Vec::new();
    for request in &requests {
        let body: Vec<Value> = serde_json::from_slice(&request.body).unwrap();
        assert!(request.body.len() <= 4096 + 2 || body.len() == 1, "{} bytes for {} detections", request.body.len(), body.len());
        ids.extend(full_ids(&body));
    }
    ids.sort();
    let mut expected = sample_full_ids();
    expected.sort();
    assert_eq!(ids, expected, "every detection once");
}

/// An answer whose body repeats the request headers, as a receiver that
/// echoes the request in its errors does.
fn echo_headers(status: u16, request: &common::http_server::Recorded) -> Answer {
    let mut body = String::from("rejected request with headers:\n");
    for (name, value) in &request.headers {
        body.push_str(&format!("{name}: {value}\n"));
    }
    Answer::new(status, body)
}

/// Runs `--once` with the given log format and returns the output and the
/// `state dead-letters` listing.
async fn run_echoed(dir: &std::path::Path, sinks: &str, log_format: &str, env: &[(&str, &str)]) -> (std::process::Output, String) {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let config = write_config(dir, "", &tenant_toml("contoso", TENANT_ID, &emulator), sinks);
    let cfg = config.to_str().unwrap();
    let output = run_cli_env(&["--log-format", log_format, "run", "--once", "--config", cfg], env).await;
    let letters = run_cli(&["state", "--config", cfg, "dead-letters"]).await;
    assert_success(&letters);
    (output, stdout(&letters))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_echoed_headers_redacted() {
    const LITERAL: &str = "literal-secret-value-1";
    const FROM_FILE: &str = "Bearer file-secret-value-2";
    const FROM_ENV: &str = "env-secret-value-3";
    for log_format in ["text", "json"] {
        // A retried 500 goes to the log, the final 400 to the dead letters.
        let receiver = HttpReceiver::start(|request| echo_headers(if request.index == 0 { 500 } else { 400 }, request)).await;
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("api-key");
        std::fs::write(&key_file, format!("{FROM_FILE}\n")).unwrap();
        let extra = format!(
            "headers = {{ \"X-Literal\" = \"{LITERAL}\" }}\nheaders_from_files = {{ \"Authorization\" = \"{}\" }}\nheaders_from_env = {{ \"X-From-Env\" = \"MDE_TEST_HEADER\" }}",
            key_file.display()
        );
        let sinks = http_sink_toml(&receiver.url(), &extra);
        let (output, letters) = run_echoed(dir.path(), &sinks, log_format, &[("MDE_TEST_HEADER", FROM_ENV)]).await;
        assert_dead_letters_stored(&output);

        let requests = receiver.requests_to("/ingest");
        assert_eq!(requests.len(), 1 + ALL_REJECTED_REQUESTS, "{log_format}");
        assert_eq!(requests[1].header("x-literal"), Some(LITERAL), "the receiver saw the secret");
        let log = stderr(&output);
        assert!(log.contains("HTTP 500"), "{log_format}: {log}");
        assert!(log.contains("[redacted]"), "{log_format}: {log}");
        // A header line, then one row per detection.
        assert_eq!(letters.lines().count(), 1 + 46, "{letters}");
        assert!(letters.contains("HTTP 400: rejected request with headers"), "{letters}");
        assert!(letters.contains("x-literal: [redacted]"), "{letters}");
        assert!(letters.contains("authorization: [redacted]"), "{letters}");
        for secret in [LITERAL, "file-secret-value-2", FROM_ENV] {
            assert!(!log.contains(secret), "{log_format}: {secret} logged: {log}");
            assert!(!letters.contains(secret), "{secret} in a dead-letter reason");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hec_echoed_token_redacted() {
    for log_format in ["text", "json"] {
        // 403 and 503 are retried and logged, the final 400 with code 6
        // dead-letters the batch.
        let receiver = HttpReceiver::start(|request| match request.index {
            0 => echo_headers(403, request),
            1 => echo_headers(503, request),
            _ => {
                let echoed = echo_headers(400, request).body;
                Answer::new(400, serde_json::json!({ "text": echoed, "code": 6 }).to_string())
            }
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let (output, letters) = run_echoed(dir.path(), &hec_sink_toml(&receiver.url(), ""), log_format, &[]).await;
        assert_dead_letters_stored(&output);

        let requests = receiver.requests_to(EVENT_PATH);
        assert_eq!(requests.len(), 2 + ALL_REJECTED_REQUESTS, "{log_format}");
        let log = stderr(&output);
        assert!(log.contains("HTTP 403"), "{log_format}: {log}");
        assert!(log.contains("HTTP 503"), "{log_format}: {log}");
        assert!(log.contains("authorization: [redacted]"), "{log_format}: {log}");
        assert!(!log.contains(HEC_TOKEN), "{log_format}: token logged: {log}");
        // A header line, then one row per detection.
        assert_eq!(letters.lines().count(), 1 + 46, "{letters}");
        assert!(letters.contains("HTTP 400: {\"text\":\"rejected request with headers"), "{letters}");
        assert!(letters.contains("authorization: [redacted]"), "{letters}");
        assert!(!letters.contains(HEC_TOKEN), "token in a dead-letter reason");
    }
}

/// A password, user name or query token in a sink URL never reaches the
/// log or `check-config`: neither in a status error nor in a connection
/// error, whose reqwest message would repeat the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_credentials_not_logged() {
    const USER: &str = "url-user-secret";
    const PASSWORD: &str = "url-password-secret";
    const TOKEN: &str = "url-query-secret";
    // A retried 500, then 400s that reject every detection; both echo the
    // request's query and headers, as some collectors do.
    let receiver = HttpReceiver::start(|request| {
        let status = if request.index == 0 { 500 } else { 400 };
        let mut answer = echo_headers(status, request);
        answer.body = format!("query {:?}\n{}", request.query, answer.body);
        answer
    })
    .await;
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let with_secrets = |base: &str| base.replacen("http://", &format!("http://{USER}:{PASSWORD}@"), 1) + &format!("/ingest?token={TOKEN}");
    let cases = [("answering", with_secrets(&receiver.url()), true), ("refusing", with_secrets(&format!("http://127.0.0.1:{closed_port}")), false)];
    for (name, url, delivers) in cases {
        let dir = tempfile::tempdir().unwrap();
        let sinks = format!("[[sink]]\nname = \"collector\"\ntype = \"http\"\nurl = \"{url}\"\nretry_initial_ms = 50\nretry_max_secs = 1\n");
        let emulator = emulator_with_samples(EmulatorOptions::default()).await;
        let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &sinks);
        let cfg = config.to_str().unwrap();

        let checked = run_cli(&["check-config", "--config", cfg]).await;
        assert_success(&checked);
        let output = run_cli(&["run", "--once", "--config", cfg]).await;
        // Exit code 3 when the receiver responds: it rejects the batch for good.
        let expected_code = if delivers { 3 } else { 1 };
        assert_eq!(output.status.code(), Some(expected_code), "{name}: {}", stderr(&output));
        let letters = run_cli(&["state", "--config", cfg, "dead-letters"]).await;
        assert_success(&letters);

        let log = stderr(&output);
        assert!(log.contains("redacted"), "{name}: the log shows the URL without its secrets: {log}");
        if delivers {
            assert!(stdout(&letters).contains("HTTP 400"), "{name}: the echoed rejection is a dead letter: {}", stdout(&letters));
        }
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
        for text in [stdout(&checked), stderr(&checked), log, stdout(&letters)] {
            assert!(!text.contains(&basic), "{name}: Basic credentials shown: {text}");
            for secret in [USER, PASSWORD, TOKEN] {
                assert!(!text.contains(secret), "{name}: {secret} shown: {text}");
            }
        }
    }
    let requests = receiver.requests_to("/ingest");
    assert_eq!(requests.len(), 1 + ALL_REJECTED_REQUESTS, "the answering receiver got the retry, then rejected the batch");
    let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}")));
    assert_eq!(requests[0].header("authorization"), Some(basic.as_str()), "the user and password go out as Basic authentication");
}

/// An HTTP sink with `proxy_url` sends through that proxy, whatever the
/// proxy environment variables contain, and a bad proxy URL is a config error
/// that names the key and hides the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_sink_uses_its_proxy() {
    // The proxy first fails and echoes the request's headers, as some do.
    let proxy = HttpReceiver::start(|request| if request.index == 0 { echo_headers(502, request) } else { Answer::new(200, "ok") }).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy_url = proxy.url().replacen("http://", "http://proxy-user:proxy-pass-987@", 1);
    let sinks = format!(
        "[[sink]]\nname = \"collector\"\ntype = \"http\"\nurl = \"http://collector.invalid/ingest\"\nproxy_url = \"{proxy_url}\"\nretry_initial_ms = 50\nretry_max_secs = 1\n"
    );
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &sinks);
    let cfg = config.to_str().unwrap();
    // The environment's proxy is closed: only the sink's own proxy_url works.
    let env = [("HTTP_PROXY", "http://127.0.0.1:1"), ("http_proxy", "http://127.0.0.1:1"), ("NO_PROXY", "127.0.0.1"), ("no_proxy", "127.0.0.1")];
    let output = run_cli_env(&["run", "--once", "--config", cfg], &env).await;
    assert_success(&output);

    let requests = proxy.requests_to("/ingest");
    assert_eq!(requests.len(), 2, "{}", stderr(&output));
    assert_eq!(requests[0].header("host"), Some("collector.invalid"), "the request went to the proxy for the sink's host");
    let basic = base64::engine::general_purpose::STANDARD.encode("proxy-user:proxy-pass-987");
    assert_eq!(requests[0].header("proxy-authorization"), Some(format!("Basic {basic}").as_str()));
    let log = stderr(&output);
    assert!(log.contains("HTTP 502"), "the echo was logged: {log}");
    assert!(!log.contains(&basic), "the proxy credentials stay out of the log: {log}");
    assert!(!log.contains("proxy-pass-987"), "the proxy password stays out of the log: {log}");
    let forwarded: Vec<Value> = serde_json::from_slice(&requests[1].body).unwrap();
    assert_eq!(forwarded.len(), sample_detections().len());

    let bad = sinks.replace(&proxy_url, "ftp://user:proxy-pass-123@proxy.example");
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &bad);
    let checked = run_cli(&["check-config", "--config", config.to_str().unwrap()]).await;
    assert!(!checked.status.success());
    let message = stderr(&checked);
    assert!(message.contains("proxy_url"), "{message}");
    assert!(!message.contains("proxy-pass-123"), "{message}");
}

/// An HTTP or HEC sink whose proxy refuses the connection names the proxy,
/// without its credentials, in the error, so the operator checks the proxy
/// and not the receiver. So does a sink whose proxy comes from HTTP_PROXY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_proxy_is_named() {
    // Nothing listens on this port once the listener is dropped.
    let closed = closed_addr();
    let proxy = format!("proxy_url = \"http://proxy-user:proxy-pass-987@{closed}\"");
    let env_proxy = format!("http://proxy-user:proxy-pass-987@{closed}");
    // NO_PROXY lets the forwarder reach the emulator directly.
    let proxy_env = [("HTTP_PROXY", env_proxy.as_str()), ("http_proxy", env_proxy.as_str()), ("NO_PROXY", "127.0.0.1"), ("no_proxy", "127.0.0.1")];
    let expected_proxy = format!("through proxy http://redacted:redacted@{closed}/");
    let expected_env_proxy = format!("through proxy http://{closed}/");
    let cases = [
        ("http", http_sink_toml("http://collector.invalid", &proxy), &[][..], &expected_proxy),
        ("splunk_hec", hec_sink_toml("http://splunk.invalid:8088", &proxy), &[][..], &expected_proxy),
        ("http from HTTP_PROXY", http_sink_toml("http://collector.invalid", ""), &proxy_env[..], &expected_env_proxy),
    ];
    for (name, sinks, env, expected) in cases {
        let emulator = emulator_with_samples(EmulatorOptions::default()).await;
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &sinks);

        let output = run_cli_env(&["run", "--once", "--config", config.to_str().unwrap()], env).await;

        let log = stderr(&output);
        assert!(!output.status.success(), "{name}: {log}");
        assert!(log.contains(expected.as_str()), "{name}: the proxy is named: {log}");
        assert!(log.contains("Connection refused"), "{name}: {log}");
        assert!(!log.contains("proxy-pass-987"), "{name}: the proxy password stays out of the log: {log}");
        assert!(!log.contains("proxy-user"), "{name}: the proxy user stays out of the log: {log}");
    }
}

/// `check-config --probe` connects to an HTTP or HEC sink's proxy, not to
/// the receiver, and names the proxy without its credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_connects_to_the_sink_proxy() {
    let listening = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let open = listening.local_addr().unwrap();
    let closed = closed_addr();
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    for (proxy, reachable) in [(open, true), (closed, false)] {
        let proxy_line = format!("proxy_url = \"http://proxy-user:proxy-pass-456@{proxy}\"");
        // The receivers' hosts do not resolve: only the proxy can be reached.
        let sinks = http_sink_toml("http://collector.invalid", &proxy_line) + &hec_sink_toml("http://splunk.invalid:8088", &proxy_line);
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &sinks);

        let output = run_cli(&["check-config", "--probe", "--config", config.to_str().unwrap()]).await;

        let text = stdout(&output) + &stderr(&output);
        assert_eq!(output.status.success(), reachable, "{text}");
        let redacted_proxy = format!("http://redacted:redacted@{proxy}/");
        let probed = if reachable { format!("TCP connection to proxy {redacted_proxy} opened") } else { format!("proxy {redacted_proxy}: connect to {proxy} failed") };
        assert_eq!(text.matches(&probed).count(), 2, "both sinks probe the proxy: {text}");
        assert!(!text.contains("proxy-pass-456"), "{text}");
        assert!(!text.contains("proxy-user"), "{text}");
    }
}

/// The largest request body the receivers of the 413 tests accept.
const RECEIVER_MAX_BODY: usize = 20_000;

/// Runs one sink against a receiver that responds with 413 to a body larger than
/// [`RECEIVER_MAX_BODY`] or containing the tenth sample detection, which
/// thus counts as too large even alone. Returns the FullIds the receiver
/// accepted with their counts, the oversized detection's FullId, and the
/// run's state directory.
async fn run_against_size_limit(sink_toml: impl Fn(&str) -> String, path: &str, ok: Answer) -> (HashMap<String, usize>, String, tempfile::TempDir) {
    let oversized = full_id_of(&sample_detections()[10]);
    let marker = oversized.clone();
    let accepts = move |body: &[u8]| body.len() <= RECEIVER_MAX_BODY && !String::from_utf8_lossy(body).contains(&marker);
    let accepted_by_receiver = accepts.clone();
    let ok = Arc::new(ok);
    let receiver = HttpReceiver::start(move |request| {
        if accepted_by_receiver(&request.body) {
            Answer::new(ok.status, ok.body.clone())
        } else {
            Answer::new(413, "request entity too large")
        }
    })
    .await;
    let (dir, output) = run_with(&sink_toml(&receiver.url())).await;
    assert_dead_letters_stored(&output);

    let mut counts = HashMap::new();
    for request in receiver.requests_to(path).iter().filter(|request| accepts(&request.body)) {
        let events: Vec<Value> = if path == EVENT_PATH {
            hec_events(&request.body).into_iter().map(|event| event["event"].clone()).collect()
        } else {
            serde_json::from_slice(&request.body).unwrap()
        };
        for event in &events {
            *counts.entry(full_id_of(event)).or_insert(0) += 1;
        }
    }
    let log = stderr(&output);
    assert!(log.contains("413"), "the split is logged: {log}");
    (counts, oversized, dir)
}

/// Checks the outcome of [`run_against_size_limit`]: every detection but
/// the oversized one delivered once, and that one a dead letter whose
/// reason names the fix.
fn assert_split_delivery(counts: &HashMap<String, usize>, oversized: &str, dir: &std::path::Path, sink: &str) {
    assert_eq!(counts.len(), 45, "every detection that fits is delivered");
    assert!(counts.values().all(|count| *count == 1), "none twice: {counts:?}");
    assert!(!counts.contains_key(oversized));

    let letters = dead_letters(dir);
    assert_eq!(letters.len(), 1, "only the detection too large alone is a dead letter");
    let letter: Value = serde_json::from_str(&letters[0].detection).unwrap();
    assert_eq!(full_id_of(&letter), oversized);
    let reason = &letters[0].reason;
    assert!(reason.contains("HTTP 413"), "{reason}");
    assert!(reason.contains(" bytes"), "the reason names the size: {reason}");
    assert!(reason.contains("raise the receiver's"), "the reason names the fix: {reason}");
    assert_eq!(pending(dir, sink), 0);
}

/// A detection that a receiver rejects as too large even alone, with no
/// limit on the size of the others, does not shrink every later batch to
/// one detection: only parts the receiver accepted set the batch size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_detection_leaves_batch_size() {
    let oversized = full_id_of(&sample_detections()[10]);
    let marker = oversized.clone();
    let receiver = HttpReceiver::start(move |request| {
        if String::from_utf8_lossy(&request.body).contains(&marker) {
            Answer::new(413, "request entity too large")
        } else {
            Answer::new(200, "ok")
        }
    })
    .await;
    let (dir, output) = run_with(&http_sink_toml(&receiver.url(), "")).await;
    assert_dead_letters_stored(&output);

    let accepted: Vec<Vec<Value>> = receiver
        .requests_to("/ingest")
        .iter()
        .filter(|request| !String::from_utf8_lossy(&request.body).contains(&oversized))
        .map(|request| serde_json::from_slice(&request.body).unwrap())
        .collect();
    let delivered: usize = accepted.iter().map(Vec::len).sum();
    assert_eq!(delivered, 45, "every other detection once");
    assert_eq!(dead_letters(dir.path()).len(), 1);
    // The 35 detections after the rejected one went in batches of the
    // largest accepted part (5 detections), not one request each.
    let single = accepted.iter().filter(|events| events.len() == 1).count();
    assert!(single <= 2, "{single} requests of one detection: {:?}", accepted.iter().map(Vec::len).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_payload_too_large_splits_batch() {
    let (counts, oversized, dir) = run_against_size_limit(|url| http_sink_toml(url, ""), "/ingest", Answer::new(200, "ok")).await;
    assert_split_delivery(&counts, &oversized, dir.path(), "collector");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hec_payload_too_large_splits_batch() {
    let (counts, oversized, dir) = run_against_size_limit(|url| hec_sink_toml(url, ""), EVENT_PATH, hec_ok()).await;
    assert_split_delivery(&counts, &oversized, dir.path(), "splunk");
}
