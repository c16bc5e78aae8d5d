//! One scrape's metric families, built from the process's state at scrape time and encoded in
//! Prometheus' text format (version 0.0.4) by the `prometheus` crate's encoder.

use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::TextEncoder;

/// The media type of [`Exposition::encode`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Metric families in the order they were first named; each name has one type and one help.
#[derive(Debug, Default)]
pub struct Exposition {
    families: Vec<MetricFamily>,
}

impl Exposition {
    /// An empty scrape.
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// A sample of a counter (a name ending in `_total`).
    pub fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: u64) {
        let mut c = Counter::default();
        c.set_value(value as f64);
        let mut m = metric(labels);
        m.set_counter(c);
        self.family(name, help, MetricType::COUNTER).mut_metric().push(m);
    }

    /// A sample of a gauge.
    pub fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        let mut g = Gauge::default();
        g.set_value(value);
        let mut m = metric(labels);
        m.set_gauge(g);
        self.family(name, help, MetricType::GAUGE).mut_metric().push(m);
    }

    /// A gauge that is 1 or 0.
    pub fn flag(&mut self, name: &str, help: &str, labels: &[(&str, &str)], on: bool) {
        self.gauge(name, help, labels, if on { 1.0 } else { 0.0 });
    }

    /// One gauge per possible value of `label`: 1 for `current`, 0 for the others (so a
    /// query can tell "not this state" from "no data").
    /// `labels` are added to each.
    pub fn state_set(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        (label, values): (&str, &[&str]),
        current: Option<&str>,
    ) {
        for v in values {
            let mut all = labels.to_vec();
            all.push((label, v));
            self.flag(name, help, &all, current == Some(*v));
        }
    }

    /// A histogram (see [`histogram`](super::histogram::histogram)), read now.
    pub fn histogram(&mut self, name: &str, help: &str, labels: &[(&str, &str)], h: &prometheus::Histogram) {
        let mut m = prometheus::core::Metric::metric(h);
        m.set_label(metric(labels).take_label());
        self.family(name, help, MetricType::HISTOGRAM).mut_metric().push(m);
    }

    /// The scrape's text.
    pub fn encode(&self) -> Result<String, prometheus::Error> {
        TextEncoder::new().encode_to_string(&self.families)
    }

    fn family(&mut self, name: &str, help: &str, kind: MetricType) -> &mut MetricFamily {
        debug_assert!(valid_name(name), "metric name {name:?}");
        debug_assert_eq!(kind == MetricType::COUNTER, name.ends_with("_total"), "{name}: counters end in _total");
        let i = match self.families.iter().position(|f| f.name() == name) {
            Some(i) => {
                debug_assert_eq!(self.families[i].get_field_type(), kind, "{name} has one type");
                i
            }
            None => {
                let mut f = MetricFamily::default();
                f.set_name(name.to_string());
                f.set_help(help.to_string());
                f.set_field_type(kind);
                self.families.push(f);
                self.families.len() - 1
            }
        };
        &mut self.families[i]
    }
}

fn metric(labels: &[(&str, &str)]) -> Metric {
    Metric::from_label(
        labels
            .iter()
            .map(|(k, v)| {
                debug_assert!(valid_name(k) && !k.contains(':') && !k.starts_with("__"), "label name {k:?}");
                let mut l = LabelPair::default();
                l.set_name(k.to_string());
                l.set_value(v.to_string());
                l
            })
            .collect(),
    )
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_group_samples_and_encode_as_text() {
        let mut x = Exposition::new();
        x.counter("t_frames_total", "Frames.", &[("side", "primary")], 3);
        x.gauge("t_flows", "Flows.", &[], 2.5);
        x.counter("t_frames_total", "Frames.", &[("side", "secondary")], 4);
        x.state_set("t_mode", "Mode.", &[], ("mode", &["colo", "passive"]), Some("passive"));
        let h = super::super::histogram(&[0.001, 0.01]);
        h.observe(0.005);
        x.histogram("t_hold_seconds", "Hold \"time\"\nof frames.", &[("nic", "a\"b\\c")], &h);
        let text = x.encode().unwrap();
        let expected = "# HELP t_frames_total Frames.
# TYPE t_frames_total counter
t_frames_total{side=\"primary\"} 3
t_frames_total{side=\"secondary\"} 4
# HELP t_flows Flows.
# TYPE t_flows gauge
t_flows 2.5
# HELP t_mode Mode.
# TYPE t_mode gauge
t_mode{mode=\"colo\"} 0
t_mode{mode=\"passive\"} 1
# HELP t_hold_seconds Hold \"time\"\\nof frames.
# TYPE t_hold_seconds histogram
t_hold_seconds_bucket{nic=\"a\\\"b\\\\c\",le=\"0.001\"} 0
t_hold_seconds_bucket{nic=\"a\\\"b\\\\c\",le=\"0.01\"} 1
t_hold_seconds_bucket{nic=\"a\\\"b\\\\c\",le=\"+Inf\"} 1
t_hold_seconds_sum{nic=\"a\\\"b\\\\c\"} 0.005
t_hold_seconds_count{nic=\"a\\\"b\\\\c\"} 1
";
        assert_eq!(text, expected);
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("colo_checkpoints_total") && valid_name("_x:y"));
        assert!(!valid_name("") && !valid_name("1x") && !valid_name("a-b"));
    }
}
