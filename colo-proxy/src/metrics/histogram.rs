//! A distribution counted into fixed buckets since start, as Prometheus histograms expose it:
//! plain data that the recording side keeps (a checkpoint's pause, a frame's hold time) and the
//! metrics endpoint reads at scrape time.

/// Counts of observations at most each upper bound, plus their sum.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// Upper bounds, ascending; `+Inf` is implied after the last.
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); one more than `bounds` (the `+Inf` bucket).
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Default for Histogram {
    /// No finite bucket: only the count and the sum.
    fn default() -> Histogram {
        Histogram::new(&[])
    }
}

impl Histogram {
    /// An empty histogram with these upper bounds (ascending, finite).
    pub fn new(bounds: &'static [f64]) -> Histogram {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]) && bounds.iter().all(|b| b.is_finite()));
        Histogram { bounds, counts: vec![0; bounds.len() + 1], sum: 0.0, count: 0 }
    }

    /// Counts one observation.
    pub fn observe(&mut self, value: f64) {
        self.observe_many(value, 1);
    }

    /// Counts `n` observations of `value` (into the first bucket whose bound is at least it).
    pub fn observe_many(&mut self, value: f64, n: u64) {
        let i = self.bounds.partition_point(|b| *b < value);
        self.counts[i] += n;
        self.sum += value * n as f64;
        self.count += n;
    }

    /// Replaces the sum (when the recording side keeps an exact one and the values counted
    /// were rounded).
    pub fn with_sum(mut self, sum: f64) -> Histogram {
        self.sum = sum;
        self
    }

    /// `(upper bound, observations at most it)` for each finite bound.
    pub fn cumulative(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        let mut total = 0;
        self.bounds.iter().zip(&self.counts).map(move |(b, n)| {
            total += n;
            (*b, total)
        })
    }

    /// The sum of all observations.
    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// The number of observations.
    pub fn count(&self) -> u64 {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_bounds_inclusive() {
        static B: [f64; 3] = [1.0, 2.0, 4.0];
        let mut h = Histogram::new(&B);
        for v in [0.5, 1.0, 1.5, 3.0, 9.0] {
            h.observe(v);
        }
        h.observe_many(2.0, 3);
        assert_eq!(h.cumulative().collect::<Vec<_>>(), vec![(1.0, 2), (2.0, 6), (4.0, 7)]);
        assert_eq!((h.count(), h.sum()), (8, 21.0));
        assert_eq!(h.clone().with_sum(1.5).sum(), 1.5);
    }

    #[test]
    fn the_default_has_only_the_infinite_bucket() {
        let mut h = Histogram::default();
        h.observe(5.0);
        assert_eq!(h.cumulative().count(), 0);
        assert_eq!(h.count(), 1);
    }
}
