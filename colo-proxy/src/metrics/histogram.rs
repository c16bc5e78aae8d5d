//! Distributions counted into fixed buckets since start (a checkpoint's pause, a frame's hold
//! time): the `prometheus` crate's histograms, whose counts are atomics, so the recording side
//! observes without a lock and the metrics thread reads them at scrape time.

/// An empty histogram with these upper bounds (ascending, finite; `+Inf` is implied). Its
/// name is given when it is exposed ([`Exposition::histogram`](super::Exposition::histogram)).
pub fn histogram(bounds: &[f64]) -> prometheus::Histogram {
    prometheus::Histogram::with_opts(
        prometheus::HistogramOpts::new("unnamed", "named when exposed").buckets(bounds.to_vec()),
    )
    .expect("ascending bucket bounds")
}

#[cfg(test)]
mod tests {
    use prometheus::core::Metric;

    use super::*;

    #[test]
    fn buckets_are_cumulative_and_bounds_inclusive() {
        let h = histogram(&[1.0, 2.0, 4.0]);
        for v in [0.5, 1.0, 1.5, 2.0, 3.0, 9.0] {
            h.observe(v);
        }
        let m = h.metric();
        let p = m.get_histogram();
        let buckets: Vec<(f64, u64)> = p.get_bucket().iter().map(|b| (b.upper_bound(), b.cumulative_count())).collect();
        assert_eq!(buckets, vec![(1.0, 2), (2.0, 4), (4.0, 5)]);
        assert_eq!((p.get_sample_count(), p.get_sample_sum()), (6, 17.0));
    }
}
