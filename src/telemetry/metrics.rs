//! A small Prometheus registry: labelled counters and gauges kept as atomic
//! `f64` bits and rendered in the text exposition format, version 0.0.4.
//!
//! Each metric is declared once as a [`Metric`] constant, so its name, help
//! text and type cannot differ between the places that update it.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// A metric family: its name, help text and type.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
}

type Labels = Vec<(&'static str, String)>;

struct Family {
    metric: Metric,
    series: BTreeMap<Labels, Arc<AtomicU64>>,
}

/// Every series by metric name, in name order for stable output.
#[derive(Default)]
pub struct Registry {
    families: Mutex<BTreeMap<&'static str, Family>>,
}

impl Registry {
    /// Adds `value` to a counter (or gauge) series, creating it at 0.
    pub fn add(&self, metric: &Metric, labels: &[(&'static str, &str)], value: f64) {
        let cell = self.cell(metric, labels);
        let mut current = cell.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(current) + value).to_bits();
            match cell.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    /// Sets a gauge series.
    pub fn set(&self, metric: &Metric, labels: &[(&'static str, &str)], value: f64) {
        self.cell(metric, labels).store(value.to_bits(), Ordering::Relaxed);
    }

    /// Removes every series of `metric`, so that gauges of removed tenants
    /// or sinks disappear before the current ones are set again.
    pub fn clear(&self, metric: &Metric) {
        if let Some(family) = self.lock().get_mut(metric.name) {
            family.series.clear();
        }
    }

    /// Returns the current value of one series, if it exists.
    pub fn value(&self, metric: &Metric, labels: &[(&'static str, &str)]) -> Option<f64> {
        let key = owned_labels(labels);
        let families = self.lock();
        let cell = families.get(metric.name)?.series.get(&key)?;
        Some(f64::from_bits(cell.load(Ordering::Relaxed)))
    }

    /// Renders every family in the Prometheus text format.
    pub fn render(&self) -> String {
        let families = self.lock();
        let mut out = String::new();
        for family in families.values() {
            let kind = match family.metric.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            };
            let _ = writeln!(out, "# HELP {} {}", family.metric.name, escape_help(family.metric.help));
            let _ = writeln!(out, "# TYPE {} {kind}", family.metric.name);
            for (labels, cell) in &family.series {
                out.push_str(family.metric.name);
                write_labels(&mut out, labels);
                let _ = writeln!(out, " {}", format_value(f64::from_bits(cell.load(Ordering::Relaxed))));
            }
        }
        out
    }

    fn cell(&self, metric: &Metric, labels: &[(&'static str, &str)]) -> Arc<AtomicU64> {
        let mut families = self.lock();
        let family = families
            .entry(metric.name)
            .or_insert_with(|| Family { metric: *metric, series: BTreeMap::new() });
        family.series.entry(owned_labels(labels)).or_insert_with(|| Arc::new(AtomicU64::new(0f64.to_bits()))).clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Family>> {
        // A panic while holding the lock leaves plain numbers behind, which
        // are still valid to read and update.
        self.families.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn owned_labels(labels: &[(&'static str, &str)]) -> Labels {
    labels.iter().map(|(name, value)| (*name, value.to_string())).collect()
}

fn write_labels(out: &mut String, labels: &Labels) {
    if labels.is_empty() {
        return;
    }
    out.push('{');
    for (i, (name, value)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{name}=\"{}\"", escape_label(value));
    }
    out.push('}');
}

/// Label values escape backslash, double quote and line feed.
fn escape_label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Help text escapes backslash and line feed.
fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUESTS: Metric = Metric { name: "test_requests_total", help: "Requests.\nSecond line", kind: Kind::Counter };
    const DEPTH: Metric = Metric { name: "test_depth", help: "Depth.", kind: Kind::Gauge };

    #[test]
    fn render_lists_help_type_and_series() {
        let registry = Registry::default();
        registry.add(&REQUESTS, &[("tenant", "contoso")], 2.0);
        registry.add(&REQUESTS, &[("tenant", "contoso")], 3.0);
        registry.set(&DEPTH, &[], 0.25);

        let text = registry.render();

        assert!(text.contains("# HELP test_requests_total Requests.\\nSecond line\n"), "{text}");
        assert!(text.contains("# TYPE test_requests_total counter\n"), "{text}");
        assert!(text.contains("test_requests_total{tenant=\"contoso\"} 5\n"), "{text}");
        assert!(text.contains("# TYPE test_depth gauge\ntest_depth 0.25\n"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let registry = Registry::default();
        registry.add(&REQUESTS, &[("sink", "a\"b\\c\nd")], 1.0);

        assert!(registry.render().contains("test_requests_total{sink=\"a\\\"b\\\\c\\nd\"} 1\n"));
    }

    #[test]
    fn clear_removes_stale_series() {
        let registry = Registry::default();
        registry.set(&DEPTH, &[("sink", "old")], 4.0);
        registry.clear(&DEPTH);
        registry.set(&DEPTH, &[("sink", "new")], 1.0);

        assert_eq!(registry.value(&DEPTH, &[("sink", "old")]), None);
        assert_eq!(registry.value(&DEPTH, &[("sink", "new")]), Some(1.0));
    }

    #[test]
    fn concurrent_adds_are_not_lost() {
        let registry = Arc::new(Registry::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let registry = registry.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        registry.add(&REQUESTS, &[], 1.0);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }

        assert_eq!(registry.value(&REQUESTS, &[]), Some(4000.0));
    }
}
