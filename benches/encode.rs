//! Encoding detections with each wire format of `mde_forwarder::format`.
//!
//! Run with `cargo bench --bench encode`. Throughput is in detections per
//! second; `docs/BENCHMARKS.md` records the results.
//!
//! Group `encode` gives each iteration freshly decoded detections, as a sink
//! worker has them: the field map is parsed on first use, inside the timed
//! part. Group `encode_parsed` encodes detections whose fields are already
//! parsed, which isolates the formatting itself.

mod support;

use std::hint::black_box;
use std::time::Duration;

use chrono::Utc;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use mde_forwarder::detection::Detection;
use mde_forwarder::format::{
    CefOptions, Encoder, EncoderOptions, Facility, Framing, HeaderFormat, LeefOptions, PayloadFormat,
};

/// The encoders measured: a name and the payload, header and framing.
const VARIANTS: [(&str, PayloadFormat, HeaderFormat, Framing); 6] = [
    ("cef", PayloadFormat::Cef, HeaderFormat::None, Framing::Newline),
    ("leef", PayloadFormat::Leef, HeaderFormat::None, Framing::Newline),
    ("json", PayloadFormat::Json, HeaderFormat::None, Framing::Newline),
    ("cef_rfc5424_newline", PayloadFormat::Cef, HeaderFormat::Rfc5424, Framing::Newline),
    ("cef_rfc5424_octet_counting", PayloadFormat::Cef, HeaderFormat::Rfc5424, Framing::OctetCounting),
    ("cef_rfc3164_newline", PayloadFormat::Cef, HeaderFormat::Rfc3164, Framing::Newline),
];

fn encoder(payload: PayloadFormat, header: HeaderFormat, framing: Framing) -> Encoder {
    Encoder::new(EncoderOptions {
        payload,
        header,
        framing,
        facility: Facility::LOCAL0,
        hostname: "collector01".to_owned(),
        app_name: "mde-forwarder".to_owned(),
        cef: CefOptions::default(),
        leef: LeefOptions::default(),
        max_message_bytes: None,
    })
}

fn decode_all(texts: &[String]) -> Vec<Detection> {
    texts.iter().map(|text| Detection::from_json_text(text).expect("a valid detection")).collect()
}

/// Encodes every detection into one reused buffer, as a sink does per batch.
fn encode_all(encoder: &Encoder, detections: &[Detection], out: &mut Vec<u8>) {
    let now = Utc::now();
    for detection in detections {
        out.clear();
        encoder.encode(detection, now, out);
        black_box(&out);
    }
}

fn encode(c: &mut Criterion) {
    let texts = support::detection_texts(support::DETECTIONS);

    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(texts.len() as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    for (name, payload, header, framing) in VARIANTS {
        let encoder = encoder(payload, header, framing);
        let mut out = Vec::with_capacity(16 * 1024);
        group.bench_function(name, |b| {
            b.iter_batched(
                || decode_all(&texts),
                |detections| encode_all(&encoder, &detections, &mut out),
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();

    let parsed = decode_all(&texts);
    for detection in &parsed {
        black_box(detection.fields().count());
    }
    let mut group = c.benchmark_group("encode_parsed");
    group.throughput(Throughput::Elements(parsed.len() as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    for (name, payload, header, framing) in VARIANTS {
        let encoder = encoder(payload, header, framing);
        let mut out = Vec::with_capacity(16 * 1024);
        group.bench_function(name, |b| b.iter(|| encode_all(&encoder, &parsed, &mut out)));
    }
    group.finish();
}

criterion_group!(benches, encode);
criterion_main!(benches);
