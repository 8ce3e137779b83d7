//! Benchmark input shared by the decode and encode benches: a JSON array of
//! realistic detections as the API sends it.

use mde_forwarder::emulator::sample_detections;
use serde_json::Value;

/// Detections per generated array. At about 2 KB each the array is about
/// 10 MB, large enough that per-call overhead does not show.
pub const DETECTIONS: usize = 5_000;

/// Minimum size of one detection in bytes of compact JSON.
pub const DETECTION_BYTES: usize = 2_048;

/// Returns `count` detections as compact JSON objects: the samples from
/// `tests/data/detections.json` in turn, each with a unique `FullId` and
/// `CommandLine` padded so the object is at least [`DETECTION_BYTES`] long.
pub fn detection_texts(count: usize) -> Vec<String> {
    let samples = sample_detections();
    assert!(!samples.is_empty(), "no sample detections in tests/data/detections.json");

    (0..count)
        .map(|index| {
            let mut detection = samples[index % samples.len()].clone();
            let fields = detection.as_object_mut().expect("every sample is a JSON object");
            let alert_id = format!("da{:020}_{index}", 639_316_227_948_225_237u64 + index as u64);
            let full_id = format!("{alert_id}:{index:016x}");
            fields.insert("AlertId".into(), Value::String(alert_id));
            fields.insert("FullId".into(), Value::String(full_id));

            let length = serde_json::to_string(&detection).expect("a Value serializes").len();
            if length < DETECTION_BYTES {
                let padding = " --arg".repeat((DETECTION_BYTES - length).div_ceil(6));
                let fields = detection.as_object_mut().expect("every sample is a JSON object");
                match fields.get_mut("CommandLine") {
                    Some(Value::String(text)) => text.push_str(&padding),
                    _ => {
                        fields.insert("CommandLine".into(), Value::String(padding));
                    }
                }
            }
            serde_json::to_string(&detection).expect("a Value serializes")
        })
        .collect()
}

/// Joins detections into the body of one API response: a JSON array.
#[allow(dead_code)] // Each bench compiles this module, and only `decode` uses it.
pub fn response_body(texts: &[String]) -> Vec<u8> {
    let mut body = Vec::with_capacity(texts.iter().map(|text| text.len() + 1).sum::<usize>() + 2);
    body.push(b'[');
    for (index, text) in texts.iter().enumerate() {
        if index > 0 {
            body.push(b',');
        }
        body.extend_from_slice(text.as_bytes());
    }
    body.push(b']');
    body
}
