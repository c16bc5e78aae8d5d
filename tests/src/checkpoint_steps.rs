//! The step times a primary colo-vmm logs with every checkpoint (`step_<name>_ms` on its
//! `checkpoint` line), read back from its log for the benchmarks' per-step tables.

/// The steps of a checkpoint, in order (`loaded`, waiting for the secondary to load, was in the
/// pause until the PVM resumed before the load: a step a log does not have is left out).
pub const STEPS: [&str; 9] = ["pause", "dirty", "pages", "marks", "state", "received", "commit", "loaded", "resume"];

/// One checkpoint's step times, ms, in the order of [`STEPS`].
pub type StepTimes = [Option<f64>; STEPS.len()];

/// The value of ` key=` on a log line, as a number.
fn field(line: &str, key: &str) -> Option<f64> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..].split(|c: char| c.is_whitespace()).next()?.parse().ok()
}

/// The step times of the checkpoints in `log` whose seq is above `from`: one row per checkpoint.
pub fn step_times(log: &str, from: u64) -> Vec<StepTimes> {
    log.lines()
        .filter(|l| l.contains("step_pause_ms="))
        .filter(|l| field(l, "seq").is_some_and(|s| s as u64 > from))
        .map(|l| {
            let mut row = [None; STEPS.len()];
            for (v, k) in row.iter_mut().zip(STEPS) {
                *v = field(l, &format!("step_{k}_ms"));
            }
            row
        })
        .collect()
}

/// The median of each step over `rows` (`None` for a step no row has).
pub fn median_steps(rows: &[StepTimes]) -> StepTimes {
    let mut out = [None; STEPS.len()];
    for (i, s) in out.iter_mut().enumerate() {
        let mut v: Vec<f64> = rows.iter().filter_map(|t| t[i]).collect();
        if v.is_empty() {
            continue;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        *s = Some(v[v.len() / 2]);
    }
    out
}

/// A markdown table header's cells for the steps (`pause`, the vCPUs' and rings' stop, as
/// `vm pause`, apart from the whole pause).
pub fn header() -> String {
    STEPS.map(|s| if s == "pause" { "vm pause" } else { s }).join(" | ")
}

/// A markdown table row's cells for `steps` (`–` where a step is missing).
pub fn cells(steps: &StepTimes) -> String {
    steps.iter().map(|v| v.map_or("–".into(), |v| format!("{v:.3}"))).collect::<Vec<_>>().join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_read_from_checkpoint_lines_after_the_given_seq() {
        let log = "x checkpoint seq=1 step_pause_ms=9 step_pages_ms=9\n\
                   x checkpoint seq=2 step_pause_ms=0.5 step_pages_ms=3.25 step_resume_ms=1\n\
                   x checkpoint seq=3 step_pause_ms=1.5 step_pages_ms=4.75\n\
                   other line seq=4\n";
        let rows = step_times(log, 1);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0][0], Some(0.5));
        assert_eq!(rows[0][2], Some(3.25));
        assert_eq!(rows[1][8], None);
        let m = median_steps(&rows);
        assert_eq!(m[0], Some(1.5));
        assert_eq!(m[8], Some(1.0));
        assert_eq!(m[1], None);
        assert!(cells(&m).starts_with("1.500 | – | 4.750"));
    }
}
