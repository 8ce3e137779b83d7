//! Decoding an API response: the forwarder's streaming decoder next to plain
//! serde_json over the same bytes.
//!
//! Run with `cargo bench --bench decode`. Throughput is in detections per
//! second; `docs/BENCHMARKS.md` records the results.

mod support;

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mde_forwarder::detection::Detection;
use mde_forwarder::json_stream::{ArraySplitter, RawElement};
use serde_json::value::RawValue;
use serde_json::Value;

/// Size of the pieces fed to the splitter, close to what the HTTP client
/// hands over per read.
const CHUNK_BYTES: usize = 16 * 1024;

/// Splits `body` as the poller does (chunk by chunk) and builds a
/// [`Detection`] from each element. Returns the number of detections.
fn split_and_parse(body: &[u8]) -> usize {
    let mut splitter = ArraySplitter::new();
    let mut elements = Vec::new();
    let mut detections = 0;
    let mut take = |elements: &mut Vec<RawElement>| {
        for element in elements.drain(..) {
            let text = String::from_utf8(element.bytes).expect("the body is UTF-8");
            let detection = match element.keys {
                Some(keys) => Detection::from_scanned(text, keys),
                None => Detection::from_string(text).map_err(|(_, error)| error).expect("a valid detection"),
            };
            black_box(&detection);
            detections += 1;
        }
    };
    for chunk in body.chunks(CHUNK_BYTES) {
        splitter.push(chunk, &mut elements).expect("the body is a valid JSON array");
        take(&mut elements);
    }
    splitter.finish(&mut elements).expect("the body is one complete array");
    take(&mut elements);
    detections
}

fn decode(c: &mut Criterion) {
    let texts = support::detection_texts(support::DETECTIONS);
    let body = support::response_body(&texts);
    let count = texts.len();

    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(count as u64));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(10));

    group.bench_function("splitter_from_string", |b| {
        b.iter(|| assert_eq!(split_and_parse(black_box(&body)), count))
    });

    // Baselines: serde_json parsing the whole body at once, with no streaming.
    group.bench_function("serde_value", |b| {
        b.iter(|| {
            let values: Vec<Value> = serde_json::from_slice(black_box(&body)).expect("a valid array");
            assert_eq!(values.len(), count);
        })
    });
    group.bench_function("serde_raw_to_detection", |b| {
        b.iter(|| {
            let elements: Vec<&RawValue> = serde_json::from_slice(black_box(&body)).expect("a valid array");
            let detections: Vec<Detection> =
                elements.iter().map(|raw| Detection::from_raw(raw).expect("a valid detection")).collect();
            assert_eq!(detections.len(), count);
        })
    });
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
