//! Percentiles and latency summaries.

use serde::{Deserialize, Serialize};

/// The `q`-th percentile (`q` in 0–100) of `sorted` (ascending), by linear interpolation between
/// the two closest ranks (NumPy's default, "linear"): rank `q/100 · (n − 1)`. `None` when
/// `sorted` is empty. `q` outside 0–100 is clamped.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = q.clamp(0.0, 100.0) / 100.0 * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    let frac = rank - lo as f64;
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * frac)
}

/// p50, p90, p99, max and mean of a set of samples (all in the samples' unit, ms in reports).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    /// The largest sample (reports written before it existed read as 0).
    #[serde(default)]
    pub max: f64,
    pub mean: f64,
    /// Number of samples.
    pub count: usize,
}

impl Summary {
    /// Summarise `values` (any order; NaNs are dropped). `None` when there is no sample.
    pub fn of(values: &[f64]) -> Option<Summary> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(Summary {
            p50: percentile(&v, 50.0)?,
            p90: percentile(&v, 90.0)?,
            p99: percentile(&v, 99.0)?,
            max: *v.last()?,
            mean: v.iter().sum::<f64>() / v.len() as f64,
            count: v.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_hand_computed_vector() {
        // 11 values 0, 10, …, 100 out of order: rank q/10 exactly.
        let v = [
            30.0, 0.0, 100.0, 10.0, 90.0, 20.0, 50.0, 40.0, 80.0, 60.0, 70.0,
        ];
        let s = Summary::of(&v).unwrap();
        assert_eq!(s.p50, 50.0);
        assert_eq!(s.p90, 90.0);
        // rank 9.9 → 90 + 0.9 · 10
        assert!((s.p99 - 99.0).abs() < 1e-9, "{}", s.p99);
        assert_eq!(s.mean, 50.0);
        assert_eq!(s.max, 100.0);
        assert_eq!(s.count, 11);

        // Four values: rank 0.5·3 = 1.5 → (2 + 4) / 2; rank 0.9·3 = 2.7 → 4 + 0.7·(10 − 4).
        let s = Summary::of(&[10.0, 1.0, 4.0, 2.0]).unwrap();
        assert_eq!(s.p50, 3.0);
        assert!((s.p90 - 8.2).abs() < 1e-9, "{}", s.p90);
        assert!((s.p99 - 9.82).abs() < 1e-9, "{}", s.p99);
        assert_eq!(s.mean, 4.25);

        let sorted = [1.0, 2.0, 4.0, 10.0];
        assert_eq!(percentile(&sorted, 0.0), Some(1.0));
        assert_eq!(percentile(&sorted, 100.0), Some(10.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(Summary::of(&[f64::NAN]), None);
    }
}
