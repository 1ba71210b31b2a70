//! The timing model: how long one engine step takes.
//!
//! Dynamo mocker's default "polynomial" model (`dynamo-router-spec.md` §15.2, from
//! `lib/mocker/src/common/perf_model.rs`):
//!
//! * prefill_ms = 4.209989e-7·T² + 1.518344e-2·T + 16.50142, T = new (uncached) prefill tokens
//!   computed in the step; 0 ms when the step computes none;
//! * decode_ms = −25.74·p² + 54.01·p + 5.74, at least 1 ms, p = KV-cache utilisation in [0, 1];
//!   0 ms when the step decodes nothing.
//!
//! A step that does both costs their sum. Wall time divides by `speedup_ratio` (0 = no delay at
//! all) and decode time additionally by `decode_speedup_ratio`.

/// Model milliseconds to prefill `new_tokens` uncached tokens in one step (spec §15.2).
pub fn prefill_ms(new_tokens: usize) -> f64 {
    if new_tokens == 0 {
        return 0.0;
    }
    let t = new_tokens as f64;
    4.209989e-7 * t * t + 1.518344e-2 * t + 16.50142
}

/// Model milliseconds of one decode step at KV utilisation `p` (0..=1) (spec §15.2), ≥ 1 ms.
pub fn decode_ms(p: f64) -> f64 {
    let p = p.clamp(0.0, 1.0);
    (-25.74 * p * p + 54.01 * p + 5.74).max(1.0)
}

/// Wall-clock scaling of the model times.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TimingModel {
    /// Divides every duration; 0 means "no delay at all".
    pub speedup_ratio: f64,
    /// Further divides decode durations (models speculative decoding); must be > 0.
    pub decode_speedup_ratio: f64,
}

impl Default for TimingModel {
    fn default() -> Self {
        Self {
            speedup_ratio: 1.0,
            decode_speedup_ratio: 1.0,
        }
    }
}

impl TimingModel {
    /// Wall seconds of a step that prefilled `prefill_tokens` new tokens and, if `decoded`,
    /// ran a decode pass at utilisation `p`.
    pub fn step_seconds(&self, prefill_tokens: usize, decoded: bool, p: f64) -> f64 {
        if self.speedup_ratio <= 0.0 {
            return 0.0;
        }
        let mut ms = prefill_ms(prefill_tokens) / self.speedup_ratio;
        if decoded {
            ms += decode_ms(p) / (self.speedup_ratio * self.decode_speedup_ratio);
        }
        ms / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polynomial_values() {
        assert_eq!(prefill_ms(0), 0.0);
        let t = 4096.0;
        let want = 4.209989e-7 * t * t + 1.518344e-2 * t + 16.50142;
        assert!((prefill_ms(4096) - want).abs() < 1e-9);
        assert!(
            (prefill_ms(4096) - 85.75).abs() < 0.05,
            "{}",
            prefill_ms(4096)
        );
        assert!((decode_ms(0.0) - 5.74).abs() < 1e-12);
        assert!((decode_ms(0.5) - (-25.74 * 0.25 + 54.01 * 0.5 + 5.74)).abs() < 1e-12);
        assert!((decode_ms(1.0) - 34.01).abs() < 1e-9);
    }

    #[test]
    fn scaling() {
        let m = TimingModel {
            speedup_ratio: 2.0,
            decode_speedup_ratio: 4.0,
        };
        let s = m.step_seconds(100, true, 0.0);
        let want = (prefill_ms(100) / 2.0 + 5.74 / 8.0) / 1000.0;
        assert!((s - want).abs() < 1e-12);
        assert_eq!(m.step_seconds(0, false, 0.3), 0.0);
        let off = TimingModel {
            speedup_ratio: 0.0,
            decode_speedup_ratio: 1.0,
        };
        assert_eq!(off.step_seconds(4096, true, 1.0), 0.0);
    }
}
